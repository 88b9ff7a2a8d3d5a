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

#[test]
fn a_message_row_and_its_index_entries_are_what_an_insert_would_write() {
    let c = cluster();
    let mut db = c.client();
    db.batch_execute("CREATE EXTENSION amcheck").unwrap();
    let mut tx = db.transaction().unwrap();
    let id: i64 = tx
        .query_one(
            "SELECT outbox.enqueue_message('t', '{\"b\": [1, 2], \"a\": \"ü\"}'::jsonb, key => 'k', headers => '{\"h\": \"v\"}')",
            &[],
        )
        .unwrap()
        .get(0);
    let expected =
        tx.query_one("SELECT currval('outbox.message_id_seq'), pg_current_xact_id()::text, now()::text", &[]).unwrap();
    let row = tx
        .query_one(
            "SELECT txid::text, enqueued_at::text, topic, key, payload IS NULL, convert_from(json_text, 'UTF8'),
                    json_payload IS NULL, headers::text, tableoid::regclass::text = 'outbox.messages_' || slot
             FROM outbox.messages WHERE id = $1",
            &[&id],
        )
        .unwrap();
    assert_eq!(id, expected.get::<_, i64>(0), "the id is the sequence's next value");
    assert_eq!(row.get::<_, String>(0), expected.get::<_, String>(1), "txid is pg_current_xact_id()");
    assert_eq!(row.get::<_, String>(1), expected.get::<_, String>(2), "enqueued_at is now()");
    assert_eq!(row.get::<_, String>(2), "t");
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("k"));
    assert!(row.get::<_, bool>(4), "no bytea payload");
    assert_eq!(row.get::<_, String>(5), r#"{"a": "ü", "b": [1, 2]}"#, "the JSON as Kafka receives it");
    assert!(row.get::<_, bool>(6), "no jsonb copy");
    assert_eq!(row.get::<_, String>(7), r#"{"h": "v"}"#);
    assert!(row.get::<_, bool>(8), "the row is in the partition of its slot");
    tx.commit().unwrap();
    // Found through each index, as the worker finds it.
    db.batch_execute("SET enable_seqscan = off; SET enable_bitmapscan = off").unwrap();
    let by_id: i64 = db.query_one("SELECT count(*) FROM outbox.messages WHERE id = $1", &[&id]).unwrap().get(0);
    let by_txid: i64 = db
        .query_one("SELECT count(*) FROM outbox.messages WHERE txid = $1::text::xid8", &[&expected.get::<_, String>(1)])
        .unwrap()
        .get(0);
    assert_eq!((by_id, by_txid), (1, 1));
    // And amcheck finds every stored row in every index of every slot, and the indexes sound.
    db.batch_execute(
        "SELECT count(outbox.enqueue_message('t', to_jsonb(i), key => (i % 7)::text)) FROM generate_series(1, 2000) i",
    )
    .unwrap();
    let checked: i64 = db
        .query_one(
            "SELECT count(bt_index_check(i.indexrelid, true)) FROM pg_index i
             JOIN pg_inherits p ON p.inhrelid = i.indrelid
             WHERE p.inhparent = 'outbox.messages'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(checked, 8, "two indexes on each of the four slots");
}

#[test]
fn enqueue_message_writes_its_row_without_running_an_insert_unless_the_slot_needs_one() {
    let c = cluster();
    let mut db = c.client();
    // auto_explain logs every statement the executor runs, the INSERT run inside a function too.
    db.batch_execute(
        "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on",
    )
    .unwrap();
    db.query_one("SELECT outbox.enqueue_message('direct', '{}'::jsonb)", &[]).unwrap();
    let log = c.log();
    assert!(log.contains("Query Text: SELECT outbox.enqueue_message('direct'"), "auto_explain logs:\n{log}");
    assert!(!log.contains("INSERT INTO outbox.messages_"), "the row was written by an INSERT:\n{log}");
    // A column with a default of its own: the INSERT writes the row, and auto_explain shows it.
    db.batch_execute("ALTER TABLE outbox.messages ADD COLUMN region text NOT NULL DEFAULT 'eu'").unwrap();
    db.query_one("SELECT outbox.enqueue_message('through', '{}'::jsonb)", &[]).unwrap();
    assert!(c.log().contains("INSERT INTO outbox.messages_"), "{}", c.log());
}

/// A table named as the slot's partition but holding another slot's rows (the bounds of two
/// partitions swapped): enqueue_message does not write the row there itself, which would break
/// the partition's bound; the INSERT it leaves it to is refused as any such INSERT is.
#[test]
fn a_slot_whose_partition_holds_another_slots_rows_is_refused_not_written_across_its_bound() {
    let c = cluster();
    let mut db = c.client();
    // The slot enqueue_message writes to (rotation waits a minute at least).
    let slot: i16 = db.query_one("SELECT outbox._current_slot()", &[]).unwrap().get(0);
    let other = (slot + 1) % 4;
    db.batch_execute(&format!(
        "ALTER TABLE outbox.messages DETACH PARTITION outbox.messages_{slot};
         ALTER TABLE outbox.messages DETACH PARTITION outbox.messages_{other};
         ALTER TABLE outbox.messages ATTACH PARTITION outbox.messages_{slot} FOR VALUES IN ({other});
         ALTER TABLE outbox.messages ATTACH PARTITION outbox.messages_{other} FOR VALUES IN ({slot});"
    ))
    .unwrap();
    // A direct write would have succeeded; the INSERT checks the partition's bound.
    assert_eq!(refused(&mut db, "SELECT outbox.enqueue_message('swapped', '{}'::jsonb)"), "23514", "check_violation");
    assert_eq!(message_rows(&mut db), 0);
}

#[test]
fn the_timeline_of_the_ids_is_recorded_by_a_session_again_after_it_recreates_the_extension() {
    let c = cluster();
    let mut db = c.client();
    let recorded = |db: &mut postgres::Client| -> i64 {
        db.query_one("SELECT last_value FROM outbox.message_id_timeline", &[]).unwrap().get(0)
    };
    assert_eq!(recorded(&mut db), 0, "nothing recorded before the first id");
    db.query_one("SELECT outbox.enqueue_message('t', '{}'::jsonb)", &[]).unwrap();
    assert_eq!(recorded(&mut db), 1);
    db.batch_execute("DROP EXTENSION pg_outbox; CREATE EXTENSION pg_outbox").unwrap();
    db.query_one("SELECT outbox.enqueue_message('t', '{}'::jsonb)", &[]).unwrap();
    assert_eq!(recorded(&mut db), 1, "the new extension's record is written by the session's next id");
}

#[test]
fn a_read_only_transaction_cannot_enqueue() {
    let c = cluster();
    let mut db = c.client();
    assert_eq!(
        refused(&mut db, "BEGIN READ ONLY; SELECT outbox.enqueue_message('t', '{}'::jsonb)"),
        "25006",
        "read_only_sql_transaction, as an INSERT would"
    );
    db.batch_execute("ROLLBACK").unwrap();
    assert_eq!(message_rows(&mut db), 0);
}

#[test]
fn a_slot_with_a_trigger_a_check_or_a_default_of_its_own_is_written_through_an_insert() {
    let c = cluster();
    let mut db = c.client();
    // What a direct write would skip: a trigger, and a column with a default (NOT NULL). The
    // trigger runs inside enqueue_message, as the extension's owner: with search_path
    // pg_catalog, pg_temp, not the caller's, so it names its table with its schema.
    db.batch_execute(
        "CREATE TABLE audit (id bigint, search_path text);
         CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN
                  INSERT INTO public.audit VALUES (NEW.id, current_setting('search_path'));
                  RETURN NEW;
                END $$;",
    )
    .unwrap();
    for slot in 0..4 {
        db.batch_execute(&format!(
            "CREATE TRIGGER audit AFTER INSERT ON outbox.messages_{slot} FOR EACH ROW EXECUTE FUNCTION audit()"
        ))
        .unwrap();
    }
    let id: i64 = db.query_one("SELECT outbox.enqueue_message('t', '{}'::jsonb)", &[]).unwrap().get(0);
    let audited: Vec<(i64, String)> =
        db.query("SELECT id, search_path FROM audit", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(audited, vec![(id, "pg_catalog, pg_temp".to_string())], "the trigger fired for the message");
    db.batch_execute("ALTER TABLE outbox.messages ADD COLUMN region text NOT NULL DEFAULT 'eu'").unwrap();
    let id: i64 = db.query_one("SELECT outbox.enqueue_message('t', '{}'::jsonb)", &[]).unwrap().get(0);
    let region: String = db.query_one("SELECT region FROM outbox.messages WHERE id = $1", &[&id]).unwrap().get(0);
    assert_eq!(region, "eu", "the column's default applies");
    db.batch_execute("ALTER TABLE outbox.messages DROP COLUMN region").unwrap();
    for slot in 0..4 {
        db.batch_execute(&format!("DROP TRIGGER audit ON outbox.messages_{slot}")).unwrap();
    }
    // A default of its own for a column the direct write fills: the INSERT applies it.
    db.batch_execute("ALTER TABLE outbox.messages ALTER COLUMN enqueued_at SET DEFAULT '2001-02-03 04:05:06+00'")
        .unwrap();
    let id: i64 = db.query_one("SELECT outbox.enqueue_message('t', '{}'::jsonb)", &[]).unwrap().get(0);
    let old: bool = db
        .query_one("SELECT enqueued_at = '2001-02-03 04:05:06+00' FROM outbox.messages WHERE id = $1", &[&id])
        .unwrap()
        .get(0);
    assert!(old, "the changed default applies");
    db.batch_execute("ALTER TABLE outbox.messages ALTER COLUMN enqueued_at SET DEFAULT now()").unwrap();
    // A CHECK constraint: checked, as the INSERT checks it.
    db.batch_execute("ALTER TABLE outbox.messages ADD CONSTRAINT not_internal CHECK (topic <> 'internal')").unwrap();
    assert_eq!(refused(&mut db, "SELECT outbox.enqueue_message('internal', '{}'::jsonb)"), "23514");
    db.batch_execute("ALTER TABLE outbox.messages DROP CONSTRAINT not_internal").unwrap();
    // Plain again: the same session goes on writing, and nothing of the above fires any more.
    db.query_one("SELECT outbox.enqueue_message('t', '{}'::jsonb)", &[]).unwrap();
    assert_eq!(message_rows(&mut db), 4);
    let audited: i64 = db.query_one("SELECT count(*) FROM audit", &[]).unwrap().get(0);
    assert_eq!(audited, 2);
}

#[test]
fn a_trigger_on_the_outbox_may_enqueue_in_turn() {
    let c = cluster();
    let mut db = c.client();
    // An audit copy of some events, made by triggers on the outbox's own tables: the copy is
    // enqueued while the INSERT of the message it copies is still running.
    db.batch_execute(
        "CREATE FUNCTION copy_to_audit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.topic = 'orders' THEN
                 PERFORM outbox.enqueue_message('orders.audit', jsonb_build_object('of', NEW.id), key => NEW.key);
             ELSIF NEW.topic = 'reminders' THEN
                 PERFORM outbox.enqueue_message('reminders.audit', jsonb_build_object('of', NEW.id),
                                                deliver_after => '1 hour');
             END IF;
             RETURN NEW;
         END $$;",
    )
    .unwrap();
    for slot in 0..4 {
        db.batch_execute(&format!(
            "CREATE TRIGGER copy_to_audit AFTER INSERT ON outbox.messages_{slot}
                 FOR EACH ROW EXECUTE FUNCTION copy_to_audit()"
        ))
        .unwrap();
    }
    // Twice: the second time through the statements the first calls planned and kept.
    for round in 1..=2 {
        let order: i64 =
            db.query_one("SELECT outbox.enqueue_message('orders', '{}'::jsonb, key => '42')", &[]).unwrap().get(0);
        let copy: (i64, String) = db
            .query_one(
                "SELECT (convert_from(json_text, 'UTF8')::jsonb ->> 'of')::bigint, key
                 FROM outbox.messages WHERE topic = 'orders.audit' ORDER BY id DESC LIMIT 1",
                &[],
            )
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
        assert_eq!(copy, (order, "42".to_string()), "round {round}: the copy of the order, with its key");
        let reminder: i64 = db
            .query_one("SELECT outbox.enqueue_message('reminders', '{}'::jsonb, deliver_after => '1 hour')", &[])
            .unwrap()
            .get(0);
        let copied: i64 = db
            .query_one(
                "SELECT (json_payload ->> 'of')::bigint FROM outbox.messages
                 WHERE topic = 'reminders.audit' AND deliver_at > now() ORDER BY id DESC LIMIT 1",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(copied, reminder, "round {round}: the delayed copy of the delayed reminder");
    }
    let stored: i64 = db.query_one("SELECT count(*) FROM outbox.messages", &[]).unwrap().get(0);
    assert_eq!(stored, 8, "two orders, two reminders and a copy of each");
}

#[test]
fn a_session_goes_on_enqueueing_after_the_extension_is_dropped_and_created_again() {
    let c = cluster();
    let mut db = c.client();
    db.query_one("SELECT outbox.enqueue_message('t', '{}'::jsonb)", &[]).unwrap();
    db.batch_execute("DROP EXTENSION pg_outbox; CREATE EXTENSION pg_outbox").unwrap();
    let id: i64 = db.query_one("SELECT outbox.enqueue_message('t', '{}'::jsonb)", &[]).unwrap().get(0);
    assert_eq!(id, 1, "the new sequence's first value");
    db.batch_execute("TRUNCATE outbox.messages_0, outbox.messages_1, outbox.messages_2, outbox.messages_3").unwrap();
    db.query_one("SELECT outbox.enqueue_message('t', '{}'::jsonb)", &[]).unwrap();
    assert_eq!(message_rows(&mut db), 1);
}
