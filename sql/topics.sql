-- Publish/subscribe: subscriptions, payloads shared by a fan-out, fan-outs handed to the worker.

-- A payload published to several queues is stored once; each queue's message row refers to it.
-- The worker deletes a body once no message and no pending fan-out refers to it.
CREATE SEQUENCE bussig.body_id_seq;
CREATE TABLE bussig.body (
        body_id    bigint PRIMARY KEY DEFAULT nextval('bussig.body_id_seq'),
    created_at timestamptz NOT NULL DEFAULT now(),
    payload    jsonb NOT NULL,
    -- When the worker first found nothing referring to it. It deletes the body only when that is still
    -- so a minute later: a restore loads bodies before the messages that refer to them.
    unreferenced_since timestamptz
);
ALTER SEQUENCE bussig.body_id_seq OWNED BY bussig.body.body_id;
CREATE INDEX message_body ON bussig.message (body_id) WHERE body_id IS NOT NULL;

CREATE TABLE bussig.subscription (
    queue_id   int NOT NULL REFERENCES bussig.queue (queue_id) ON DELETE CASCADE,
    pattern    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue_id, pattern)
);

-- A publish that reaches many queues hands them to the worker: it inserts the message rows after
-- commit, a chunk of queues per transaction, advancing next_index in the same transaction, so each
-- queue receives the message exactly once even if the worker dies in the middle.
CREATE SEQUENCE bussig.fanout_id_seq;
CREATE TABLE bussig.fanout (
    fanout_id      bigint PRIMARY KEY DEFAULT nextval('bussig.fanout_id_seq'),
    body_id        bigint NOT NULL,
    queue_ids      int[] NOT NULL,
    next_index     int NOT NULL DEFAULT 1,
    subject        text NOT NULL,
    headers        jsonb,
    visible_at     timestamptz NOT NULL,
    enqueued_at    timestamptz NOT NULL,
    priority       int NOT NULL,
    correlation_id text,
    reply_to       text
);
ALTER SEQUENCE bussig.fanout_id_seq OWNED BY bussig.fanout.fanout_id;

SELECT pg_catalog.pg_extension_config_dump('bussig.body', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.body_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.subscription', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.fanout', '');
SELECT pg_catalog.pg_extension_config_dump('bussig.fanout_id_seq', '');

-- Each backend caches the subscriptions as a token trie, and the queues it used by name; any change
-- to subscriptions, or to the queue names and notify flags the caches hold, invalidates every
-- backend's copies (at commit, or at once locally).
CREATE FUNCTION bussig.routing_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bussig.invalidate_routing();
    RETURN NULL;
END $$;
CREATE TRIGGER subscription_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON bussig.subscription
    FOR EACH STATEMENT EXECUTE FUNCTION bussig.routing_changed();
CREATE TRIGGER queue_routing_changed AFTER UPDATE OF name, notify, max_in_flight, owner OR DELETE ON bussig.queue
    FOR EACH STATEMENT EXECUTE FUNCTION bussig.routing_changed();
-- Backends keep the privileges a restricted role was found to hold (src/access/held.rs).
CREATE TRIGGER queue_grant_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON bussig.queue_grant
    FOR EACH STATEMENT EXECUTE FUNCTION bussig.routing_changed();
-- Even under session_replication_role = replica (a replication apply, a restore without triggers).
ALTER TABLE bussig.queue ENABLE ALWAYS TRIGGER queue_routing_changed;
ALTER TABLE bussig.queue_grant ENABLE ALWAYS TRIGGER queue_grant_changed;

CREATE VIEW bussig.subscriptions AS
SELECT q.name AS queue, s.pattern, s.created_at, q.heartbeat_at + q.ephemeral_ttl AS expires_at
FROM bussig.subscription s
JOIN bussig.queue q USING (queue_id)
WHERE bussig.has_queue_privilege(q.name);
