-- Who may do what: a role with no grants, one with only send, one with only consume, a queue's owner
-- and the extension owner (this superuser) each try every function. Each call runs in its own
-- subtransaction as that role and is rolled back, so every outcome starts from the same state.
CREATE ROLE bussig_regress_nobody;
CREATE ROLE bussig_regress_sender;
CREATE ROLE bussig_regress_consumer;
CREATE ROLE bussig_regress_owner;

-- Only roles the extension owner allowed may create queues; they own what they create.
SELECT bussig.grant_create_queues('bussig_regress_owner');
SET ROLE bussig_regress_owner;
SELECT bussig.create_queue('perm'), bussig.create_queue('perm_other');
SELECT bussig.subscribe('perm', 'perm.>');
SELECT bussig.send('perm', '{"n": 1}') IS NOT NULL AS sent;
SELECT bussig.grant('perm', 'bussig_regress_sender', ARRAY['send']);
SELECT bussig.grant('perm', 'bussig_regress_consumer', ARRAY['consume']);
RESET ROLE;
SELECT message_id AS mid, lock_token AS tok FROM bussig.read('perm') \gset
SELECT * FROM bussig.grants ORDER BY 1, 2, 3;

-- 'ok: ' and the first column of the first row, or the SQLSTATE; always rolled back.
CREATE FUNCTION outcome_as(role name, statement text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    answer text;
BEGIN
    BEGIN
        EXECUTE format('SET LOCAL ROLE %I', role);
        EXECUTE statement INTO answer;
        RAISE EXCEPTION USING ERRCODE = 'P0099', MESSAGE = coalesce(answer, '');
    EXCEPTION WHEN OTHERS THEN
        IF SQLSTATE = 'P0099' THEN
            RETURN 'ok: ' || SQLERRM;
        END IF;
        RETURN SQLSTATE;
    END;
END $$;

CREATE TEMP TABLE calls (n serial, call text);
INSERT INTO calls (call) VALUES
    ($$SELECT bussig.create_queue('perm_new')$$),
    ($$SELECT bussig.alter_queue('perm', max_deliveries => 3)$$),
    ($$SELECT bussig.purge_queue('perm')$$),
    ($$SELECT bussig.drop_queue('perm_other')$$),
    ($$SELECT bussig.send('perm', '{}') > 0$$),
    ($$SELECT count(*) FROM bussig.send_batch('perm', ARRAY['{}', '{}']::jsonb[])$$),
    ($$SELECT count(*) FROM bussig.read('perm', 10)$$),
    ($$SELECT count(*) FROM bussig.ack_and_read('perm', max_messages => 10)$$),
    (format($$SELECT bussig.ack('perm', %s, %L)$$, :mid, :'tok')),
    (format($$SELECT bussig.ack_batch('perm', ARRAY[%s], ARRAY[%L]::uuid[])$$, :mid, :'tok')),
    (format($$SELECT bussig.nack('perm', %s, %L)$$, :mid, :'tok')),
    (format($$SELECT bussig.extend_lock('perm', %s, %L, '1 minute')$$, :mid, :'tok')),
    (format($$SELECT bussig.dead_letter('perm', %s, %L)$$, :mid, :'tok')),
    (format($$SELECT bussig.reply('perm', %s, %L, '{}')$$, :mid, :'tok')),
    ($$SELECT bussig.redrive('perm')$$),
    ($$SELECT count(*) FROM bussig.peek('perm')$$),
    ($$SELECT count(*) FROM bussig.blocked_groups('perm')$$),
    ($$SELECT bussig.queue_depth('perm')$$),
    ($$SELECT bussig.queue_depth_if_exists('perm')$$),
    ($$SELECT bussig.subscribe('perm', 'other.>')$$),
    ($$SELECT bussig.unsubscribe('perm', 'perm.>')$$),
    ($$SELECT bussig.heartbeat('perm')$$),
    ($$SELECT bussig.publish('perm.x', '{}')$$),
    ($$SELECT bussig.publish_batch(ARRAY['perm.x'], ARRAY['{}']::jsonb[])$$),
    ($$SELECT count(*) FROM bussig.match('perm.x')$$),
    ($$SELECT bussig.grant('perm', 'bussig_regress_nobody', ARRAY['send'])$$),
    ($$SELECT bussig.revoke('perm', 'bussig_regress_sender')$$),
    ($$SELECT bussig.grant_create_queues('bussig_regress_nobody')$$),
    ($$SELECT bussig.revoke_create_queues('bussig_regress_owner')$$),
    ($$SELECT bussig.has_queue_privilege('perm', 'send')$$),
    ($$SELECT bussig.retry_backoff('1 second', 2, '1 minute', 3)$$),
    ($$SELECT count(*) FROM bussig.queues$$),
    ($$SELECT count(*) FROM bussig.subscriptions$$),
    ($$SELECT count(*) FROM bussig.grants$$),
    ($$SELECT bussig.run_maintenance() IS NOT NULL$$),
    ($$SELECT bussig.ensure_worker() IS NOT NULL$$),
    ($$SELECT bussig.invalidate_routing()$$),
    ($$SELECT bussig.lock_token() IS NOT NULL$$),
    ($$SELECT count(*) FROM bussig.message$$),
    ($$SELECT count(*) FROM bussig.queue_grant$$),
    ($$SELECT count(*) FROM bussig.message_group$$),
    ($$WITH gone AS (DELETE FROM bussig.queue RETURNING 1) SELECT count(*) FROM gone$$),
    ($$INSERT INTO bussig.queue_creator VALUES ('bussig_regress_nobody') RETURNING grantee$$);

\pset format aligned
SELECT regexp_replace(call, '(ARRAY\[|''perm'', )\d+|''[0-9a-f-]{36}''', '\1…', 'g') AS call,
       outcome_as('bussig_regress_nobody', call) AS nobody,
       outcome_as('bussig_regress_sender', call) AS sender,
       outcome_as('bussig_regress_consumer', call) AS consumer,
       outcome_as('bussig_regress_owner', call) AS queue_owner,
       outcome_as(current_user, call) AS extension_owner
FROM calls ORDER BY n;

-- Nothing any of them tried changed anything.
SELECT count(*) AS messages FROM bussig.message;
SELECT count(*) AS queues FROM bussig.queue;

-- A revoked privilege is gone at once; a grant to public reaches every role; a dropped queue takes
-- its grants along.
SET ROLE bussig_regress_owner;
SELECT bussig.revoke('perm', 'bussig_regress_sender', ARRAY['send']);
SET ROLE bussig_regress_sender;
SELECT outcome_of($$SELECT bussig.send('perm', '{}')$$);
RESET ROLE;
SET ROLE bussig_regress_owner;
SELECT bussig.grant('perm', 'PUBLIC', ARRAY['send']);
SET ROLE bussig_regress_nobody;
SELECT bussig.send('perm', '{}') IS NOT NULL AS sent_by_anyone;
RESET ROLE;
SELECT bussig.has_queue_privilege('bussig_regress_nobody', 'perm', 'send') AS nobody_may_send,
       bussig.has_queue_privilege('bussig_regress_nobody', 'perm', 'consume') AS nobody_may_consume,
       bussig.has_queue_privilege('bussig_regress_nobody', 'missing', 'send') AS on_missing_queue;

-- Membership counts: a role in a granted group role may do what the group may.
CREATE ROLE bussig_regress_member IN ROLE bussig_regress_consumer;
SET ROLE bussig_regress_member;
SELECT count(*) AS read_through_group FROM bussig.peek('perm');
RESET ROLE;

-- Bad grants: unknown role, unknown privilege, empty list, NULLs, missing queue, not the owner.
SELECT statement, outcome_of(statement) AS outcome FROM (VALUES
    ($$SELECT bussig.grant('perm', 'no_such_role', ARRAY['send'])$$),
    ($$SELECT bussig.grant('perm', 'bussig_regress_nobody', ARRAY['send', 'delete'])$$),
    ($$SELECT bussig.grant('perm', 'bussig_regress_nobody', ARRAY[]::text[])$$),
    ($$SELECT bussig.grant('perm', 'bussig_regress_nobody', ARRAY[NULL])$$),
    ($$SELECT bussig.grant('perm', 'bussig_regress_nobody', NULL)$$),
    ($$SELECT bussig.grant('perm', NULL, ARRAY['send'])$$),
    ($$SELECT bussig.grant(NULL, 'bussig_regress_nobody', ARRAY['send'])$$),
    ($$SELECT bussig.grant('missing', 'bussig_regress_nobody', ARRAY['send'])$$),
    ($$SELECT bussig.revoke('perm', 'no_such_role')$$),
    ($$SELECT bussig.grant_create_queues('no_such_role')$$),
    ($$SELECT bussig.grant_create_queues(NULL)$$)
) AS t(statement);
SELECT count(*) AS grants FROM bussig.queue_grant;

-- A dropped queue takes its grants along.
SELECT bussig.drop_queue('perm');
SELECT count(*) AS grants_left FROM bussig.queue_grant;

SELECT bussig.revoke_create_queues('bussig_regress_owner');
SELECT bussig.drop_queue('perm_other');
DROP ROLE bussig_regress_member, bussig_regress_nobody, bussig_regress_sender, bussig_regress_consumer,
    bussig_regress_owner;
