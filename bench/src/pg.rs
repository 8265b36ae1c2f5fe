//! Connections, the value types passed to the three systems, and timing helpers.

use std::error::Error;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use postgres::{Client, NoTls};

pub type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

pub fn connect(url: &str) -> Res<Client> {
    Ok(Client::connect(url, NoTls)?)
}

/// The ~100-byte JSON object every system sends, as text, so no system pays for serialising it.
pub const PAYLOAD: &str = r#"{"order_id": 1048576, "customer": "c-00042", "amount_cents": 129900, "currency": "EUR", "items": 3}"#;

/// A JSON text sent as `jsonb` in binary form (a version byte, then the text) without parsing it here.
#[derive(Debug, Clone, Copy)]
pub struct JsonbText<'a>(pub &'a str);

impl ToSql for JsonbText<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.extend_from_slice(&[1]);
        }
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }
    to_sql_checked!();
}

/// A column the consumer receives but does not look into (a payload): only its size is kept.
pub struct Received(pub usize);

impl<'a> FromSql<'a> for Received {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        Ok(Received(raw.len()))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

pub fn payloads(count: usize) -> Vec<JsonbText<'static>> {
    vec![JsonbText(PAYLOAD); count]
}

/// A message's sequence number and the time it was sent, carried in its payload: what a consumer
/// needs to tell its latency and a ledger to tell a lost or doubled message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub seq: i64,
    /// Microseconds since the Unix epoch, the clock every process on the machine shares.
    pub sent_us: i64,
}

impl Stamp {
    pub fn now(seq: i64) -> Self {
        Stamp {
            seq,
            sent_us: now_us(),
        }
    }

    /// About the size of `PAYLOAD`, in the key order jsonb gives back (shorter keys first).
    pub fn payload(self) -> String {
        format!(
            r#"{{"seq": {}, "sent_us": {}, "currency": "EUR", "customer": "c-00042", "amount_cents": 129900}}"#,
            self.seq, self.sent_us
        )
    }

    fn parse(json: &[u8]) -> Option<Self> {
        let number = |key: &str| -> Option<i64> {
            let key = format!("\"{key}\": ");
            let start = json.windows(key.len()).position(|w| w == key.as_bytes())? + key.len();
            let digits = json[start..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            std::str::from_utf8(&json[start..start + digits])
                .ok()?
                .parse()
                .ok()
        };
        Some(Stamp {
            seq: number("seq")?,
            sent_us: number("sent_us")?,
        })
    }
}

impl<'a> FromSql<'a> for Stamp {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        // Binary jsonb is a version byte, then the text.
        let json = if *ty == Type::JSONB { &raw[1..] } else { raw };
        Stamp::parse(json).ok_or_else(|| "a payload without seq and sent_us".into())
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Sorted samples in milliseconds, with nearest-rank percentiles.
#[derive(Default, Clone, Debug)]
pub struct Samples(Vec<f64>);

impl Samples {
    pub fn new(mut values: Vec<f64>) -> Self {
        values.sort_by(|a, b| a.total_cmp(b));
        Samples(values)
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn merge(parts: impl IntoIterator<Item = Samples>) -> Self {
        Samples::new(parts.into_iter().flat_map(|part| part.0).collect())
    }
    pub fn percentile(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }
}

/// Connects, retrying with a backoff from 50 ms to 1 s while the server is away (restarting, or it
/// ended this client's backend), until `give_up` says to stop; `None` then. Counts the failed tries.
pub fn connect_with_backoff(
    url: &str,
    failures: &mut u32,
    give_up: impl Fn() -> bool,
) -> Option<Client> {
    let mut pause = Duration::from_millis(50);
    while !give_up() {
        match connect(url) {
            Ok(client) => return Some(client),
            Err(_) => {
                *failures += 1;
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
    None
}

/// Sleeps until `deadline`, returning at once when it has passed: paced producers catch up instead of
/// drifting.
pub fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_comes_back_from_its_payload() {
        let stamp = Stamp {
            seq: 42,
            sent_us: 1_765_000_000_123_456,
        };
        let text = stamp.payload();
        assert_eq!(Stamp::parse(text.as_bytes()), Some(stamp));
        let mut jsonb = vec![1u8];
        jsonb.extend_from_slice(text.as_bytes());
        assert_eq!(Stamp::from_sql(&Type::JSONB, &jsonb).ok(), Some(stamp));
        assert_eq!(Stamp::parse(PAYLOAD.as_bytes()), None);
    }
}
