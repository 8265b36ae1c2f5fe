//! Prometheus metrics in the text exposition format, kept in atomics: a handful of series per route
//! do not need a metrics library.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds of the batch duration histogram, in seconds.
const DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A series written for every route: name, help text, and where its value comes from.
type CounterSeries = (&'static str, &'static str, fn(&RouteMetrics) -> &AtomicU64);
type GaugeSeries = (&'static str, &'static str, fn(&RouteMetrics) -> f64);

#[derive(Default)]
pub struct RouteMetrics {
    pub published: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub unavailable: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Messages whose lock ran out while the relay held them: bussig delivers them again, and
    /// JetStream drops the re-sent copy only within its duplicate window.
    pub locks_lost: AtomicU64,
    pub in_flight: AtomicI64,
    /// f64 bits: age of the oldest ready message, refreshed by the lag watcher.
    lag_seconds: AtomicU64,
    pub ready: AtomicI64,
    batch_buckets: [AtomicU64; DURATION_BUCKETS.len()],
    batch_count: AtomicU64,
    /// Microseconds, so the sum stays an integer.
    batch_micros: AtomicU64,
}

impl RouteMetrics {
    pub fn observe_batch(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        for (bound, bucket) in DURATION_BUCKETS.iter().zip(&self.batch_buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.batch_count.fetch_add(1, Ordering::Relaxed);
        self.batch_micros
            .fetch_add(duration.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn set_lag(&self, seconds: f64) {
        self.lag_seconds.store(seconds.to_bits(), Ordering::Relaxed);
    }

    fn lag(&self) -> f64 {
        f64::from_bits(self.lag_seconds.load(Ordering::Relaxed))
    }
}

/// Counters of one inbound route (JetStream into bussig).
#[derive(Default)]
pub struct InboundMetrics {
    pub stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub failed: AtomicU64,
}

type InboundSeries = (
    &'static str,
    &'static str,
    fn(&InboundMetrics) -> &AtomicU64,
);

pub struct Metrics {
    pub routes: Vec<(String, Arc<RouteMetrics>)>,
    /// By inbound route name, `<stream>/<consumer>`.
    pub inbound: Vec<(String, Arc<InboundMetrics>)>,
    pub database_up: AtomicBool,
    pub nats_up: AtomicBool,
}

impl Metrics {
    pub fn new(
        queues: impl IntoIterator<Item = String>,
        inbound: impl IntoIterator<Item = String>,
    ) -> Metrics {
        Metrics {
            routes: queues
                .into_iter()
                .map(|q| (q, Arc::new(RouteMetrics::default())))
                .collect(),
            inbound: inbound
                .into_iter()
                .map(|name| (name, Arc::new(InboundMetrics::default())))
                .collect(),
            database_up: AtomicBool::new(false),
            nats_up: AtomicBool::new(false),
        }
    }

    pub fn route(&self, queue: &str) -> Arc<RouteMetrics> {
        self.routes
            .iter()
            .find(|(q, _)| q == queue)
            .map(|(_, m)| m.clone())
            .expect("metrics are made for every configured route")
    }

    pub fn inbound(&self, name: &str) -> Arc<InboundMetrics> {
        self.inbound
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m.clone())
            .expect("metrics are made for every configured inbound route")
    }

    /// The text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters: [CounterSeries; 4] = [
            (
                "bussig_relay_published_total",
                "Messages JetStream stored (acknowledged in bussig afterwards).",
                |m| &m.published,
            ),
            (
                "bussig_relay_duplicates_total",
                "Re-sent messages JetStream recognised by Nats-Msg-Id and did not store again.",
                |m| &m.duplicates,
            ),
            (
                "bussig_relay_dead_lettered_total",
                "Messages the relay moved, or had bussig move, to the dead-letter queue.",
                |m| &m.dead_lettered,
            ),
            (
                "bussig_relay_locks_lost_total",
                "Messages whose lock ran out while the relay held them (bussig delivers them again).",
                |m| &m.locks_lost,
            ),
        ];
        for (name, help, field) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (queue, m) in &self.routes {
                let _ = writeln!(
                    out,
                    "{name}{{route=\"{}\"}} {}",
                    escape(queue),
                    load(field(m))
                );
            }
        }

