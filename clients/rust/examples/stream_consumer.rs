//! A stream's producer and a member of its consumer group, as the README's "Streams" section shows
//! them: appends an order in a transaction, then bills orders with 4 partitions at a time until
//! Ctrl-C. `BUSSIG_URL="host=... dbname=..." cargo run -p bussig-client --example stream_consumer`
//! (the stream and group made first: `SELECT bussig.create_stream('orders', 4)`,
//! `SELECT bussig.create_consumer_group('orders', 'billing', 'earliest')`).
use bussig_client::{
    append, connect_no_tls, AppendOptions, CancellationToken, StreamConsumer, StreamRecord,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Order {
    id: i64,
    total: i64,
}

async fn bill(order: &Order) -> Result<(), std::io::Error> {
    println!("billing order {} for {}", order.id, order.total);
    Ok(())
}

#[tokio::main]
#[rustfmt::skip] // The README shows these lines as they are here.
async fn main() -> bussig_client::Result<()> {
    let url = std::env::var("BUSSIG_URL").unwrap_or_else(|_| "host=127.0.0.1 dbname=bussig".into());
    let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });

    // Records with the same key go to the same partition and are read in append order. The append
    // commits with the transaction; it returns the partition, not the seq (given at commit).
    let tx = client.transaction().await?;
    append(&tx, "orders", &Order { id: 7, total: 9 }, &AppendOptions::new().key("customer-7").subject("orders.created")).await?;
    tx.commit().await?;

    // Each partition's records in seq order, partitions side by side; each partition is committed up to
    // the last record handled when its share of a read is done.
    StreamConsumer::new(connect_no_tls(url), "orders", "billing")
        .concurrency(4)
        .run(|r: StreamRecord| async move { bill(&r.payload_as::<Order>()?).await?; Ok(()) }, shutdown.clone())
        .await?;
    Ok(())
}
