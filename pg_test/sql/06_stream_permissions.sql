-- Who may do what with a stream: a role with no grants, one with only append, one with only read, the
-- stream's owner and the extension owner (this superuser) each try every stream function. Each call
-- runs as that role in a subtransaction that is rolled back (outcome_as, from 05_permissions).
CREATE ROLE bussig_regress_nobody;
CREATE ROLE bussig_regress_appender;
CREATE ROLE bussig_regress_reader;
CREATE ROLE bussig_regress_owner;

-- Creating streams takes the right to create queues; the creator owns the stream.
SELECT bussig.grant_create_queues('bussig_regress_owner');
SET ROLE bussig_regress_owner;
SELECT bussig.create_stream('sperm'), bussig.create_stream('sperm_other');
SELECT bussig.create_consumer_group('sperm', 'g', 'earliest');
SELECT bussig.append('sperm', '{"n": 1}');
SELECT bussig.subscribe_stream('sperm', 'sperm.>');
SELECT bussig.grant('sperm', 'bussig_regress_appender', ARRAY['append']);
SELECT bussig.grant('sperm', 'bussig_regress_reader', ARRAY['read']);
RESET ROLE;
SELECT partition AS p, lease_token AS tok FROM bussig.stream_read('sperm', 'g') \gset
SELECT * FROM bussig.stream_grants ORDER BY 1, 2, 3;

CREATE TEMP TABLE stream_calls (n serial, call text);
INSERT INTO stream_calls (call) VALUES
    ($$SELECT bussig.create_stream('sperm_new')$$),
    ($$SELECT bussig.alter_stream('sperm', retention => '1 day')$$),
    ($$SELECT bussig.drop_stream('sperm_other')$$),
    ($$SELECT bussig.append('sperm', '{}')$$),
    ($$SELECT bussig.append_batch('sperm', ARRAY['{}', '{}']::jsonb[])$$),
    ($$SELECT bussig.create_consumer_group('sperm', 'h')$$),
    ($$SELECT bussig.drop_consumer_group('sperm', 'g')$$),
    ($$SELECT count(*) FROM bussig.stream_read('sperm', 'g')$$),
    (format($$SELECT bussig.stream_commit('sperm', 'g', %s, 1, %L)$$, :p, :'tok')),
    (format($$SELECT bussig.stream_extend_lease('sperm', 'g', %s, %L)$$, :p, :'tok')),
    (format($$SELECT bussig.stream_release('sperm', 'g', %s, %L)$$, :p, :'tok')),
    ($$SELECT bussig.stream_seek('sperm', 'g', 0, 1)$$),
    ($$SELECT bussig.stream_seek_time('sperm', 'g', now())$$),
    ($$SELECT count(*) FROM bussig.stream_range('sperm', 0, 1)$$),
    ($$SELECT bussig.subscribe_stream('sperm', 'other.>')$$),
    ($$SELECT bussig.unsubscribe_stream('sperm', 'sperm.>')$$),
    ($$SELECT bussig.publish('sperm.x', '{}')$$),
    ($$SELECT bussig.grant('sperm', 'bussig_regress_nobody', ARRAY['read'])$$),
    ($$SELECT bussig.revoke('sperm', 'bussig_regress_appender')$$),
    ($$SELECT bussig.has_stream_privilege('sperm', 'read')$$),
    ($$SELECT count(*) FROM bussig.streams$$),
    ($$SELECT count(*) FROM bussig.consumer_groups$$),
    ($$SELECT count(*) FROM bussig.stream_subscriptions$$),
    ($$SELECT count(*) FROM bussig.stream_grants$$),
    ($$SELECT bytes IS NOT NULL FROM bussig.stream_storage(1)$$),
    ($$SELECT count(*) FROM bussig.stream$$),
    ($$SELECT count(*) FROM bussig.group_partition$$),
    ($$SELECT count(*) FROM bussig.stream_1$$),
    ($$WITH gone AS (DELETE FROM bussig.stream_grant RETURNING 1) SELECT count(*) FROM gone$$);

\pset format aligned
SELECT regexp_replace(call, '''[0-9a-f-]{36}''', '…', 'g') AS call,
       outcome_as('bussig_regress_nobody', call) AS nobody,
       outcome_as('bussig_regress_appender', call) AS appender,
       outcome_as('bussig_regress_reader', call) AS reader,
       outcome_as('bussig_regress_owner', call) AS stream_owner,
       outcome_as(current_user, call) AS extension_owner
FROM stream_calls ORDER BY n;

-- Nothing any of them tried changed anything.
SELECT count(*) AS streams FROM bussig.stream;
SELECT head_seq FROM bussig.stream_partition JOIN bussig.stream USING (stream_id) WHERE name = 'sperm';

-- A grant to public reaches every role; membership counts; a dropped stream takes its grants along.
SET ROLE bussig_regress_owner;
SELECT bussig.grant('sperm', 'PUBLIC', ARRAY['append']);
SET ROLE bussig_regress_nobody;
SELECT bussig.append('sperm', '{}') AS appended_by_anyone;
RESET ROLE;
CREATE ROLE bussig_regress_member IN ROLE bussig_regress_reader;
SET ROLE bussig_regress_member;
SELECT count(*) AS read_through_group FROM bussig.stream_range('sperm', 0, 1);
RESET ROLE;
SELECT statement, outcome_of(statement) AS outcome FROM (VALUES
    ($$SELECT bussig.grant('sperm', 'bussig_regress_nobody', ARRAY['send'])$$),
    ($$SELECT bussig.grant('sperm', 'bussig_regress_nobody', ARRAY['read', 'consume'])$$),
    ($$SELECT bussig.grant('sperm', 'no_such_role', ARRAY['read'])$$),
    ($$SELECT bussig.revoke('sperm', 'bussig_regress_nobody', ARRAY['append'])$$)
) AS t(statement);
SELECT bussig.drop_stream('sperm');
SELECT count(*) AS grants_left FROM bussig.stream_grant;

SELECT bussig.revoke_create_queues('bussig_regress_owner');
SELECT bussig.drop_stream('sperm_other');
DROP ROLE bussig_regress_member, bussig_regress_nobody, bussig_regress_appender, bussig_regress_reader,
    bussig_regress_owner;
