-- The queue most users write by hand: one table, a read that locks with SKIP LOCKED and pushes
-- visible_at past a visibility timeout, an ack that deletes. The load generator prepares the statements.
CREATE SCHEMA hand;
CREATE TABLE hand.queue (
    id         bigserial PRIMARY KEY,
    payload    jsonb NOT NULL,
    visible_at timestamptz NOT NULL DEFAULT now()
);
