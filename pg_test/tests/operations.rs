//! Operating pg_outbox from SQL: pausing topics, delayed delivery, dead-letter retries and purges,
//! synchronous waits, retention and replay, routing, several databases, settings, upgrades.
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pg_outbox_tests::{
    payloads, read_topic, read_topic_settled, unique, wait_for, BrokerKind, Cluster, PrivateBroker, Record,
};

const WAIT: Duration = Duration::from_secs(30);

fn kafka_cluster(conf: &str) -> (Cluster, String) {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    (Cluster::start(&bootstrap, conf), bootstrap)
}

/// A cluster with the extension's SQL objects at an older `version` than the library's.
fn cluster_at_version(version: &str) -> (Cluster, String) {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start_without_extension(&bootstrap, "");
    c.client().batch_execute(&format!("CREATE EXTENSION pg_outbox VERSION '{version}'")).unwrap();
    (c, bootstrap)
}

/// The version of the extension's SQL objects.
fn version(db: &mut postgres::Client) -> String {
    db.query_one("SELECT extversion FROM pg_extension WHERE extname = 'pg_outbox'", &[]).unwrap().get(0)
}

#[test]
fn a_paused_topic_keeps_its_messages_until_resumed_and_other_topics_flow() {
    let (c, bootstrap) = kafka_cluster("");
    let (paused, open) = (unique("paused"), unique("open"));
    let mut db = c.client();
    db.execute("SELECT outbox.pause_topic($1)", &[&paused]).unwrap();
    for i in 0..5 {
        db.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::int), key => 'k')", &[&paused, &i]).unwrap();
    }
    db.execute("SELECT outbox.enqueue_message($1, '\"x\"'::jsonb)", &[&open]).unwrap();
    assert_eq!(read_topic(&bootstrap, &open, 1, WAIT).len(), 1);
    std::thread::sleep(Duration::from_millis(500));
    let row = db.query_one("SELECT paused, pending FROM outbox.topic_stats WHERE topic = $1", &[&paused]).unwrap();
    assert_eq!((row.get::<_, bool>(0), row.get::<_, i64>(1)), (true, 5));
    assert!(read_topic(&bootstrap, &paused, 1, Duration::from_secs(2)).is_empty());
    db.execute("SELECT outbox.resume_topic($1)", &[&paused]).unwrap();
    assert_eq!(payloads(&read_topic(&bootstrap, &paused, 5, WAIT)), vec!["0", "1", "2", "3", "4"]);
}

#[test]
fn a_resumed_topic_drains_its_backlog_in_batches_not_a_message_per_key_per_cycle() {
    let (c, bootstrap) = kafka_cluster("");
    let topic = unique("resumed");
    let mut db = c.client();
    db.execute("SELECT outbox.pause_topic($1)", &[&topic]).unwrap();
    let enqueue = "SELECT count(outbox.enqueue_message($1, jsonb_build_object('i', i, 'pad', repeat('x', 250)),
                                                     key => (i % 4)::text))
                   FROM generate_series($2::int, $3::int) i";
    db.execute(enqueue, &[&topic, &1, &20_000]).unwrap();
    wait_for("the paused messages to be held", WAIT, || {
        db.query_one("SELECT count(*) FROM outbox.held_messages", &[]).unwrap().get::<_, i64>(0) == 20_000
    });
    db.execute("SELECT outbox.resume_topic($1)", &[&topic]).unwrap();
    let resumed = Instant::now();
    // Messages of the same keys committed while the line drains join it at its end.
    db.execute(enqueue, &[&topic, &20_001, &20_200]).unwrap();
    let records = read_topic(&bootstrap, &topic, 20_200, Duration::from_secs(120));
    let took = resumed.elapsed();
    assert_eq!(records.len(), 20_200);
    // One message per key and cycle took 168 s here for the first 20,000.
    assert!(took < Duration::from_secs(30), "20,200 messages of 4 keys took {took:?} after resume_topic");
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    for r in &records {
        let value: serde_json::Value = serde_json::from_slice(r.payload.as_deref().unwrap()).unwrap();
        let i = value["i"].as_i64().unwrap();
        let key = r.key.clone().unwrap();
        assert!(last.insert(key.clone(), i).is_none_or(|before| before < i), "key {key}: {i} came after a later one");
    }
    assert!(c.wait_until_drained(WAIT));
}

#[test]
fn a_delayed_message_waits_for_its_time_without_blocking_its_key() {
    let (c, bootstrap) = kafka_cluster("");
    let topic = unique("delayed");
    let mut db = c.client();
    // Judged by when the worker produced each record (its timestamp, from the same clock), not by
    // when this test got to read it: a loaded machine delays the reading, not the claim.
    let enqueued_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    db.execute(
        "SELECT outbox.enqueue_message($1, '\"later\"'::jsonb, key => 'k', deliver_after => '2 seconds')",
        &[&topic],
    )
    .unwrap();
    db.execute(
        "SELECT outbox.enqueue_message($1, '\"at\"'::jsonb, key => 'k', deliver_at => now() + interval '3 seconds')",
        &[&topic],
    )
    .unwrap();
    let scheduled: i64 =
        db.query_one("SELECT scheduled FROM outbox.topic_stats WHERE topic = $1", &[&topic]).unwrap().get(0);
    assert_eq!(scheduled, 2);
    db.execute("SELECT outbox.enqueue_message($1, '\"now\"'::jsonb, key => 'k')", &[&topic]).unwrap();
    let first = read_topic(&bootstrap, &topic, 1, WAIT);
    assert_eq!(payloads(&first), vec!["\"now\""]);
    let produced_after = |r: &Record| r.timestamp_ms.expect("a record timestamp") - enqueued_ms;
    assert!(produced_after(&first[0]) < 2000, "not held back until the delayed message of its key was due");
    let all = read_topic(&bootstrap, &topic, 3, WAIT);
    assert_eq!(payloads(&all), vec!["\"now\"", "\"later\"", "\"at\""]);
    assert!(produced_after(&all[1]) >= 2000, "deliver_after is honoured: {} ms", produced_after(&all[1]));
    assert!(produced_after(&all[2]) >= 3000, "deliver_at is honoured: {} ms", produced_after(&all[2]));
    // Rolled back delayed messages are never sent either.
    db.batch_execute(&format!(
        "BEGIN; SELECT outbox.enqueue_message('{topic}', '\"rolled back\"'::jsonb, deliver_after => '100ms'); ROLLBACK;"
    ))
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(read_topic(&bootstrap, &topic, 3, Duration::from_secs(3)).len(), 3);
}

