//! Input nobody should send, and people nobody should trust: each gets a clear error or works, and
//! nothing already committed is lost.
use std::time::Duration;

use pg_outbox_tests::{read_topic, sqlstate, unique, BrokerKind, Cluster};

fn connect_as(c: &Cluster, user: &str) -> postgres::Client {
    postgres::Client::connect(&c.dsn("shop").replace("user=postgres", &format!("user={user}")), postgres::NoTls)
        .expect("connect")
}

#[test]
fn a_hundred_thousand_messages_in_one_transaction_are_all_delivered_in_order() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "pg_outbox.batch_size = 5000");
    let topic = unique("bulk");
    c.client()
        .execute(
            "SELECT count(outbox.enqueue_message($1, to_jsonb(i), key => (i % 4)::text)) FROM generate_series(1, 100000) i",
            &[&topic],
        )
        .unwrap();
    let records = read_topic(&bootstrap, &topic, 100_000, Duration::from_secs(120));
    assert_eq!(records.len(), 100_000);
    for k in 0..4 {
        let ns: Vec<i64> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(&k.to_string()))
            .map(|r| r.json().as_i64().unwrap())
            .collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "key {k} in order");
        assert_eq!(ns.len(), 25_000);
    }
    assert!(c.wait_until_drained(Duration::from_secs(30)));
}

#[test]
fn nul_and_invalid_utf8_in_keys_and_headers_are_refused_by_postgres_itself() {
    let c = Cluster::start(&BrokerKind::Kafka.shared_bootstrap(), "");
    let mut db = c.client();
    let err = db.batch_execute("SELECT outbox.enqueue_message('t', '{}'::jsonb, key => E'a\\000b')").unwrap_err();
    assert_eq!(sqlstate(&err), "22021", "NUL in a key");
    let err = db
        .batch_execute("SELECT outbox.enqueue_message('t', '{}'::jsonb, key => convert_from('\\x61ff'::bytea, 'UTF8'))")
        .unwrap_err();
    assert_eq!(sqlstate(&err), "22021", "invalid UTF-8 in a key");
    let err = db
        .batch_execute(r#"SELECT outbox.enqueue_message('t', '{}'::jsonb, headers => '{"h": "a\u0000b"}')"#)
        .unwrap_err();
    assert_eq!(sqlstate(&err), "22P05", "NUL in a header value");
    // Binary payloads may hold any byte, NUL included.
    db.batch_execute("SELECT outbox.enqueue_message('t', '\\x00ff00'::bytea, key => 'k')").unwrap();
    let n: i64 = db.query_one("SELECT count(*) FROM outbox.messages", &[]).unwrap().get(0);
    assert_eq!(n, 1);
}

#[test]
fn non_owners_cannot_drop_alter_or_read_the_outbox() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let mut admin = c.client();
    admin
        .batch_execute(
            "CREATE ROLE app LOGIN; GRANT outbox_writer TO app; CREATE ROLE ops LOGIN; GRANT outbox_reader TO ops",
        )
        .unwrap();
    let topic = unique("guarded");
    admin.execute("SELECT outbox.enqueue_message($1, '1'::jsonb, key => 'k')", &[&topic]).unwrap();
    let mut app = connect_as(&c, "app");
    for sql in [
        "DROP TABLE outbox.messages",
        "ALTER TABLE outbox.messages ADD COLUMN x int",
        "TRUNCATE outbox.messages",
        "DELETE FROM outbox.held_messages",
        "UPDATE outbox.worker_state SET done_snapshot = pg_current_snapshot()",
        "SELECT * FROM outbox.destinations",
        "DROP FUNCTION outbox.enqueue_message(text, jsonb, text, jsonb, interval, timestamptz)",
        "SELECT outbox.pause_topic('x')",
        "SELECT outbox.purge_dead_letters()",
        "SELECT outbox._inject_producer_fatal_error()",
        "DROP EXTENSION pg_outbox",
    ] {
        let err = app.batch_execute(sql).expect_err(sql);
        assert_eq!(sqlstate(&err), "42501", "{sql}: {err}");
    }
    let mut ops = connect_as(&c, "ops");
    ops.batch_execute(
        "SELECT * FROM outbox.topic_stats; SELECT * FROM outbox.worker_status; SELECT * FROM outbox.pending_messages",
    )
    .expect("outbox_reader reads the views");
    assert_eq!(sqlstate(&ops.batch_execute("SELECT outbox.enqueue_message('t', '1'::jsonb)").unwrap_err()), "42501");
    // All that left the committed message alone.
    assert_eq!(read_topic(&bootstrap, &topic, 1, Duration::from_secs(30)).len(), 1);
}

