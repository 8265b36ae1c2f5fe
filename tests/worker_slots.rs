//! A cluster with more databases than worker slots (the default `max_worker_processes = 8`, 15
//! databases) still gets a worker in every database that has the extension, without
//! `bussig.worker_databases`: probing the databases without it must not keep taking the slots. Runs a
//! throw-away cluster of its own.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bussig_tests::*;

/// A PostgreSQL program run as `postgres` when this runs as root (initdb and pg_ctl refuse root).
fn as_postgres(program: &str, args: &[&str]) -> Output {
    let is_root = std::fs::metadata("/proc/self").is_ok_and(|me| me.uid() == 0);
    let mut command = if is_root {
        let mut runuser = Command::new("runuser");
        runuser.args(["-u", "postgres", "--", &pg_program(program)]);
        runuser
    } else {
        Command::new(pg_program(program))
    };
    // A Rust backtrace setting inherited by the server would end up in every error's DETAIL.
    command
        .env_remove("RUST_BACKTRACE")
        .args(args)
        .output()
        .expect(program)
}

/// A cluster of its own on a free port, stopped and removed when dropped.
struct Cluster {
    dir: String,
    port: u16,
}

impl Cluster {
    fn start(settings: &str) -> Cluster {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = format!("/tmp/bussig-worker-slots-{}", std::process::id());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Command::new("chown")
            .args(["postgres:", &dir])
            .status()
            .ok();
        let data = format!("{dir}/data");
        let init = as_postgres(
            "initdb",
            &["-D", &data, "-U", "postgres", "--auth=trust", "--no-sync"],
        );
        assert!(
            init.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let conf = format!("{data}/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{dir}'\n\
             shared_preload_libraries = 'bussig'\nfsync = off\n{settings}\n"
        ));
        std::fs::write(&conf, text).unwrap();
        let log = format!("{dir}/server.log");
        let started = as_postgres(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-t", "60", "start"],
        );
        assert!(
            started.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&started.stderr)
        );
        Cluster { dir, port }
    }

    fn connect(&self, database: &str) -> Client {
        let url = format!(
            "host=127.0.0.1 port={} user=postgres dbname={database}",
            self.port
        );
        Client::connect(&url, NoTls).unwrap_or_else(|e| panic!("connect to {database}: {e}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(format!("{}/server.log", self.dir)).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("server log, last lines:\n{}", tail.join("\n"));
        }
        let data = format!("{}/data", self.dir);
        as_postgres("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The databases a bussig worker serves now, by name.
fn served(admin: &mut Client) -> Vec<String> {
    admin
        .query(
            "SELECT datname::text FROM pg_stat_activity WHERE backend_type = 'bussig worker' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Waits until the workers serve exactly `expected`; fails with what they serve after `limit`.
fn wait_for_workers(admin: &mut Client, expected: &[&str], limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = served(admin);
    while last != expected {
        assert!(
            Instant::now() < deadline,
            "after {limit:?} workers serve {last:?}, not {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
        last = served(admin);
    }
}

#[test]
fn every_database_with_the_extension_gets_a_worker_with_fewer_slots_than_databases() {
    let cluster = Cluster::start("max_worker_processes = 8");
    let mut admin = cluster.connect("postgres");
    for n in 1..=15 {
        admin
            .batch_execute(&format!("CREATE DATABASE db{n:02}"))
            .unwrap();
    }
    // The catalog's last databases: a launcher that probes in catalog order reaches them last.
    for name in ["db14", "db15"] {
        cluster
            .connect(name)
            .batch_execute("CREATE EXTENSION bussig")
            .unwrap();
    }
    wait_for_workers(&mut admin, &["db14", "db15"], Duration::from_secs(30));

    // A database that gets the extension later gets its worker within seconds.
    cluster
        .connect("db07")
        .batch_execute("CREATE EXTENSION bussig")
        .unwrap();
    wait_for_workers(
        &mut admin,
        &["db07", "db14", "db15"],
        Duration::from_secs(10),
    );

    // And keeps it: no probe takes its place.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(served(&mut admin), ["db07", "db14", "db15"]);
}