#[test]
fn messages_scheduled_for_tomorrow_do_not_slow_the_delivery_of_todays() {
    let (c, _bootstrap) = kafka_cluster("");
    let (later, now) = (unique("tomorrow"), unique("today"));
    let mut db = c.client();
    db.execute(
        "SELECT count(outbox.enqueue_message($1, to_jsonb(i), key => i::text, deliver_after => '1 day'))
         FROM generate_series(1, 200000) i",
        &[&later],
    )
    .unwrap();
    // The worker gives them their places in line as it reads them, a backlog of batches.
    let started = Instant::now();
    wait_for("the worker to take the scheduled messages", Duration::from_secs(120), || {
        db.query_one("SELECT count(*) FROM outbox.held_messages WHERE delayed", &[]).unwrap().get::<_, i64>(0)
            == 200_000
    });
    eprintln!("200,000 scheduled messages taken by the worker in {:?}", started.elapsed());
    // Each of today's transactions schedules one more for tomorrow, as an order would a reminder.
    let mut took: Vec<Duration> = (0..30)
        .map(|i| {
            let mut tx = db.transaction().unwrap();
            let id: i64 = tx
                .query_one("SELECT outbox.enqueue_message($1, to_jsonb($2::int), key => 'k')", &[&now, &i])
                .unwrap()
                .get(0);
            tx.execute(
                "SELECT outbox.enqueue_message($1, to_jsonb($2::int), key => 'k', deliver_after => '1 day')",
                &[&later, &i],
            )
            .unwrap();
            tx.commit().unwrap();
            let committed = Instant::now();
            let delivered: bool = db.query_one("SELECT outbox.wait_for_delivery($1, '10s')", &[&id]).unwrap().get(0);
            assert!(delivered, "message {i} was not delivered within 10 s");
            committed.elapsed()
        })
        .collect();
    took.sort();
    eprintln!("commit to delivery with 200,000 messages scheduled: median {:?}, max {:?}", took[15], took[29]);
    // A pass over every scheduled message in each worker cycle made this about 100 ms; one in
    // each cycle that held a message (the scheduled one of each transaction here), about 20 ms.
    assert!(took[15] < Duration::from_millis(12), "commit to delivery, median {:?}, all {took:?}", took[15]);
    let scheduled: i64 =
        db.query_one("SELECT scheduled FROM outbox.topic_stats WHERE topic = $1", &[&later]).unwrap().get(0);
    assert_eq!(scheduled, 200_030);
}

#[test]
fn dead_letters_can_be_retried_per_topic_and_purged() {
    let (c, bootstrap) = kafka_cluster(
        "pg_outbox.create_topics = off
         pg_outbox.max_attempts = 1
         pg_outbox.kafka_properties = 'topic.metadata.propagation.max.ms=1000'",
    );
    let (topic, other) = (unique("revived"), unique("purged"));
    let mut db = c.client();
    let id: i64 =
        db.query_one("SELECT outbox.enqueue_message($1, '\"one\"'::jsonb, key => 'k')", &[&topic]).unwrap().get(0);
    db.execute("SELECT outbox.enqueue_message($1, '\"two\"'::jsonb, key => 'k')", &[&topic]).unwrap();
    db.execute("SELECT outbox.enqueue_message($1, '\"x\"'::jsonb)", &[&other]).unwrap();
    wait_for("three dead letters", WAIT, || {
        db.query_one("SELECT count(*) FROM outbox.dead_letters", &[]).unwrap().get::<_, i64>(0) == 3
    });
    // The operator fixes the cause (lets the worker create topics) and puts them back in line.
    c.reconfigure("pg_outbox.create_topics = on");
    std::thread::sleep(Duration::from_millis(500));
    assert!(db.query_one("SELECT outbox.retry_dead_letter($1)", &[&id]).unwrap().get::<_, bool>(0));
    assert_eq!(db.query_one("SELECT outbox.retry_dead_letters($1)", &[&topic]).unwrap().get::<_, i32>(0), 1);
    let records = read_topic(&bootstrap, &topic, 2, WAIT);
    assert_eq!(payloads(&records), vec!["\"one\"", "\"two\""]);
    assert_eq!(db.query_one("SELECT outbox.purge_dead_letters($1)", &[&other]).unwrap().get::<_, i32>(0), 1);
    assert_eq!(db.query_one("SELECT count(*) FROM outbox.dead_letters", &[]).unwrap().get::<_, i64>(0), 0);
}

#[test]
fn wait_for_delivery_returns_once_acknowledged_or_false_at_the_timeout() {
    let (c, _) = kafka_cluster("pg_outbox.poll_interval = '10s'");
    let topic = unique("sync");
    let mut db = c.client();
    let id: i64 = db.query_one("SELECT outbox.enqueue_message($1, '1'::jsonb)", &[&topic]).unwrap().get(0);
    let started = Instant::now();
    assert!(db.query_one("SELECT outbox.wait_for_delivery($1, '10 seconds')", &[&id]).unwrap().get::<_, bool>(0));
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    let status: String = db.query_one("SELECT outbox.message_status($1)", &[&id]).unwrap().get(0);
    assert_eq!(status, "delivered");
    db.execute("SELECT outbox.pause_topic($1)", &[&topic]).unwrap();
    let held: i64 = db.query_one("SELECT outbox.enqueue_message($1, '2'::jsonb)", &[&topic]).unwrap().get(0);
    let started = Instant::now();
    assert!(!db
        .query_one("SELECT outbox.wait_for_delivery($1, '700 milliseconds')", &[&held])
        .unwrap()
        .get::<_, bool>(0));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(700) && waited < Duration::from_secs(3), "{waited:?}");
    let never: i64 = 1_000_000;
    assert!(!db.query_one("SELECT outbox.wait_for_delivery($1, '5 seconds')", &[&never]).unwrap().get::<_, bool>(0));
}

#[test]
fn retained_messages_can_be_replayed_with_their_original_ids() {
    let (c, bootstrap) = kafka_cluster("pg_outbox.retention = '1h'\npg_outbox.rotation_interval = '1s'");
    let topic = unique("replay");
    let mut db = c.client();
    for i in 0..3 {
        db.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::int), key => 'k')", &[&topic, &i]).unwrap();
    }
    let first = read_topic(&bootstrap, &topic, 3, WAIT);
    assert!(c.wait_until_drained(WAIT));
    std::thread::sleep(Duration::from_secs(3));
    let stored: i64 = db.query_one("SELECT count(*) FROM outbox.messages WHERE topic = $1", &[&topic]).unwrap().get(0);
    assert_eq!(stored, 3, "retention keeps delivered messages across rotations");
    let replayed: i32 =
        db.query_one("SELECT outbox.replay($1, now() - interval '10 minutes')", &[&topic]).unwrap().get(0);
    assert_eq!(replayed, 3);
    let all = read_topic(&bootstrap, &topic, 6, WAIT);
    assert_eq!(payloads(&all), vec!["0", "1", "2", "0", "1", "2"]);
    let ids: Vec<&str> = all.iter().map(Record::message_id).collect();
    assert_eq!(ids[..3], ids[3..]);
    assert_eq!(first.iter().map(Record::message_id).collect::<Vec<_>>(), ids[..3]);
}

#[test]
fn a_topic_can_be_routed_to_another_topic_name_and_another_cluster() {
    let (c, kafka) = kafka_cluster("");
    let tansu = BrokerKind::Tansu.shared_bootstrap();
    let (renamed, elsewhere) = (unique("renamed"), unique("elsewhere"));
    let target = unique("renamed-target");
    let mut db = c.client();
    db.execute("INSERT INTO outbox.destinations (topic, kafka_topic) VALUES ($1, $2)", &[&renamed, &target]).unwrap();
    db.execute("INSERT INTO outbox.destinations (topic, bootstrap_servers) VALUES ($1, $2)", &[&elsewhere, &tansu])
        .unwrap();
    db.execute("SELECT outbox.enqueue_message($1, '\"r\"'::jsonb)", &[&renamed]).unwrap();
    db.execute("SELECT outbox.enqueue_message($1, '\"e\"'::jsonb)", &[&elsewhere]).unwrap();
    assert_eq!(payloads(&read_topic(&kafka, &target, 1, WAIT)), vec!["\"r\""]);
    assert_eq!(payloads(&read_topic(&tansu, &elsewhere, 1, WAIT)), vec!["\"e\""]);
    assert!(read_topic(&kafka, &elsewhere, 1, Duration::from_secs(2)).is_empty());
}