        let name = "bussig_relay_failed_total";
        let _ = writeln!(
            out,
            "# HELP {name} Failed publish attempts: rejected by JetStream, or NATS unavailable (retried).\n# TYPE {name} counter"
        );
        for (queue, m) in &self.routes {
            for (reason, value) in [("rejected", &m.rejected), ("unavailable", &m.unavailable)] {
                let _ = writeln!(
                    out,
                    "{name}{{route=\"{}\",reason=\"{reason}\"}} {}",
                    escape(queue),
                    load(value)
                );
            }
        }

        let gauges: [GaugeSeries; 3] = [
            (
                "bussig_relay_in_flight",
                "Messages this relay holds locked: read, not yet settled.",
                |m| m.in_flight.load(Ordering::Relaxed) as f64,
            ),
            (
                "bussig_relay_lag_seconds",
                "Age of the oldest ready message of the route's queue.",
                RouteMetrics::lag,
            ),
            (
                "bussig_relay_ready_messages",
                "Ready messages in the route's queue.",
                |m| m.ready.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (queue, m) in &self.routes {
                let _ = writeln!(out, "{name}{{route=\"{}\"}} {}", escape(queue), value(m));
            }
        }

        let name = "bussig_relay_batch_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from reading a batch to settling all of it.\n# TYPE {name} histogram"
        );
        for (queue, m) in &self.routes {
            let queue = escape(queue);
            for (bound, bucket) in DURATION_BUCKETS.iter().zip(&m.batch_buckets) {
                let _ = writeln!(
                    out,
                    "{name}_bucket{{route=\"{queue}\",le=\"{bound}\"}} {}",
                    load(bucket)
                );
            }
            let count = load(&m.batch_count);
            let _ = writeln!(
                out,
                "{name}_bucket{{route=\"{queue}\",le=\"+Inf\"}} {count}"
            );
            let sum = load(&m.batch_micros) as f64 / 1e6;
            let _ = writeln!(out, "{name}_sum{{route=\"{queue}\"}} {sum}");
            let _ = writeln!(out, "{name}_count{{route=\"{queue}\"}} {count}");
        }

        let inbound: [InboundSeries; 4] = [
            (
                "bussig_relay_inbound_stored_total",
                "JetStream messages committed to bussig (acked to NATS afterwards).",
                |m| &m.stored,
            ),
            (
                "bussig_relay_inbound_duplicates_total",
                "Redelivered JetStream messages bussig already had (same dedup_id; for a subject, also when no queue took it).",
                |m| &m.duplicates,
            ),
            (
                "bussig_relay_inbound_rejected_total",
                "JetStream messages bussig can never take (too large, not text): terminated in NATS.",
                |m| &m.rejected,
            ),
            (
                "bussig_relay_inbound_failed_total",
                "JetStream messages bussig refused for now (e.g. unknown queue): given back to NATS for later.",
                |m| &m.failed,
            ),
        ];
        for (name, help, field) in inbound {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (inbound, m) in &self.inbound {
                let _ = writeln!(
                    out,
                    "{name}{{inbound=\"{}\"}} {}",
                    escape(inbound),
                    load(field(m))
                );
            }
        }

        for (name, help, up) in [
            (
                "bussig_relay_database_up",
                "1 when the database answered the last check.",
                &self.database_up,
            ),
            (
                "bussig_relay_nats_up",
                "1 when the NATS connection is established.",
                &self.nats_up,
            ),
        ] {
            let value = u8::from(up.load(Ordering::Relaxed));
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}

/// Label values escape backslash, quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_series_per_route() {
        let metrics = Metrics::new(["orders".to_string()], ["PARTNER/in".to_string()]);
        metrics
            .inbound("PARTNER/in")
            .stored
            .fetch_add(2, Ordering::Relaxed);
        let route = metrics.route("orders");
        route.published.fetch_add(3, Ordering::Relaxed);
        route.observe_batch(Duration::from_millis(20));
        route.set_lag(1.5);
        let text = metrics.render();
        for line in [
            "bussig_relay_published_total{route=\"orders\"} 3",
            "bussig_relay_failed_total{route=\"orders\",reason=\"rejected\"} 0",
            "bussig_relay_lag_seconds{route=\"orders\"} 1.5",
            "bussig_relay_batch_duration_seconds_bucket{route=\"orders\",le=\"0.01\"} 0",
            "bussig_relay_batch_duration_seconds_bucket{route=\"orders\",le=\"0.025\"} 1",
            "bussig_relay_batch_duration_seconds_count{route=\"orders\"} 1",
            "bussig_relay_nats_up 0",
            "bussig_relay_inbound_stored_total{inbound=\"PARTNER/in\"} 2",
            "bussig_relay_inbound_duplicates_total{inbound=\"PARTNER/in\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
