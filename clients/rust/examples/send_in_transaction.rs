//! Sending in the application's own transaction: the order row and its message commit together, or
//! neither does. `BUSSIG_URL="host=... dbname=..." cargo run -p bussig-client --example send_in_transaction`
use bussig_client::{connect_no_tls, send, SendOptions};
use serde_json::json;

#[tokio::main]
async fn main() -> bussig_client::Result<()> {
    let url = std::env::var("BUSSIG_URL").unwrap_or_else(|_| "host=127.0.0.1 dbname=bussig".into());
    let mut client = (connect_no_tls(url))().await?;
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS orders (id bigserial PRIMARY KEY, total bigint);
             SELECT bussig.create_queue('order_events');",
        )
        .await?;

    let tx = client.transaction().await?;
    let order: i64 = tx
        .query_one("INSERT INTO orders (total) VALUES (4200) RETURNING id", &[])
        .await?
        .get(0);
    let options = SendOptions::new()
        .dedup_id(format!("order-{order}-created"))
        .header("type", "order.created");
    send(
        &tx,
        "order_events",
        &json!({"order": order, "total": 4200}),
        &options,
    )
    .await?;
    tx.commit().await?;
    println!("order {order} and its event committed together");
    Ok(())
}
