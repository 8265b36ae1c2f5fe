//! Workload 13's ledger: the consumer processes that record each ack in it, in the ack's own
//! transaction, and the check of it against what the producer sent.

use std::collections::{HashMap, HashSet};
use std::error::Error;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postgres::error::SqlState;
use postgres::Client;

use crate::field::POLL;
use crate::pg::{connect_with_backoff, Res};
use crate::pressure::Sent;
use crate::report::format_value;
use crate::systems::{Consumer, System, QUEUE};

/// The hidden subcommand that runs one consumer process: `bussig-bench --fault-consumer SYSTEM`.
pub const CONSUMER_COMMAND: &str = "--fault-consumer";
/// Short, so that the messages a lost consumer held come back within the drain.
pub const LOCK_SECONDS: u32 = 5;
/// How the consumers' backends are told apart from the rest in `pg_stat_activity`.
pub const APPLICATION: &str = "bench_fault_consumer";
/// A ledger row per committed ack: the message's sequence number and send time, and when it was acked.
pub const LEDGER: &str = "CREATE TABLE IF NOT EXISTS bench_ledger (
    seq bigint NOT NULL, sent_us bigint NOT NULL, acked_at timestamptz NOT NULL DEFAULT clock_timestamp())";
pub const SYSTEMS: [System; 3] = [System::Bussig, System::Hand, System::Pgmq];

fn arg_name(system: System) -> &'static str {
    match system {
        System::Bussig => "bussig",
        System::Hand => "hand",
        System::Pgmq => "pgmq",
        System::Pgq => "pgq",
    }
}

/// A consumer that acks into the ledger: it reads up to 10 (bussig and pgmq waiting up to a second,
/// the hand-written queue polling) and acks them in one statement that also inserts the ledger rows
/// of just the messages its ack removed.
struct LedgerConsumer {
    system: System,
    consumer: Consumer,
    ack: postgres::Statement,
}

impl LedgerConsumer {
    fn new(client: &mut Client, system: System) -> Res<Self> {
        let wait = (system != System::Hand).then_some(1_000);
        let consumer = Consumer::with_lock(client, system, QUEUE, 10, wait, Some(LOCK_SECONDS))?;
        // bussig.ack is false for a lock that expired and went to another reader: no ledger row.
        let ack = client.prepare(match system {
            System::Bussig => {
                "INSERT INTO bench_ledger (seq, sent_us)
                 SELECT t.seq, t.sent_us
                   FROM unnest($2::bigint[], $3::uuid[], $4::bigint[], $5::bigint[]) AS t(id, token, seq, sent_us)
                  WHERE bussig.ack($1::text, t.id, t.token)"
            }
            System::Hand => {
                "WITH gone AS (DELETE FROM hand.queue WHERE id = ANY($1::bigint[]) RETURNING id)
                 INSERT INTO bench_ledger (seq, sent_us)
                 SELECT t.seq, t.sent_us
                   FROM gone JOIN unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS t(id, seq, sent_us) USING (id)"
            }
            System::Pgmq => {
                "WITH gone AS (SELECT d.id FROM pgmq.delete($1::text, $2::bigint[]) AS d(id))
                 INSERT INTO bench_ledger (seq, sent_us)
                 SELECT t.seq, t.sent_us
                   FROM gone JOIN unnest($2::bigint[], $3::bigint[], $4::bigint[]) AS t(id, seq, sent_us) USING (id)"
            }
            System::Pgq => unreachable!("PgQ takes no part in workload 13"),
        })?;
        Ok(LedgerConsumer {
            system,
            consumer,
            ack,
        })
    }

    fn step(&self, client: &mut Client) -> Res<()> {
        let (locked, stamps) = self.consumer.read_stamped(client)?;
        if locked.len() == 0 {
            if self.system == System::Hand {
                std::thread::sleep(POLL);
            }
            return Ok(());
        }
        let seqs: Vec<i64> = stamps.iter().map(|s| s.seq).collect();
        let sent: Vec<i64> = stamps.iter().map(|s| s.sent_us).collect();
        let ids = locked.ids();
        match self.system {
            System::Bussig => {
                let tokens = locked.tokens();
                client.execute(&self.ack, &[&QUEUE, &ids, &tokens, &seqs, &sent])?
            }
            System::Hand => client.execute(&self.ack, &[&ids, &seqs, &sent])?,
            _ => client.execute(&self.ack, &[&QUEUE, &ids, &seqs, &sent])?,
        };
        Ok(())
    }
}

