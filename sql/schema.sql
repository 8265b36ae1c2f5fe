-- Storage for queues and messages. Why it looks like this: docs/design.md.

-- Queue definitions. Messages refer to queues by queue_id, so no queue name ever reaches SQL text.
CREATE SEQUENCE bussig.queue_id_seq AS int;
CREATE TABLE bussig.queue (
    queue_id             int PRIMARY KEY DEFAULT nextval('bussig.queue_id_seq'),
    name                 text NOT NULL UNIQUE
                         CONSTRAINT queue_name_valid CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,59}$'),
    -- NULL only for a dead-letter queue created as one: it has none of its own.
    dead_letter_queue_id int REFERENCES bussig.queue (queue_id),
    -- Set on a dead-letter queue that create_queue made for this queue, so drop_queue takes it along.
    dead_letter_owner_id int,
    max_deliveries       int NOT NULL CHECK (max_deliveries >= 1),
    lock_timeout         interval NOT NULL CHECK (lock_timeout > interval '0'),
    message_ttl          interval CHECK (message_ttl > interval '0'),
    retry_delay          interval NOT NULL CHECK (retry_delay >= interval '0'),
    retry_delay_max      interval NOT NULL CHECK (retry_delay_max >= retry_delay),
    retry_multiplier     float8 NOT NULL CHECK (retry_multiplier >= 1),
    dedup_window         interval NOT NULL CHECK (dedup_window >= interval '0'),
    -- A NOTIFY bussig_<name> follows each commit that made messages ready here (see src/wakeup.rs).
    notify               boolean NOT NULL DEFAULT false,
    -- An ephemeral queue is dropped by the worker when no heartbeat came for ephemeral_ttl.
    ephemeral_ttl        interval CHECK (ephemeral_ttl > interval '0'),
    heartbeat_at         timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    -- The role that created it: it may do everything with the queue, and grant that to others.
    owner                name NOT NULL,
    -- The most messages of the queue locked at once, across all consumers; NULL for no cap.
    max_in_flight        int CHECK (max_in_flight >= 1)
);
ALTER SEQUENCE bussig.queue_id_seq OWNED BY bussig.queue.queue_id;
-- drop_queue looks queues up by their dead-letter queue, as does the foreign key's check.
CREATE INDEX queue_dead_letter_queue ON bussig.queue (dead_letter_queue_id);
CREATE INDEX queue_dead_letter_owner ON bussig.queue (dead_letter_owner_id);

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

-- One row per message in one queue. A locked message is one whose visible_at lies in the future and
-- whose lock_token is set; a delayed one has visible_at in the future and no token. Lock expiry needs
-- no writer: the message is simply visible again.
-- Steps of 128: a value stands for the ids since the one before it, so a send_batch takes one value
-- per 128 messages (see direct_insert.rs). Ids still increase in the order sends take them.
CREATE SEQUENCE bussig.message_id_seq INCREMENT BY 128;
CREATE TABLE bussig.message (
    message_id     bigint PRIMARY KEY DEFAULT nextval('bussig.message_id_seq'),
    visible_at     timestamptz NOT NULL,
    enqueued_at    timestamptz NOT NULL DEFAULT now(),
    queue_id       int NOT NULL,
    priority       int NOT NULL DEFAULT 0,
    delivery_count int NOT NULL DEFAULT 0,
    -- Set while the message is out on its last allowed delivery: if that lock runs out, the worker
    -- dead-letters it (found through a partial index, without walking any backlog).
    final_delivery boolean NOT NULL DEFAULT false,
    lock_token     uuid,
    -- The payload, or the shared body it was published with (see bussig.body): never both. No CHECK
    -- says so: bussig's statements are the only writers, and the check cost every insert 5%.
    payload        jsonb,
    body_id        bigint,
    headers        jsonb,
    subject        text,
    correlation_id text,
    reply_to       text,
    -- The latest nack's error, carried into the dead-letter headers when the message dies later.
    last_error     text,
    -- Ordered groups (src/message/group.rs): the group, the message's place in it (NULL once it left
    -- it, in a dead-letter queue), and, while it waits behind the group's head with visible_at
    -- 'infinity', when it would have been ready.
    group_id       text,
    group_seq      bigint,
    group_ready_at timestamptz
);
ALTER SEQUENCE bussig.message_id_seq OWNED BY bussig.message.message_id;
-- Every message is inserted, updated on each delivery and deleted, and a read starts its index scan at
-- the head of its queue, past the entries of messages consumed since the last VACUUM. So vacuum by the
-- count of dead rows, not by a fifth of the table as for ordinary tables, and without cost delays.
ALTER TABLE bussig.message SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
                                autovacuum_vacuum_cost_delay = 0);

