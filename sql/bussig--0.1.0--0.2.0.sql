-- bussig 0.1.0 to 0.2.0: queue owners, grants, the right to create queues, ordered groups and in-flight caps.
\echo Use "ALTER EXTENSION bussig UPDATE" to load this file. \quit

-- Queues made before owners existed belong to the extension's owner.
ALTER TABLE bussig.queue ADD COLUMN owner name;
UPDATE bussig.queue
SET owner = (SELECT pg_catalog.pg_get_userbyid(nspowner) FROM pg_catalog.pg_namespace WHERE nspname = 'bussig');
ALTER TABLE bussig.queue ALTER COLUMN owner SET NOT NULL;
-- The most messages of a queue locked at once (max_in_flight; src/message/in_flight.rs).
ALTER TABLE bussig.queue ADD COLUMN max_in_flight int CHECK (max_in_flight >= 1);
-- When the worker first saw a drop committed: orphans of sends that raced it go once no transaction
-- older than that is left.
ALTER TABLE bussig.dropped_queue ADD COLUMN noticed_at timestamptz;

-- Privileges on a queue beyond its owner's (bussig.grant). Roles are kept by name, as pg_dump writes
-- them, so grants survive a restore into a cluster whose roles have other OIDs; 'public' is everyone.
CREATE TABLE bussig.queue_grant (
    queue_id  int NOT NULL REFERENCES bussig.queue (queue_id) ON DELETE CASCADE,
    grantee   name NOT NULL,
    privilege text NOT NULL CHECK (privilege IN ('send', 'consume', 'manage')),
    PRIMARY KEY (queue_id, grantee, privilege)
);
-- Roles the extension owner allowed to create queues (bussig.grant_create_queues).
CREATE TABLE bussig.queue_creator (
    grantee name PRIMARY KEY
);

