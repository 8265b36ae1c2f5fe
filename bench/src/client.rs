//! Workload 14: the Rust client's consumer framework (`bussig-client`) with a handler that does
//! nothing, against the raw loop it is built on and against pgmq's read/delete loop, on one
//! connection each and the same batch: what the framework costs per message.
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use postgres::Client;

use crate::load::closed_loop;
use crate::pg::Res;
use crate::report::{only, Section, Target};
use crate::systems::{ack_and_read_step, prefill, reset, Consumer, System, QUEUE};
use crate::workloads::{at_least, index_of, rate_cell};
use crate::Config;

const FRAMEWORK: &str = "bussig-client Consumer, no-op handler";
const RAW: &str = "raw ack_and_read loop, same batch; pgmq read + delete";
/// Handlers in flight: the consumer reads as many as are free, at most 10 at a time.
const CONCURRENCY: [usize; 3] = [1, 4, 16];

pub fn client_consumer(
    cfg: &Config,
    admin: &mut Client,
    targets: &mut Vec<Target>,
) -> Res<Section> {
    let mut section = Section::new(
        "14. The Rust client's consumer",
        "msgs/s",
        &format!(
            "A pre-filled queue of {} messages consumed for the run's time on one connection: \
             `bussig-client`'s `Consumer` at the given concurrency with a handler that returns at once \
             (acks ride on its next `ack_and_read`), the raw `ack_and_read` loop with the batch the \
             consumer reads (the concurrency, at most 10), and pgmq's `read` + `delete` with that batch.",
            crate::report::format_value(cfg.consume_fill as f64)
        ),
    );
    for concurrency in CONCURRENCY {
        let batch = concurrency.min(10) as i32;
        reset(admin, System::Bussig)?;
        prefill(admin, System::Bussig, cfg.consume_fill)?;
        let framework = run_framework(&cfg.url, concurrency, cfg.run)?;
        section.add(
            FRAMEWORK,
            Some(concurrency),
            only(System::Bussig, framework),
        );

        reset(admin, System::Bussig)?;
        prefill(admin, System::Bussig, cfg.consume_fill)?;
        let raw = closed_loop(&cfg.url, 1, cfg.run, true, |c, _| {
            ack_and_read_step(c, QUEUE, batch)
        })?;
        let mut cells = only(System::Bussig, rate_cell(&raw));
        reset(admin, System::Pgmq)?;
        prefill(admin, System::Pgmq, cfg.consume_fill)?;
        let pgmq = closed_loop(&cfg.url, 1, cfg.run, true, |c, _| {
            Ok(Consumer::new(c, System::Pgmq, QUEUE, batch, None)?.step())
        })?;
        cells[index_of(System::Pgmq)] = Some(rate_cell(&pgmq));
        section.add(RAW, Some(concurrency), cells);
    }
    for concurrency in CONCURRENCY {
        let framework = section.value(FRAMEWORK, Some(concurrency), System::Bussig);
        let raw = section.value(RAW, Some(concurrency), System::Bussig);
        let ratio = framework.zip(raw).map_or(f64::NAN, |(a, b)| a / b);
        targets.push(at_least(
            format!("client Consumer vs raw ack_and_read loop, concurrency {concurrency}"),
            ratio,
            0.9,
        ));
    }
    Ok(section)
}

/// Runs the consumer for `duration` and returns its rate.
fn run_framework(url: &str, concurrency: usize, duration: Duration) -> Res<crate::report::Cell> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handled = runtime.block_on(async {
        let shutdown = bussig_client::CancellationToken::new();
        let consumer = bussig_client::Consumer::new(bussig_client::connect_no_tls(url), QUEUE)
            .concurrency(concurrency)
            .wait(Duration::from_millis(100));
        let stats = consumer.stats();
        let running = tokio::spawn(consumer.run(
            |_: bussig_client::Message<serde_json::Value>| async { Ok(()) },
            shutdown.clone(),
        ));
        let started = Instant::now();
        tokio::time::sleep(duration).await;
        let handled = stats.handled.load(Ordering::Relaxed);
        let elapsed = started.elapsed();
        shutdown.cancel();
        running.await??;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((handled, elapsed))
    });
    let (handled, elapsed) = handled.map_err(|error| error.to_string())?;
    Ok(crate::report::Cell {
        value: handled as f64 / elapsed.as_secs_f64(),
        detail: String::new(),
    })
}
