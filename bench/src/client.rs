//! Workload 14: the Rust client's consumer framework (`bussig-client`) with a handler that does
//! nothing, against the raw loop it is built on and against pgmq's read/delete loop, on one
//! connection each and the same batch: what the framework costs per message.
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use postgres::types::{Json, Type};
use postgres::Client;
use uuid::Uuid;

use crate::load::closed_loop;
use crate::pg::Res;
use crate::report::{only, Section, Target};
use crate::systems::{prefill, reset, Consumer, Step, System, QUEUE};
use crate::workloads::{at_least, index_of, rate_cell};
use crate::Config;

const FRAMEWORK: &str = "bussig-client Consumer, no-op handler";
const RAW: &str = "raw ack_and_read loop, same batch, every column decoded; pgmq read + delete";
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
             consumer reads (the concurrency, at most 10) that decodes what the consumer hands its \
             handler (every column, the payload as JSON), and pgmq's `read` + `delete` with that batch.",
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
            whole_deliveries_step(c, batch)
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

/// One turn of the raw loop: acks the last batch and reads the next, decoding each delivery as the
/// consumer does before its handler runs.
fn whole_deliveries_step(client: &mut Client, max: i32) -> Res<Step> {
    let statement = client.prepare_typed(
        "SELECT * FROM bussig.ack_and_read($1, $2, $3, $4)",
        &[Type::TEXT, Type::INT8_ARRAY, Type::UUID_ARRAY, Type::INT4],
    )?;
    let mut held: (Option<Vec<i64>>, Option<Vec<Uuid>>) = (None, None);
    Ok(Box::new(move |c| {
        let rows = c.query(&statement, &[&QUEUE, &held.0, &held.1, &max])?;
        let (mut ids, mut tokens) = (
            Vec::with_capacity(rows.len()),
            Vec::with_capacity(rows.len()),
        );
        for row in &rows {
            let delivery: Delivered = (
                row.get("message_id"),
                row.get("lock_token"),
                row.get("subject"),
                row.get::<_, Json<serde_json::Value>>("payload").0,
                row.get::<_, Option<Json<serde_json::Value>>>("headers")
                    .map(|h| h.0),
                row.get("delivery_count"),
                row.get("priority"),
                row.get("enqueued_at"),
                row.get("correlation_id"),
                row.get("reply_to"),
            );
            std::hint::black_box(&delivery);
            ids.push(delivery.0);
            tokens.push(delivery.1);
        }
        held = (Some(ids), Some(tokens));
        Ok(rows.len() as u64)
    }))
}

type Delivered = (
    i64,
    Uuid,
    Option<String>,
    serde_json::Value,
    Option<serde_json::Value>,
    i32,
    i32,
    std::time::SystemTime,
    Option<String>,
    Option<String>,
);

/// Runs the consumer for `duration` and returns its rate.
fn run_framework(url: &str, concurrency: usize, duration: Duration) -> Res<crate::report::Cell> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handled = runtime.block_on(async {
        let shutdown = bussig_client::CancellationToken::new();
        let consumer = bussig_client::Consumer::new(bussig_client::connect_no_tls(url), QUEUE)
            .concurrency(concurrency)
            .wait(Duration::from_millis(100))
            .prepared_statements(true);
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
