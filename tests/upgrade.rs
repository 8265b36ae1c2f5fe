//! Upgrades: a database made with the first release (0.1.0), with data in it, is updated with
//! `ALTER EXTENSION bussig UPDATE`; its data and the whole API work afterwards, and it ends up exactly
//! like a database where the current version was installed fresh.

use std::time::Duration;

use bussig_tests::*;

/// The first tagged release; every later one ships `sql/bussig--A--B.sql` from it on.
const FIRST_RELEASE: &str = "0.1.0";

/// Every object of the extension and everything that defines it, one line each, sorted: tables with
/// their columns, constraints, indexes and triggers, functions with their definitions, views, privileges.
fn shape(client: &mut Client) -> Vec<String> {
    let sql = r#"
        WITH members AS (
            SELECT d.classid, d.objid FROM pg_depend d
            WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
              AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'bussig'))
        SELECT pg_describe_object(classid, objid, 0) || ': ' || coalesce(CASE classid
            WHEN 'pg_proc'::regclass THEN
                pg_get_functiondef(objid) || ' acl ' || coalesce((SELECT proacl::text FROM pg_proc WHERE oid = objid), '-')
            WHEN 'pg_class'::regclass THEN
                (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                                   || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                                   || coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), ''), ', ' ORDER BY a.attnum)
                 FROM pg_attribute a LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                 WHERE a.attrelid = objid AND a.attnum > 0 AND NOT a.attisdropped)
                || coalesce(' view ' || pg_get_viewdef(objid), '')
                || ' acl ' || coalesce((SELECT relacl::text FROM pg_class WHERE oid = objid), '-')
            ELSE '' END, '')
        FROM members
        UNION ALL
        SELECT 'constraint ' || conname || ' on ' || conrelid::regclass || ': ' || pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'bussig'::regnamespace
        UNION ALL
        SELECT 'index ' || pg_get_indexdef(indexrelid)
        FROM pg_index WHERE indrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'bussig'::regnamespace)
        UNION ALL
        SELECT 'trigger ' || pg_get_triggerdef(oid)
        FROM pg_trigger WHERE NOT tgisinternal
          AND tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'bussig'::regnamespace)
        UNION ALL
        SELECT 'dumped ' || c::regclass::text
        FROM pg_extension, unnest(extconfig) AS c WHERE extname = 'bussig'
        UNION ALL
        SELECT 'schema acl ' || coalesce(nspacl::text, '-') FROM pg_namespace WHERE nspname = 'bussig'
        ORDER BY 1"#;
    client
        .query(sql, &[])
        .expect("extension shape")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[test]
