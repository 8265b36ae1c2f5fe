//! Broadcast: every running copy of this program gets every `cache.>` message (run it twice, then
//! `SELECT bussig.publish('cache.users', '{"id": 7}')`). Ctrl-C drops this copy's queue.
//! `BUSSIG_URL="host=... dbname=..." cargo run -p bussig-client --example broadcast`
use bussig_client::{connect_no_tls, Broadcast, CancellationToken, Message};

#[tokio::main]
async fn main() -> bussig_client::Result<()> {
    let url = std::env::var("BUSSIG_URL").unwrap_or_else(|_| "host=127.0.0.1 dbname=bussig".into());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    let broadcast = Broadcast::subscribe(connect_no_tls(url), "cache.>").await?;
    println!("listening on {}", broadcast.queue());
    broadcast
        .run(
            |m: Message| async move {
                println!("invalidate {:?}: {}", m.subject, m.payload);
                Ok(())
            },
            shutdown,
        )
        .await
}
