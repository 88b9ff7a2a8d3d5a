//! Topics the worker creates, and messages the broker refuses: retried with backoff, then
//! dead-lettered, while other keys keep flowing and later messages of the key wait behind.
use std::time::Duration;

use pg_outbox_tests::{payloads, read_topic, unique, wait_for, BrokerKind, Cluster};
use rdkafka::consumer::Consumer;

const WAIT: Duration = Duration::from_secs(30);

/// A message of key p that the broker refuses every time: over librdkafka's default
/// message.max.bytes (1,000,000), under pg_outbox.max_message_bytes.
fn enqueue_poison(db: &mut postgres::Client, topic: &str) -> i64 {
    db.query_one("SELECT outbox.enqueue_message($1, convert_to(repeat('x', 1000500), 'UTF8'), key => 'p')", &[&topic])
        .unwrap()
        .get(0)
}

fn wait_for_refusal(db: &mut postgres::Client, id: i64) {
    wait_for("the first refusal", WAIT, || {
        db.query_opt("SELECT 1 FROM outbox.held_messages WHERE id = $1 AND attempts >= 1", &[&id]).unwrap().is_some()
    });
}

#[test]
fn a_missing_topic_is_created_with_topic_partitions() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "pg_outbox.topic_partitions = 5");
    let topic = unique("created");
    c.client().execute("SELECT outbox.enqueue_message($1, '1'::jsonb)", &[&topic]).unwrap();
    assert_eq!(read_topic(&bootstrap, &topic, 1, WAIT).len(), 1);
    let consumer = pg_outbox_tests::consumer(&bootstrap);
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)).unwrap();
    assert_eq!(metadata.topics()[0].partitions().len(), 5);
}

#[test]
fn with_create_topics_off_a_missing_topic_ends_in_dead_letters() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(
        &bootstrap,
        "pg_outbox.create_topics = off
         pg_outbox.max_attempts = 2
         pg_outbox.retry_backoff = '100ms'
         pg_outbox.kafka_properties = 'topic.metadata.propagation.max.ms=1000'",
    );
    let topic = unique("never-created");
    let id: i64 = c.client().query_one("SELECT outbox.enqueue_message($1, '1'::jsonb)", &[&topic]).unwrap().get(0);
    let mut db = c.client();
    wait_for("the dead letter", WAIT, || {
        db.query_opt("SELECT 1 FROM outbox.dead_letters WHERE id = $1", &[&id]).unwrap().is_some()
    });
    let row = db.query_one("SELECT attempts, last_error FROM outbox.dead_letters WHERE id = $1", &[&id]).unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    let error: String = row.get(1);
    assert!(error.to_lowercase().contains("unknown topic"), "{error}");
    let mut stats = || {
        let row = db
            .query_one(
                "SELECT dead_letters, failed_attempts, pending FROM outbox.topic_stats WHERE topic = $1",
                &[&topic],
            )
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2))
    };
    // Per-topic counters are written at most once a second.
    wait_for("the failed attempts to be counted", Duration::from_secs(3), || stats().1 == 2);
    assert_eq!(stats(), (1, 2, 0));
}

#[test]
fn a_message_the_broker_refuses_is_retried_then_dead_lettered_while_others_flow() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(
        &bootstrap,
        "pg_outbox.max_attempts = 4
         pg_outbox.retry_backoff = '300ms'
         pg_outbox.retry_backoff_max = '1s'",
    );
    let topic = unique("poison");
    let mut db = c.client();
    let poison = enqueue_poison(&mut db, &topic);
    db.execute("SELECT outbox.enqueue_message($1, '\"a1\"'::jsonb, key => 'a')", &[&topic]).unwrap();
    wait_for_refusal(&mut db, poison);
    // Enqueued after the poison message was refused: must not overtake it.
    db.execute("SELECT outbox.enqueue_message($1, '\"p2\"'::jsonb, key => 'p')", &[&topic]).unwrap();
    db.execute("SELECT outbox.enqueue_message($1, '\"b1\"'::jsonb, key => 'b')", &[&topic]).unwrap();
    let early = read_topic(&bootstrap, &topic, 2, WAIT);
    let mut early_payloads = payloads(&early);
    early_payloads.sort();
    assert_eq!(early_payloads, vec!["\"a1\"", "\"b1\""], "other keys flow while p is retried");
    let row = db
        .query_one(
            "SELECT attempts, next_attempt_at > now(), last_error FROM outbox.pending_messages WHERE id = $1",
            &[&poison],
        )
        .unwrap();
    assert!(row.get::<_, i32>(0) >= 1);
    wait_for("the dead letter", WAIT, || {
        db.query_opt("SELECT 1 FROM outbox.dead_letters WHERE id = $1", &[&poison]).unwrap().is_some()
    });
    let dead = db.query_one("SELECT attempts, last_error FROM outbox.dead_letters WHERE id = $1", &[&poison]).unwrap();
    assert_eq!(dead.get::<_, i32>(0), 4);
    assert!(dead.get::<_, String>(1).to_lowercase().contains("too large"), "{}", dead.get::<_, String>(1));
    // Once p's head is out of line, its later message goes out.
    let all = read_topic(&bootstrap, &topic, 3, WAIT);
    assert_eq!(payloads(&all).iter().filter(|p| *p == "\"p2\"").count(), 1);
    assert!(c.wait_until_drained(WAIT));
}

