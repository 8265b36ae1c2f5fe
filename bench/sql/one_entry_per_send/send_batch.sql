-- Workload 2: 100 messages per statement, as bussig.send_batch's INSERT ... SELECT.
INSERT INTO message (queue_id, payload, headers, visible_at, priority)
SELECT 1, '{"id": 123456, "kind": "order.created", "customer": "customer-000042", "amount": 1999, "currency": "EUR"}'::jsonb,
       NULL, now(), 0
FROM generate_series(1, 100)
RETURNING message_id;