#[test]
fn a_user_schema_cannot_hijack_the_functions_through_search_path() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let mut admin = c.client();
    admin
        .batch_execute("CREATE ROLE app LOGIN; GRANT outbox_writer TO app; CREATE SCHEMA evil AUTHORIZATION app;")
        .unwrap();
    let mut app = connect_as(&c, "app");
    // Shadow functions and operators the enqueue code uses; SECURITY DEFINER code must not call them.
    // The operators match exactly where pg_catalog's need a cast (oid = regclass), or have the same
    // argument types and come first in the path (name = name); each records who ran it.
    app.batch_execute(
        "CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT 'epoch'::timestamptz $$;
         CREATE FUNCTION evil.octet_length(jsonb) RETURNS int LANGUAGE sql AS $$ SELECT 0 $$;
         CREATE TABLE evil.messages (id bigint);
         CREATE TABLE evil.captured (who text, operator text);
         CREATE FUNCTION evil.oid_eq(oid, regclass) RETURNS bool LANGUAGE plpgsql AS $$
           BEGIN
             INSERT INTO evil.captured VALUES (current_user, 'oid = regclass');
             RETURN $1 OPERATOR(pg_catalog.=) $2::oid;
           END $$;
         CREATE OPERATOR evil.= (LEFTARG = oid, RIGHTARG = regclass, FUNCTION = evil.oid_eq);
         CREATE FUNCTION evil.name_eq(name, name) RETURNS bool LANGUAGE plpgsql AS $$
           BEGIN
             INSERT INTO evil.captured VALUES (current_user, 'name = name');
             RETURN $1::text OPERATOR(pg_catalog.=) $2::text;
           END $$;
         CREATE OPERATOR evil.= (LEFTARG = name, RIGHTARG = name, FUNCTION = evil.name_eq);
         SET search_path = evil, pg_catalog, public;",
    )
    .unwrap();
    let id: i64 = app.query_one("SELECT outbox.enqueue_message('hijack', '{\"a\": 1}'::jsonb)", &[]).unwrap().get(0);
    app.execute("SELECT outbox.enqueue_message('hijack', '{}'::jsonb, deliver_after => interval '1 hour')", &[])
        .unwrap();
    let row = admin
        .query_one("SELECT enqueued_at > now() - interval '1 minute' FROM outbox.messages WHERE id = $1", &[&id])
        .unwrap();
    assert!(row.get::<_, bool>(0), "the real now() was used");
    let shadow: i64 = admin.query_one("SELECT count(*) FROM evil.messages", &[]).unwrap().get(0);
    assert_eq!(shadow, 0);
    let captured: Vec<String> = admin
        .query("SELECT who || ' ran ' || operator FROM evil.captured", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(captured.is_empty(), "the caller's operators ran inside enqueue_message: {captured:?}");
}

