-- Streams: retained logs with sequence numbers, consumer groups, replay and key partitions. Why they
-- look like this: docs/design.md, "Streams".

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
