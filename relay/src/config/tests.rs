//! The configuration's parsing and checks.
use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

const MINIMAL: &str = r#"
    database_url = "host=db user=relay password=secret dbname=app"
    [[route]]
    queue = "orders"
    subject = "prod.orders"
"#;

#[test]
fn defaults_apply_to_a_minimal_file() {
    let config = Config::parse("t.toml", MINIMAL, no_env).unwrap();
    assert_eq!(config.nats_url, DEFAULT_NATS_URL);
    assert_eq!(config.metrics_address.to_string(), DEFAULT_METRICS_ADDRESS);
    assert_eq!(config.log_format, LogFormat::Json);
    let route = &config.routes[0];
    assert_eq!(
        (route.batch_size, route.ordered, route.concurrency),
        (100, false, 1)
    );
    assert_eq!(route.lock_timeout, None);
}

#[test]
fn environment_overrides_addresses() {
    let env = |name: &str| match name {
        DATABASE_URL_ENV => Some("postgres://other/app".to_string()),
        NATS_URL_ENV => Some("nats://nats:4222".to_string()),
        METRICS_ADDRESS_ENV => Some("0.0.0.0:9999".to_string()),
        _ => None,
    };
    let config = Config::parse("t.toml", MINIMAL, env).unwrap();
    assert_eq!(config.database_url, "postgres://other/app");
    assert_eq!(config.nats_url, "nats://nats:4222");
    assert_eq!(config.metrics_address.to_string(), "0.0.0.0:9999");
}

#[test]
fn routes_take_file_defaults_and_their_own_settings() {
    let text = r#"
        database_url = "host=db"
        batch_size = 20
        lock_timeout = "1m"
        [[route]]
        queue = "a"
        [[route]]
        queue = "b"
        ordered = true
        batch_size = 5
        lock_timeout = "20s"
        [[route.map]]
        from = "orders.*"
        to = "prod.orders.*"
    "#;
    let config = Config::parse("t.toml", text, no_env).unwrap();
    let (a, b) = (&config.routes[0], &config.routes[1]);
    assert_eq!(
        (a.batch_size, a.lock_timeout),
        (20, Some(Duration::from_secs(60)))
    );
    assert_eq!(
        (b.batch_size, b.lock_timeout),
        (5, Some(Duration::from_secs(20)))
    );
    assert!(b.ordered);
    assert_eq!(
        b.target_subject(Some("orders.eu")).as_deref(),
        Some("prod.orders.eu")
    );
    assert_eq!(
        b.target_subject(Some("billing.eu")).as_deref(),
        Some("billing.eu")
    );
    assert_eq!(b.target_subject(None), None);
}

#[test]
fn durations_parse() {
    assert_eq!(
        parse_duration("x", "500ms").unwrap(),
        Duration::from_millis(500)
    );
    assert_eq!(
        parse_duration("x", "1.5s").unwrap(),
        Duration::from_millis(1500)
    );
    assert_eq!(parse_duration("x", "2m").unwrap(), Duration::from_secs(120));
    assert_eq!(
        parse_duration("x", "1h").unwrap(),
        Duration::from_secs(3600)
    );
    for bad in ["", "10", "s", "ten s", "5 days", "-1s"] {
        assert!(parse_duration("x", bad).is_err(), "{bad:?} parsed");
    }
}

#[test]
fn bad_configurations_say_what_is_wrong() {
    let db = "database_url = \"host=db\"\n";
    let cases = [
        ("", "no database given"),
        (db, "has no [[route]]"),
        (
            &format!("{db}[[route]]\nqueue = \"q\"\nsubject = \"a.*\""),
            "cannot have one",
        ),
        (
            &format!("{db}[[route]]\nqueue = \"q\"\nmap = [{{from = \"o.*\", to = \"p.o\"}}]"),
            "same wildcards",
        ),
        (
            &format!("{db}[[route]]\nqueue = \"q\"\nbatch_size = 0"),
            "outside 1..=1000",
        ),
        (
            &format!("{db}[[route]]\nqueue = \"q\"\nbatch_size = 1001"),
            "outside 1..=1000",
        ),
        (
            &format!("{db}[[route]]\nqueue = \"q\"\n[[route]]\nqueue = \"q\""),
            "more than one route",
        ),
        (
            &format!("{db}[[route]]\nqueue = \"q\"\nordered = true\nconcurrency = 2"),
            "ordered",
        ),
        (
            &format!("{db}[[route]]\nqueue = \"q\"\nlock_timeout = \"10s\""),
            "more than twice ack_timeout",
        ),
        (
            &format!("{db}[[route]]\nqueue = \"q\"\nqueue_name = \"x\""),
            "unknown field",
        ),
        (
            &format!("{db}poll_wait = \"soon\"\n[[route]]\nqueue = \"q\""),
            "not a duration",
        ),
        (
            &format!("{db}poll_wait = \"0s\"\n[[route]]\nqueue = \"q\""),
            "at least 100ms",
        ),
        (
            &format!("{db}metrics_address = \"here\"\n[[route]]\nqueue = \"q\""),
            "not an address",
        ),
        ("database_url = [", "not valid"),
        (
            &format!(
                "{db}[[route]]\nqueue = \"q\"\n[[stream]]\nname = \"a.b\"\nsubjects = [\"x\"]"
            ),
            "stream name",
        ),
        (
            &format!("{db}[[route]]\nqueue = \"q\"\n[[stream]]\nname = \"S\"\nsubjects = []"),
            "is empty",
        ),
        (
            &format!(
                "{db}[[route]]\nqueue = \"q\"\n[[stream]]\nname = \"S\"\nsubjects = [\"a.>.b\"]"
            ),
            "before its last",
        ),
    ];
    for (text, expected) in cases {
        let error = Config::parse("t.toml", text, no_env)
            .expect_err(text)
            .to_string();
        assert!(error.contains(expected), "{text:?}: {error}");
    }
}

