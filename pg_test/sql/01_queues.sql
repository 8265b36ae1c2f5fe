-- Queue life cycle: create (with its dead-letter queue), alter, purge, drop.
SELECT bussig.create_queue('orders', max_deliveries => 3, lock_timeout => '1 minute');
SELECT bussig.create_queue('orders');                        -- exists: false, settings untouched
SELECT bussig.create_queue('emails', dead_letter_queue => 'failed');
SELECT bussig.create_queue('sms', dead_letter_queue => 'failed');
SELECT queue, dead_letter_queue, ready, delayed, locked, max_deliveries, lock_timeout, message_ttl
FROM bussig.queues ORDER BY queue;

SELECT bussig.alter_queue('orders', message_ttl => '1 day', retry_delay => '5 seconds');
SELECT name, max_deliveries, lock_timeout, message_ttl, retry_delay, retry_delay_max, retry_multiplier, dedup_window
FROM bussig.queue WHERE name = 'orders';

SELECT bussig.send_batch('orders', ARRAY['{"n": 1}', '{"n": 2}']::jsonb[]) IS NOT NULL AS sent;
SELECT bussig.purge_queue('orders');

SELECT bussig.drop_queue('emails');                          -- 'failed' stays: sms still uses it
SELECT bussig.drop_queue('orders');                          -- takes orders_dlq along
SELECT bussig.drop_queue('orders');
SELECT queue, dead_letter_queue FROM bussig.queues ORDER BY queue;
SELECT bussig.drop_queue('sms');
SELECT bussig.drop_queue('failed');
SELECT count(*) AS queues_left FROM bussig.queue;
