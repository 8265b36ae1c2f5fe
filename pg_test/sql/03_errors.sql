-- Wrong input gets a clear error with the right SQLSTATE, and changes nothing.

SELECT bussig.create_queue('q');
SELECT statement, outcome_of(statement) AS outcome FROM (VALUES
    ($$SELECT bussig.create_queue('bad name')$$),
    ($$SELECT bussig.create_queue('x"; DROP TABLE bussig.message; --')$$),
    ($$SELECT bussig.create_queue(repeat('x', 61))$$),
    ($$SELECT bussig.create_queue('x', max_deliveries => 0)$$),
    ($$SELECT bussig.create_queue('x', retry_delay => '1 hour')$$),
    ($$SELECT bussig.send('missing', '{}')$$),
    ($$SELECT bussig.send('q', NULL)$$),
    ($$SELECT bussig.send('q', '{}', headers => '[]')$$),
    ($$SELECT bussig.send('q', '{}', delay => '-1 minute')$$),
    ($$SELECT bussig.send('q', jsonb_build_object('big', repeat('x', 2000000)))$$),
    ($$SELECT bussig.send_batch('q', ARRAY['{}', NULL]::jsonb[])$$),
    ($$SELECT * FROM bussig.read('q', 0)$$),
    ($$SELECT * FROM bussig.read('q', 1001)$$),
    ($$SELECT * FROM bussig.read('q', wait => '-1 second')$$),
    ($$SELECT bussig.ack('q', NULL, gen_random_uuid())$$),
    ($$SELECT bussig.ack_batch('q', ARRAY[1, 2], ARRAY[gen_random_uuid()])$$),
    ($$SELECT bussig.redrive('q_dlq')$$),
    ($$SELECT bussig.drop_queue('q_dlq')$$)
) AS t(statement);
SELECT count(*) AS messages, (SELECT count(*) FROM bussig.queue) AS queues FROM bussig.message;
