-- Rebuilds table :v.message (v = a: today's indexes; v = b: the idea) with :prefill ready messages
-- in queue 1, then VACUUM ANALYZE and CHECKPOINT. Columns and the other indexes as sql/schema.sql.
-- psql -v v=a -v prefill=1000000 -f reset.sql
SELECT :'v' = 'a' AS is_a \gset
CREATE SCHEMA IF NOT EXISTS :"v";
SET search_path = :"v";
DROP TABLE IF EXISTS message;
DROP SEQUENCE IF EXISTS message_id_seq;
CREATE SEQUENCE message_id_seq INCREMENT BY 128;
CREATE TABLE message (
    message_id     bigint NOT NULL DEFAULT nextval('message_id_seq'),
    visible_at     timestamptz NOT NULL,
    enqueued_at    timestamptz NOT NULL DEFAULT now(),
    queue_id       int NOT NULL,
    priority       int NOT NULL DEFAULT 0,
    delivery_count int NOT NULL DEFAULT 0,
    final_delivery boolean NOT NULL DEFAULT false,
    lock_token     uuid,
    payload        jsonb,
    body_id        bigint,
    headers        jsonb,
    subject        text,
    correlation_id text,
    reply_to       text,
    last_error     text
);
ALTER SEQUENCE message_id_seq OWNED BY message.message_id;
ALTER TABLE message SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
                         autovacuum_vacuum_cost_delay = 0);
INSERT INTO message (queue_id, payload, headers, visible_at, priority, enqueued_at)
SELECT 1, '{"id": 123456, "kind": "order.created", "customer": "customer-000042", "amount": 1999, "currency": "EUR"}',
       NULL, now() - interval '1 hour', 0, now() - interval '1 hour'
FROM generate_series(1, :prefill);
\if :is_a
ALTER TABLE message ADD CONSTRAINT message_pkey PRIMARY KEY (message_id);
\else
CREATE UNIQUE INDEX message_locked_id ON message (message_id) WHERE lock_token IS NOT NULL;
\endif
CREATE INDEX message_delivery_order ON message (queue_id, priority DESC, visible_at, message_id)
    WITH (deduplicate_items = off);
CREATE INDEX message_final_lock ON message (visible_at) WHERE final_delivery;
CREATE INDEX message_body ON message (body_id) WHERE body_id IS NOT NULL;
VACUUM ANALYZE message;
CHECKPOINT;