/// Enqueues one message for each topic in one transaction; returns their ids.
fn enqueue_pair(db: &mut postgres::Client, topics: [&str; 2], key: &str, n: i32) -> [i64; 2] {
    let mut tx = db.transaction().unwrap();
    let ids = topics.map(|topic| {
        tx.query_one("SELECT outbox.enqueue_message($1, to_jsonb($2::int), key => $3)", &[&topic, &n, &key])
            .unwrap()
            .get::<_, i64>(0)
    });
    tx.commit().unwrap();
    ids
}

/// How long the message took to be delivered, counted from now; None if not within `timeout`.
fn delivery_time(db: &mut postgres::Client, id: i64, timeout: &str) -> Option<Duration> {
    let started = Instant::now();
    let sql = format!("SELECT outbox.wait_for_delivery($1, '{timeout}')");
    db.query_one(&sql, &[&id]).unwrap().get::<_, bool>(0).then(|| started.elapsed())
}

#[test]
fn a_routed_cluster_that_is_down_holds_back_only_its_own_topics_and_gets_them_in_order_once_back() {
    let (c, kafka) = kafka_cluster("pg_outbox.retry_backoff = '200ms'\npg_outbox.retry_backoff_max = '1s'");
    let tansu = PrivateBroker::reserve(BrokerKind::Tansu);
    let (local, elsewhere) = (unique("local"), unique("elsewhere"));
    let mut db = c.client();
    db.execute(
        "INSERT INTO outbox.destinations (topic, bootstrap_servers) VALUES ($1, $2)",
        &[&elsewhere, &tansu.bootstrap()],
    )
    .unwrap();
    let topics = [local.as_str(), elsewhere.as_str()];

    // Down from the start: each transaction's message to the default cluster goes out, its
    // message to the cluster nobody answers for waits.
    for n in 0..10 {
        let [id, _] = enqueue_pair(&mut db, topics, "k", n);
        let took = delivery_time(&mut db, id, "20 seconds").expect("the default cluster's message is delivered");
        // The first try asks the dead cluster for its topic for up to 5 s; the later ones, when
        // it is tried again, for up to 1 s.
        let bound = Duration::from_secs(if n == 0 { 12 } else { 4 });
        assert!(took < bound, "message {n} took {took:?}");
        eprintln!("while the other cluster is down: message {n} delivered in {took:?}");
        // Over about 3 s: the dead cluster is tried again meanwhile.
        std::thread::sleep(Duration::from_millis(300));
    }
    // They wait for the cluster (the reason shown), in their key's line; none uses up an attempt.
    let row = db
        .query_one(
            "SELECT count(*), sum(attempts)::int8, count(*) FILTER (WHERE last_error LIKE '%metadata%')
             FROM outbox.held_messages WHERE topic = $1",
            &[&elsewhere],
        )
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (10, 0));
    assert!(row.get::<_, i64>(2) >= 1);
    let status = db.query_one("SELECT broker_state, last_error FROM outbox.worker_status", &[]).unwrap();
    let (state, last_error): (String, String) = (status.get(0), status.get(1));
    assert_eq!(state, "unavailable", "one cluster down is enough for worker_status to say so");
    assert!(last_error.starts_with(&format!("Kafka cluster {}", tansu.bootstrap())), "{last_error}");

    // Back: what waited goes out first, in order, and the key's later messages behind it.
    tansu.resume();
    for n in 10..13 {
        enqueue_pair(&mut db, topics, "k", n);
    }
    let got = payloads(&read_topic(&tansu.bootstrap(), &elsewhere, 13, WAIT));
    assert_eq!(got, (0..13).map(|n| n.to_string()).collect::<Vec<_>>());

    // Down in the middle of the flow: the batch in flight to it is given up within 10 s at most,
    // not after the 120 s message timeout, and the default cluster's messages keep going.
    tansu.kill();
    let mut last = 0;
    for n in 13..18 {
        let [id, other] = enqueue_pair(&mut db, topics, "k", n);
        let took = delivery_time(&mut db, id, "30 seconds").expect("the default cluster's message is delivered");
        assert!(took < Duration::from_secs(20), "message {n} took {took:?}");
        eprintln!("after the other cluster died: message {n} delivered in {took:?}");
        last = other;
    }
    tansu.resume();
    assert!(delivery_time(&mut db, last, "60 seconds").is_some(), "what waited for the cluster is delivered");
    let records = read_topic_settled(&tansu.bootstrap(), &elsewhere, 18, WAIT, Duration::from_secs(2));
    // At least once: a message purged in flight may have been written before the broker died.
    let mut seen = std::collections::HashSet::new();
    let in_order: Vec<String> =
        records.iter().filter(|r| seen.insert(r.message_id().to_string())).map(|r| r.json().to_string()).collect();
    assert_eq!(in_order, (0..18).map(|n| n.to_string()).collect::<Vec<_>>());
    let on_default = payloads(&read_topic(&kafka, &local, 18, WAIT));
    assert_eq!(on_default, (0..18).map(|n| n.to_string()).collect::<Vec<_>>());

    let state: String = db.query_one("SELECT broker_state FROM outbox.worker_status", &[]).unwrap().get(0);
    assert_eq!(state, "connected");
    // Each outage's start and end are logged once (two outages, unless the broker hiccuped).
    let log = c.log();
    let down = log.matches(&format!("Kafka cluster {} is unavailable", tansu.bootstrap())).count();
    let back = log.matches(&format!("Kafka cluster {} is reachable again", tansu.bootstrap())).count();
    assert!(down >= 2 && down == back, "{down} outages, {back} ends");

    // A route removed while its cluster is down: what waited for it goes where the topic goes
    // now, and nothing is left shown as down.
    tansu.kill();
    let [_, moved] = enqueue_pair(&mut db, topics, "k", 18);
    wait_for("the worker to find the cluster down again", WAIT, || {
        let sql = "SELECT count(*) FROM outbox.worker_status WHERE broker_state = 'unavailable'";
        db.query_one(sql, &[]).unwrap().get::<_, i64>(0) == 1
    });
    db.execute("DELETE FROM outbox.destinations WHERE topic = $1", &[&elsewhere]).unwrap();
    assert!(delivery_time(&mut db, moved, "30 seconds").is_some(), "delivered once the route is gone");
    assert_eq!(payloads(&read_topic(&kafka, &elsewhere, 1, WAIT)), vec!["18"]);
    wait_for("worker_status to show the broker connected", WAIT, || {
        let sql = "SELECT count(*) FROM outbox.worker_status WHERE broker_state = 'connected'";
        db.query_one(sql, &[]).unwrap().get::<_, i64>(0) == 1
    });
}