fn update_from_first_release_keeps_data_and_matches_a_fresh_install() {
    let old = Database::create("upgrade_old");
    let fresh = Database::create("upgrade_new");
    let mut db = old.connect();
    db.batch_execute(&format!(
        "CREATE EXTENSION bussig VERSION '{FIRST_RELEASE}'"
    ))
    .expect("install the first release");
    db.batch_execute(include_str!("fixtures/bussig-0.1.0-data.sql"))
        .expect("load 0.1.0 data");

    db.batch_execute("ALTER EXTENSION bussig UPDATE")
        .expect("update");
    let (installed, default): (String, String) = db
        .query_one(
            "SELECT installed_version, default_version FROM pg_available_extensions WHERE name = 'bussig'",
            &[],
        )
        .map(|row| (row.get(0), row.get(1)))
        .unwrap();
    assert_eq!(
        installed, default,
        "ALTER EXTENSION UPDATE did not reach the current version"
    );

    let mut new = fresh.connect();
    new.batch_execute("CREATE EXTENSION bussig")
        .expect("fresh install");
    let (updated, installed_fresh) = (shape(&mut db), shape(&mut new));
    let only_updated: Vec<_> = updated
        .iter()
        .filter(|line| !installed_fresh.contains(line))
        .collect();
    let only_fresh: Vec<_> = installed_fresh
        .iter()
        .filter(|line| !updated.contains(line))
        .collect();
    assert!(
        only_updated.is_empty() && only_fresh.is_empty(),
        "the updated extension differs from a fresh install\nonly after update: {only_updated:#?}\nonly fresh: {only_fresh:#?}"
    );

    // The data: queues belong to the extension owner, every message is where it was.
    let owners: i64 = db
        .query_one(
            "SELECT count(*) FROM bussig.queues WHERE owner = current_user",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(owners, 4);
    assert_eq!(
        counts(&mut db, "orders"),
        (2, 1, 1),
        "(ready, delayed, locked) of orders"
    );
    let ready: Vec<Delivery> = read(&mut db, "orders", 10, None);
    assert_eq!(ready.len(), 2);
    assert_eq!(
        ready[0].payload,
        json!({"shared": true}),
        "priority 5 first"
    );
    assert_eq!(ready[1].payload, json!({"order": 1}));
    assert_eq!(header(&ready[1].headers, "tenant"), Some("acme"));
    for delivery in &ready {
        assert!(ack(&mut db, "orders", delivery.id, delivery.token));
    }
    let token = uuid::Uuid::parse_str("00000000-0000-4000-8000-000000000003").unwrap();
    assert!(
        ack(&mut db, "orders", 3, token),
        "a lock taken before the update still settles"
    );

    // The API: dedup ids remembered, subscriptions route, dead letters redrive, ids continue,
    // and the new privileges apply.
    let duplicate: Option<i64> = db
        .query_one(
            "SELECT bussig.send('orders', '{}', dedup_id => 'order-1')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(duplicate, None);
    assert!(send(&mut db, "orders", &json!({"after": "update"})) > 6);
    let published: i32 = db
        .query_one("SELECT bussig.publish('audit.orders', '{}')", &[])
        .unwrap()
        .get(0);
    assert_eq!(published, 2);
    let redriven: i64 = db
        .query_one("SELECT bussig.redrive('orders')", &[])
        .unwrap()
        .get(0);
    assert_eq!(redriven, 1);
    let role = Role::create("upgrade_role");
    db.execute(
        "SELECT bussig.grant('orders', $1, ARRAY['consume'])",
        &[&role.name],
    )
    .expect("grant after update");
    let mut as_role = db.transaction().unwrap();
    as_role
        .batch_execute(&format!("SET LOCAL ROLE \"{}\"", role.name))
        .unwrap();
    assert_eq!(
        read(&mut as_role, "orders", 10, None).len(),
        3,
        "granted role reads"
    );
    let denied = as_role
        .query_one("SELECT bussig.send('orders', '{}')", &[])
        .expect_err("send without the privilege");
    assert_eq!(denied.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    drop(as_role);
    let maintenance = db.query_one("SELECT bussig.run_maintenance()", &[]);
    assert!(
        maintenance.is_ok(),
        "maintenance after update: {maintenance:?}"
    );
}

/// A database left at the first release while the server runs the new library: its worker waits for
/// `ALTER EXTENSION bussig UPDATE`, says so once, and does not fail a step every round; after the
/// update it does its work.
#[test]
fn the_worker_waits_for_the_update_instead_of_failing_every_round() {
    let Ok(data) = std::env::var("BUSSIG_TEST_PGDATA") else {
        panic!("BUSSIG_TEST_PGDATA is not set: this test reads the server's log");
    };
    let log = || std::fs::read_to_string(format!("{data}/server.log")).unwrap_or_default();
    let old = Database::create("upgrade_wait");
    let mut db = old.connect();
    db.batch_execute(&format!(
        "CREATE EXTENSION bussig VERSION '{FIRST_RELEASE}'"
    ))
    .expect("install the first release");
    let pid: i32 = eventually(Duration::from_secs(60), "this database's worker", || {
        db.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'bussig worker'",
            &[],
        )
        .unwrap()
        .map(|row| row.get(0))
    });
    let mine = format!("[{pid}] ");
    let waits = "maintenance waits for ALTER EXTENSION bussig UPDATE";
    eventually(Duration::from_secs(30), "the worker's warning", || {
        log()
            .lines()
            .any(|line| line.contains(&mine) && line.contains(waits))
            .then_some(())
    });
    // Two more rounds.
    std::thread::sleep(Duration::from_millis(2500));
    let said: Vec<String> = log()
        .lines()
        .filter(|line| line.contains(&mine) && line.contains("bussig worker"))
        .map(str::to_string)
        .collect();
    assert_eq!(said.len(), 1, "one warning, no failed steps: {said:#?}");

    db.batch_execute("ALTER EXTENSION bussig UPDATE; SELECT bussig.create_queue('q')")
        .expect("update");
    send(&mut db, "q", &json!(1));
    eventually(
        Duration::from_secs(30),
        "the worker's count after the update",
        || {
            let counted: Option<std::time::SystemTime> = db
                .query_one(
                    "SELECT counted_at FROM bussig.queues WHERE queue = 'q'",
                    &[],
                )
                .unwrap()
                .get(0);
            counted.map(|_| ())
        },
    );
}