#[test]
fn broker_credentials_never_show_to_non_superusers_nor_in_the_log() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let secret = "s3cr3t-Passw0rd";
    // A SASL configuration the broker does not speak: the worker reports an error, without the secret.
    let c = Cluster::start(
        &bootstrap,
        &format!(
            "pg_outbox.kafka_properties = 'security.protocol=SASL_PLAINTEXT;sasl.mechanism=PLAIN;sasl.username=outbox;sasl.password={secret};ssl.key.password={secret}'"
        ),
    );
    let mut admin = c.client();
    admin.batch_execute("CREATE ROLE ops LOGIN; GRANT outbox_reader TO ops").unwrap();
    admin.execute("SELECT outbox.enqueue_message('creds', '1'::jsonb)", &[]).unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let mut ops = connect_as(&c, "ops");
    assert_eq!(sqlstate(&ops.batch_execute("SHOW pg_outbox.kafka_properties").unwrap_err()), "42501");
    let visible: Vec<String> = ops
        .query(
            "SELECT coalesce(setting, '') FROM pg_settings WHERE name LIKE 'pg_outbox%'
             UNION ALL SELECT coalesce(last_error, '') FROM outbox.worker_status
             UNION ALL SELECT coalesce(setting, '') FROM outbox.settings",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(visible.iter().all(|v| !v.contains(secret)), "{visible:?}");
    assert!(!c.log().contains(secret), "the secret reached the server log");

    // Nor where Postgres itself would log it: a reload's "changed to", the statements that
    // log_statement logs, the statement logged beside an error in it, COPY's context line.
    let secrets = [
        "r3load-Passw0rd",
        "r0ute-Passw0rd",
        "b4d-r0ute-Passw0rd",
        "c0py-Passw0rd",
        "alt3r-Passw0rd",
        "p4ram-Passw0rd",
        "n0topic-Passw0rd",
        "c0lumns-Passw0rd",
        "pr3pared-Passw0rd",
        "t1meout-Passw0rd",
    ];
    c.reconfigure(&format!("log_statement = 'all'\npg_outbox.kafka_properties = 'sasl.password={}'", secrets[0]));
    pg_outbox_tests::wait_for("the reload to be logged", Duration::from_secs(30), || {
        c.log().contains("parameter \"pg_outbox.kafka_properties\" changed (its value is not logged)")
    });
    // This session may not have read the reload yet.
    admin.batch_execute("SET log_statement = 'all'").unwrap();
    admin
        .batch_execute(&format!(
            "INSERT INTO outbox.destinations VALUES ('routed', NULL, '127.0.0.1:9', 'sasl.password={}')",
            secrets[1]
        ))
        .unwrap();
    // As a parameter: log_statement logs it in the statement's detail.
    admin
        .execute(
            "UPDATE outbox.destinations SET kafka_properties = $1 WHERE topic = 'routed'",
            &[&format!("sasl.password={}", secrets[5])],
        )
        .unwrap();
    // A route INSERTed into outbox.destinations, which must be refused.
    let insert_refused = |admin: &mut postgres::Client, values: String| {
        admin.batch_execute(&format!("INSERT INTO outbox.destinations VALUES ({values})")).unwrap_err()
    };
    let err = insert_refused(
        &mut admin,
        format!("'refused', NULL, '127.0.0.1:9', 'lingerms=1;sasl.password={}'", secrets[2]),
    );
    assert_eq!(sqlstate(&err), "22023");
    // Postgres's own refusal of a row quotes it ("Failing row contains").
    let err = insert_refused(&mut admin, format!("NULL, NULL, 'h:1', 'sasl.password={}'", secrets[6]));
    assert_eq!(sqlstate(&err), "23502");
    assert!(!format!("{err:?}").contains(secrets[6]), "{err:?}");
    // One line COPYed into outbox.destinations, which must be refused.
    let copy_refused = |admin: &mut postgres::Client, line: String| {
        let mut copy = admin.copy_in("COPY outbox.destinations FROM STDIN").unwrap();
        std::io::Write::write_all(&mut copy, line.as_bytes()).unwrap();
        copy.finish().unwrap_err()
    };
    let err = copy_refused(&mut admin, format!("copied\t\\N\th:1\tlingerms=1;sasl.password={}\n", secrets[3]));
    assert_eq!(sqlstate(&err), "22023");
    assert!(!format!("{err:?}").contains(secrets[3]), "{err:?}");
    // A line COPY cannot split: its context quotes the line.
    let err = copy_refused(&mut admin, format!("columns\t\\N\th:1\tsasl.password={}\textra\n", secrets[7]));
    assert_eq!(sqlstate(&err), "22P04");
    // The statement logged beside the error names neither the table nor the column.
    admin
        .batch_execute(
            "PREPARE add_route(text) AS INSERT INTO outbox.destinations VALUES ('prepared', NULL, 'h:1', $1)",
        )
        .unwrap();
    let err =
        admin.batch_execute(&format!("EXECUTE add_route('lingerms=1;sasl.password={}')", secrets[8])).unwrap_err();
    assert_eq!(sqlstate(&err), "22023");
    // Nor beside an error that is not about the route (a lock timeout) in a prepared statement
    // that writes one.
    let mut locker = c.client();
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute("LOCK TABLE outbox.destinations IN ACCESS EXCLUSIVE MODE").unwrap();
    let err = admin
        .batch_execute(&format!("SET lock_timeout = '100ms'; EXECUTE add_route('sasl.password={}')", secrets[9]))
        .unwrap_err();
    assert_eq!(sqlstate(&err), "55P03");
    lock.rollback().unwrap();
    admin.batch_execute("RESET lock_timeout").unwrap();
    let err = admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET pg_outbox.kafka_properties = 'lingerms=1;sasl.password={}'",
            secrets[4]
        ))
        .unwrap_err();
    assert_eq!(sqlstate(&err), "22023");
    admin.batch_execute("SELECT 'flushed'").unwrap();
    pg_outbox_tests::wait_for("the last statement to be logged", Duration::from_secs(10), || {
        c.log().contains("SELECT 'flushed'")
    });
    let log = c.log();
    for secret in secrets {
        assert!(!log.contains(secret), "{secret} reached the server log");
    }
    // Logged, without what they set: two INSERTs, the UPDATE, the COPYs, the PREPARE, ALTER SYSTEM.
    let hidden = log.matches("statement not logged: it mentions kafka_properties or destinations").count();
    assert!(hidden >= 7, "{hidden} statements logged as not logged");
}

#[test]
fn the_worker_talks_tls_to_a_broker_that_requires_it() {
    let broker = pg_outbox_tests::PrivateBroker::start_tls();
    let ca = broker.ca_pem().display().to_string();
    let c = Cluster::start(
        &broker.bootstrap(),
        &format!("pg_outbox.kafka_properties = 'security.protocol=SSL;ssl.ca.location={ca}'"),
    );
    let topic = unique("tls");
    c.client().execute("SELECT outbox.enqueue_message($1, '\"over TLS\"'::jsonb, key => 'k')", &[&topic]).unwrap();
    let tls = [("security.protocol", "SSL"), ("ssl.ca.location", ca.as_str())];
    let records = pg_outbox_tests::read_topic_with(
        &broker.bootstrap(),
        &tls,
        &topic,
        1,
        Duration::from_secs(60),
        Duration::from_millis(500),
    );
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].json(), serde_json::json!("over TLS"));
    // A plaintext client gets nothing from that listener.
    assert!(read_topic(&broker.bootstrap(), &topic, 1, Duration::from_secs(3)).is_empty());
}
