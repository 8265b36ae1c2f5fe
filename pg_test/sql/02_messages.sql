-- Delivery order, delays and de-duplication.
SELECT bussig.create_queue('inbox');
SELECT bussig.send('inbox', '{"job": "resize"}', headers => '{"trace": "t1"}',
                   correlation_id => 'c-7', reply_to => 'results') IS NOT NULL AS sent;
SELECT bussig.send('inbox', '{"job": "urgent"}', priority => 10) IS NOT NULL AS sent;
SELECT bussig.send('inbox', '{"job": "later"}', delay => '1 hour') IS NOT NULL AS sent;
SELECT bussig.send('inbox', '{"job": "once"}', dedup_id => 'k1') IS NOT NULL AS sent;
SELECT bussig.send('inbox', '{"job": "once again"}', dedup_id => 'k1') IS NULL AS deduplicated;

-- Browse without locking: ready ones in delivery order, then the rest.
SELECT state, payload, priority, delivery_count FROM bussig.peek('inbox');

-- Highest priority first, then oldest; each delivery gets its own lock token.
CREATE TEMP TABLE got AS SELECT * FROM bussig.read('inbox', 2);
SELECT payload, headers, delivery_count, correlation_id, reply_to FROM got;
SELECT count(DISTINCT lock_token) AS tokens FROM got;
SELECT bussig.ack_batch('inbox', array_agg(message_id), array_agg(lock_token)) FROM got;
SELECT bussig.ack_batch('inbox', array_agg(message_id), array_agg(lock_token)) AS stale FROM got;
-- How many messages a queue holds is exact at every look; the split is the worker's count.
SELECT bussig.queue_depth('inbox'), messages FROM bussig.queues WHERE queue = 'inbox';
SELECT (bussig.run_maintenance() ->> 'counted_queues') IS NOT NULL AS counted;
SELECT queue, ready, delayed, locked, messages FROM bussig.queues WHERE queue = 'inbox';
SELECT bussig.drop_queue('inbox');

-- One message's life: read, nack, read again, nack on its last delivery (dead), redrive, ack.
SELECT bussig.create_queue('jobs', max_deliveries => 2, retry_delay => '0');
SELECT bussig.send('jobs', '{"job": "flaky"}', headers => '{"trace": "t2"}', correlation_id => 'c-8') IS NOT NULL AS sent;
TRUNCATE got;
INSERT INTO got SELECT * FROM bussig.read('jobs');
SELECT payload, delivery_count FROM got;
SELECT bussig.nack('jobs', message_id, lock_token, error => 'timeout') FROM got;
SELECT bussig.ack('jobs', message_id, lock_token) AS stale FROM got;
SELECT state, delivery_count FROM bussig.peek('jobs');
TRUNCATE got;
INSERT INTO got SELECT * FROM bussig.read('jobs');
SELECT payload, delivery_count FROM got;
SELECT bussig.nack('jobs', message_id, lock_token, error => 'timeout again') FROM got;
SELECT count(*) AS left_in_jobs FROM bussig.peek('jobs');
SELECT payload, headers, correlation_id, delivery_count FROM bussig.peek('jobs_dlq');

SELECT bussig.redrive('jobs');
SELECT state, payload, headers, delivery_count FROM bussig.peek('jobs');
TRUNCATE got;
INSERT INTO got SELECT * FROM bussig.read('jobs');
SELECT bussig.ack('jobs', message_id, lock_token) FROM got;
SELECT queue, ready, delayed, locked FROM bussig.queues WHERE queue LIKE 'jobs%' ORDER BY queue;
SELECT bussig.drop_queue('jobs');
