-- Workload 1: one message per transaction, as bussig.send writes it (~100-byte payload, headers NULL).
INSERT INTO message (queue_id, payload, headers, visible_at, priority)
VALUES (1, '{"id": 123456, "kind": "order.created", "customer": "customer-000042", "amount": 1999, "currency": "EUR"}',
        NULL, now(), 0)
RETURNING message_id;
