//! End to end, against each broker (Apache Kafka and Tansu): what commits reaches the topic with
//! its key, headers and message id, in commit order per key; what rolls back never does.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use pg_outbox_tests::{payloads, read_topic, unique, BrokerKind, Cluster, Record};

const WAIT: Duration = Duration::from_secs(30);

macro_rules! on_every_broker {
    ($($name:ident),* $(,)?) => {
        mod kafka { $( #[test] fn $name() { super::$name(pg_outbox_tests::BrokerKind::Kafka) } )* }
        mod tansu { $( #[test] fn $name() { super::$name(pg_outbox_tests::BrokerKind::Tansu) } )* }
    };
}

on_every_broker!(
    committed_messages_reach_the_topic_with_key_headers_and_message_id,
    rolled_back_messages_never_reach_the_broker,
    a_prepared_transaction_is_delivered_only_after_commit_prepared,
    a_later_commit_of_an_earlier_enqueue_is_delivered_in_commit_order,
    concurrent_writers_of_a_key_are_delivered_in_commit_order_with_nothing_lost,
    a_single_message_arrives_within_milliseconds_of_commit,
);

// How the worker paces itself does not depend on the broker; on Kafka only, because a burst of
// thousands of messages slows the Tansu (in memory) the other tests share for seconds.
#[test]
fn commits_that_outpace_the_worker_gather_into_fewer_batches_and_a_trickle_after_them_does_not_wait() {
    commits_outpacing_the_worker(BrokerKind::Kafka)
}

fn committed_messages_reach_the_topic_with_key_headers_and_message_id(broker: BrokerKind) {
    let bootstrap = broker.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let mut db = c.client();
    let topic = unique("orders.created");
    db.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric)").unwrap();
    let mut tx = db.transaction().unwrap();
    tx.execute("INSERT INTO orders VALUES (42, 99.5)", &[]).unwrap();
    let id: i64 = tx
        .query_one(
            "SELECT outbox.enqueue_message($1, '{\"id\": 42, \"total\": 99.5}'::jsonb, key => '42',
                                           headers => '{\"source\": \"shop\"}')",
            &[&topic],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    // Autocommit, a binary payload, no key, and a tombstone (NULL payload with a key).
    db.execute("SELECT outbox.enqueue_message($1, '\\xdeadbeef'::bytea)", &[&topic]).unwrap();
    db.execute("SELECT outbox.enqueue_message($1, NULL::jsonb, key => '42')", &[&topic]).unwrap();

    let records = read_topic(&bootstrap, &topic, 3, WAIT);
    assert_eq!(records.len(), 3, "{records:?}");
    let order = records.iter().find(|r| r.payload.as_deref().is_some_and(|p| p.starts_with(b"{"))).unwrap();
    assert_eq!(order.key.as_deref(), Some("42"));
    assert_eq!(order.json(), serde_json::json!({"id": 42, "total": 99.5}));
    assert_eq!(order.headers.get("source").map(String::as_str), Some("shop"));
    assert!(order.message_id().ends_with(&format!("-{id}")), "message id header: {}", order.message_id());
    let binary = records.iter().find(|r| r.key.is_none()).unwrap();
    assert_eq!(binary.payload.as_deref(), Some(&[0xde, 0xad, 0xbe, 0xef][..]));
    let tombstone = records.iter().find(|r| r.payload.is_none()).expect("a tombstone");
    assert_eq!(tombstone.key.as_deref(), Some("42"));
    // Records of one key share a partition, and all message ids differ.
    assert_eq!(order.partition, tombstone.partition);
    let mut ids: Vec<&str> = records.iter().map(Record::message_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3);
    assert!(c.wait_until_drained(WAIT));
}

fn rolled_back_messages_never_reach_the_broker(broker: BrokerKind) {
    let bootstrap = broker.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let mut db = c.client();
    let topic = unique("rollbacks");
    let enqueue = |body: &str| format!("SELECT outbox.enqueue_message('{topic}', '\"{body}\"'::jsonb, key => 'k');");
    db.batch_execute(&format!("BEGIN; {} ROLLBACK;", enqueue("rolled back"))).unwrap();
    db.batch_execute(&format!(
        "BEGIN; {} SAVEPOINT s; {} ROLLBACK TO SAVEPOINT s; COMMIT;",
        enqueue("before savepoint"),
        enqueue("after savepoint")
    ))
    .unwrap();
    // A failing statement aborts the transaction: its COMMIT rolls back.
    let _ = db.batch_execute(&format!("BEGIN; {} SELECT 1/0;", enqueue("aborted")));
    db.batch_execute("COMMIT").unwrap();
    db.batch_execute(&format!("BEGIN; {} PREPARE TRANSACTION 'p1';", enqueue("rollback prepared"))).unwrap();
    db.batch_execute("ROLLBACK PREPARED 'p1'").unwrap();
    db.batch_execute(&enqueue("last")).unwrap();

    let records = read_topic(&bootstrap, &topic, 2, WAIT);
    assert_eq!(payloads(&records), vec!["\"before savepoint\"", "\"last\""]);
}

fn a_prepared_transaction_is_delivered_only_after_commit_prepared(broker: BrokerKind) {
    let bootstrap = broker.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let mut db = c.client();
    let topic = unique("prepared");
    db.batch_execute(&format!(
        "BEGIN; SELECT outbox.enqueue_message('{topic}', '\"prepared\"'::jsonb, key => 'k'); PREPARE TRANSACTION 'p2';"
    ))
    .unwrap();
    db.batch_execute(&format!("SELECT outbox.enqueue_message('{topic}', '\"marker\"'::jsonb, key => 'k')")).unwrap();
    let before = read_topic(&bootstrap, &topic, 1, WAIT);
    assert_eq!(payloads(&before), vec!["\"marker\""]);
    // Committed by another session, as a transaction manager would.
    c.client().batch_execute("COMMIT PREPARED 'p2'").unwrap();
    let after = read_topic(&bootstrap, &topic, 2, WAIT);
    assert_eq!(payloads(&after), vec!["\"marker\"", "\"prepared\""]);
}

fn a_later_commit_of_an_earlier_enqueue_is_delivered_in_commit_order(broker: BrokerKind) {
    let bootstrap = broker.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let topic = unique("commit-order");
    let mut early = c.client();
    let mut late = c.client();
    let mut t1 = early.transaction().unwrap();
    let id1: i64 = t1
        .query_one(
            "SELECT outbox.enqueue_message($1, '\"enqueued first, committed last\"'::jsonb, key => 'k')",
            &[&topic],
        )
        .unwrap()
        .get(0);
    let mut t2 = late.transaction().unwrap();
    let id2: i64 = t2
        .query_one(
            "SELECT outbox.enqueue_message($1, '\"enqueued second, committed first\"'::jsonb, key => 'k')",
            &[&topic],
        )
        .unwrap()
        .get(0);
    assert!(id1 < id2);
    t2.commit().unwrap();
    // The worker forwards the second message while the first transaction is still open...
    let first = read_topic(&bootstrap, &topic, 1, WAIT);
    assert_eq!(payloads(&first), vec!["\"enqueued second, committed first\""]);
    // ...and still delivers the first one (lower id) once it commits: no outbox gap.
    t1.commit().unwrap();
    let all = read_topic(&bootstrap, &topic, 2, WAIT);
    assert_eq!(payloads(&all), vec!["\"enqueued second, committed first\"", "\"enqueued first, committed last\""]);
}

fn concurrent_writers_of_a_key_are_delivered_in_commit_order_with_nothing_lost(broker: BrokerKind) {
    let bootstrap = broker.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let topic = unique("concurrent");
    c.client()
        .batch_execute(
            "CREATE TABLE counters (key text PRIMARY KEY, n int NOT NULL);
             INSERT INTO counters SELECT 'key-' || i, 0 FROM generate_series(1, 4) i;",
        )
        .unwrap();
    let clients = 6;
    let per_client = 150;
    let handles: Vec<_> = (0..clients)
        .map(|w| {
            let dsn = c.dsn("shop");
            let topic = topic.clone();
            std::thread::spawn(move || {
                let mut db = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
                let mut committed = 0;
                for i in 0..per_client {
                    let key = format!("key-{}", (w + i) % 4 + 1);
                    let mut tx = db.transaction().unwrap();
                    // Some transactions enqueue something unrelated first, so their ids are
                    // older than their commit position.
                    if i % 3 == 0 {
                        tx.execute("SELECT outbox.enqueue_message($1, '\"noise\"'::jsonb)", &[&topic]).unwrap();
                    }
                    let n: i32 = tx
                        .query_one("UPDATE counters SET n = n + 1 WHERE key = $1 RETURNING n", &[&key])
                        .unwrap()
                        .get(0);
                    tx.execute(
                        "SELECT outbox.enqueue_message($1, jsonb_build_object('n', $2::int), key => $3)",
                        &[&topic, &n, &key],
                    )
                    .unwrap();
                    if i % 7 == 0 {
                        std::thread::sleep(Duration::from_millis(3));
                    }
                    if i % 10 == 9 {
                        tx.rollback().unwrap();
                    } else {
                        tx.commit().unwrap();
                        committed += 1;
                    }
                }
                committed
            })
        })
        .collect();
    let committed: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let noise = (0..clients).map(|_| (0..per_client).filter(|i| i % 3 == 0 && i % 10 != 9).count()).sum::<usize>();
    let records = read_topic(&bootstrap, &topic, committed + noise, Duration::from_secs(60));
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for r in records.iter().filter(|r| r.key.is_some()) {
        per_key.entry(r.key.clone().unwrap()).or_default().push(r.json()["n"].as_i64().unwrap());
    }
    let keyed: usize = per_key.values().map(Vec::len).sum();
    assert_eq!(keyed, committed, "every committed keyed message delivered exactly once");
    assert_eq!(records.len(), committed + noise);
    for (key, ns) in &per_key {
        // Each committed value of the counter, in commit order; rolled-back increments are
        // reused by the next writer, so the sequence is exactly 1..=count.
        let expected: Vec<i64> = (1..=ns.len() as i64).collect();
        assert_eq!(ns, &expected, "key {key} out of commit order");
    }
}

fn a_single_message_arrives_within_milliseconds_of_commit(broker: BrokerKind) {
    let bootstrap = broker.shared_bootstrap();
    // A 10 s fallback poll: only the commit wake-up can make delivery fast.
    let c = Cluster::start(&bootstrap, "pg_outbox.poll_interval = '10s'");
    let topic = unique("latency");
    let mut db = c.client();
    db.execute("SELECT outbox.enqueue_message($1, '\"warm-up\"'::jsonb)", &[&topic]).unwrap();
    assert_eq!(read_topic(&bootstrap, &topic, 1, WAIT).len(), 1);
    let latencies = one_commit_at_a_time(&bootstrap, &mut db, &topic);
    let (p50, max) = (latencies[latencies.len() / 2], latencies[latencies.len() - 1]);
    eprintln!("{broker:?}: commit-to-consumer latency p50 {p50:?}, max {max:?}");
    assert!(p50 < Duration::from_millis(100), "p50 {p50:?}");
    assert!(max < Duration::from_secs(2), "max {max:?}");
}

fn commits_outpacing_the_worker(broker: BrokerKind) {
    let bootstrap = broker.shared_bootstrap();
    // A linger far longer than a cycle, so that whether the worker lingers shows in both the
    // batch count and the latency,
    // and a batch size no burst fills, so that only lingering makes the batches large.
    let c = Cluster::start(
        &bootstrap,
        "pg_outbox.poll_interval = '10s'\npg_outbox.linger = '200ms'\npg_outbox.batch_size = 1000000",
    );
    let topic = unique("linger");
    let mut db = c.client();
    db.execute("SELECT outbox.enqueue_message($1, '\"warm-up\"'::jsonb)", &[&topic]).unwrap();
    assert_eq!(read_topic(&bootstrap, &topic, 1, WAIT).len(), 1);
    let batches = |db: &mut postgres::Client| -> i64 {
        db.query_one("SELECT batches FROM outbox.worker_status", &[]).unwrap().get(0)
    };
    let batches_before = batches(&mut db);

    // Two writers committing 20 messages a transaction, as fast as they can: each cycle would
    // find dozens of messages, far more than a trickle brings.
    let writers: Vec<_> = (0..2)
        .map(|_| {
            let (dsn, topic) = (c.dsn("shop"), topic.clone());
            std::thread::spawn(move || {
                let mut db = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
                for _ in 0..200 {
                    db.execute(
                        "SELECT count(outbox.enqueue_message($1, to_jsonb(i))) FROM generate_series(1, 20) i",
                        &[&topic],
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    let started = Instant::now();
    writers.into_iter().for_each(|w| w.join().unwrap());
    let writing = started.elapsed();
    let sent = 2 * 200 * 20;
    assert_eq!(read_topic(&bootstrap, &topic, sent + 1, WAIT).len(), sent + 1, "every message delivered once");
    let burst_batches = batches(&mut db) - batches_before;
    eprintln!("{broker:?}: {sent} messages written in {writing:?} went out in {burst_batches} batches");
    // About one batch per 200 ms linger, plus the cycles before the rate is trusted (16) and a
    // few more. Without lingering each cycle takes a few milliseconds and the messages that came
    // meanwhile: hundreds of batches.
    let expected = 20 + (writing.as_millis() / 200) as i64;
    assert!(burst_batches <= 2 * expected, "{burst_batches} batches for {sent} messages in {writing:?}");

    // Lingering does not outlast the rate that called for it.
    let latencies = one_commit_at_a_time(&bootstrap, &mut db, &topic);
    eprintln!("{broker:?}: after the burst, commit-to-consumer latencies {latencies:?}");
    let waited = latencies.iter().filter(|&&l| l >= Duration::from_millis(200)).count();
    // One slow round trip on a busy machine is not lingering; lingering would be most of them.
    assert!(waited <= 1, "{waited} of {} single commits waited out the 200 ms linger", latencies.len());
}

/// Commits 20 single messages 50 ms apart, each timed from its commit until a consumer has it;
/// the times, shortest first.
fn one_commit_at_a_time(bootstrap: &str, db: &mut postgres::Client, topic: &str) -> Vec<Duration> {
    let consumer = pg_outbox_tests::consumer(bootstrap);
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::End).unwrap();
    }
    rdkafka::consumer::Consumer::assign(&consumer, &tpl).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let mut latencies = Vec::new();
    for i in 0..20 {
        db.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::int))", &[&topic, &i]).unwrap();
        let committed = Instant::now();
        loop {
            match consumer.poll(Duration::from_millis(5)) {
                Some(Ok(_)) => break,
                _ if committed.elapsed() > Duration::from_secs(5) => panic!("message {i} not delivered in 5 s"),
                _ => {}
            }
        }
        latencies.push(committed.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    latencies.sort();
    latencies
}
