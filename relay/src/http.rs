//! `/metrics`, `/health` and `/ready` over a minimal HTTP/1.1 server: one request per connection,
//! GET only, which is all Prometheus and orchestrators ask for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tracing::debug;

use crate::bus::Bus;
use crate::metrics::Metrics;

const MAX_REQUEST_HEAD: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const DATABASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the endpoints report on; the database session here serves the checks and the lag metrics.
pub struct Status {
    pub metrics: Arc<Metrics>,
    pub nats: async_nats::Client,
    pub database_url: String,
    pub database: Mutex<Option<Bus>>,
    pub stopping: AtomicBool,
}

impl Status {
    /// Answers a query on the monitoring session, reconnecting it when needed.
    pub async fn database_reachable(&self) -> bool {
        let check = async {
            let mut session = self.database.lock().await;
            if session.as_ref().is_none_or(Bus::is_closed) {
                *session = Bus::connect(&self.database_url, DATABASE_CHECK_TIMEOUT)
                    .await
                    .ok();
            }
            match session.as_ref() {
                Some(bus) => bus.ping().await.is_ok(),
                None => false,
            }
        };
        let up = tokio::time::timeout(DATABASE_CHECK_TIMEOUT, check)
            .await
            .unwrap_or(false);
        self.metrics.database_up.store(up, Ordering::Relaxed);
        up
    }

    pub fn nats_connected(&self) -> bool {
        let up = self.nats.connection_state() == State::Connected;
        self.metrics.nats_up.store(up, Ordering::Relaxed);
        up
    }

    /// Refreshes the per-route ready count and lag.
    pub async fn refresh_lag(&self) {
        if !self.database_reachable().await {
            return;
        }
        let queues: Vec<String> = self.metrics.routes.iter().map(|(q, _)| q.clone()).collect();
        let session = self.database.lock().await;
        let Some(bus) = session.as_ref() else { return };
        match bussig_client::queues(bus.client(), &queues).await {
            Ok(found) => {
                for queue in found {
                    let route = self.metrics.route(&queue.name);
                    route.ready.store(queue.ready, Ordering::Relaxed);
                    route.set_lag(queue.oldest_ready_age.as_secs_f64());
                }
            }
            Err(error) => debug!(%error, "lag query failed"),
        }
    }
}

pub async fn serve(listener: TcpListener, status: Arc<Status>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let status = status.clone();
                tokio::spawn(async move {
                    if let Err(error) = respond(stream, &status).await {
                        debug!(%error, "HTTP request failed");
                    }
                });
            }
            Err(error) => {
                debug!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn respond(mut stream: TcpStream, status: &Status) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
            let n = stream.read(&mut buffer).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read_head)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "request head too slow")
        })??;
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");

    let (code, content_type, body) = if method != "GET" && method != "HEAD" {
        (405, "text/plain", "only GET is served\n".to_string())
    } else {
        match path {
            "/metrics" => {
                status.nats_connected();
                (200, "text/plain; version=0.0.4", status.metrics.render())
            }
            "/health" => (200, "text/plain", "ok\n".to_string()),
            "/ready" => ready(status).await,
            _ => (
                404,
                "text/plain",
                "not found: try /metrics, /health or /ready\n".to_string(),
            ),
        }
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&response).await?;
    stream.shutdown().await
}

/// Ready: both servers reachable and not shutting down; otherwise 503 with what is missing.
async fn ready(status: &Status) -> (u16, &'static str, String) {
    let mut missing = Vec::new();
    if status.stopping.load(Ordering::Relaxed) {
        missing.push("shutting down");
    }
    if !status.database_reachable().await {
        missing.push("database unreachable");
    }
    if !status.nats_connected() {
        missing.push("NATS disconnected");
    }
    if missing.is_empty() {
        (200, "text/plain", "ready\n".to_string())
    } else {
        (
            503,
            "text/plain",
            format!("not ready: {}\n", missing.join(", ")),
        )
    }
}
