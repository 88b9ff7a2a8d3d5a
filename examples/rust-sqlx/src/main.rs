//! An order service using sqlx: the order row and its event in one transaction. Run against
//! PG_OUTBOX_DSN (see `make up`); exits non-zero if the outbox misbehaves.
use serde_json::json;
use sqlx::{Connection, PgConnection};

async fn create_order(tx: &mut PgConnection, id: i64, total: f64) -> Result<i64, sqlx::Error> {
    sqlx::query("INSERT INTO sqlx_orders (id, total) VALUES ($1, $2)").bind(id).bind(total).execute(&mut *tx).await?;
    sqlx::query_scalar(
        "SELECT outbox.enqueue_message('orders.created', $1, key => $2, headers => '{\"source\": \"sqlx\"}')",
    )
    .bind(json!({"id": id, "total": total}))
    .bind(id.to_string())
    .fetch_one(&mut *tx)
    .await
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dsn = std::env::var("PG_OUTBOX_DSN")?;
    let mut db = PgConnection::connect(&format!("postgres:///?{}", dsn.replace(' ', "&"))).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS sqlx_orders (id bigint PRIMARY KEY, total float8)").execute(&mut db).await?;
    let base = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;

    let mut tx = db.begin().await?;
    let committed = create_order(&mut tx, base, 99.5).await?;
    tx.commit().await?;
    let delivered: bool = sqlx::query_scalar("SELECT outbox.wait_for_delivery($1, '15 seconds')")
        .bind(committed)
        .fetch_one(&mut db)
        .await?;
    assert!(delivered, "the committed order's event reached Kafka");

    let mut tx = db.begin().await?;
    let rolled_back = create_order(&mut tx, base + 1, 12.0).await?;
    tx.rollback().await?;
    let status: Option<String> =
        sqlx::query_scalar("SELECT outbox.message_status($1)").bind(rolled_back).fetch_one(&mut db).await?;
    assert_eq!(status, None, "a rolled-back event does not exist");
    let order: Option<i64> =
        sqlx::query_scalar("SELECT id FROM sqlx_orders WHERE id = $1").bind(base + 1).fetch_optional(&mut db).await?;
    assert_eq!(order, None);
    println!("sqlx example: committed message {committed} delivered, rolled-back message {rolled_back} absent");
    println!("2 passed, 0 failed");
    Ok(())
}
