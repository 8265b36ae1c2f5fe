-- messages is exact at every look (bussig.queue_depth). Its split into ready, delayed and locked is
-- the worker's count, about a second old for a queue of up to 10,000 messages and at most
-- bussig.stats_interval for a larger one: counting on every look would cost as much as the dead rows
-- churn leaves, and a held snapshot keeps them all. Each role sees the queues it may use.
CREATE VIEW bussig.queues AS
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

-- Privileges: the SQL functions check who calls them (src/access.rs) and work as the extension owner;
-- the tables stay closed to everyone else.
GRANT USAGE ON SCHEMA bussig TO PUBLIC;
GRANT SELECT ON bussig.queues, bussig.subscriptions, bussig.grants TO PUBLIC;
REVOKE EXECUTE ON FUNCTION bussig.run_maintenance(), bussig.invalidate_routing(), bussig.ensure_worker(),
    bussig.routing_changed(), bussig.lock_token(), bussig.superseded(oid, tid) FROM PUBLIC;

SELECT bussig.ensure_worker();
