//! A queue's settings: their defaults, a caller's change to them, and their checks.
use pgrx::datum::{DatumWithOid, Interval};
use pgrx::pg_sys;

use crate::error::{BusError, BusResult};
use crate::validate;

/// Every setting of a queue, complete and checked.
pub struct QueueSettings {
    pub(super) max_deliveries: i32,
    pub(super) lock_timeout: Interval,
    pub(super) message_ttl: Option<Interval>,
    pub(super) retry_delay: Interval,
    pub(super) retry_delay_max: Interval,
    pub(super) retry_multiplier: f64,
    pub(super) dedup_window: Interval,
    pub(super) notify: bool,
    /// The most messages of the queue locked at once, across all consumers; None for no cap.
    pub(super) max_in_flight: Option<i32>,
}

impl Default for QueueSettings {
    /// The defaults create_queue documents in its signature.
    fn default() -> Self {
        QueueSettings {
            max_deliveries: 5,
            lock_timeout: Interval::from_seconds(30.0),
            message_ttl: None,
            retry_delay: Interval::from_seconds(1.0),
            retry_delay_max: Interval::from_minutes(15),
            retry_multiplier: 2.0,
            dedup_window: Interval::from_minutes(5),
            notify: false,
            max_in_flight: None,
        }
    }
}

/// The settings a caller named; None leaves a setting as it is. A zero message_ttl removes the TTL, a
/// zero max_in_flight the cap.
#[derive(Default)]
pub struct SettingsChange {
    pub max_deliveries: Option<i32>,
    pub lock_timeout: Option<Interval>,
    pub message_ttl: Option<Interval>,
    pub retry_delay: Option<Interval>,
    pub retry_delay_max: Option<Interval>,
    pub retry_multiplier: Option<f64>,
    pub dedup_window: Option<Interval>,
    pub notify: Option<bool>,
    pub max_in_flight: Option<i32>,
}

impl SettingsChange {
    pub(super) fn apply(self, base: QueueSettings) -> BusResult<QueueSettings> {
        let settings = QueueSettings {
            max_deliveries: self.max_deliveries.unwrap_or(base.max_deliveries),
            lock_timeout: self.lock_timeout.unwrap_or(base.lock_timeout),
            message_ttl: match self.message_ttl {
                Some(ttl) if validate::is_zero(&ttl) => None,
                Some(ttl) => Some(ttl),
                None => base.message_ttl,
            },
            retry_delay: self.retry_delay.unwrap_or(base.retry_delay),
            retry_delay_max: self.retry_delay_max.unwrap_or(base.retry_delay_max),
            retry_multiplier: self.retry_multiplier.unwrap_or(base.retry_multiplier),
            dedup_window: self.dedup_window.unwrap_or(base.dedup_window),
            notify: self.notify.unwrap_or(base.notify),
            max_in_flight: match self.max_in_flight {
                Some(0) => None,
                Some(cap) => Some(cap),
                None => base.max_in_flight,
            },
        };
        settings.check()?;
        Ok(settings)
    }
}

impl QueueSettings {
    fn check(&self) -> BusResult<()> {
        if self.max_deliveries < 1 {
            return Err(BusError::invalid("max_deliveries", "it must be at least 1"));
        }
        validate::positive(&self.lock_timeout, "lock_timeout")?;
        if let Some(ttl) = &self.message_ttl {
            validate::not_negative(ttl, "message_ttl")?;
        }
        validate::not_negative(&self.retry_delay, "retry_delay")?;
        validate::not_negative(&self.retry_delay_max, "retry_delay_max")?;
        validate::at_most(
            &self.retry_delay,
            &self.retry_delay_max,
            "retry_delay_max",
            "it must not be shorter than retry_delay",
        )?;
        if !(self.retry_multiplier >= 1.0 && self.retry_multiplier.is_finite()) {
            return Err(BusError::invalid(
                "retry_multiplier",
                "it must be a finite number of at least 1",
            ));
        }
        validate::not_negative(&self.dedup_window, "dedup_window")?;
        if self.max_in_flight.is_some_and(|cap| cap < 1) {
            return Err(BusError::invalid(
                "max_in_flight",
                "it must be at least 1, or 0 for no cap",
            ));
        }
        Ok(())
    }

    /// NOTIFY channels are identifiers of at most 63 bytes: "bussig_" leaves 56 for the name.
    pub(super) fn check_notify(&self, queue: &str) -> BusResult<()> {
        if self.notify && queue.len() > MAX_NOTIFY_QUEUE_NAME {
            return Err(BusError::invalid(
                "notify",
                format!("the channel bussig_{queue} would be longer than 63 bytes; notify needs a queue name of at most {MAX_NOTIFY_QUEUE_NAME} characters"),
            ));
        }
        Ok(())
    }

    pub(super) fn args(&self) -> [DatumWithOid<'static>; 9] {
        [
            self.max_deliveries.into(),
            self.lock_timeout.into(),
            self.message_ttl.into(),
            self.retry_delay.into(),
            self.retry_delay_max.into(),
            self.retry_multiplier.into(),
            self.dedup_window.into(),
            self.notify.into(),
            self.max_in_flight.into(),
        ]
    }
}

const MAX_NOTIFY_QUEUE_NAME: usize = 56;

/// Parameter types of QueueSettings::args(), which statements take first.
const SETTINGS_OIDS: [pg_sys::Oid; 9] = [
    pg_sys::INT4OID,
    pg_sys::INTERVALOID,
    pg_sys::INTERVALOID,
    pg_sys::INTERVALOID,
    pg_sys::INTERVALOID,
    pg_sys::FLOAT8OID,
    pg_sys::INTERVALOID,
    pg_sys::BOOLOID,
    pg_sys::INT4OID,
];

pub(super) const fn settings_then<const EXTRA: usize, const ALL: usize>(
    extra: [pg_sys::Oid; EXTRA],
) -> [pg_sys::Oid; ALL] {
    crate::plans::joined(SETTINGS_OIDS, extra)
}