#[test]
fn with_routes_that_only_rename_topics_an_outage_keeps_the_batch_in_place_as_without_routes() {
    // Nothing listens on the default cluster's address.
    let nowhere = PrivateBroker::reserve(BrokerKind::Kafka);
    let c = Cluster::start(&nowhere.bootstrap(), "");
    let (topic, target) = (unique("renamed"), unique("renamed-target"));
    let mut db = c.client();
    db.execute("INSERT INTO outbox.destinations (topic, kafka_topic) VALUES ($1, $2)", &[&topic, &target]).unwrap();
    for i in 0..50 {
        db.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::int), key => 'k')", &[&topic, &i]).unwrap();
    }
    wait_for("worker_status to say Kafka is unavailable", WAIT, || {
        let sql = "SELECT count(*) FROM outbox.worker_status WHERE broker_state = 'unavailable'";
        db.query_one(sql, &[]).unwrap().get::<_, i64>(0) == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    // One cluster: nothing else could go meanwhile, so nothing is copied into held_messages.
    let held: i64 = db.query_one("SELECT count(*) FROM outbox.held_messages", &[]).unwrap().get(0);
    let pending: i64 =
        db.query_one("SELECT count(*) FROM outbox.pending_messages WHERE topic = $1", &[&topic]).unwrap().get(0);
    assert_eq!((held, pending), (0, 50));
}

#[test]
fn a_route_the_worker_could_not_follow_is_refused_when_written_naming_what_is_wrong_but_no_value() {
    let (c, kafka) = kafka_cluster("");
    let mut db = c.client();
    let topic = unique("checked");
    let insert = "INSERT INTO outbox.destinations (topic, kafka_topic, bootstrap_servers, kafka_properties)
                  VALUES ($1, $2, $3, $4)";
    let refused = |db: &mut postgres::Client, route: [Option<&str>; 3]| {
        let err = db.execute(insert, &[&topic, &route[0], &route[1], &route[2]]).expect_err("refused");
        assert_eq!(pg_outbox_tests::sqlstate(&err), "22023", "{err}");
        let message = err.as_db_error().unwrap().message().to_string();
        assert!(message.starts_with(&format!("route of topic \"{topic}\": ")), "{message}");
        message
    };
    let message = refused(&mut db, [None, Some(&kafka), Some("lingerms=5")]);
    assert!(message.contains("\"lingerms\" is not a librdkafka property"), "{message}");
    let message = refused(&mut db, [None, Some(&kafka), Some("sasl.password=x; compression.type=s3cret")]);
    assert!(message.contains("\"compression.type\"") && !message.contains("s3cret"), "{message}");
    let message = refused(&mut db, [None, Some(&kafka), Some("linger.ms")]);
    assert!(message.contains("key=value"), "{message}");
    // Properties without a cluster of their own used to be ignored.
    let message = refused(&mut db, [Some("elsewhere"), None, Some("linger.ms=5")]);
    assert!(message.contains("bootstrap_servers is NULL"), "{message}");
    let message = refused(&mut db, [None, None, None]);
    assert!(message.contains("a route names a kafka_topic, a bootstrap_servers, or both"), "{message}");
    let message = refused(&mut db, [None, Some(" "), None]);
    assert!(message.contains("bootstrap_servers is empty"), "{message}");
    let message = refused(&mut db, [Some("orders created"), None, None]);
    assert!(message.contains("kafka_topic is invalid"), "{message}");
    let message = refused(&mut db, [None, Some(&kafka), Some("plugin.library.paths=/tmp/evil.so")]);
    assert!(message.contains("\"plugin.library.paths\" makes the worker load or run code"), "{message}");

    // A valid route is kept, and updating it into one the worker could not follow is refused.
    db.execute(insert, &[&topic, &None::<&str>, &Some(kafka.as_str()), &Some("linger.ms=5; sasl.password=s3cret")])
        .unwrap();
    let err = db
        .execute("UPDATE outbox.destinations SET kafka_properties = 'acks=most' WHERE topic = $1", &[&topic])
        .unwrap_err();
    assert_eq!(pg_outbox_tests::sqlstate(&err), "22023", "{err}");
    let kept: String =
        db.query_one("SELECT kafka_properties FROM outbox.destinations WHERE topic = $1", &[&topic]).unwrap().get(0);
    assert_eq!(kept, "linger.ms=5; sasl.password=s3cret");
}

#[test]
fn a_route_whose_producer_librdkafka_refuses_holds_back_only_its_topic_and_says_why() {
    let conf = "pg_outbox.retry_backoff = '200ms'\npg_outbox.retry_backoff_max = '1s'";
    let (c, kafka) = kafka_cluster(conf);
    let (local, refused) = (unique("local"), unique("refused-route"));
    let mut db = c.client();
    // Each property is valid on its own; librdkafka refuses acks=1 beside the idempotence the
    // worker asks for only when the producer is created.
    db.execute(
        "INSERT INTO outbox.destinations (topic, bootstrap_servers, kafka_properties) VALUES ($1, '127.0.0.1:9', 'acks=1')",
        &[&refused],
    )
    .unwrap();
    let [local_id, refused_id] = enqueue_pair(&mut db, [local.as_str(), refused.as_str()], "k", 1);
    assert!(delivery_time(&mut db, local_id, "20 seconds").is_some(), "the other topic's message is delivered");
    wait_for("the refused route's message to wait, saying why", WAIT, || {
        let sql = "SELECT last_error FROM outbox.held_messages WHERE id = $1 AND attempts = 0";
        db.query_opt(sql, &[&refused_id])
            .unwrap()
            .and_then(|r| r.get::<_, Option<String>>(0))
            .is_some_and(|e| e.contains("127.0.0.1:9") && e.contains("acks"))
    });
    let last_error: Option<String> = db.query_one("SELECT last_error FROM outbox.worker_status", &[]).unwrap().get(0);
    assert!(last_error.is_some_and(|e| e.contains("acks")));
    // Fixed: it goes where the route now says.
    db.execute(
        "UPDATE outbox.destinations SET bootstrap_servers = $2, kafka_properties = NULL WHERE topic = $1",
        &[&refused, &kafka],
    )
    .unwrap();
    assert!(delivery_time(&mut db, refused_id, "30 seconds").is_some(), "delivered once the route is fixed");
    assert_eq!(payloads(&read_topic(&kafka, &refused, 1, WAIT)), vec!["1"]);
}

#[test]
fn pg_dump_keeps_routes_paused_topics_and_where_ids_are_but_not_the_messages() {
    let (c, kafka) = kafka_cluster("");
    let (routed, paused) = (unique("routed"), unique("paused"));
    let mut db = c.client();
    db.execute(
        "INSERT INTO outbox.destinations (topic, kafka_topic, bootstrap_servers, kafka_properties)
         VALUES ($1, 'orders-v2', $2, 'linger.ms=5')",
        &[&routed, &kafka],
    )
    .unwrap();
    db.execute("SELECT outbox.pause_topic($1)", &[&paused]).unwrap();
    // Resumed: not kept.
    db.batch_execute("SELECT outbox.pause_topic('resumed'); SELECT outbox.resume_topic('resumed')").unwrap();
    db.execute("SELECT outbox.enqueue_message($1, '1'::jsonb)", &[&paused]).unwrap();
    let last_id: i64 = db.query_one("SELECT outbox.enqueue_message('elsewhere', '2'::jsonb)", &[]).unwrap().get(0);
    db.batch_execute("CREATE DATABASE restored").unwrap();
    let bin = pg_outbox_tests::pg_bin();
    let dump = std::process::Command::new(format!("{bin}/pg_dump"))
        .args(["-h", "127.0.0.1", "-p", &c.port.to_string(), "-U", "postgres", "-Fc", &c.database])
        .output()
        .unwrap();
    assert!(dump.status.success(), "pg_dump: {}", String::from_utf8_lossy(&dump.stderr));
    let mut restore = std::process::Command::new(format!("{bin}/pg_restore"))
        .args(["-h", "127.0.0.1", "-p", &c.port.to_string(), "-U", "postgres", "--exit-on-error", "-d", "restored"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut restore.stdin.take().unwrap(), &dump.stdout).unwrap();
    let restored = restore.wait_with_output().unwrap();
    assert!(restored.status.success(), "pg_restore: {}", String::from_utf8_lossy(&restored.stderr));

    let mut copy = c.client_for("restored");
    let route = copy
        .query_one("SELECT topic, kafka_topic, bootstrap_servers, kafka_properties FROM outbox.destinations", &[])
        .unwrap();
    let route: (String, String, String, String) = (route.get(0), route.get(1), route.get(2), route.get(3));
    assert_eq!(route, (routed, "orders-v2".to_string(), kafka, "linger.ms=5".to_string()));
    let paused_topics: Vec<String> =
        copy.query("SELECT topic FROM outbox.topics WHERE paused", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(paused_topics, vec![paused]);
    assert_eq!(copy.query_one("SELECT count(*) FROM outbox.topics", &[]).unwrap().get::<_, i64>(0), 1);
    let messages: i64 = copy
        .query_one("SELECT (SELECT count(*) FROM outbox.messages) + (SELECT count(*) FROM outbox.held_messages)", &[])
        .unwrap()
        .get(0);
    assert_eq!(messages, 0);
    // Ids go on from where they were, not from 1 again.
    let next_id: i64 = copy.query_one("SELECT outbox.enqueue_message('elsewhere', '3'::jsonb)", &[]).unwrap().get(0);
    assert!(next_id > last_id, "{next_id} after {last_id}");
}

#[test]
fn the_worker_forwards_from_0_6_0_objects_and_the_update_stops_at_a_route_written_before_that_it_refuses() {
    let (c, bootstrap) = cluster_at_version("0.6.0");
    let mut db = c.client();
    let topic = unique("from-0-6-0");
    // Refused from 0.7.0 on (properties without a cluster of their own are ignored).
    db.execute(
        "INSERT INTO outbox.destinations (topic, kafka_properties, kafka_topic) VALUES ('old', 'x=y', 'old')",
        &[],
    )
    .unwrap();
    db.execute("SELECT outbox.enqueue_message($1, '\"plain\"'::jsonb, key => 'k')", &[&topic]).unwrap();
    db.execute(
        "SELECT outbox.enqueue_message($1, '\"delayed\"'::jsonb, key => 'k', deliver_after => '1 second')",
        &[&topic],
    )
    .unwrap();
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 2, WAIT)), vec!["\"plain\"", "\"delayed\""]);
    assert!(!c.log().contains("run ALTER EXTENSION pg_outbox UPDATE"));

    let err = db.batch_execute("ALTER EXTENSION pg_outbox UPDATE").unwrap_err();
    assert_eq!(pg_outbox_tests::sqlstate(&err), "22023", "{err}");
    assert!(err.as_db_error().unwrap().message().starts_with("route of topic \"old\": kafka_properties"), "{err}");
    assert_eq!(version(&mut db), "0.6.0");
    db.execute("UPDATE outbox.destinations SET kafka_properties = NULL", &[]).unwrap();
    db.batch_execute("ALTER EXTENSION pg_outbox UPDATE").unwrap();
    assert_eq!(version(&mut db), "0.8.0");
    let err = db.execute("UPDATE outbox.destinations SET kafka_properties = 'x=y'", &[]).unwrap_err();
    assert_eq!(pg_outbox_tests::sqlstate(&err), "22023", "{err}");
    db.execute("SELECT outbox.enqueue_message($1, '\"after\"'::jsonb, key => 'k')", &[&topic]).unwrap();
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 3, WAIT))[2], "\"after\"");
}

