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
pub struct JsonbText(pub &'static str);

impl ToSql for JsonbText {
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

pub fn payloads(count: usize) -> Vec<JsonbText> {
    vec![JsonbText(PAYLOAD); count]
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

/// Sleeps until `deadline`, returning at once when it has passed: paced producers catch up instead of
/// drifting.
pub fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}
