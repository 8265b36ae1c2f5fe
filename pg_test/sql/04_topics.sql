-- Publish/subscribe with NATS subjects: '*' is one token, '>' one or more (last only).
SELECT bussig.subscribe('billing', 'orders.*.paid');
SELECT bussig.subscribe('eu-ops', 'orders.eu.>');
SELECT bussig.subscribe('audit', '>');
SELECT bussig.subscribe('audit', 'orders.>');                 -- overlapping: audit still gets one copy
SELECT queue, pattern, expires_at IS NULL AS durable FROM bussig.subscriptions ORDER BY queue, pattern;

SELECT * FROM bussig.match('orders.eu.paid') ORDER BY queue, pattern;
SELECT bussig.publish('orders.eu.paid', '{"order": 1}', correlation_id => 'c-1');
SELECT bussig.publish('orders.us.paid', '{"order": 2}');
SELECT bussig.publish('orders.eu.refund.partial', '{"order": 3}');
SELECT bussig.publish_batch(ARRAY['orders.us.paid', 'misc'], ARRAY['{"order": 4}', '{"n": 5}']::jsonb[]);

SELECT queue, ready FROM bussig.queues WHERE queue NOT LIKE '%dlq' ORDER BY queue;
SELECT subject, payload, correlation_id FROM bussig.read('audit', 10) ORDER BY subject, payload::text;

-- Unsubscribing stops routing; no receiver means nothing is kept.
SELECT bussig.unsubscribe('audit', '>');
SELECT bussig.unsubscribe('audit', 'orders.>');
SELECT bussig.publish('misc', '{"n": 6}');

-- Ephemeral queues live as long as their heartbeats.
SELECT bussig.subscribe('node-1', 'cache.invalidate', ttl => '30 seconds');
SELECT bussig.heartbeat('node-1'), bussig.heartbeat('billing');
SELECT queue, expires_at > now() AS alive FROM bussig.subscriptions WHERE queue = 'node-1';

-- Invalid subjects and patterns are refused with 22023.
SELECT statement, outcome_of(statement) AS outcome FROM (VALUES
    ($$SELECT bussig.subscribe('q', 'a*')$$),
    ($$SELECT bussig.subscribe('q', 'a.>.b')$$),
    ($$SELECT bussig.subscribe('q', 'a..b')$$),
    ($$SELECT bussig.publish('orders.*', '{}')$$),
    ($$SELECT bussig.publish('a b', '{}')$$),
    ($$SELECT bussig.publish_batch(ARRAY['a'], ARRAY['1', '2']::jsonb[])$$)
) AS t(statement);

SELECT bussig.drop_queue(queue) FROM (VALUES ('billing'), ('eu-ops'), ('audit'), ('node-1')) AS q(queue);
SELECT count(*) AS subscriptions_left FROM bussig.subscriptions;
