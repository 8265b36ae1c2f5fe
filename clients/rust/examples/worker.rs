//! A worker: consumes `emails` with 8 handlers until Ctrl-C, then shuts down without leaving a message
//! locked. `BUSSIG_URL="host=... dbname=..." cargo run -p bussig-client --example worker`
use std::time::Duration;

use bussig_client::{connect_no_tls, CancellationToken, Consumer, Failure, Message};
use serde::Deserialize;

#[derive(Deserialize)]
struct Email {
    to: String,
}

#[tokio::main]
async fn main() -> bussig_client::Result<()> {
    let url = std::env::var("BUSSIG_URL").unwrap_or_else(|_| "host=127.0.0.1 dbname=bussig".into());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    let consumer = Consumer::new(connect_no_tls(url), "emails")
        .concurrency(8)
        .lock_timeout(Duration::from_secs(60));
    let stats = consumer.stats();
    consumer
        .run(
            |m: Message<Email>| async move {
                if !m.payload.to.contains('@') {
                    return Err(Failure::dead_letter("no address"));
                }
                println!(
                    "sending to {} (delivery {})",
                    m.payload.to, m.delivery_count
                );
                Ok(())
            },
            shutdown,
        )
        .await?;
    println!("handled {:?}", stats.handled);
    Ok(())
}