/// What a fault is expected to do to a client: its connection closed, its backend terminated, the
/// server shutting down or starting.
fn caused_by_fault(error: &(dyn Error + Send + Sync + 'static)) -> bool {
    let Some(error) = error.downcast_ref::<postgres::Error>() else {
        return false;
    };
    error.is_closed()
        || error.source().is_some_and(|s| s.is::<std::io::Error>())
        || [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
        ]
        .iter()
        .any(|code| error.code() == Some(code))
}

static STOPPING: AtomicBool = AtomicBool::new(false);

/// One consumer process of workload 13: consumes into the ledger until its standard input closes,
/// reconnecting with backoff whenever its connection fails, then prints how often it reconnected.
pub fn consumer_process(system: &str) -> Res<()> {
    let system = SYSTEMS
        .into_iter()
        .find(|s| arg_name(*s) == system)
        .ok_or("unknown system")?;
    let url = format!(
        "{} application_name={APPLICATION}",
        std::env::var("BENCH_URL")?
    );
    // The parent closes the pipe to stop us, and so does its death.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        STOPPING.store(true, Ordering::Relaxed);
    });
    let stopping = || STOPPING.load(Ordering::Relaxed);
    let (mut reconnects, mut failures) = (0u32, 0u32);
    let mut reported = HashSet::new();
    while !stopping() {
        let Some(mut client) = connect_with_backoff(&url, &mut failures, stopping) else {
            break;
        };
        let outcome = LedgerConsumer::new(&mut client, system).and_then(|consumer| {
            while !stopping() {
                consumer.step(&mut client)?;
            }
            Ok(())
        });
        if let Err(error) = outcome {
            reconnects += 1;
            // Anything a fault does not explain is a bug of the bench or of the queue: say it once.
            if !caused_by_fault(error.as_ref()) && reported.insert(error.to_string()) {
                eprintln!("fault consumer ({}): {error:?}", arg_name(system));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    println!("{reconnects}");
    Ok(())
}

pub fn spawn_consumer(system: System) -> Res<Child> {
    Ok(Command::new(std::env::current_exe()?)
        .args([CONSUMER_COMMAND, arg_name(system)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?)
}

/// Stops the consumer processes; returns how often they reconnected in all.
pub fn stop_consumers(children: Vec<Child>) -> Res<u32> {
    let mut reconnects = 0;
    for mut child in children {
        drop(child.stdin.take());
        let output = child.wait_with_output()?;
        reconnects += String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse::<u32>()
            .unwrap_or(0);
    }
    Ok(reconnects)
}

/// The ledger against what the producer sent.
pub struct Check {
    pub sent: usize,
    pub in_doubt: usize,
    pub in_doubt_acked: usize,
    pub acked: usize,
    pub dead: usize,
    pub twice: usize,
    pub lost: usize,
    /// Ledger rows of no message sent: a bug of the bench.
    pub unknown: usize,
    pub left: i64,
}

impl Check {
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.twice == 0 && self.unknown == 0
    }

    pub fn headline(&self) -> String {
        format!(
            "{} lost, {} twice of {} sent",
            self.lost,
            self.twice,
            format_value(self.sent as f64)
        )
    }

    pub fn summary(&self) -> String {
        format!(
            "{} ({} acked, {} dead-lettered; {} sends in doubt, {} of them acked{}{})",
            self.headline(),
            format_value(self.acked as f64),
            self.dead,
            self.in_doubt,
            self.in_doubt_acked,
            if self.unknown > 0 {
                format!("; {} acks of no send", self.unknown)
            } else {
                String::new()
            },
            if self.left > 0 {
                format!("; {} left after the drain", self.left)
            } else {
                String::new()
            },
        )
    }
}

pub fn check(sent: &Sent, ledger: &[(i64, i64, i64)], dead: &[i64], left: i64) -> Check {
    let mut times: HashMap<i64, usize> = HashMap::new();
    for (seq, _, _) in ledger {
        *times.entry(*seq).or_default() += 1;
    }
    let dead: HashSet<i64> = dead.iter().copied().collect();
    let doubted: HashSet<i64> = sent.in_doubt.iter().copied().collect();
    let confirmed: HashSet<i64> = sent.confirmed.iter().copied().collect();
    Check {
        sent: sent.confirmed.len(),
        in_doubt: sent.in_doubt.len(),
        in_doubt_acked: doubted.iter().filter(|s| times.contains_key(s)).count(),
        acked: times.len(),
        dead: dead.len(),
        twice: times.values().filter(|n| **n > 1).count(),
        lost: confirmed
            .iter()
            .filter(|s| !times.contains_key(s) && !dead.contains(s))
            .count(),
        unknown: times
            .keys()
            .filter(|s| !confirmed.contains(s) && !doubted.contains(s))
            .count(),
        left,
    }
}