-- Whether role holds privilege (any, when NULL) on queue: the owner of extension bussig (and every
-- superuser) holds all of them on every queue, a queue's owner all of them on it. No row when there is
-- no such queue. For bussig's own statements, which run as the extension owner, and for
-- has_queue_privilege: a set-returning SQL function without SECURITY DEFINER or SET, so that the
-- statement calling it plans its body in once and keeps that plan (a function call planned it anew
-- each time, most of a restricted role's send).
CREATE FUNCTION bussig.queue_privilege_of(role oid, queue text, privilege text)
RETURNS SETOF boolean
LANGUAGE sql STABLE ROWS 1
AS $$
    SELECT pg_catalog.pg_has_role($1, n.nspowner, 'USAGE')
        OR EXISTS (SELECT FROM pg_catalog.pg_roles r
                   WHERE r.rolname = q.owner AND pg_catalog.pg_has_role($1, r.oid, 'USAGE'))
        OR EXISTS (SELECT FROM bussig.queue_grant g
                   WHERE g.queue_id = q.queue_id
                     AND (g.privilege = $3 OR $3 IS NULL)
                     AND (g.grantee = 'public'
                          OR EXISTS (SELECT FROM pg_catalog.pg_roles r
                                     WHERE r.rolname = g.grantee
                                       AND pg_catalog.pg_has_role($1, r.oid, 'USAGE'))))
    FROM bussig.queue q, pg_catalog.pg_namespace n
    WHERE q.name = $2 AND n.nspname = 'bussig'
$$;
REVOKE EXECUTE ON FUNCTION bussig.queue_privilege_of(oid, text, text) FROM PUBLIC;

-- The same, NULL when there is no such queue. Like has_table_privilege, anyone may ask about anyone.
CREATE FUNCTION bussig.has_queue_privilege(role regrole, queue text, privilege text)
RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT held FROM bussig.queue_privilege_of($1, $2, $3) AS held $$;

-- The same for the current user.
CREATE FUNCTION bussig.has_queue_privilege(queue text, privilege text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql STABLE
AS $$ SELECT bussig.has_queue_privilege(pg_catalog.to_regrole(current_user::text), $1, $2) $$;

-- Whether role may create queues: the extension owner allowed it, or role owns the extension.
CREATE FUNCTION bussig.may_create_queues(role regrole)
RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT pg_has_role($1, n.nspowner, 'USAGE')
        OR EXISTS (SELECT FROM bussig.queue_creator c
                   WHERE c.grantee = 'public'
                      OR EXISTS (SELECT FROM pg_roles r
                                 WHERE r.rolname = c.grantee AND pg_has_role($1, r.oid, 'USAGE')))
    FROM pg_namespace n
    WHERE n.nspname = 'bussig'
$$;

SELECT pg_catalog.pg_extension_config_dump('bussig.queue_grant', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.queue_creator', '');

-- How many messages a queue holds, from counts kept in shared memory.
CREATE FUNCTION bussig.queue_depth(queue text)
RETURNS bigint LANGUAGE c AS 'MODULE_PATHNAME', 'queue_depth_wrapper';

-- As queue_depth, but NULL for a queue that does not exist (any more): the bussig.queues view's
-- messages, as a queue may be dropped while the view runs.
CREATE FUNCTION bussig.queue_depth_if_exists(queue text)
RETURNS bigint LANGUAGE c AS 'MODULE_PATHNAME', 'queue_depth_if_exists_wrapper';

-- Acknowledges a request and sends its reply to the request's reply_to queue, in one call.
CREATE FUNCTION bussig.reply(queue text, message_id bigint, lock_token uuid, payload jsonb,
                             headers jsonb DEFAULT NULL)
RETURNS bigint LANGUAGE c AS 'MODULE_PATHNAME', 'reply_wrapper';

-- messages is exact at every look (bussig.queue_depth). Its split into ready, delayed and locked is
-- the worker's count, about a second old for a queue of up to 10,000 messages and at most
-- bussig.stats_interval for a larger one: counting on every look would cost as much as the dead rows
-- churn leaves, and a held snapshot keeps them all. Each role sees the queues it may use.
CREATE OR REPLACE VIEW bussig.queues AS
SELECT q.name AS queue,
       d.name AS dead_letter_queue,
       depth.messages - split.delayed - split.locked AS ready,
       split.delayed,
       split.locked,
       CASE WHEN depth.messages > split.delayed + split.locked
            THEN clock_timestamp() - counted.oldest_ready_since END AS oldest_ready_age,
       q.max_deliveries,
       q.lock_timeout,
       q.message_ttl,
       q.created_at,
       q.owner,
       q.retry_delay,
       q.retry_delay_max,
       q.retry_multiplier,
       q.dedup_window,
       depth.messages,
       counted.counted_at,
       q.max_in_flight
FROM bussig.queue q
LEFT JOIN bussig.queue d ON d.queue_id = q.dead_letter_queue_id
LEFT JOIN bussig.queue_stats counted ON counted.queue_id = q.queue_id
CROSS JOIN LATERAL (SELECT bussig.queue_depth_if_exists(q.name) AS messages) depth
CROSS JOIN LATERAL (
    SELECT least(coalesce(counted.locked, 0), depth.messages) AS locked,
           least(coalesce(counted.delayed, 0),
                 depth.messages - least(coalesce(counted.locked, 0), depth.messages)) AS delayed
) split
WHERE bussig.has_queue_privilege(q.name) AND depth.messages IS NOT NULL;

-- The grants on the queues the current user may manage.
CREATE VIEW bussig.grants AS
SELECT q.name AS queue, g.grantee, g.privilege
FROM bussig.queue_grant g
JOIN bussig.queue q USING (queue_id)
WHERE bussig.has_queue_privilege(q.name, 'manage');

CREATE OR REPLACE VIEW bussig.subscriptions AS
SELECT q.name AS queue, s.pattern, s.created_at, q.heartbeat_at + q.ephemeral_ttl AS expires_at
FROM bussig.subscription s
JOIN bussig.queue q USING (queue_id)
WHERE bussig.has_queue_privilege(q.name);

-- The new SQL functions, as the 0.2.0 library defines them.
CREATE FUNCTION bussig."grant"(queue text, role text, privileges text[])
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'grant_wrapper';
CREATE FUNCTION bussig."revoke"(queue text, role text, privileges text[] DEFAULT NULL)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'revoke_wrapper';
CREATE FUNCTION bussig.grant_create_queues(role text)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'grant_create_queues_wrapper';
CREATE FUNCTION bussig.revoke_create_queues(role text)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'revoke_create_queues_wrapper';
-- Lock tokens from a per-backend generator instead of one OpenSSL call each (gen_random_uuid).
CREATE FUNCTION bussig.lock_token()
RETURNS uuid STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'lock_token_wrapper';
-- Reads skip message versions a committed transaction has replaced, without locking them.
CREATE FUNCTION bussig.superseded(relation oid, version tid)
RETURNS boolean STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'superseded_wrapper';

-- Privileges: the SQL functions check who calls them (src/access.rs) and work as the extension owner;
-- the tables stay closed to everyone else.
GRANT USAGE ON SCHEMA bussig TO PUBLIC;
GRANT SELECT ON bussig.queues, bussig.subscriptions, bussig.grants TO PUBLIC;
REVOKE EXECUTE ON FUNCTION bussig.run_maintenance(), bussig.invalidate_routing(), bussig.ensure_worker(),
    bussig.routing_changed(), bussig.lock_token(), bussig.superseded(oid, tid) FROM PUBLIC;

-- The payload-or-body rule is bussig's own statements' to keep; checking it cost every insert.
ALTER TABLE bussig.message DROP CONSTRAINT message_check;

-- Vacuumed by dead rows, not by a fifth of the table: reads start at the head of their queue.
ALTER TABLE bussig.message SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
                                autovacuum_vacuum_cost_delay = 0);

-- Every key of the delivery order ends in the unique message_id: deduplication only costs page splits.
ALTER INDEX bussig.message_delivery_order SET (deduplicate_items = off);

-- A send_batch takes one value of the sequence per 128 messages (see schema.sql).
ALTER SEQUENCE bussig.message_id_seq INCREMENT BY 128;

-- Ordered message groups (src/message/group.rs): a group's messages are delivered one at a time, in
-- send order; those behind the group's head wait with visible_at 'infinity'.
ALTER TABLE bussig.message ADD COLUMN group_id text, ADD COLUMN group_seq bigint,
                           ADD COLUMN group_ready_at timestamptz;
CREATE INDEX message_group_waiting ON bussig.message (queue_id, group_id, group_seq) WHERE visible_at = 'infinity';
CREATE TABLE bussig.message_group (
    queue_id int NOT NULL,
    group_id text NOT NULL,
    pending  int NOT NULL,
    last_seq bigint NOT NULL,
    PRIMARY KEY (queue_id, group_id)
);
-- Updated by every grouped send and settle: room on each page for the new version (a HOT update), and
-- vacuumed by dead rows as bussig.message is.
ALTER TABLE bussig.message_group SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0,
                                      autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0);

-- A TRUNCATE of bussig.message empties every group too: a group counted with messages gone would hold
-- its next sends back for ever.
CREATE FUNCTION bussig.forget_groups() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN DELETE FROM bussig.message_group; RETURN NULL; END $$;
CREATE TRIGGER message_truncated AFTER TRUNCATE ON bussig.message
FOR EACH STATEMENT EXECUTE FUNCTION bussig.forget_groups();
SELECT pg_catalog.pg_extension_config_dump('bussig.message_group', '');

-- Sends take a group; reads and peek say it.
DROP FUNCTION bussig.send(text, jsonb, jsonb, interval, int, text, text, text);
CREATE FUNCTION bussig.send(queue text, payload jsonb, headers jsonb DEFAULT NULL, delay interval DEFAULT NULL,
                            priority int DEFAULT 0, dedup_id text DEFAULT NULL, correlation_id text DEFAULT NULL,
                            reply_to text DEFAULT NULL, group_id text DEFAULT NULL)
RETURNS bigint LANGUAGE c AS 'MODULE_PATHNAME', 'send_wrapper';
DROP FUNCTION bussig.send_batch(text, jsonb[], jsonb, interval, int);
CREATE FUNCTION bussig.send_batch(queue text, payloads jsonb[], headers jsonb DEFAULT NULL,
                                  delay interval DEFAULT NULL, priority int DEFAULT 0, group_ids text[] DEFAULT NULL)
RETURNS SETOF bigint LANGUAGE c AS 'MODULE_PATHNAME', 'send_batch_wrapper';
DROP FUNCTION bussig.publish(text, jsonb, jsonb, interval, int, text, text, text);
CREATE FUNCTION bussig.publish(subject text, payload jsonb, headers jsonb DEFAULT NULL, delay interval DEFAULT NULL,
                               priority int DEFAULT 0, dedup_id text DEFAULT NULL, correlation_id text DEFAULT NULL,
                               reply_to text DEFAULT NULL, group_id text DEFAULT NULL)
RETURNS int LANGUAGE c AS 'MODULE_PATHNAME', 'publish_wrapper';
DROP FUNCTION bussig.read(text, int, interval, interval);
CREATE FUNCTION bussig.read(queue text, max_messages int DEFAULT 1, lock_timeout interval DEFAULT NULL,
                            wait interval DEFAULT NULL)
RETURNS TABLE (message_id bigint, lock_token uuid, subject text, payload jsonb, headers jsonb, delivery_count int,
               priority int, enqueued_at timestamptz, correlation_id text, reply_to text, group_id text)
LANGUAGE c AS 'MODULE_PATHNAME', 'read_wrapper';
DROP FUNCTION bussig.ack_and_read(text, bigint[], uuid[], int, interval, interval);
CREATE FUNCTION bussig.ack_and_read(queue text, message_ids bigint[] DEFAULT NULL, lock_tokens uuid[] DEFAULT NULL,
                                    max_messages int DEFAULT 1, lock_timeout interval DEFAULT NULL,
                                    wait interval DEFAULT NULL)
RETURNS TABLE (message_id bigint, lock_token uuid, subject text, payload jsonb, headers jsonb, delivery_count int,
               priority int, enqueued_at timestamptz, correlation_id text, reply_to text, group_id text)
LANGUAGE c AS 'MODULE_PATHNAME', 'ack_and_read_wrapper';
DROP FUNCTION bussig.peek(text, int);
CREATE FUNCTION bussig.peek(queue text, max_messages int DEFAULT 10)
RETURNS TABLE (message_id bigint, state text, visible_at timestamptz, subject text, payload jsonb, headers jsonb,
               delivery_count int, priority int, enqueued_at timestamptz, correlation_id text, reply_to text,
               group_id text)
LANGUAGE c AS 'MODULE_PATHNAME', 'peek_wrapper';
-- The groups whose head holds the rest back.
CREATE FUNCTION bussig.blocked_groups(queue text)
RETURNS TABLE (group_id text, head_message_id bigint, state text, since timestamptz)
LANGUAGE c AS 'MODULE_PATHNAME', 'blocked_groups_wrapper';

-- In-flight caps: the most messages of a queue locked at once (src/message/in_flight.rs).
CREATE TABLE bussig.in_flight_slot (
    queue_id     int NOT NULL REFERENCES bussig.queue (queue_id) ON DELETE CASCADE,
    slot         int NOT NULL,
    message_id   bigint,
    lock_token   uuid,
    locked_until timestamptz NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (queue_id, slot)
);
CREATE INDEX in_flight_slot_free ON bussig.in_flight_slot (queue_id, locked_until);
CREATE INDEX in_flight_slot_message ON bussig.in_flight_slot (message_id);
ALTER TABLE bussig.in_flight_slot SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
                                       autovacuum_vacuum_cost_delay = 0);