#[test]
fn a_refusal_in_a_backlog_holds_back_its_key_in_the_batches_read_after_it() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    // The worker reads the next batch of a backlog while the broker acknowledges the current
    // one; that batch must not go out as read when the current one had a refusal.
    let c = Cluster::start(
        &bootstrap,
        "pg_outbox.batch_size = 5
         pg_outbox.max_attempts = 3
         pg_outbox.retry_backoff = '2s'",
    );
    let topic = unique("backlog-refusal");
    let mut db = c.client();
    let mut tx = db.transaction().unwrap();
    // One window: [poison, q1..q4] [p1, q5, p2, q6, p3] [q7, p4, q8, p5, q9]
    tx.execute("SELECT outbox.enqueue_message($1, convert_to(repeat('x', 1000500), 'UTF8'), key => 'p')", &[&topic])
        .unwrap();
    let later = ["q1", "q2", "q3", "q4", "p1", "q5", "p2", "q6", "p3", "q7", "p4", "q8", "p5", "q9"];
    for m in later {
        tx.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::text), key => left($2, 1))", &[&topic, &m]).unwrap();
    }
    tx.commit().unwrap();
    let first = payloads(&read_topic(&bootstrap, &topic, 9, WAIT));
    let q: Vec<String> = (1..=9).map(|i| format!("\"q{i}\"")).collect();
    assert_eq!(first, q, "key q flows in order; key p waits behind its refused head");
    let all = payloads(&read_topic(&bootstrap, &topic, 14, WAIT));
    let p: Vec<&String> = all.iter().filter(|m| m.starts_with("\"p")).collect();
    assert_eq!(p, ["\"p1\"", "\"p2\"", "\"p3\"", "\"p4\"", "\"p5\""], "after the dead letter, in order");
    let dead: i64 = db.query_one("SELECT count(*) FROM outbox.dead_letters", &[]).unwrap().get(0);
    assert_eq!(dead, 1);
}

#[test]
fn a_delayed_message_falling_due_ahead_of_a_refused_retry_goes_alone_and_the_retry_keeps_its_key_behind_it() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(
        &bootstrap,
        "pg_outbox.max_attempts = 3
         pg_outbox.retry_backoff = '3s'
         pg_outbox.retry_backoff_max = '3s'",
    );
    let topic = unique("due-before-retry");
    let mut db = c.client();
    db.execute(
        "SELECT outbox.enqueue_message($1, '\"due\"'::jsonb, key => 'p', deliver_after => '2 seconds')",
        &[&topic],
    )
    .unwrap();
    let poison = enqueue_poison(&mut db, &topic);
    wait_for_refusal(&mut db, poison);
    db.execute("SELECT outbox.enqueue_message($1, '\"after\"'::jsonb, key => 'p')", &[&topic]).unwrap();
    // The delayed message falls due first, at its place ahead of the refused one: it goes out
    // alone, and the refused one's retry waits for its own time.
    let records = read_topic(&bootstrap, &topic, 2, WAIT);
    assert_eq!(payloads(&records), vec!["\"due\"", "\"after\""]);
    let died_ms: f64 = db
        .query_one(
            "SELECT (extract(epoch FROM died_at) * 1000)::float8 FROM outbox.dead_letters WHERE id = $1",
            &[&poison],
        )
        .unwrap()
        .get(0);
    let after_ms = records[1].timestamp_ms.expect("a record timestamp") as f64;
    assert!(
        after_ms >= died_ms - 1.0,
        "\"after\" went out {} ms before the refused message ahead of it died",
        died_ms - after_ms
    );
}

#[test]
fn a_delayed_message_waiting_behind_a_refused_retry_keeps_its_place_after_what_was_enqueued_before_it() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(
        &bootstrap,
        "pg_outbox.max_attempts = 2
         pg_outbox.retry_backoff = '3s'
         pg_outbox.retry_backoff_max = '3s'",
    );
    let topic = unique("delayed-in-line");
    let mut db = c.client();
    let poison = enqueue_poison(&mut db, &topic);
    wait_for_refusal(&mut db, poison);
    // Both wait behind the refused message of their key. The delayed one falls due while they
    // wait; the one enqueued before it must still go first.
    let mut tx = db.transaction().unwrap();
    tx.execute("SELECT outbox.enqueue_message($1, '\"first\"'::jsonb, key => 'p')", &[&topic]).unwrap();
    tx.execute(
        "SELECT outbox.enqueue_message($1, '\"delayed\"'::jsonb, key => 'p', deliver_after => '500ms')",
        &[&topic],
    )
    .unwrap();
    tx.commit().unwrap();
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 2, WAIT)), vec!["\"first\"", "\"delayed\""]);
    let dead: i64 = db.query_one("SELECT count(*) FROM outbox.dead_letters WHERE id = $1", &[&poison]).unwrap().get(0);
    assert_eq!(dead, 1);
}