#[test]
fn the_worker_and_enqueue_go_on_against_0_7_0_objects_and_the_update_gives_every_slot_the_new_id_default() {
    let (c, bootstrap) = cluster_at_version("0.7.0");
    let mut db = c.client();
    let topic = unique("from-0-7-0");
    db.execute("SELECT outbox.enqueue_message($1, '\"before\"'::jsonb, key => 'k')", &[&topic]).unwrap();
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 1, WAIT)), vec!["\"before\""]);
    assert!(!c.log().contains("run ALTER EXTENSION pg_outbox UPDATE"));

    db.batch_execute("ALTER EXTENSION pg_outbox UPDATE").unwrap();
    assert_eq!(version(&mut db), "0.8.0");
    // The parent and each slot partition: a row may be written into either.
    let defaults: Vec<(String, String)> = db
        .query(
            "SELECT c.relname::text, pg_get_expr(d.adbin, d.adrelid)
             FROM pg_attrdef d
             JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum AND a.attname = 'id'
             JOIN pg_class c ON c.oid = d.adrelid
             WHERE c.relnamespace = 'outbox'::regnamespace AND c.relname ~ '^messages(_[0-9]+)?$'
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let tables: Vec<&str> = defaults.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(tables, ["messages", "messages_0", "messages_1", "messages_2", "messages_3"]);
    for (table, default) in &defaults {
        assert_eq!(default, "outbox._next_message_id('outbox.message_id_seq'::regclass)", "{table}");
    }
    db.execute("SELECT outbox.enqueue_message($1, '\"after\"'::jsonb, key => 'k')", &[&topic]).unwrap();
    db.execute("INSERT INTO outbox.messages (topic, key, json_payload) VALUES ($1, 'k', '\"plain\"')", &[&topic])
        .unwrap();
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 3, WAIT)), vec!["\"before\"", "\"after\"", "\"plain\""]);
    // The session that took ids before the update recorded the timeline with its first id after.
    let recorded: i64 = db.query_one("SELECT last_value FROM outbox.message_id_timeline", &[]).unwrap().get(0);
    assert_eq!(recorded, 1);
}

#[test]
fn each_database_has_its_own_worker_and_row_in_worker_status() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start_with_databases(&bootstrap, "", &["shop", "billing"]);
    let topic = unique("multi-db");
    for db in ["shop", "billing"] {
        let mut client = c.client_for(db);
        client.batch_execute("CREATE EXTENSION pg_outbox").unwrap();
        client.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::text))", &[&topic, &db]).unwrap();
    }
    let mut got = payloads(&read_topic(&bootstrap, &topic, 2, WAIT));
    got.sort();
    assert_eq!(got, vec!["\"billing\"", "\"shop\""]);
    let rows = c.client().query("SELECT database, pid FROM outbox.worker_status ORDER BY 1", &[]).unwrap();
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(names, vec!["billing", "shop"]);
    assert!(rows.iter().all(|r| r.get::<_, Option<i32>>(1).is_some()));
}