SELECT pg_catalog.pg_extension_config_dump('bussig.in_flight_slot', '');
-- Backends cache a queue's cap with its name.
DROP TRIGGER queue_routing_changed ON bussig.queue;
CREATE TRIGGER queue_routing_changed AFTER UPDATE OF name, notify, max_in_flight, owner OR DELETE ON bussig.queue
    FOR EACH STATEMENT EXECUTE FUNCTION bussig.routing_changed();
-- Backends keep the privileges a restricted role was found to hold (src/access/held.rs).
CREATE TRIGGER queue_grant_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON bussig.queue_grant
    FOR EACH STATEMENT EXECUTE FUNCTION bussig.routing_changed();
-- Even under session_replication_role = replica (a replication apply, a restore without triggers).
ALTER TABLE bussig.queue ENABLE ALWAYS TRIGGER queue_routing_changed;
ALTER TABLE bussig.queue_grant ENABLE ALWAYS TRIGGER queue_grant_changed;
DROP FUNCTION bussig.create_queue(text, int, interval, interval, interval, interval, float8, interval, text, bool);
CREATE FUNCTION bussig.create_queue(queue text, max_deliveries int DEFAULT 5, lock_timeout interval DEFAULT '30 seconds',
                                    message_ttl interval DEFAULT NULL, retry_delay interval DEFAULT '1 second',
                                    retry_delay_max interval DEFAULT '15 minutes', retry_multiplier float8 DEFAULT 2.0,
                                    dedup_window interval DEFAULT '5 minutes', dead_letter_queue text DEFAULT NULL,
                                    notify bool DEFAULT false, max_in_flight int DEFAULT NULL)
