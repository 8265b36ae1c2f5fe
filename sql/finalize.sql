-- Privileges: the SQL functions check who calls them (src/access.rs) and work as the extension owner;
-- the tables stay closed to everyone else.
GRANT USAGE ON SCHEMA bussig TO PUBLIC;
GRANT SELECT ON bussig.queues, bussig.subscriptions, bussig.grants TO PUBLIC;
REVOKE EXECUTE ON FUNCTION bussig.run_maintenance(), bussig.invalidate_routing(), bussig.ensure_worker(),
    bussig.routing_changed(), bussig.lock_token(), bussig.superseded(oid, tid) FROM PUBLIC;

SELECT bussig.ensure_worker();
