//! The SQL API: what enqueue_message accepts, what it refuses (with which SQLSTATE), and that a
//! refused call writes nothing.
use pg_outbox_tests::{sqlstate, BrokerKind, Cluster};

fn cluster() -> Cluster {
    Cluster::start(&BrokerKind::Kafka.shared_bootstrap(), "")
}

fn message_rows(client: &mut postgres::Client) -> i64 {
    client.query_one("SELECT count(*) FROM outbox.messages", &[]).unwrap().get(0)
}

fn refused(client: &mut postgres::Client, sql: &str) -> String {
    let err = client.batch_execute(sql).expect_err(sql);
    sqlstate(&err)
}

#[test]
fn enqueue_returns_increasing_message_ids_in_and_out_of_transactions() {
    let c = cluster();
    let mut db = c.client();
    let a: i64 = db.query_one("SELECT outbox.enqueue_message('t1', '{\"a\": 1}'::jsonb)", &[]).unwrap().get(0);
    let mut tx = db.transaction().unwrap();
    let b: i64 = tx
        .query_one(
            "SELECT outbox.enqueue_message('t1', '\\x0001ff'::bytea, key => 'k', headers => '{\"h\": \"v\"}')",
            &[],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    assert!(b > a, "{b} > {a}");
    assert_eq!(message_rows(&mut db), 2);
}

#[test]
fn null_or_empty_topic_is_refused() {
    let c = cluster();
    let mut db = c.client();
    assert_eq!(refused(&mut db, "SELECT outbox.enqueue_message(NULL, '{}'::jsonb)"), "22004");
    assert_eq!(refused(&mut db, "SELECT outbox.enqueue_message('', '{}'::jsonb)"), "22023");
    assert_eq!(message_rows(&mut db), 0);
}

#[test]
fn topic_names_kafka_rejects_are_refused() {
    let c = cluster();
    let mut db = c.client();
    let long = "x".repeat(250);
    for topic in [".", "..", "has space", "slash/es", "ümlaut", long.as_str()] {
        let sql = format!("SELECT outbox.enqueue_message('{topic}', '{{}}'::jsonb)");
        assert_eq!(refused(&mut db, &sql), "22023", "{topic}");
    }
    let ok = "x".repeat(249);
    db.batch_execute(&format!("SELECT outbox.enqueue_message('{ok}', '{{}}'::jsonb)")).unwrap();
    db.batch_execute("SELECT outbox.enqueue_message('Orders_v2.created-eu', '{}'::jsonb)").unwrap();
    assert_eq!(message_rows(&mut db), 2);
}

#[test]
fn headers_must_be_a_json_object_of_strings() {
    let c = cluster();
    let mut db = c.client();
    // Nested deeper than the JSON parser goes: refused as headers, not as an internal error.
    let deep = format!("{{\"deep\": {}{}}}", "[".repeat(300), "]".repeat(300));
    for headers in ["[\"a\"]", "\"text\"", "{\"n\": 1}", "{\"nested\": {\"a\": \"b\"}}", "{\"nul\": null}", &deep] {
        let sql = format!("SELECT outbox.enqueue_message('t', '{{}}'::jsonb, headers => '{headers}')");
        let err = db.batch_execute(&sql).expect_err(&sql);
        assert_eq!(sqlstate(&err), "22023", "{headers}");
        let text = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
        assert!(text.contains("header"), "message names the problem: {text}");
    }
    assert_eq!(message_rows(&mut db), 0);
}

#[test]
fn payload_over_max_message_bytes_is_refused_and_at_the_limit_accepted() {
    let c = cluster();
    let mut db = c.client();
    db.batch_execute("SET pg_outbox.max_message_bytes = 10").unwrap();
    // '"12345678"' is exactly 10 bytes of JSON text.
    db.batch_execute("SELECT outbox.enqueue_message('t', '\"12345678\"'::jsonb)").unwrap();
    assert_eq!(refused(&mut db, "SELECT outbox.enqueue_message('t', '\"123456789\"'::jsonb)"), "54000");
    db.batch_execute("SELECT outbox.enqueue_message('t', '\\x00010203040506070809'::bytea)").unwrap();
    assert_eq!(refused(&mut db, "SELECT outbox.enqueue_message('t', '\\x0001020304050607080910'::bytea)"), "54000");
    assert_eq!(message_rows(&mut db), 2);
}

#[test]
fn a_refused_message_leaves_the_transaction_aborted_and_nothing_written() {
    let c = cluster();
    let mut db = c.client();
    let mut tx = db.transaction().unwrap();
    tx.batch_execute("SELECT outbox.enqueue_message('ok', '{}'::jsonb)").unwrap();
    assert!(tx.batch_execute("SELECT outbox.enqueue_message('bad topic', '{}'::jsonb)").is_err());
    drop(tx);
    assert_eq!(message_rows(&mut db), 0);
}

#[test]
fn the_default_limit_is_one_mebibyte() {
    let c = cluster();
    let mut db = c.client();
    let limit: String = db.query_one("SHOW pg_outbox.max_message_bytes", &[]).unwrap().get(0);
    assert_eq!(limit, "1MB");
}

#[test]
fn public_gets_nothing_and_outbox_writer_may_enqueue() {
    let c = cluster();
    let mut db = c.client();
    db.batch_execute("CREATE ROLE app LOGIN; CREATE ROLE nobody LOGIN; GRANT outbox_writer TO app").unwrap();
    let mut app =
        postgres::Client::connect(&c.dsn("shop").replace("user=postgres", "user=app"), postgres::NoTls).unwrap();
    app.batch_execute("SELECT outbox.enqueue_message('t', '{}'::jsonb)").unwrap();
    assert_eq!(refused(&mut app, "SELECT * FROM outbox.messages"), "42501");
    let mut nobody =
        postgres::Client::connect(&c.dsn("shop").replace("user=postgres", "user=nobody"), postgres::NoTls).unwrap();
    assert_eq!(refused(&mut nobody, "SELECT outbox.enqueue_message('t', '{}'::jsonb)"), "42501");
    assert_eq!(message_rows(&mut db), 1);
}

#[test]
fn the_default_limit_accepts_exactly_one_mebibyte_and_refuses_one_byte_more() {
    let c = cluster();
    let mut db = c.client();
    // A JSON string of 1,048,574 characters plus its two quotes is exactly 1 MiB of JSON text.
    db.batch_execute("SELECT outbox.enqueue_message('big', to_jsonb(repeat('x', 1048574)))").unwrap();
    let err = db.batch_execute("SELECT outbox.enqueue_message('big', to_jsonb(repeat('x', 1048575)))").unwrap_err();
    assert_eq!(sqlstate(&err), "54000");
    db.batch_execute("SELECT outbox.enqueue_message('big', convert_to(repeat('x', 1048576), 'UTF8'))").unwrap();
    let err =
        db.batch_execute("SELECT outbox.enqueue_message('big', convert_to(repeat('x', 1048577), 'UTF8'))").unwrap_err();
    assert_eq!(sqlstate(&err), "54000");
    assert_eq!(message_rows(&mut db), 2);
}