RETURNS bool LANGUAGE c AS 'MODULE_PATHNAME', 'create_queue_wrapper';
DROP FUNCTION bussig.alter_queue(text, int, interval, interval, interval, interval, float8, interval, text, bool);
CREATE FUNCTION bussig.alter_queue(queue text, max_deliveries int DEFAULT NULL, lock_timeout interval DEFAULT NULL,
                                   message_ttl interval DEFAULT NULL, retry_delay interval DEFAULT NULL,
                                   retry_delay_max interval DEFAULT NULL, retry_multiplier float8 DEFAULT NULL,
                                   dedup_window interval DEFAULT NULL, dead_letter_queue text DEFAULT NULL,
                                   notify bool DEFAULT NULL, max_in_flight int DEFAULT NULL)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'alter_queue_wrapper';

-- Streams: retained logs with sequence numbers, consumer groups, replay and key partitions (issue 22):
-- sql/streams.sql, then the functions of src/api/streams.rs. Why they look like this: docs/design.md.

-- Stream definitions. Each stream's records live in its own table, bussig.stream_<stream_id>,
-- partitioned by segment: a ring of STREAM_SEGMENTS tables, the oldest emptied whole by TRUNCATE once
-- past retention (src/stream/retention.rs), never row by row.
CREATE SEQUENCE bussig.stream_id_seq AS int;
CREATE TABLE bussig.stream (
    stream_id       int PRIMARY KEY DEFAULT nextval('bussig.stream_id_seq'),
    name            text NOT NULL UNIQUE
                    CONSTRAINT stream_name_valid CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,59}$'),
    partitions      int NOT NULL CHECK (partitions BETWEEN 1 AND 256),
    retention       interval NOT NULL CHECK (retention > interval '0'),
    retention_bytes bigint CHECK (retention_bytes > 0),
    -- The segment appends go to.
    current_segment int NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    owner           name NOT NULL
);
ALTER SEQUENCE bussig.stream_id_seq OWNED BY bussig.stream.stream_id;

