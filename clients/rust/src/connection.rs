//! Connections that come back: a `Connector` opens one, `retry_connecting` tries again with a capped
//! backoff while the database is away, and `Current` is a connection shared by tasks that any of them
//! replaces once it finds it closed.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// Opens a new connection; the consumer calls it again after the database was lost.
pub type Connector =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<Client>> + Send>> + Send + Sync>;

/// A connector for `conninfo` without TLS; the connection runs on a task of its own.
pub fn connect_no_tls(conninfo: impl Into<String>) -> Connector {
    let conninfo: Arc<str> = conninfo.into().into();
    Arc::new(move || {
        let conninfo = conninfo.clone();
        Box::pin(async move {
            let (client, connection) = config(&conninfo)?.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            Ok(client)
        })
    })
}

/// TCP keepalives start after this long idle unless `conninfo` says otherwise (the system's default
/// is two hours): a server that vanished without closing the socket (a failover, a cable) is noticed
/// within about a minute, also by a read waiting on it, and the connection made anew.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVES_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVES_RETRIES: u32 = 3;

/// `conninfo` parsed, with the keepalives above where it sets none.
pub(crate) fn config(conninfo: &str) -> Result<tokio_postgres::Config> {
    let mut config: tokio_postgres::Config = conninfo.parse()?;
    let defaults = tokio_postgres::Config::new();
    if config.get_keepalives_idle() == defaults.get_keepalives_idle() {
        config.keepalives_idle(KEEPALIVES_IDLE);
    }
    if config.get_keepalives_interval() == defaults.get_keepalives_interval() {
        config.keepalives_interval(KEEPALIVES_INTERVAL);
    }
    if config.get_keepalives_retries() == defaults.get_keepalives_retries() {
        config.keepalives_retries(KEEPALIVES_RETRIES);
    }
    Ok(config)
}

/// The first reconnect waits this long, each next one twice as long, up to `RECONNECT_MAX`.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Runs `connect` until it succeeds or fails other than by the connection, waiting between tries
/// from `RECONNECT_FIRST` doubling up to `RECONNECT_MAX`; the last error once `shutdown` is cancelled.
pub(crate) async fn retry_connecting<T, F>(
    shutdown: &CancellationToken,
    mut connect: impl FnMut() -> F,
) -> Result<T>
where
    F: Future<Output = Result<T>>,
{
    let mut pause = RECONNECT_FIRST;
    loop {
        match connect().await {
            Ok(connected) => return Ok(connected),
            Err(error) if !error.is_connection() => return Err(error),
            Err(error) => {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.cancelled() => return Err(error),
                }
                pause = (pause * 2).min(RECONNECT_MAX);
            }
        }
    }
}

/// A connection as of now, shared by tasks: a consumer's handlers extend their locks and settle on
/// its loop's, a requester sends on its own. Whoever finds it closed connects anew, once for all of
/// them (a consumer's loop may be waiting for that very handler); a reconnect elsewhere replaces it.
#[derive(Clone)]
pub(crate) struct Current {
    held: Arc<tokio::sync::Mutex<Held>>,
    /// None for a connection the caller made and keeps (`delivery::stream`): never made anew.
    connector: Option<Connector>,
}

/// How long `Current` waits for a new connection: the others who need it wait behind (a connect to
/// a server that drops packets can otherwise hang for minutes).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

struct Held {
    client: Arc<Client>,
    /// A call on it failed by the connection: the client may not know it closed yet (it learns
    /// from its connection's task, a moment after the call's error).
    lost: bool,
}

impl Current {
    pub(crate) fn new(client: Arc<Client>, connector: Connector) -> Self {
        Self::with(client, Some(connector))
    }

    /// A connection that is never made anew: calls on it fail once it is lost.
    pub(crate) fn fixed(client: Arc<Client>) -> Self {
        Self::with(client, None)
    }

    fn with(client: Arc<Client>, connector: Option<Connector>) -> Self {
        Current {
            held: Arc::new(tokio::sync::Mutex::new(Held {
                client,
                lost: false,
            })),
            connector,
        }
    }

    /// The connection, connected anew when it was closed or lost (and left as it is when that
    /// fails: the call on it fails, and the next one tries again).
    pub(crate) async fn get(&self) -> Arc<Client> {
        let mut held = self.held.lock().await;
        if let Some(connector) = &self.connector {
            if held.lost || held.client.is_closed() {
                if let Ok(Ok(client)) = tokio::time::timeout(CONNECT_TIMEOUT, connector()).await {
                    *held = Held {
                        client: Arc::new(client),
                        lost: false,
                    };
                }
            }
        }
        held.client.clone()
    }

    /// Runs `call` on the connection; one that failed by the connection marks it lost, so that the
    /// next call connects anew.
    pub(crate) async fn run<T, F>(&self, call: impl FnOnce(Arc<Client>) -> F) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        let client = self.get().await;
        let result = call(client.clone()).await;
        if matches!(&result, Err(error) if error.is_connection()) {
            let mut held = self.held.lock().await;
            if Arc::ptr_eq(&held.client, &client) {
                held.lost = true;
            }
        }
        result
    }

    /// As `run`, and once more on a new connection when the first call lost its own: for calls that
    /// settle deliveries, which a second try cannot apply twice (a spent token matches nothing).
    pub(crate) async fn run_settling<T, F>(&self, call: impl Fn(Arc<Client>) -> F) -> Result<T>
    where
        F: Future<Output = Result<T>>,
    {
        match self.run(&call).await {
            Err(error) if error.is_connection() => self.run(&call).await,
            done => done,
        }
    }

    pub(crate) async fn set(&self, client: Arc<Client>) {
        *self.held.lock().await = Held {
            client,
            lost: false,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalives_are_minutes_not_hours_unless_the_conninfo_says() {
        let plain = config("host=localhost user=me").unwrap();
        assert_eq!(plain.get_keepalives_idle(), KEEPALIVES_IDLE);
        assert_eq!(plain.get_keepalives_interval(), Some(KEEPALIVES_INTERVAL));
        assert_eq!(plain.get_keepalives_retries(), Some(KEEPALIVES_RETRIES));
        let own = config("host=localhost keepalives_idle=7 keepalives_interval=2").unwrap();
        assert_eq!(own.get_keepalives_idle(), Duration::from_secs(7));
        assert_eq!(own.get_keepalives_interval(), Some(Duration::from_secs(2)));
        assert!(config("host=localhost port=notaport").is_err());
    }
}