-- Delivery order. Within one priority, ready messages (visible_at <= now) sort before locked and
-- delayed ones, so a read never walks past in-flight messages to find work (pgmq's head-of-line problem).
-- Every key ends in the unique message_id, so deduplication never merges anything: turned off, a full
-- page splits without first scanning for duplicates.
CREATE INDEX message_delivery_order ON bussig.message (queue_id, priority DESC, visible_at, message_id)
    WITH (deduplicate_items = off);
CREATE INDEX message_final_lock ON bussig.message (visible_at) WHERE final_delivery;
-- The messages waiting behind their group's head, in send order: the next in line when the head goes.
-- Only those: a head's updates (reads, nacks) write no entry here.
CREATE INDEX message_group_waiting ON bussig.message (queue_id, group_id, group_seq) WHERE visible_at = 'infinity';

-- The groups of each queue that hold messages: how many, and the last one's place in send order. No
-- foreign key, as for messages: a send racing drop_queue commits, and the worker clears up after it.
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

-- A capped queue's slots, max_in_flight of them: each holds the message a read locked in it until that
-- lock ends (src/message/in_flight.rs). Written by every read and settle of the queue, and vacuumed by
-- dead rows as bussig.message is.
CREATE TABLE bussig.in_flight_slot (
    queue_id     int NOT NULL REFERENCES bussig.queue (queue_id) ON DELETE CASCADE,
    slot         int NOT NULL,
    message_id   bigint,
    lock_token   uuid,
    locked_until timestamptz NOT NULL DEFAULT '-infinity',
    PRIMARY KEY (queue_id, slot)
);
-- Free slots first: a claim reads no busy slot.
CREATE INDEX in_flight_slot_free ON bussig.in_flight_slot (queue_id, locked_until);
-- A settle finds its message's slot.
CREATE INDEX in_flight_slot_message ON bussig.in_flight_slot (message_id);
ALTER TABLE bussig.in_flight_slot SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000,
                                       autovacuum_vacuum_cost_delay = 0);

-- Queues drop_queue removed. A send that raced the drop may still commit a message for one of them;
-- the worker deletes such messages once every transaction that began before it noticed the drop
-- (`noticed_at`, a round after the drop committed) has ended. Recording the drop keeps that from ever
-- touching messages whose queue is merely not loaded yet (pg_restore loads bussig.message before
-- bussig.queue). Not dumped.
CREATE TABLE bussig.dropped_queue (
    queue_id   int PRIMARY KEY,
    dropped_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    noticed_at timestamptz
);

-- De-duplication keys of send(dedup_id => ...), each alive for its queue's dedup_window.
CREATE TABLE bussig.dedup (
    queue_id   int NOT NULL,
    dedup_id   text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (queue_id, dedup_id)
);
CREATE INDEX dedup_expiry ON bussig.dedup (expires_at);

-- Definitions and messages travel with pg_dump.
SELECT pg_catalog.pg_extension_config_dump('bussig.queue', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.queue_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.message', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.message_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.dedup', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.message_group', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.in_flight_slot', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.queue_grant', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.queue_creator', '');

-- The delay before a nacked message is ready again: retry_delay * retry_multiplier^(attempt-1), capped
-- at retry_delay_max. Computed in log space so that no attempt count can overflow. Inlined by the planner.
CREATE FUNCTION bussig.retry_backoff(retry_delay interval, retry_multiplier float8,
                                     retry_delay_max interval, attempt int)
RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT least(retry_delay_max,
                 retry_delay * exp(least(greatest(attempt - 1, 0) * ln(retry_multiplier),
                                         ln(greatest(extract(epoch FROM retry_delay_max)::float8
                                                     / nullif(extract(epoch FROM retry_delay)::float8, 0), 1)))))
$$;

-- Message counts per queue by state, for bussig.queues: the worker counts a queue of up to 10,000
-- messages in the round after a commit changed it, and every queue every bussig.stats_interval.
-- Derived data: not dumped.
CREATE TABLE bussig.queue_stats (
    queue_id           int PRIMARY KEY,
    ready              bigint NOT NULL,
    delayed            bigint NOT NULL,
    locked             bigint NOT NULL,
    oldest_ready_since timestamptz,
    counted_at         timestamptz NOT NULL
);

-- The grants on the queues the current user may manage.
CREATE VIEW bussig.grants AS
SELECT q.name AS queue, g.grantee, g.privilege
FROM bussig.queue_grant g
JOIN bussig.queue q USING (queue_id)
WHERE bussig.has_queue_privilege(q.name, 'manage');