-- The ring of segments of each stream: when each began taking appends and when it stopped; both NULL
-- for an empty one.
CREATE TABLE bussig.stream_segment (
    stream_id  int NOT NULL REFERENCES bussig.stream (stream_id) ON DELETE CASCADE,
    segment    int NOT NULL,
    opened_at  timestamptz,
    closed_at  timestamptz,
    PRIMARY KEY (stream_id, segment)
);

-- Each partition's sequence: head_seq is the last seq given, first_seq the first still kept. Its row
-- lock lines up the sequencing of committed records (src/stream/sequence.rs); updated in place, so
-- room is left on each page for the new version.
CREATE TABLE bussig.stream_partition (
    stream_id int NOT NULL REFERENCES bussig.stream (stream_id) ON DELETE CASCADE,
    partition int NOT NULL,
    head_seq  bigint NOT NULL DEFAULT 0,
    first_seq bigint NOT NULL DEFAULT 1,
    PRIMARY KEY (stream_id, partition)
) WITH (fillfactor = 50);

-- Every record of every stream takes its id here: the order records of one partition are sequenced
-- in when they become readable together.
CREATE SEQUENCE bussig.stream_record_id_seq;

CREATE TABLE bussig.consumer_group (
    stream_id      int NOT NULL REFERENCES bussig.stream (stream_id) ON DELETE CASCADE,
    consumer_group text NOT NULL
                   CONSTRAINT consumer_group_name_valid CHECK (consumer_group ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,59}$'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, consumer_group)
);

-- A group's position in each partition: processed up to and including committed_seq. Updated by
-- every commit, never in an indexed column: HOT updates.
CREATE TABLE bussig.group_partition (
    stream_id      int NOT NULL,
    consumer_group text NOT NULL,
    partition      int NOT NULL,
    committed_seq  bigint NOT NULL,
    PRIMARY KEY (stream_id, consumer_group, partition),
    FOREIGN KEY (stream_id, consumer_group) REFERENCES bussig.consumer_group ON DELETE CASCADE
) WITH (fillfactor = 50, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);

-- The lease of the member reading a group's partition. Unlogged: a lease records no progress
-- (committed_seq does), so taking and ending one writes no WAL, and a read commits without waiting for
-- a flush. After a crash the table is empty: every lease has ended, and reads make the rows again.
CREATE UNLOGGED TABLE bussig.group_lease (
    stream_id      int NOT NULL,
    consumer_group text NOT NULL,
    partition      int NOT NULL,
    lease_token    uuid,
    leased_until   timestamptz,
    PRIMARY KEY (stream_id, consumer_group, partition),
    FOREIGN KEY (stream_id, consumer_group, partition) REFERENCES bussig.group_partition ON DELETE CASCADE
) WITH (fillfactor = 50, autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000);

-- Privileges on a stream beyond its owner's, as bussig.queue_grant for queues.
CREATE TABLE bussig.stream_grant (
    stream_id int NOT NULL REFERENCES bussig.stream (stream_id) ON DELETE CASCADE,
    grantee   name NOT NULL,
    privilege text NOT NULL CHECK (privilege IN ('append', 'read', 'manage')),
    PRIMARY KEY (stream_id, grantee, privilege)
);

-- Streams publish appends to (bussig.subscribe_stream).
CREATE TABLE bussig.stream_subscription (
    stream_id  int NOT NULL REFERENCES bussig.stream (stream_id) ON DELETE CASCADE,
    pattern    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, pattern)
);

