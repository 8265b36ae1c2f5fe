//! pgmq as a peer: installed from the SQL scripts embedded in the `pgmq` crate (no extension files),
//! and the housekeeping the workloads need around its one-table-per-queue layout.

use postgres::Client;

use crate::pg::Res;

/// Installs pgmq's SQL in the bench database through the crate's own installer (it runs on sqlx, so
/// on a small tokio runtime here), and returns the installed version.
pub fn install(url: &str) -> Res<String> {
    let url = sqlx_url(url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let pgmq = pgmq::PGMQueueExt::new(url, 1).await?;
        pgmq.install_sql_from_embedded().await?;
        let version = pgmq.installed_version().await?;
        Ok(version.map_or_else(|| "unknown".into(), |v| v.to_string()))
    })
}

/// The key=value connection string the bench uses, as the URL sqlx takes.
fn sqlx_url(url: &str) -> Res<String> {
    let config: postgres::Config = url.parse()?;
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let dbname = config.get_dbname().unwrap_or("postgres");
    // pgmq's URL parser insists on a password; trust authentication ignores it.
    let password = config
        .get_password()
        .map_or("unused".into(), |p| String::from_utf8_lossy(p).into_owned());
    Ok(format!(
        "postgres://{user}:{password}@{host}:{port}/{dbname}"
    ))
}

/// Drops `queue` if it exists and creates it empty.
pub fn recreate(admin: &mut Client, queue: &str) -> Res<()> {
    drop_queue(admin, queue)?;
    admin.execute("SELECT pgmq.create($1)", &[&queue])?;
    Ok(())
}

pub fn drop_queue(admin: &mut Client, queue: &str) -> Res<()> {
    let exists: bool = admin
        .query_one(
            "SELECT EXISTS (SELECT FROM pgmq.meta WHERE queue_name = $1)",
            &[&queue],
        )?
        .get(0);
    if exists {
        admin.execute("SELECT pgmq.drop_queue($1)", &[&queue])?;
    }
    Ok(())
}

/// The queue's message table and its archive, those that exist.
pub fn tables(admin: &mut Client, queue: &str) -> Res<Vec<String>> {
    let rows = admin.query(
        "SELECT t::text FROM unnest(array[to_regclass('pgmq.' || quote_ident('q_' || $1)),
                                          to_regclass('pgmq.' || quote_ident('a_' || $1))]) t
          WHERE t IS NOT NULL",
        &[&queue],
    )?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}