#[test]
fn a_database_added_to_pg_outbox_database_on_reload_gets_a_worker_and_one_taken_off_loses_it() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start_with_databases(&bootstrap, "pg_outbox.database = 'shop'", &["shop", "billing"]);
    let mut billing = c.client_for("billing");
    billing.batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    let shop_worker = c.worker_pid_of("shop", WAIT).expect("shop's worker");
    let topic = unique("listed-on-reload");
    let enqueue = |db: &mut postgres::Client, i: i32| {
        db.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::int), key => 'k')", &[&topic, &i]).unwrap();
    };
    enqueue(&mut billing, 1);
    std::thread::sleep(Duration::from_secs(2));
    let state: String =
        billing.query_one("SELECT state FROM outbox.worker_status WHERE pid IS NULL", &[]).unwrap().get(0);
    assert_eq!(state, "no worker: not in pg_outbox.database");

    c.reconfigure("pg_outbox.database = 'shop, billing'");
    let first = c.worker_pid_of("billing", WAIT).expect("billing gets a worker on reload");
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 1, WAIT)), vec!["1"]);

    c.reconfigure("pg_outbox.database = 'shop'");
    wait_for("billing's worker to leave", WAIT, || c.worker_pid_of("billing", Duration::ZERO).is_none());
    assert!(c.log().contains("pg_outbox: database \"billing\" is no longer in pg_outbox.database, worker exits"));
    let row = billing.query_one("SELECT pid, state FROM outbox.worker_status WHERE database = 'billing'", &[]).unwrap();
    assert_eq!(row.get::<_, Option<i32>>(0), None);
    assert_eq!(row.get::<_, String>(1), "no worker: not in pg_outbox.database");
    // Not started again while it is off the list; its messages wait.
    enqueue(&mut billing, 2);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.worker_pid_of("billing", Duration::ZERO), None);
    let pending: i64 = billing.query_one("SELECT count(*) FROM outbox.pending_messages", &[]).unwrap().get(0);
    assert_eq!(pending, 1);
    assert_eq!(c.worker_pid_of("shop", Duration::ZERO), Some(shop_worker), "shop's worker was left alone");

    c.reconfigure("pg_outbox.database = 'shop, billing'");
    let second = c.worker_pid_of("billing", WAIT).expect("billing's worker comes back");
    assert_ne!(first, second);
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 2, WAIT)), vec!["1", "2"]);
}

/// A name in pg_outbox.database that matches no database is said once in the server log, until
/// the database is created; a database with the extension that no worker forwards says so in
/// worker_status, instead of showing no row at all.
#[test]
fn a_listed_database_that_does_not_exist_is_warned_about_once_and_worker_status_says_no_worker_forwards_this_one() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    // The extension is created in "shop"; the setting names "Shop" (names are case-sensitive).
    let c = Cluster::start(&bootstrap, "pg_outbox.database = 'Shop'");
    let row = c.client().query_one("SELECT database, pid, state FROM outbox.worker_status", &[]).unwrap();
    assert_eq!(row.get::<_, String>(0), "shop");
    assert_eq!(row.get::<_, Option<i32>>(1), None);
    assert_eq!(row.get::<_, String>(2), "no worker: not in pg_outbox.database");
    let warning = "WARNING:  pg_outbox: database \"Shop\" named in pg_outbox.database does not exist or does not allow connections; nothing is forwarded for it";
    wait_for("the launcher to warn about \"Shop\"", WAIT, || c.log().contains(warning));
    // The launcher looks every second.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.log().matches(warning).count(), 1, "said once, not once a second");

    c.client_for("postgres").batch_execute("CREATE DATABASE \"Shop\"").unwrap();
    assert!(c.worker_pid_of("Shop", WAIT).is_some(), "the database, once created, gets its worker");
    assert!(c
        .log()
        .contains("LOG:  pg_outbox: database \"Shop\" named in pg_outbox.database now exists; its worker starts"));
    let mut shop = c.client_for("Shop");
    shop.batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    let topic = unique("listed-late");
    shop.execute("SELECT outbox.enqueue_message($1, '\"x\"'::jsonb)", &[&topic]).unwrap();
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 1, WAIT)), vec!["\"x\""]);
    let states: Vec<String> = shop
        .query("SELECT state FROM outbox.worker_status WHERE database = current_database()", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(states.len(), 1);
    assert_ne!(states[0], "no worker: not in pg_outbox.database");
}

/// Without shared_preload_libraries the library cannot forward anything; loading it in a session
/// used to end that session (FATAL: cannot create PGC_POSTMASTER variables after startup).
#[test]
fn create_extension_on_a_server_started_without_the_library_is_refused_with_how_to_fix_it() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start_without_extension(&bootstrap, "shared_preload_libraries = ''");
    let mut db = c.client();
    for _ in 0..2 {
        let err = db.batch_execute("CREATE EXTENSION pg_outbox").unwrap_err();
        let e = err.as_db_error().expect("an ERROR, not a closed connection");
        assert_eq!(e.code().code(), "55000");
        assert_eq!(e.message(), "pg_outbox must be loaded at server start");
        assert_eq!(
            e.hint(),
            Some("Add pg_outbox to shared_preload_libraries in postgresql.conf and restart the server.")
        );
    }
    // The session goes on.
    assert_eq!(db.query_one("SELECT 1", &[]).unwrap().get::<_, i32>(0), 1);
    assert!(!c.log().contains("FATAL"), "{}", c.log());
}

