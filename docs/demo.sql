-- The `make run` demo: a queue, a message's life, and a message that fails until it is dead-lettered.
\pset footer off
\echo
\echo '== create queue demo.orders (it gets dead-letter queue demo.orders_dlq)'
SELECT bussig.create_queue('demo.orders', max_deliveries => 3, retry_delay => '0');
\echo '== send two messages, one of them urgent'
SELECT bussig.send('demo.orders', '{"order": 1001, "item": "book"}', correlation_id => 'web-1') AS message_id;
SELECT bussig.send('demo.orders', '{"order": 1002, "item": "pen"}', priority => 9) AS message_id;
\echo '== read two: the urgent one comes first, each under its own lock token'
CREATE TEMP TABLE delivery AS SELECT * FROM bussig.read('demo.orders', 2);
SELECT message_id, lock_token, payload, delivery_count FROM delivery;
\echo '== ack both: they are gone'
SELECT bussig.ack('demo.orders', message_id, lock_token) AS acked FROM delivery;
SELECT queue, ready, delayed, locked FROM bussig.queues WHERE queue LIKE 'demo.orders%';

\echo '== a poison message: every delivery fails (nack), max_deliveries is 3'
SELECT bussig.send('demo.orders', '{"order": 1003, "item": null}') AS message_id;
SELECT message_id, delivery_count, bussig.nack('demo.orders', message_id, lock_token, error => 'item is null') AS nacked
FROM bussig.read('demo.orders');
SELECT message_id, delivery_count, bussig.nack('demo.orders', message_id, lock_token, error => 'item is null') AS nacked
FROM bussig.read('demo.orders');
SELECT message_id, delivery_count, bussig.nack('demo.orders', message_id, lock_token, error => 'item is null') AS nacked
FROM bussig.read('demo.orders');
\echo '== after its third failure it waits in the dead-letter queue, with the reason'
SELECT message_id, payload, headers FROM bussig.peek('demo.orders_dlq');
\echo '== redrive it back once the bug is fixed'
SELECT bussig.redrive('demo.orders') AS redriven;
SELECT message_id, state, payload FROM bussig.peek('demo.orders');

\echo '== clean up'
SELECT bussig.drop_queue('demo.orders');