#[test]
fn the_example_file_is_valid() {
    let text = include_str!("../../bussig-relay.example.toml");
    let config = Config::parse("example", text, no_env).unwrap();
    assert_eq!(config.routes.len(), 2);
    assert_eq!(
        config.inbound[0].target,
        Target::Queue("partner_orders".into())
    );
    assert_eq!(config.streams[0].subjects, ["prod.orders.>"]);
    let orders = &config.routes[0];
    assert_eq!(
        orders.target_subject(Some("orders.eu")).as_deref(),
        Some("prod.orders.eu")
    );
    assert_eq!(
        orders.target_subject(None).as_deref(),
        Some("prod.orders.direct")
    );
}

#[test]
fn passwords_are_hidden() {
    assert_eq!(
        redact("host=db user=relay password=secret dbname=app"),
        "host=db user=relay password=*** dbname=app"
    );
    assert_eq!(
        redact("postgres://relay:secret@db:5432/app"),
        "postgres://relay:***@db:5432/app"
    );
    assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
}

#[test]
fn inbound_routes_take_a_queue_or_a_subject() {
    let text = r#"
        database_url = "host=db"
        [[inbound]]
        stream = "PARTNER"
        consumer = "bussig-orders"
        filter_subject = "partner.orders.>"
        queue = "partner_orders"
        [[inbound]]
        stream = "EVENTS"
        consumer = "bussig-events"
        subject = "events.nats"
        batch_size = 10
        concurrency = 3
        ack_wait = "5s"
        group_id_header = "Order-Id"
    "#;
    let config = Config::parse("t.toml", text, no_env).unwrap();
    assert!(config.routes.is_empty());
    let (orders, events) = (&config.inbound[0], &config.inbound[1]);
    assert_eq!(orders.name(), "PARTNER/bussig-orders");
    assert_eq!(orders.target, Target::Queue("partner_orders".into()));
    assert_eq!(orders.filter_subject.as_deref(), Some("partner.orders.>"));
    assert_eq!(
        (orders.batch_size, orders.concurrency, orders.ack_wait),
        (100, 1, Duration::from_secs(30))
    );
    assert_eq!(events.target, Target::Subject("events.nats".into()));
    assert_eq!(
        (events.batch_size, events.concurrency, events.ack_wait),
        (10, 3, Duration::from_secs(5))
    );
    assert_eq!(orders.group_id_header.as_deref(), Some("Bussig-Group-Id"));
    assert_eq!(events.group_id_header.as_deref(), Some("Order-Id"));
    let without = text.replace("\"Order-Id\"", "\"\"");
    let config = Config::parse("t.toml", &without, no_env).unwrap();
    assert_eq!(config.inbound[1].group_id_header, None);
}

#[test]
fn bad_inbound_routes_say_what_is_wrong() {
    let head = "database_url = \"host=db\"\n[[inbound]]\nstream = \"S\"\nconsumer = \"c\"\n";
    let cases = [
        (head.to_string(), "one of them"),
        (format!("{head}queue = \"q\"\nsubject = \"s\""), "one of them"),
        (format!("{head}subject = \"a.*\""), "cannot have one"),
        (format!("{head}queue = \"q\"\nfilter_subject = \"a.>.b\""), "before its last"),
        (format!("{head}queue = \"q\"\nbatch_size = 0"), "outside 1..=1000"),
        (format!("{head}queue = \"q\"\nconcurrency = 0"), "at least 1"),
        (format!("{head}queue = \"q\"\nack_wait = \"0s\""), "more than zero"),
        (format!("{head}queue = \"q\"\ndurable = \"x\""), "unknown field"),
        (format!("{head}queue = \"q\"\ngroup_id_header = \"Order Id\""), "`group_id_header`"),
        (
            "database_url = \"host=db\"\n[[inbound]]\nstream = \"S.1\"\nconsumer = \"c\"\nqueue = \"q\"".into(),
            "`stream`: a name must",
        ),
        (
            format!("{head}queue = \"q\"\n[[inbound]]\nstream = \"S\"\nconsumer = \"c\"\nqueue = \"r\""),
            "more than one [[inbound]]",
        ),
    ];
    for (text, expected) in cases {
        let error = Config::parse("t.toml", &text, no_env)
            .expect_err(&text)
            .to_string();
        assert!(error.contains(expected), "{text:?}: {error}");
    }
}