#[test]
fn payloads_keys_and_headers_arrive_as_utf8_whatever_the_database_encoding() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    // "latin" and "ascii" are created below, with their own encodings; the launcher starts their
    // workers then.
    let c = Cluster::start(&bootstrap, "pg_outbox.database = 'shop,latin,ascii'");
    for (db, encoding) in [("latin", "LATIN1"), ("ascii", "SQL_ASCII")] {
        c.client()
            .batch_execute(&format!(
                "CREATE DATABASE {db} TEMPLATE template0 ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'"
            ))
            .unwrap();
    }
    let topic = unique("encodings");
    let dbs = ["ascii", "latin", "shop"];
    for db in dbs {
        let mut client = c.client_for(db);
        client.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_outbox").unwrap();
        // A non-ASCII character and a backslash: neither may be re-encoded or unescaped.
        client
            .execute(
                r#"SELECT outbox.enqueue_message($1, '{"db": "x", "name": "café", "path": "C:\\dir"}'::jsonb || jsonb_build_object('db', $2::text),
                                                 key => 'clé-' || $2, headers => jsonb_build_object('origine', 'crème ' || $2))"#,
                &[&topic, &db],
            )
            .unwrap();
        // A delayed message waits in held_messages, then in its key's line.
        client
            .execute(
                r#"SELECT outbox.enqueue_message($1, jsonb_build_object('db', $2::text, 'name', 'déjà', 'delayed', true),
                                                 key => 'clé-' || $2, headers => jsonb_build_object('origine', 'crème ' || $2),
                                                 deliver_after => '1 second')"#,
                &[&topic, &db],
            )
            .unwrap();
    }
    // SQL_ASCII stores any bytes: a key that is not UTF-8 arrives with the bad byte replaced,
    // rather than stopping the worker on it.
    c.client_for("ascii")
        .execute(
            r#"SELECT outbox.enqueue_message($1, '{"raw": true}'::jsonb, key => convert_from('\x6bff'::bytea, 'SQL_ASCII'))"#,
            &[&topic],
        )
        .unwrap();
    let mut records = read_topic(&bootstrap, &topic, 7, WAIT);
    records.sort_by_key(|r| (r.key.clone(), r.offset));
    let got: Vec<(String, Option<String>, String)> = records
        .iter()
        .map(|r| {
            let payload = String::from_utf8_lossy(r.payload.as_deref().unwrap_or_default()).into_owned();
            (r.key.clone().unwrap_or_default(), r.headers.get("origine").cloned(), payload)
        })
        .collect();
    let mut expected = Vec::new();
    for db in dbs {
        for payload in [
            format!(r#"{{"db": "{db}", "name": "café", "path": "C:\\dir"}}"#),
            format!(r#"{{"db": "{db}", "name": "déjà", "delayed": true}}"#),
        ] {
            expected.push((format!("clé-{db}"), Some(format!("crème {db}")), payload));
        }
    }
    expected.push(("k\u{fffd}".to_string(), None, r#"{"raw": true}"#.to_string()));
    assert_eq!(got, expected);
}

#[test]
fn settings_are_visible_and_changed_without_restarting_the_worker() {
    let (c, bootstrap) = kafka_cluster("");
    let pid = c.worker_pid(WAIT).unwrap();
    let mut db = c.client();
    db.batch_execute("ALTER SYSTEM SET pg_outbox.batch_size = 77").unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for("the new setting", WAIT, || {
        db.query_one("SELECT setting FROM outbox.settings WHERE name = 'pg_outbox.batch_size'", &[])
            .unwrap()
            .get::<_, String>(0)
            == "77"
    });
    let topic = unique("settings");
    db.execute("SELECT outbox.enqueue_message($1, '1'::jsonb)", &[&topic]).unwrap();
    assert_eq!(read_topic(&bootstrap, &topic, 1, WAIT).len(), 1);
    assert_eq!(c.worker_pid(WAIT), Some(pid));
    let hidden: i64 = db
        .query_one("SELECT count(*) FROM outbox.settings WHERE name = 'pg_outbox.kafka_properties'", &[])
        .unwrap()
        .get(0);
    assert_eq!(hidden, 0, "the setting that may hold broker credentials is not listed");
    db.batch_execute("SHOW pg_outbox.kafka_properties").expect("a superuser may read it");
    db.batch_execute("CREATE ROLE ops LOGIN; GRANT outbox_reader TO ops").unwrap();
    let mut ops =
        postgres::Client::connect(&c.dsn("shop").replace("user=postgres", "user=ops"), postgres::NoTls).unwrap();
    let err = ops.batch_execute("SHOW pg_outbox.kafka_properties").unwrap_err();
    assert_eq!(pg_outbox_tests::sqlstate(&err), "42501");
    assert_eq!(ops.query("SELECT * FROM outbox.settings", &[]).unwrap().len(), 14);
}

fn show_kafka_properties(db: &mut postgres::Client) -> String {
    db.query_one("SHOW pg_outbox.kafka_properties", &[]).unwrap().get(0)
}

#[test]
fn kafka_properties_librdkafka_refuses_are_refused_by_alter_system_and_a_reload_keeps_the_value_before() {
    let (c, bootstrap) = kafka_cluster("");
    let mut db = c.client();
    let err = db
        .batch_execute("ALTER SYSTEM SET pg_outbox.kafka_properties = 'lingerms=5; sasl.password=s3cret'")
        .unwrap_err();
    assert_eq!(pg_outbox_tests::sqlstate(&err), "22023", "{err}");
    let message = err.as_db_error().unwrap().message().to_string();
    assert_eq!(message, "invalid pg_outbox.kafka_properties: \"lingerms\" is not a librdkafka property");

    c.reconfigure("pg_outbox.kafka_properties = 'linger.ms=5'");
    wait_for("the valid value", WAIT, || show_kafka_properties(&mut db) == "linger.ms=5");
    // A value the reload refuses is logged, without the value, and the one before stays.
    c.reconfigure("pg_outbox.kafka_properties = 'compression.type=zzsecret'");
    wait_for("the reload to refuse the value", WAIT, || {
        c.log().contains("invalid pg_outbox.kafka_properties: invalid value for property \"compression.type\"")
    });
    assert!(!c.log().contains("zzsecret"));
    assert_eq!(show_kafka_properties(&mut db), "linger.ms=5");
    let topic = unique("kept-properties");
    db.execute("SELECT outbox.enqueue_message($1, '1'::jsonb)", &[&topic]).unwrap();
    assert_eq!(read_topic(&bootstrap, &topic, 1, WAIT).len(), 1, "the worker goes on with the value before");
}

/// librdkafka warns of a property it will ignore, as it does of deprecated ones and of settings
/// that contradict each other: the warning reaches the server log, naming the cluster, once.
#[test]
fn librdkafkas_warnings_reach_the_server_log_once_naming_the_cluster() {
    let (c, bootstrap) = kafka_cluster("pg_outbox.kafka_properties = 'fetch.wait.max.ms=100'");
    let mut db = c.client();
    let topic = unique("librdkafka-warned");
    db.execute("SELECT outbox.enqueue_message($1, '1'::jsonb)", &[&topic]).unwrap();
    assert_eq!(read_topic(&bootstrap, &topic, 1, WAIT).len(), 1);
    let warning = format!(
        "WARNING:  pg_outbox: librdkafka (Kafka cluster {bootstrap}) CONFWARN: Configuration property fetch.wait.max.ms is a consumer property and will be ignored by this producer instance"
    );
    wait_for("librdkafka's warning", WAIT, || c.log().contains(&warning));
    // Changed properties make a new producer, which warns again: said once is enough.
    c.reconfigure("pg_outbox.kafka_properties = 'fetch.wait.max.ms=100; linger.ms=2'");
    wait_for("the new properties", WAIT, || show_kafka_properties(&mut db).ends_with("linger.ms=2"));
    db.execute("SELECT outbox.enqueue_message($1, '2'::jsonb)", &[&topic]).unwrap();
    assert_eq!(read_topic(&bootstrap, &topic, 2, WAIT).len(), 2);
    let log = c.log();
    assert_eq!(log.matches(&warning).count(), 1, "{log}");
}

/// As with any librdkafka client, `debug` asks for its debug lines: they are logged as they come.
#[test]
fn a_debug_property_brings_librdkafkas_debug_lines_to_the_server_log() {
    let (c, bootstrap) = kafka_cluster("pg_outbox.kafka_properties = 'debug=metadata'");
    let topic = unique("librdkafka-debugged");
    c.client().execute("SELECT outbox.enqueue_message($1, '1'::jsonb)", &[&topic]).unwrap();
    assert_eq!(read_topic(&bootstrap, &topic, 1, WAIT).len(), 1);
    let debug_line = format!("LOG:  pg_outbox: librdkafka (Kafka cluster {bootstrap}) METADATA: ");
    wait_for("librdkafka's debug lines", WAIT, || c.log().matches(&debug_line).count() > 1);
}

#[test]
fn kafka_properties_wrong_when_the_server_starts_hold_every_message_and_say_why_until_fixed() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    // Not dropped for no properties at all (which could mean no TLS or SASL): the worker refuses it.
    let c = Cluster::start(&bootstrap, "pg_outbox.kafka_properties = 'lingerms=5; sasl.password=zzsecret'");
    let mut db = c.client();
    let topic = unique("held-by-properties");
    db.execute("SELECT outbox.enqueue_message($1, '1'::jsonb)", &[&topic]).unwrap();
    wait_for("worker_status to say why", WAIT, || {
        let row = db.query_opt("SELECT last_error FROM outbox.worker_status", &[]).unwrap();
        row.and_then(|r| r.get::<_, Option<String>>(0))
            .is_some_and(|e| e.contains("\"lingerms\" is not a librdkafka property"))
    });
    assert!(read_topic(&bootstrap, &topic, 1, Duration::from_secs(2)).is_empty());

    // A parallel worker takes the setting from its leader as it is: any role's parallel query works.
    db.batch_execute("CREATE TABLE numbers AS SELECT generate_series(1, 1000) n; CREATE ROLE analyst LOGIN; GRANT SELECT ON numbers TO analyst")
        .unwrap();
    let mut analyst =
        postgres::Client::connect(&c.dsn("shop").replace("user=postgres", "user=analyst"), postgres::NoTls).unwrap();
    analyst.batch_execute("SET force_parallel_mode = on").unwrap();
    let plan: Vec<String> = analyst
        .query("EXPLAIN (ANALYZE, COSTS OFF) SELECT sum(n) FROM numbers", &[])
        .expect("a parallel query")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(plan.iter().any(|l| l.contains("Workers Launched: 1")), "{plan:?}");
    assert!(!c.log().contains("zzsecret"), "the secret reached the server log");

    c.reconfigure("pg_outbox.kafka_properties = 'linger.ms=5'");
    assert_eq!(read_topic(&bootstrap, &topic, 1, WAIT).len(), 1, "delivered once the setting is fixed");
}

#[test]
fn monitoring_views_count_deliveries_and_wakeups() {
    let (c, bootstrap) = kafka_cluster("");
    let topic = unique("monitored");
    let mut db = c.client();
    for i in 0..10 {
        db.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::int))", &[&topic, &i]).unwrap();
    }
    assert_eq!(read_topic(&bootstrap, &topic, 10, WAIT).len(), 10);
    assert!(c.wait_until_drained(WAIT));
    // Per-topic counters are written at most once a second.
    let counted = || {
        let t = c
            .client()
            .query_one(
                "SELECT pending, delivered_total, recent_rate_per_s > 0, last_delivered_at IS NOT NULL
                 FROM outbox.topic_stats WHERE topic = $1",
                &[&topic],
            )
            .unwrap();
        (t.get::<_, i64>(0), t.get::<_, i64>(1), t.get::<_, bool>(2), t.get::<_, bool>(3))
    };
    wait_for("the topic's counters", Duration::from_secs(3), || counted().1 == 10);
    assert_eq!(counted(), (0, 10, true, true));
    let w = db
        .query_one(
            "SELECT state, broker_state, backlog, messages_delivered, batches > 0, wakeups_by_commit > 0, uptime > '0'
             FROM outbox.worker_status",
            &[],
        )
        .unwrap();
    assert_eq!(w.get::<_, String>(1), "connected");
    assert_eq!(w.get::<_, Option<i64>>(2), Some(0));
    assert_eq!(w.get::<_, i64>(3), 10);
    assert!(w.get::<_, bool>(4) && w.get::<_, bool>(5) && w.get::<_, bool>(6));
}