-- Payloads publish appends to several streams, stored once: each of those records refers to its body
-- by (body_segment, body_id) and has no payload of its own. A ring of segments like a stream's: new
-- bodies go to the current one, and a segment no kept record refers to is emptied whole by TRUNCATE
-- (src/stream/body.rs).
CREATE SEQUENCE bussig.stream_body_id_seq;
CREATE TABLE bussig.stream_body (
    segment int NOT NULL,
    body_id bigint NOT NULL DEFAULT nextval('bussig.stream_body_id_seq'),
    payload jsonb NOT NULL,
    PRIMARY KEY (segment, body_id)
) PARTITION BY LIST (segment);
ALTER SEQUENCE bussig.stream_body_id_seq OWNED BY bussig.stream_body.body_id;
CREATE TABLE bussig.stream_body_0 PARTITION OF bussig.stream_body FOR VALUES IN (0);
CREATE TABLE bussig.stream_body_1 PARTITION OF bussig.stream_body FOR VALUES IN (1);
CREATE TABLE bussig.stream_body_2 PARTITION OF bussig.stream_body FOR VALUES IN (2);
CREATE TABLE bussig.stream_body_3 PARTITION OF bussig.stream_body FOR VALUES IN (3);
-- Which body segment takes new bodies, and since when; when the ring was made (no segment is emptied
-- in the hour after: a restore loads bodies and the records referring to them in any order). Not
-- dumped: a restored database starts the ring again at segment 0, and keeps every restored body
-- until nothing refers to it.
CREATE TABLE bussig.stream_body_ring (
    only_row        boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    current_segment int NOT NULL CHECK (current_segment BETWEEN 0 AND 3),
    switched_at     timestamptz NOT NULL DEFAULT now(),
    made_at         timestamptz NOT NULL DEFAULT now()
);
INSERT INTO bussig.stream_body_ring (current_segment) VALUES (0);

-- Whether a kept record of any stream refers to a body in segment: each stream's partial index on
-- body_segment answers, whatever the statistics say.
CREATE FUNCTION bussig.stream_body_referenced(segment int) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
DECLARE
    stream_id int;
    found boolean;
BEGIN
    FOR stream_id IN SELECT s.stream_id FROM bussig.stream s LOOP
        CONTINUE WHEN to_regclass(format('bussig.stream_%s', stream_id)) IS NULL;
        EXECUTE format('SELECT EXISTS (SELECT FROM bussig.stream_%s WHERE body_segment = $1)', stream_id)
        INTO found USING segment;
        IF found THEN
            RETURN true;
        END IF;
    END LOOP;
    RETURN false;
END $$;
REVOKE EXECUTE ON FUNCTION bussig.stream_body_referenced(int) FROM PUBLIC;

-- A stream dropped, renamed or given another owner: every backend drops its cached streams
-- (src/stream/mod.rs) and the privileges it keeps, as a change of queues makes them drop theirs.
CREATE FUNCTION bussig.streams_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bussig.invalidate_routing();
    RETURN NULL;
END $$;
REVOKE EXECUTE ON FUNCTION bussig.streams_changed() FROM PUBLIC;
CREATE TRIGGER stream_changed AFTER UPDATE OF name, owner OR DELETE ON bussig.stream
    FOR EACH STATEMENT EXECUTE FUNCTION bussig.streams_changed();
-- Backends keep the privileges a restricted role was found to hold (src/access/held.rs).
CREATE TRIGGER stream_grant_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON bussig.stream_grant
    FOR EACH STATEMENT EXECUTE FUNCTION bussig.streams_changed();
-- Even under session_replication_role = replica (a replication apply, a restore without triggers).
ALTER TABLE bussig.stream ENABLE ALWAYS TRIGGER stream_changed;
ALTER TABLE bussig.stream_grant ENABLE ALWAYS TRIGGER stream_grant_changed;
-- publish keeps the streams' subscriptions with the queues' (src/topic/routes.rs).
CREATE TRIGGER stream_subscription_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON bussig.stream_subscription
    FOR EACH STATEMENT EXECUTE FUNCTION bussig.streams_changed();
-- Backends remember which groups' lease rows exist (src/stream/group.rs): rows removed other than by a
-- crash, which ends every backend, make them look again.
CREATE TRIGGER group_lease_removed AFTER DELETE OR TRUNCATE ON bussig.group_lease
    FOR EACH STATEMENT EXECUTE FUNCTION bussig.streams_changed();

SELECT pg_catalog.pg_extension_config_dump('bussig.stream', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.stream_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.stream_segment', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.stream_partition', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.stream_record_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.consumer_group', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.group_partition', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.stream_grant', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.stream_subscription', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.stream_body_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.stream_body_0', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.stream_body_1', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.stream_body_2', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.stream_body_3', '');

