-- Workload 3: read (lock the next 10 ready messages of queue 1, found by the delivery-order index and
-- updated by ctid, as bussig's read), then ack them in a second transaction (bussig's ACK_BATCH).
WITH picked AS (
    SELECT ctid AS row_ctid FROM message
    WHERE queue_id = 1 AND priority = 0 AND visible_at <= now()
    ORDER BY priority DESC, visible_at, message_id
    LIMIT 10
    FOR UPDATE SKIP LOCKED
), locked AS (
    UPDATE message m
    SET lock_token = gen_random_uuid(), visible_at = now() + interval '30 s', delivery_count = m.delivery_count + 1
    FROM picked WHERE m.ctid = picked.row_ctid
    RETURNING m.message_id, m.lock_token, m.payload, m.headers, m.delivery_count, m.enqueued_at
)
SELECT array_agg(message_id) AS ids, array_agg(lock_token) AS tokens FROM locked
\gset
DELETE FROM message
WHERE message_id = ANY (CAST(:ids AS bigint[])) AND queue_id = 1 AND lock_token = ANY (CAST(:tokens AS uuid[]));