#[test]
fn alter_extension_update_upgrades_from_0_1_0_and_keeps_pending_messages() {
    let (c, bootstrap) = cluster_at_version("0.1.0");
    let mut db = c.client();
    let topic = unique("upgrade");
    db.execute("SELECT outbox.enqueue_message($1, '\"before upgrade\"'::jsonb, 'k', NULL::jsonb)", &[&topic]).unwrap();
    wait_for("the worker to ask for the update", WAIT, || {
        db.query_opt("SELECT 1 FROM pg_stat_activity WHERE backend_type = 'pg_outbox worker'", &[]).unwrap().is_some()
            && c.log().contains("run ALTER EXTENSION pg_outbox UPDATE")
    });
    db.batch_execute("ALTER EXTENSION pg_outbox UPDATE").unwrap();
    assert_eq!(version(&mut db), "0.8.0");
    db.execute(
        "SELECT outbox.enqueue_message($1, '\"after upgrade\"'::jsonb, key => 'k', deliver_after => '0')",
        &[&topic],
    )
    .unwrap();
    db.execute("SELECT outbox.enqueue_message($1, '\"stored as text\"'::jsonb, key => 'k')", &[&topic]).unwrap();
    assert_eq!(
        payloads(&read_topic(&bootstrap, &topic, 3, WAIT)),
        vec!["\"before upgrade\"", "\"after upgrade\"", "\"stored as text\""]
    );
}

#[test]
fn enqueue_goes_on_against_0_4_0_objects_and_what_it_held_is_forwarded_in_order_after_the_update() {
    enqueue_goes_on_against_older_objects("0.4.0");
}

#[test]
fn enqueue_goes_on_against_0_5_0_objects_and_what_it_held_is_forwarded_in_order_after_the_update() {
    enqueue_goes_on_against_older_objects("0.5.0");
}

/// Plain and delayed messages enqueued by this library into `version`'s objects (a delayed one
/// through that version's own function) are forwarded, in order, once the update has run.
fn enqueue_goes_on_against_older_objects(version: &str) {
    let (c, bootstrap) = cluster_at_version(version);
    let mut db = c.client();
    let topic = unique(&format!("from-{}", version.replace('.', "-")));
    let enqueue = |db: &mut postgres::Client, payload: &str, after: &str| {
        db.execute(
            "SELECT outbox.enqueue_message($1, to_jsonb($2::text), key => 'k', deliver_after => $3::text::interval)",
            &[&topic, &payload, &after],
        )
        .unwrap();
    };
    enqueue(&mut db, "due", "0");
    enqueue(&mut db, "due too", "0");
    db.execute("SELECT outbox.enqueue_message($1, '\"plain\"'::jsonb, key => 'k')", &[&topic]).unwrap();
    enqueue(&mut db, "later", "3 seconds");
    wait_for("the worker to ask for the update", WAIT, || c.log().contains("run ALTER EXTENSION pg_outbox UPDATE"));
    assert!(read_topic(&bootstrap, &topic, 1, Duration::from_secs(1)).is_empty(), "the worker waits for the update");
    db.batch_execute("ALTER EXTENSION pg_outbox UPDATE").unwrap();
    assert_eq!(
        payloads(&read_topic(&bootstrap, &topic, 4, WAIT)),
        vec!["\"due\"", "\"due too\"", "\"plain\"", "\"later\""]
    );
}

#[test]
fn enqueue_against_sql_objects_older_than_the_library_asks_for_the_update() {
    let (c, bootstrap) = cluster_at_version("0.3.0");
    let mut db = c.client();
    let topic = unique("outdated");
    let err = db.execute("SELECT outbox.enqueue_message($1, '{}'::jsonb)", &[&topic]).unwrap_err();
    let err = err.as_db_error().expect("a database error");
    assert_eq!(err.code().code(), "55000", "{err:?}");
    assert!(err.message().contains("run ALTER EXTENSION pg_outbox UPDATE"), "{err:?}");
    db.batch_execute("ALTER EXTENSION pg_outbox UPDATE").unwrap();
    db.execute("SELECT outbox.enqueue_message($1, '{\"n\": 1}'::jsonb)", &[&topic]).unwrap();
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 1, WAIT)), vec![r#"{"n": 1}"#]);
}