-- Whether role holds privilege (any, when NULL) on stream: the owner of extension bussig (and every
-- superuser) holds all of them on every stream, a stream's owner all of them on it. No row when there is
-- no such stream. For bussig's own statements, which run as the extension owner, and for
-- has_stream_privilege: a set-returning SQL function without SECURITY DEFINER or SET, so that the
-- statement calling it plans its body in once and keeps that plan (a function call planned it anew
-- each time, most of a restricted role's send).
CREATE FUNCTION bussig.stream_privilege_of(role oid, stream text, privilege text)
RETURNS SETOF boolean
LANGUAGE sql STABLE ROWS 1
AS $$
    SELECT pg_catalog.pg_has_role($1, n.nspowner, 'USAGE')
        OR EXISTS (SELECT FROM pg_catalog.pg_roles r
                   WHERE r.rolname = s.owner AND pg_catalog.pg_has_role($1, r.oid, 'USAGE'))
        OR EXISTS (SELECT FROM bussig.stream_grant g
                   WHERE g.stream_id = s.stream_id
                     AND (g.privilege = $3 OR $3 IS NULL)
                     AND (g.grantee = 'public'
                          OR EXISTS (SELECT FROM pg_catalog.pg_roles r
                                     WHERE r.rolname = g.grantee
                                       AND pg_catalog.pg_has_role($1, r.oid, 'USAGE'))))
    FROM bussig.stream s, pg_catalog.pg_namespace n
    WHERE s.name = $2 AND n.nspname = 'bussig'
$$;
REVOKE EXECUTE ON FUNCTION bussig.stream_privilege_of(oid, text, text) FROM PUBLIC;

-- The same, NULL when there is no such stream.
CREATE FUNCTION bussig.has_stream_privilege(role regrole, stream text, privilege text)
RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT held FROM bussig.stream_privilege_of($1, $2, $3) AS held $$;

CREATE FUNCTION bussig.has_stream_privilege(stream text, privilege text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql STABLE
AS $$ SELECT bussig.has_stream_privilege(pg_catalog.to_regrole(current_user::text), $1, $2) $$;

-- The bytes a stream's segments take, and its oldest record still kept: read from its own table,
-- whose name only bussig's code knows, through the index on (partition, seq) whatever its statistics
-- say (taken while records waited for their numbers, they call every seq NULL, and the planner read
-- the whole stream for the oldest one).
CREATE FUNCTION bussig.stream_storage(stream_id int, OUT bytes bigint, OUT oldest_appended_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
BEGIN
    IF to_regclass(format('bussig.stream_%s', stream_id)) IS NULL THEN
        RETURN;
    END IF;
    SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0)::bigint INTO bytes
    FROM pg_inherits WHERE inhparent = format('bussig.stream_%s', stream_id)::regclass;
    EXECUTE format('SELECT min(first.appended_at) FROM bussig.stream_partition p
                    CROSS JOIN LATERAL (SELECT r.appended_at FROM bussig.stream_%s r
                                        WHERE r.partition = p.partition AND r.seq IS NOT NULL
                                        ORDER BY r.seq LIMIT 1) first
                    WHERE p.stream_id = $1', stream_id)
    INTO oldest_appended_at USING stream_id;
END $$;

-- records counts numbered records still kept; appends committed since the last read are counted once
-- a read numbers them. Each role sees the streams it holds a privilege on.
CREATE VIEW bussig.streams AS
SELECT s.name AS stream,
       s.partitions,
       p.records,
       storage.bytes,
       storage.oldest_appended_at,
       p.head_seq AS last_seq,
       s.retention,
       s.retention_bytes,
       s.created_at,
       s.owner
FROM bussig.stream s
CROSS JOIN LATERAL (SELECT sum(head_seq - first_seq + 1)::bigint AS records, sum(head_seq)::bigint AS head_seq
                    FROM bussig.stream_partition WHERE stream_id = s.stream_id) p
CROSS JOIN LATERAL bussig.stream_storage(s.stream_id) storage
WHERE bussig.has_stream_privilege(s.name);

-- When the lease of a group's partition ends, NULL when none is in force. A standby cannot read
-- unlogged tables, and shows none, so that bussig.consumer_groups works there too.
CREATE FUNCTION bussig.group_lease_until(stream_id int, consumer_group text, partition int)
RETURNS timestamptz
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    until timestamptz;
BEGIN
    IF pg_is_in_recovery() THEN
        RETURN NULL;
    END IF;
    SELECT l.leased_until INTO until FROM bussig.group_lease l
    WHERE l.stream_id = $1 AND l.consumer_group = $2 AND l.partition = $3 AND l.leased_until > clock_timestamp();
    RETURN until;
END $$;

-- A group behind the retention point reads from the oldest record kept: its committed_seq shows that.
CREATE VIEW bussig.consumer_groups AS
SELECT s.name AS stream,
       g.consumer_group,
       g.partition,
       greatest(g.committed_seq, p.first_seq - 1) AS committed_seq,
       p.head_seq,
       p.head_seq - greatest(g.committed_seq, p.first_seq - 1) AS lag,
       bussig.group_lease_until(g.stream_id, g.consumer_group, g.partition) AS leased_until
FROM bussig.group_partition g
JOIN bussig.stream s USING (stream_id)
JOIN bussig.stream_partition p USING (stream_id, partition)
WHERE bussig.has_stream_privilege(s.name);

CREATE VIEW bussig.stream_subscriptions AS
SELECT s.name AS stream, sub.pattern, sub.created_at
FROM bussig.stream_subscription sub
JOIN bussig.stream s USING (stream_id)
WHERE bussig.has_stream_privilege(s.name);

CREATE VIEW bussig.stream_grants AS
SELECT s.name AS stream, g.grantee, g.privilege
FROM bussig.stream_grant g
JOIN bussig.stream s USING (stream_id)
WHERE bussig.has_stream_privilege(s.name, 'manage');

GRANT SELECT ON bussig.streams, bussig.consumer_groups, bussig.stream_subscriptions, bussig.stream_grants TO PUBLIC;

CREATE FUNCTION bussig.create_stream(stream text, partitions int DEFAULT 1, retention interval DEFAULT '7 days',
                                     retention_bytes bigint DEFAULT NULL)
RETURNS boolean LANGUAGE c AS 'MODULE_PATHNAME', 'create_stream_wrapper';
CREATE FUNCTION bussig.alter_stream(stream text, retention interval DEFAULT NULL, retention_bytes bigint DEFAULT NULL)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'alter_stream_wrapper';
CREATE FUNCTION bussig.drop_stream(stream text)
RETURNS boolean LANGUAGE c AS 'MODULE_PATHNAME', 'drop_stream_wrapper';
CREATE FUNCTION bussig.append(stream text, payload jsonb, subject text DEFAULT NULL, headers jsonb DEFAULT NULL,
                              key text DEFAULT NULL)
RETURNS bigint LANGUAGE c AS 'MODULE_PATHNAME', 'append_wrapper';
CREATE FUNCTION bussig.append_batch(stream text, payloads jsonb[], subjects text[] DEFAULT NULL, headers jsonb DEFAULT NULL,
                                    keys text[] DEFAULT NULL)
RETURNS bigint LANGUAGE c AS 'MODULE_PATHNAME', 'append_batch_wrapper';
CREATE FUNCTION bussig.create_consumer_group(stream text, consumer_group text, start_at text DEFAULT 'latest')
RETURNS boolean LANGUAGE c AS 'MODULE_PATHNAME', 'create_consumer_group_wrapper';
CREATE FUNCTION bussig.drop_consumer_group(stream text, consumer_group text)
RETURNS boolean LANGUAGE c AS 'MODULE_PATHNAME', 'drop_consumer_group_wrapper';
CREATE FUNCTION bussig.stream_read(stream text, consumer_group text, max_records int DEFAULT 100,
                                   wait interval DEFAULT NULL, lease interval DEFAULT '30 seconds')
RETURNS TABLE (partition int, seq bigint, lease_token uuid, subject text, key text, payload jsonb, headers jsonb,
               appended_at timestamptz)
LANGUAGE c AS 'MODULE_PATHNAME', 'stream_read_wrapper';
CREATE FUNCTION bussig.stream_commit(stream text, consumer_group text, partition int, seq bigint, lease_token uuid)
RETURNS boolean LANGUAGE c AS 'MODULE_PATHNAME', 'stream_commit_wrapper';
CREATE FUNCTION bussig.stream_extend_lease(stream text, consumer_group text, partition int, lease_token uuid,
                                           lease interval DEFAULT '30 seconds')
RETURNS boolean LANGUAGE c AS 'MODULE_PATHNAME', 'stream_extend_lease_wrapper';
CREATE FUNCTION bussig.stream_release(stream text, consumer_group text, partition int, lease_token uuid)
RETURNS boolean LANGUAGE c AS 'MODULE_PATHNAME', 'stream_release_wrapper';
CREATE FUNCTION bussig.stream_seek(stream text, consumer_group text, partition int, seq bigint)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'stream_seek_wrapper';
CREATE FUNCTION bussig.stream_seek_time(stream text, consumer_group text, at timestamptz)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'stream_seek_time_wrapper';
CREATE FUNCTION bussig.stream_range(stream text, partition int, from_seq bigint, max_records int DEFAULT 100)
RETURNS TABLE (partition int, seq bigint, subject text, key text, payload jsonb, headers jsonb, appended_at timestamptz)
LANGUAGE c AS 'MODULE_PATHNAME', 'stream_range_wrapper';
CREATE FUNCTION bussig.subscribe_stream(stream text, pattern text)
RETURNS boolean LANGUAGE c AS 'MODULE_PATHNAME', 'subscribe_stream_wrapper';
CREATE FUNCTION bussig.unsubscribe_stream(stream text, pattern text)
RETURNS boolean LANGUAGE c AS 'MODULE_PATHNAME', 'unsubscribe_stream_wrapper';
