//! Request/reply: a price service answers on `prices`, and a client asks it.
//! `BUSSIG_URL="host=... dbname=..." cargo run -p bussig-client --example request_reply`
use std::time::Duration;

use bussig_client::{connect_no_tls, CancellationToken, Consumer, Message, Requester};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Sku(String);

#[derive(Serialize, Deserialize, Debug)]
struct Price {
    cents: i64,
}

#[tokio::main]
async fn main() -> bussig_client::Result<()> {
    let url = std::env::var("BUSSIG_URL").unwrap_or_else(|_| "host=127.0.0.1 dbname=bussig".into());
    let setup = (connect_no_tls(url.clone()))().await?;
    setup
        .execute("SELECT bussig.create_queue('prices')", &[])
        .await?;

    let shutdown = CancellationToken::new();
    let service = tokio::spawn(Consumer::new(connect_no_tls(url.clone()), "prices").run(
        |m: Message<Sku>| async move {
            let cents = m.payload.0.len() as i64 * 100;
            m.reply(&Price { cents }).await?;
            Ok(())
        },
        shutdown.clone(),
    ));

    let requester = Requester::start(connect_no_tls(url)).await?;
    let price: Message<Price> = requester
        .request("prices", &Sku("A-1".into()), Duration::from_secs(5))
        .await?;
    println!("A-1 costs {:?}", price.payload);
    requester.stop().await?;
    shutdown.cancel();
    service.await.expect("the service task")?;
    Ok(())
}
