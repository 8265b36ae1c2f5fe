//! A configuration that cannot work stops the relay at once, with a non-zero status and a message
//! that names the problem; a good one passes `--check`.

mod common;

use std::fs;
use std::process::{Command, Output};

use common::*;

/// Runs the relay on `config` with the given NATS and database, to completion.
fn run(config: &str, nats_url: &str, database_url: &str, args: &[&str]) -> Output {
    let metrics_address = format!("127.0.0.1:{}", free_port());
    run_serving(config, nats_url, database_url, args, &metrics_address)
}

/// As `run`, serving HTTP on `metrics_address`.
fn run_serving(
    config: &str,
    nats_url: &str,
    database_url: &str,
    args: &[&str],
    metrics_address: &str,
) -> Output {
    let dir = TempDir::new("config");
    let path = dir.0.join("relay.toml");
    fs::write(&path, config).expect("write config");
    Command::new(env!("CARGO_BIN_EXE_bussig-relay"))
        .arg("--config")
        .arg(&path)
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("NATS_URL", nats_url)
        .env("BUSSIG_RELAY_METRICS_ADDRESS", metrics_address)
        .output()
        .expect("run bussig-relay")
}

fn assert_fails(output: &Output, code: i32, message: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(code),
        "exit status; stderr:\n{stderr}"
    );
    // The plain message comes last, after any log lines; it may span lines (a TOML excerpt).
    let plain = stderr
        .rfind("bussig-relay: ")
        .map(|at| &stderr[at..])
        .unwrap_or("");
    assert!(
        plain.contains(message),
        "expected a last line naming `{message}`, got:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configurations_exit_with_a_clear_message() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "CHECKED", &["checked.>"], -1).await;
    let queue = Queue::create(&db, "config_errors", "").await;
    let good = format!("{FAST}{}", route(&queue.name, "checked.out", ""));
    let url = database_url();

    let output = run(&good, &nats.url(), &url, &["--check"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("configuration OK"));

    let unknown = format!(
        "{FAST}{}",
        route("no_such_queue_for_relay", "checked.out", "")
    );
    assert_fails(
        &run(&unknown, &nats.url(), &url, &[]),
        2,
        "queue `no_such_queue_for_relay` does not exist",
    );

    let bad_mapping = format!(
        "{FAST}{}",
        route(
            &queue.name,
            "checked.out",
            "[[route.map]]\nfrom = \"orders.*\"\nto = \"checked.orders\""
        )
    );
    assert_fails(
        &run(&bad_mapping, &nats.url(), &url, &[]),
        2,
        "same wildcards",
    );

    let wildcard_subject = format!("{FAST}{}", route(&queue.name, "checked.*", ""));
    assert_fails(
        &run(&wildcard_subject, &nats.url(), &url, &[]),
        2,
        "cannot have one",
    );

    let no_stream = format!("{FAST}{}", route(&queue.name, "elsewhere.out", ""));
    assert_fails(
        &run(&no_stream, &nats.url(), &url, &[]),
        2,
        "no JetStream stream captures subject `elsewhere.out`",
    );

    let overlapping = format!(
        "{FAST}[[stream]]\nname = \"OTHER\"\nsubjects = [\"checked.>\"]\n{}",
        route(&queue.name, "checked.out", "")
    );
    assert_fails(
        &run(&overlapping, &nats.url(), &url, &[]),
        2,
        "cannot create stream `OTHER`",
    );

    let inbound = |target: &str, stream: &str| {
        format!("{FAST}[[inbound]]\nstream = \"{stream}\"\nconsumer = \"in\"\n{target}\n")
    };
    let good_inbound = inbound(&format!("queue = \"{}\"", queue.name), "CHECKED");
    let output = run(&good_inbound, &nats.url(), &url, &["--check"]);
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("0 route(s), 1 inbound"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_fails(
        &run(
            &inbound("queue = \"no_such_inbound_queue\"", "CHECKED"),
            &nats.url(),
            &url,
            &[],
        ),
        2,
        "inbound 1 (CHECKED/in): queue `no_such_inbound_queue` does not exist",
    );
    assert_fails(
        &run(
            &inbound(&format!("queue = \"{}\"", queue.name), "NOSUCH"),
            &nats.url(),
            &url,
            &[],
        ),
        2,
        "no JetStream stream `NOSUCH`",
    );
    // NATS takes 17 tokens; bussig takes at most 16.
    let too_deep = vec!["t"; 17].join(".");
    assert_fails(
        &run(
            &inbound(&format!("subject = \"{too_deep}\""), "CHECKED"),
            &nats.url(),
            &url,
            &[],
        ),
        2,
        &format!("subject `{too_deep}`"),
    );

    let nobody = format!("nats://127.0.0.1:{}", free_port());
    assert_fails(&run(&good, &nobody, &url, &[]), 1, "cannot connect to NATS");

    let no_database = format!(
        "host=127.0.0.1 port={} user=postgres dbname=none connect_timeout=5",
        free_port()
    );
    assert_fails(
        &run(&good, &nats.url(), &no_database, &[]),
        1,
        "cannot connect to the database",
    );

    assert_fails(
        &run("[[route]]\nqueue = ", &nats.url(), &url, &[]),
        2,
        "is not valid",
    );
    assert_fails(
        &run(&good, &nats.url(), &url, &["--frobnicate"]),
        2,
        "unknown argument",
    );

    let missing = Command::new(env!("CARGO_BIN_EXE_bussig-relay"))
        .args(["--config", "no-such-relay-config.toml"])
        .output()
        .expect("run bussig-relay");
    assert_fails(
        &missing,
        2,
        "cannot read configuration file no-such-relay-config.toml",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_address_is_reported() {
    let db = connect().await;
    let nats = Nats::start().await;
    let js = nats.jetstream().await;
    create_stream(&js, "CHECKED", &["checked.>"], -1).await;
    let queue = Queue::create(&db, "config_port", "").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().unwrap().to_string();
    let config = format!("{FAST}{}", route(&queue.name, "checked.out", ""));
    let output = run_serving(&config, &nats.url(), &database_url(), &[], &address);
    assert_fails(
        &output,
        1,
        &format!("cannot listen on metrics_address {address}"),
    );
}
