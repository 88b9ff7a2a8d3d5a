//! The worker as an operator sees it: how it shows up, starts, stops, reloads settings, and
//! survives broker outages, DROP EXTENSION, DROP DATABASE, crashes and immediate shutdowns.
use std::time::{Duration, Instant};

use pg_outbox_tests::proxy::SilencingProxy;
use pg_outbox_tests::{payloads, read_topic, read_topic_settled, unique, wait_for, BrokerKind, Cluster, PrivateBroker};

const WAIT: Duration = Duration::from_secs(30);
/// What a worker logs when it leaves for a DROP DATABASE (or the like).
const LEAVING: &str = "another session needs the database to itself";

fn enqueue_numbers(c: &Cluster, topic: &str, range: std::ops::Range<i32>) {
    let mut db = c.client();
    for i in range {
        db.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::int), key => 'k')", &[&topic, &i]).unwrap();
    }
}

fn numbers(n: std::ops::Range<i32>) -> Vec<String> {
    n.map(|i| i.to_string()).collect()
}

/// Three messages enqueued to a new topic reach it, in order.
fn assert_forwards(c: &Cluster, bootstrap: &str, topic: &str) {
    let topic = unique(topic);
    enqueue_numbers(c, &topic, 0..3);
    assert_eq!(payloads(&read_topic(bootstrap, &topic, 3, WAIT)), numbers(0..3), "on {topic}");
}

#[test]
fn the_worker_and_launcher_show_in_pg_stat_activity() {
    let c = Cluster::start(&BrokerKind::Kafka.shared_bootstrap(), "");
    assert!(c.worker_pid(WAIT).is_some());
    let types: Vec<String> = c
        .client()
        .query("SELECT backend_type FROM pg_stat_activity WHERE backend_type LIKE 'pg_outbox%' ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, vec!["pg_outbox launcher", "pg_outbox worker"]);
    let row = c.client().query_one("SELECT pid, state FROM outbox.worker_status", &[]).unwrap();
    assert_eq!(row.get::<_, Option<i32>>(0), c.worker_pid(WAIT));
}

#[test]
fn sigterm_stops_the_worker_promptly_and_the_launcher_starts_it_again() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let before = unique("before-sigterm");
    enqueue_numbers(&c, &before, 0..3);
    assert_eq!(read_topic(&bootstrap, &before, 3, WAIT).len(), 3);
    assert!(c.wait_until_drained(WAIT));
    let pid = c.worker_pid(WAIT).unwrap();
    let sent = Instant::now();
    c.client().execute("SELECT pg_terminate_backend($1)", &[&pid]).unwrap();
    while c.worker_pid(Duration::ZERO) == Some(pid) {
        assert!(sent.elapsed() < Duration::from_secs(2), "worker still running 2 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopped_in = sent.elapsed();
    let new_pid = c.worker_pid(WAIT).expect("the launcher restarts the worker");
    assert_ne!(new_pid, pid);
    eprintln!("stopped {stopped_in:?} after SIGTERM, back after {:?}", sent.elapsed());
    assert_forwards(&c, &bootstrap, "after-sigterm");
    // The worker's figures outlive the worker process.
    assert!(c.wait_until_drained(WAIT));
    std::thread::sleep(Duration::from_millis(300));
    let delivered: i64 =
        c.client().query_one("SELECT messages_delivered FROM outbox.worker_status", &[]).unwrap().get(0);
    assert_eq!(delivered, 6);
}

fn pids_of(c: &Cluster, backend_type: &str) -> Vec<i32> {
    let rows = c
        .client_for("postgres")
        .query("SELECT pid FROM pg_stat_activity WHERE backend_type = $1 ORDER BY pid", &[&backend_type])
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// Waits until the one process of `backend_type` is another than `old`, and returns it.
fn replaced(c: &Cluster, backend_type: &str, old: i32, within: Duration) -> i32 {
    let mut new = old;
    wait_for(&format!("a new {backend_type}"), within, || match pids_of(c, backend_type)[..] {
        [pid] if pid != old => {
            new = pid;
            true
        }
        _ => false,
    });
    new
}

#[test]
fn a_cancel_request_to_the_worker_cancels_the_statement_it_waits_in_and_nothing_when_it_runs_none() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    // Asleep for a minute at a time: the cancel does not land in a poll's transaction.
    let c = Cluster::start(&bootstrap, "pg_outbox.poll_interval = '1min'");
    let pid = c.worker_pid(WAIT).unwrap();
    wait_for("the worker to be idle", WAIT, || {
        c.client().query_one("SELECT state FROM outbox.worker_status", &[]).unwrap().get::<_, String>(0) == "idle"
    });
    c.client().execute("SELECT pg_cancel_backend($1)", &[&pid]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(pids_of(&c, "pg_outbox worker"), vec![pid], "an idle worker goes on");
    assert_forwards(&c, &bootstrap, "after-idle-cancel");
    let log = c.log();
    assert!(!log.contains("canceling statement"), "{log}");
    assert_eq!(log.matches("the worker was asked to cancel between transactions").count(), 1, "{log}");

    // In a statement, waiting for a lock a session holds on the table it reads each cycle.
    let mut holder = c.client();
    holder.batch_execute("BEGIN; LOCK TABLE outbox.worker_state IN ACCESS EXCLUSIVE MODE").unwrap();
    let topic = unique("after-lock-cancel");
    enqueue_numbers(&c, &topic, 0..3);
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'";
    wait_for("the worker to wait for the lock", WAIT, || {
        c.client().query_one(waiting, &[&pid]).unwrap().get::<_, i64>(0) == 1
    });
    c.client().execute("SELECT pg_cancel_backend($1)", &[&pid]).unwrap();
    let new_pid = replaced(&c, "pg_outbox worker", pid, WAIT);
    let cancelled = format!("[{pid}] pg_outbox worker ERROR:  canceling statement due to user request");
    assert!(c.log().contains(&cancelled), "{}", c.log());
    holder.batch_execute("COMMIT").unwrap();
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 3, WAIT)), numbers(0..3));
    assert_eq!(c.worker_pid(WAIT), Some(new_pid));
}

/// While a batch waits for its acknowledgements the worker is in no transaction, but it logs
/// (librdkafka's lines, the outage), and each log line looks for interrupts.
#[test]
fn a_cancel_request_while_a_batch_waits_for_a_broker_that_went_silent_changes_nothing() {
    let (proxy, _broker) = SilencingProxy::with_broker();
    let bootstrap = proxy.bootstrap();
    // The batch waits on its silent connection until librdkafka gives it up (socket.timeout.ms)
    // and sends it again: after the worker reported the outage, at 10 s.
    let c = Cluster::start(&bootstrap, "pg_outbox.kafka_properties = 'socket.timeout.ms=15000'");
    let topic = unique("cancelled-while-waiting");
    enqueue_numbers(&c, &topic, 0..3);
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 3, WAIT)), numbers(0..3));
    let pid = c.worker_pid(WAIT).unwrap();
    proxy.silence_open_connections();
    enqueue_numbers(&c, &topic, 3..6);
    wait_for("the batch to wait for the broker", WAIT, || {
        c.client().query_one("SELECT in_flight FROM outbox.worker_status", &[]).unwrap().get::<_, i32>(0) > 0
    });
    c.client().execute("SELECT pg_cancel_backend($1)", &[&pid]).unwrap();
    let records = read_topic(&bootstrap, &topic, 6, Duration::from_secs(45));
    assert_eq!(payloads(&records), numbers(0..6));
    assert_eq!(c.worker_pid(WAIT), Some(pid), "the same worker delivered them");
    let log = c.log();
    assert!(log.contains("Kafka is unavailable"), "logged after the cancel:\n{log}");
    assert!(!log.contains("canceling statement"), "{log}");
}

#[test]
fn the_launcher_ignores_a_cancel_request_and_once_terminated_comes_back_without_starting_a_second_worker() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let worker = c.worker_pid(WAIT).unwrap();
    let [launcher] = pids_of(&c, "pg_outbox launcher")[..] else { panic!("one launcher") };
    c.client().execute("SELECT pg_cancel_backend($1)", &[&launcher]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(pids_of(&c, "pg_outbox launcher"), vec![launcher]);

    // The postmaster starts it again (its restart time is 5 s); the worker forwards meanwhile.
    c.client().execute("SELECT pg_terminate_backend($1)", &[&launcher]).unwrap();
    let during = unique("while-the-launcher-is-away");
    enqueue_numbers(&c, &during, 0..3);
    assert_eq!(payloads(&read_topic(&bootstrap, &during, 3, WAIT)), numbers(0..3));
    let launcher = replaced(&c, "pg_outbox launcher", launcher, WAIT);
    // The new launcher found the worker its predecessor started: one worker, and each message
    // sent once.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(pids_of(&c, "pg_outbox worker"), vec![worker]);
    let topic = unique("after-the-launcher-came-back");
    enqueue_numbers(&c, &topic, 0..200);
    let read = read_topic_settled(&bootstrap, &topic, 400, Duration::from_secs(10), Duration::from_secs(2));
    assert_eq!(payloads(&read), numbers(0..200));

    // And it starts the next worker when that one stops.
    c.client().execute("SELECT pg_terminate_backend($1)", &[&worker]).unwrap();
    replaced(&c, "pg_outbox worker", worker, WAIT);
    assert_forwards(&c, &bootstrap, "after-the-adopted-worker");
    assert_eq!(pids_of(&c, "pg_outbox launcher"), vec![launcher]);
    let log = c.log();
    assert!(!log.contains("canceling statement"), "{log}");
    assert!(!log.contains("is forwarded by worker PID"), "no second worker was started:\n{log}");
}

#[test]
fn a_new_bootstrap_server_applies_on_reload_without_restart() {
    let nowhere = PrivateBroker::reserve(BrokerKind::Kafka);
    let c = Cluster::start(&nowhere.bootstrap(), "");
    let topic = unique("reload");
    enqueue_numbers(&c, &topic, 0..5);
    std::thread::sleep(Duration::from_secs(3));
    let pending: i64 = c.client().query_one("SELECT count(*) FROM outbox.pending_messages", &[]).unwrap().get(0);
    assert_eq!(pending, 5, "nothing is lost or dropped while the broker cannot be reached");
    let pid = c.worker_pid(WAIT).unwrap();
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    c.reconfigure(&format!("pg_outbox.kafka_bootstrap_servers = '{bootstrap}'"));
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 5, WAIT)), numbers(0..5));
    assert_eq!(c.worker_pid(WAIT), Some(pid), "same worker process: no restart");
}

#[test]
fn a_broker_unreachable_at_start_is_reported_with_librdkafkas_reason_and_gets_everything_once_it_is_up() {
    let broker = PrivateBroker::reserve(BrokerKind::Kafka);
    let c =
        Cluster::start(&broker.bootstrap(), "pg_outbox.retry_backoff = '200ms'\npg_outbox.retry_backoff_max = '2s'");
    let topic = unique("late-broker");
    enqueue_numbers(&c, &topic, 0..20);
    wait_for_broker_state(&mut c.client(), "unavailable", WAIT);
    // Not only that it timed out: why, as librdkafka heard it, in the view and in the log.
    let last_error: String = c.client().query_one("SELECT last_error FROM outbox.worker_status", &[]).unwrap().get(0);
    assert!(last_error.contains("Connection refused"), "{last_error}");
    let log = c.log();
    let reported = log.lines().find(|l| l.contains("Kafka is unavailable")).unwrap_or_default();
    assert!(reported.contains("Connection refused"), "{reported}");
    std::thread::sleep(Duration::from_secs(3));
    broker.resume();
    assert_eq!(payloads(&read_topic(&broker.bootstrap(), &topic, 20, Duration::from_secs(60))), numbers(0..20));
    assert!(c.wait_until_drained(WAIT));
    let log = c.log();
    assert_eq!(log.matches("Kafka is unavailable").count(), 1, "the outage is logged once:\n{log}");
    assert_eq!(log.matches("Kafka is reachable again").count(), 1);
    // And librdkafka's own line about it, once, though every producer that tried heard it.
    let librdkafkas = format!("WARNING:  pg_outbox: librdkafka (Kafka cluster {}) FAIL: ", broker.bootstrap());
    let refused = log.lines().filter(|l| l.contains(&librdkafkas) && l.contains("Connection refused")).count();
    assert_eq!(refused, 1, "{log}");
}

#[test]
fn a_backlog_waiting_for_an_unreachable_broker_keeps_its_place_between_attempts() {
    let broker = PrivateBroker::reserve(BrokerKind::Kafka);
    let c = Cluster::start(
        &broker.bootstrap(),
        "pg_outbox.batch_size = 5\npg_outbox.retry_backoff = '200ms'\npg_outbox.retry_backoff_max = '1s'",
    );
    let topic = unique("backlog-outage");
    // One commit of four batches: a backlog, whose window starts at its lowest id.
    c.client()
        .execute("SELECT outbox.enqueue_message($1, to_jsonb(i), key => 'k') FROM generate_series(0, 19) i", &[&topic])
        .unwrap();
    wait_for_broker_state(&mut c.client(), "unavailable", WAIT);
    // The first failed attempt recorded where the window starts, so the attempts after it go on
    // from there instead of looking for the window's first row among all unsettled ones again.
    let row = c
        .client()
        .query_one(
            "SELECT window_snapshot IS NOT NULL, window_last_id, (SELECT min(id) FROM outbox.messages)
             FROM outbox.worker_state",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0), "the backlog's window is recorded while the broker is down");
    assert_eq!(row.get::<_, Option<i64>>(1), Some(row.get::<_, i64>(2) - 1));
    broker.resume();
    assert_eq!(payloads(&read_topic(&broker.bootstrap(), &topic, 20, Duration::from_secs(60))), numbers(0..20));
    assert!(c.wait_until_drained(WAIT));
}

#[test]
fn a_broker_restart_mid_flow_loses_nothing_and_keeps_key_order() {
    let broker = PrivateBroker::start(BrokerKind::Kafka);
    let c =
        Cluster::start(&broker.bootstrap(), "pg_outbox.retry_backoff = '200ms'\npg_outbox.retry_backoff_max = '2s'");
    let topic = unique("broker-restart");
    enqueue_numbers(&c, &topic, 0..50);
    assert_eq!(read_topic(&broker.bootstrap(), &topic, 50, WAIT).len(), 50);
    broker.stop();
    enqueue_numbers(&c, &topic, 50..100);
    // The outage shows while the messages wait, long before the producer's 120 s message timeout.
    wait_for_broker_state(&mut c.client(), "unavailable", Duration::from_secs(20));
    broker.resume();
    let records = read_topic(&broker.bootstrap(), &topic, 100, Duration::from_secs(90));
    // At least once: a batch in flight when the broker went away may appear twice, in order.
    let mut seen: Vec<String> = payloads(&records);
    seen.dedup();
    let mut distinct = seen.clone();
    distinct.sort_by_key(|s| s.parse::<i32>().unwrap());
    distinct.dedup();
    assert_eq!(distinct, numbers(0..100), "nothing lost");
    let first_seen: Vec<i32> = {
        let mut firsts = Vec::new();
        for p in &seen {
            let n: i32 = p.parse().unwrap();
            if !firsts.contains(&n) {
                firsts.push(n);
            }
        }
        firsts
    };
    assert_eq!(first_seen, (0..100).collect::<Vec<_>>(), "first deliveries in commit order");
    assert!(c.wait_until_drained(WAIT));
    let log = c.log();
    assert_eq!(log.matches("Kafka is unavailable").count(), 1, "the outage is logged once:\n{log}");
    assert_eq!(log.matches("Kafka is reachable again").count(), 1);
}

/// A firewall or NAT that forgets the worker's connections leaves librdkafka waiting on them,
/// unanswered, until its 60 s socket timeout. A producer that cannot learn a new topic's
/// metadata three times running is replaced, and the new one's connections get through.
#[test]
fn a_producer_whose_connections_went_silent_is_replaced_and_a_new_topic_gets_its_messages_within_seconds() {
    let (proxy, _broker) = SilencingProxy::with_broker();
    let bootstrap = proxy.bootstrap();
    let c = Cluster::start(&bootstrap, "pg_outbox.retry_backoff = '200ms'\npg_outbox.retry_backoff_max = '2s'");
    assert_forwards(&c, &bootstrap, "before-silence");
    let logged_before = c.log().len();
    proxy.silence_open_connections();
    let topic = unique("after-silence");
    let silenced = Instant::now();
    enqueue_numbers(&c, &topic, 0..3);
    let records = read_topic(&bootstrap, &topic, 3, Duration::from_secs(45));
    assert_eq!(payloads(&records), numbers(0..3), "delivered {:?} after the silence", silenced.elapsed());
    eprintln!("delivered {:?} after the silence", silenced.elapsed());
    let log = c.log()[logged_before..].to_string();
    assert_eq!(log.matches("Kafka is unavailable").count(), 1, "the outage is logged once:\n{log}");
    assert_eq!(log.matches("Kafka is reachable again").count(), 1, "{log}");
}

/// The same for a cluster that routes name, beside the default one: its messages wait while the
/// default cluster's go on, and every third failed try of it goes through a new producer.
#[test]
fn a_routed_clusters_producer_whose_connections_went_silent_is_replaced_while_the_default_cluster_goes_on() {
    let (proxy, _broker) = SilencingProxy::with_broker();
    let routed = proxy.bootstrap();
    let default = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&default, "pg_outbox.retry_backoff = '200ms'\npg_outbox.retry_backoff_max = '2s'");
    let (before, after) = (unique("routed-before-silence"), unique("routed-after-silence"));
    for topic in [&before, &after] {
        c.client()
            .execute("INSERT INTO outbox.destinations (topic, bootstrap_servers) VALUES ($1, $2)", &[topic, &routed])
            .unwrap();
    }
    enqueue_numbers(&c, &before, 0..3);
    assert_eq!(payloads(&read_topic(&routed, &before, 3, WAIT)), numbers(0..3));
    let logged_before = c.log().len();
    proxy.silence_open_connections();
    let silenced = Instant::now();
    enqueue_numbers(&c, &after, 0..3);
    assert_forwards(&c, &default, "default-cluster-meanwhile");
    let records = read_topic(&routed, &after, 3, Duration::from_secs(45));
    assert_eq!(payloads(&records), numbers(0..3), "delivered {:?} after the silence", silenced.elapsed());
    eprintln!("delivered {:?} after the silence", silenced.elapsed());
    let log = c.log()[logged_before..].to_string();
    assert_eq!(log.matches(&format!("Kafka cluster {routed} is unavailable")).count(), 1, "{log}");
    assert_eq!(log.matches(&format!("Kafka cluster {routed} is reachable again")).count(), 1, "{log}");
}

#[test]
fn drop_extension_with_the_worker_attached_does_not_hang_and_create_brings_it_back() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    assert!(c.worker_pid(WAIT).is_some());
    let started = Instant::now();
    c.client().batch_execute("DROP EXTENSION pg_outbox").unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "DROP EXTENSION took {:?}", started.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    c.client().batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    assert_forwards(&c, &bootstrap, "recreated");
    assert!(!c.log().contains("PANIC"));
}

#[test]
fn an_extension_recreated_at_an_older_version_while_the_worker_forwards_is_found_outdated() {
    // The worker keeps what it found of the extension between cycles: dropping it must make the
    // worker look again, even when it is created anew before the worker's next cycle.
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    assert_forwards(&c, &bootstrap, "before-recreate");
    c.client().batch_execute("DROP EXTENSION pg_outbox; CREATE EXTENSION pg_outbox VERSION '0.3.0'").unwrap();
    wait_for("the worker to ask for the update", WAIT, || c.log().contains("run ALTER EXTENSION pg_outbox UPDATE"));
    c.client().batch_execute("ALTER EXTENSION pg_outbox UPDATE").unwrap();
    assert_forwards(&c, &bootstrap, "after-recreate");
}

#[test]
fn an_extension_created_after_server_start_is_picked_up() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start_without_extension(&bootstrap, "");
    assert!(c.worker_pid(WAIT).is_some(), "the worker waits in the database");
    std::thread::sleep(Duration::from_secs(1));
    c.client().batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    assert_forwards(&c, &bootstrap, "created-later");
}

#[test]
fn drop_database_is_not_blocked_and_other_databases_keep_forwarding() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start_with_databases(&bootstrap, "", &["shop", "scratch"]);
    for db in ["shop", "scratch"] {
        c.client_for(db).batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    }
    assert!(c.worker_pid_of("scratch", WAIT).is_some());
    let started = Instant::now();
    c.client_for("postgres").batch_execute("DROP DATABASE scratch").expect("DROP DATABASE succeeds");
    eprintln!("DROP DATABASE took {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_forwards(&c, &bootstrap, "survivor");
    // The database comes back: so does its worker.
    c.client_for("postgres").batch_execute("CREATE DATABASE scratch").unwrap();
    assert!(c.worker_pid_of("scratch", WAIT).is_some());
}

/// ALTER DATABASE ... RENAME and CREATE DATABASE ... TEMPLATE need the database to themselves,
/// as DROP DATABASE does: its worker leaves for them, within their 5 s wait.
#[test]
fn a_forwarded_database_can_be_renamed_and_copied_as_a_template() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start_with_databases(&bootstrap, "", &["shop", "scratch"]);
    let mut scratch = c.client_for("scratch");
    scratch.batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    let topic = unique("renamed-and-copied");
    scratch.execute("SELECT outbox.pause_topic($1)", &[&topic]).unwrap();
    for i in 0..3 {
        scratch.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::int), key => 'k')", &[&topic, &i]).unwrap();
    }
    drop(scratch);
    let mut postgres = c.client_for("postgres");
    let first = c.worker_pid_of("scratch", WAIT).expect("a worker for scratch");

    // It fails (55006) unless the worker leaves within CREATE DATABASE's own 5 s wait.
    let started = Instant::now();
    postgres.batch_execute("CREATE DATABASE scratch_copy TEMPLATE scratch").expect("CREATE DATABASE succeeds");
    eprintln!("CREATE DATABASE ... TEMPLATE took {:?}", started.elapsed());
    assert!(c.log().contains(LEAVING));
    let second = c.worker_pid_of("scratch", WAIT).expect("the worker comes back");
    assert_ne!(first, second);
    // The copy holds the outbox as it was, pending messages included, and no worker forwards it.
    let mut copy = c.client_for("scratch_copy");
    let pending: i64 = copy.query_one("SELECT count(*) FROM outbox.pending_messages", &[]).unwrap().get(0);
    assert_eq!(pending, 3);
    let state: String = copy
        .query_one("SELECT state FROM outbox.worker_status WHERE database = current_database()", &[])
        .unwrap()
        .get(0);
    assert_eq!(state, "no worker: not in pg_outbox.database");
    // What the README says to run in such a copy before a worker forwards it.
    copy.batch_execute("TRUNCATE outbox.messages, outbox.held_messages, outbox.dead_letters").unwrap();
    let pending: i64 = copy.query_one("SELECT count(*) FROM outbox.pending_messages", &[]).unwrap().get(0);
    assert_eq!(pending, 0);

    // (The launcher may have said so already at server start, before scratch was created.)
    let gone = "database \"scratch\" named in pg_outbox.database does not exist";
    let said = c.log().matches(gone).count();
    postgres.batch_execute("ALTER DATABASE scratch RENAME TO scratch_old").expect("RENAME succeeds");
    wait_for("the launcher to say scratch is gone", WAIT, || c.log().matches(gone).count() > said);
    postgres.batch_execute("ALTER DATABASE scratch_old RENAME TO scratch").expect("RENAME back succeeds");
    assert!(c.worker_pid_of("scratch", WAIT).is_some());
    c.client_for("scratch").execute("SELECT outbox.resume_topic($1)", &[&topic]).unwrap();
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 3, WAIT)), vec!["0", "1", "2"]);
}

/// Settings of the database (ALTER DATABASE ... SET) reach its worker as any new session: a
/// database made read-only by default, for maintenance, had the worker fail at its first write
/// and restart again and again, forwarding nothing. (A statement_timeout never applied to it.)
#[test]
fn a_database_read_only_or_serializable_by_default_is_still_forwarded_by_the_same_worker() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let mut postgres = c.client_for("postgres");
    postgres
        .batch_execute(
            "ALTER DATABASE shop SET default_transaction_read_only = on;
             ALTER DATABASE shop SET default_transaction_isolation = 'serializable';
             ALTER DATABASE shop SET statement_timeout = '1ms'",
        )
        .unwrap();
    // The worker reads the database's settings when it connects.
    let before = c.worker_pid(WAIT).expect("a worker");
    postgres.execute("SELECT pg_terminate_backend($1)", &[&before]).unwrap();
    let worker = replaced(&c, "pg_outbox worker", before, WAIT);
    // The session's own settings from the start: under 1 ms, even its first SET could time out.
    let options = "options='-c statement_timeout=0 -c default_transaction_read_only=off'";
    let mut shop = postgres::Client::connect(&format!("{} {options}", c.dsn("shop")), postgres::NoTls).unwrap();
    let (open, paused) = (unique("read-only-db"), unique("read-only-db-paused"));
    shop.execute("SELECT outbox.pause_topic($1)", &[&paused]).unwrap();
    for i in 0..5 {
        for topic in [&open, &paused] {
            shop.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::int), key => 'k')", &[topic, &i]).unwrap();
        }
    }
    assert_eq!(payloads(&read_topic(&bootstrap, &open, 5, WAIT)), vec!["0", "1", "2", "3", "4"]);
    // Held while paused, the messages are moved out of the held table once resumed.
    shop.execute("SELECT outbox.resume_topic($1)", &[&paused]).unwrap();
    assert_eq!(payloads(&read_topic(&bootstrap, &paused, 5, WAIT)), vec!["0", "1", "2", "3", "4"]);
    wait_for("nothing pending", WAIT, || {
        shop.query_one("SELECT count(*) FROM outbox.pending_messages", &[]).unwrap().get::<_, i64>(0) == 0
    });
    assert_eq!(c.worker_pid(Duration::ZERO), Some(worker), "the same worker forwarded them");
    assert!(!c.log().contains("read-only transaction"), "{}", c.log());
}

/// A lock_timeout of the database, meant for the applications' sessions, ended the worker each
/// time it waited behind one of their transactions (here one that pauses the topic, still open
/// while the worker counts what it delivered): "canceling statement due to lock timeout", a
/// restart with backoff, and a batch in flight then sent again.
#[test]
fn a_worker_waiting_behind_an_open_transaction_outlasts_the_databases_lock_timeout() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let mut postgres = c.client_for("postgres");
    postgres.batch_execute("ALTER DATABASE shop SET lock_timeout = '200ms'").unwrap();
    let before = c.worker_pid(WAIT).expect("a worker");
    postgres.execute("SELECT pg_terminate_backend($1)", &[&before]).unwrap();
    let worker = replaced(&c, "pg_outbox worker", before, WAIT);
    let topic = unique("behind-an-open-transaction");
    let mut shop = c.client();
    let enqueue = |db: &mut postgres::Client, i: i32| {
        db.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::int), key => 'k')", &[&topic, &i]).unwrap();
    };
    enqueue(&mut shop, 0);
    assert_eq!(read_topic(&bootstrap, &topic, 1, WAIT).len(), 1);
    // The topic's row in outbox.topics, where the worker counts deliveries, now exists.
    wait_for("the delivery to be counted", WAIT, || {
        let sql = "SELECT delivered_total FROM outbox.topic_stats WHERE topic = $1";
        shop.query_opt(sql, &[&topic]).unwrap().is_some_and(|r| r.get::<_, i64>(0) == 1)
    });
    let mut pauser = c.client();
    let mut pausing = pauser.transaction().unwrap();
    pausing.execute("SELECT outbox.pause_topic($1)", &[&topic]).unwrap();
    for i in 1..=5 {
        enqueue(&mut shop, i);
    }
    // Sent (the pause is not committed), and counted only once the pausing transaction ends: the
    // worker waits for its lock, longer than the lock_timeout.
    let waiting = Instant::now();
    wait_for("the worker to wait for the pausing transaction's lock", WAIT, || {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'";
        postgres.query_one(sql, &[&worker]).unwrap().get::<_, i64>(0) == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    let row = postgres.query_one("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", &[&worker]).unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("Lock"), "still waiting after {:?}", waiting.elapsed());
    pausing.rollback().unwrap();
    let got = read_topic_settled(&bootstrap, &topic, 6, WAIT, Duration::from_secs(2));
    assert_eq!(payloads(&got), vec!["0", "1", "2", "3", "4", "5"], "each once");
    assert_eq!(c.worker_pid(Duration::ZERO), Some(worker), "the same worker forwarded them");
    assert!(!c.log().contains("lock timeout"), "{}", c.log());
}

/// What an interrupted DROP DATABASE leaves (Postgres 15.4 on) cannot be connected to: the
/// launcher says so once instead of starting a worker that fails to connect, again and again.
#[test]
fn a_database_left_invalid_by_an_interrupted_drop_gets_no_worker_and_can_still_be_dropped() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start_with_databases(&bootstrap, "", &["shop", "scratch"]);
    let worker = c.worker_pid_of("scratch", WAIT).expect("a worker for scratch");
    let mut postgres = c.client_for("postgres");
    // (The launcher may have said so at server start, before scratch was created.)
    let missing = "database \"scratch\" named in pg_outbox.database does not exist or does not allow connections";
    let said = c.log().matches(missing).count();
    // As dropdb marks it before it removes the files (DATCONNLIMIT_INVALID_DB).
    postgres.batch_execute("UPDATE pg_database SET datconnlimit = -2 WHERE datname = 'scratch'").unwrap();
    postgres.execute("SELECT pg_terminate_backend($1)", &[&worker]).unwrap();
    wait_for("the launcher to say scratch cannot be forwarded", WAIT, || c.log().matches(missing).count() > said);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.worker_pid_of("scratch", Duration::ZERO), None);
    assert!(!c.log().contains("cannot connect to invalid database"), "{}", c.log());
    postgres.batch_execute("DROP DATABASE scratch").expect("DROP DATABASE succeeds");
}

#[test]
fn drop_database_is_not_blocked_by_a_batch_waiting_for_a_broker_that_went_away() {
    let broker = PrivateBroker::start(BrokerKind::Kafka);
    let c = Cluster::start_with_databases(&broker.bootstrap(), "", &["shop", "scratch"]);
    let mut scratch = c.client_for("scratch");
    scratch.batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    let topic = unique("dropped-while-waiting");
    let enqueue = format!("SELECT outbox.enqueue_message('{topic}', '1'::jsonb)");
    scratch.batch_execute(&enqueue).unwrap();
    assert_eq!(read_topic(&broker.bootstrap(), &topic, 1, WAIT).len(), 1);
    broker.stop();
    scratch.batch_execute(&enqueue).unwrap();
    // Unavailable while the batch waits: its producer knows the topic, so nothing else failed.
    wait_for_broker_state(&mut scratch, "unavailable", Duration::from_secs(30));
    drop_scratch_while_its_worker_waits(&c, scratch, "for the broker, not between batches");
}

#[test]
fn drop_database_is_not_blocked_by_a_worker_waiting_for_a_topic_to_be_created_on_a_connection_that_went_silent() {
    let (proxy, _broker) = SilencingProxy::with_broker();
    let bootstrap = proxy.bootstrap();
    let c = Cluster::start_with_databases(&bootstrap, "", &["shop", "scratch"]);
    let mut scratch = c.client_for("scratch");
    scratch.batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    let enqueue = |db: &mut postgres::Client, topic: &str| {
        db.batch_execute(&format!("SELECT outbox.enqueue_message('{topic}', '1'::jsonb)")).unwrap()
    };
    let before = unique("before-silence");
    enqueue(&mut scratch, &before);
    assert_eq!(read_topic(&bootstrap, &before, 1, WAIT).len(), 1);
    // A new topic: the worker learns it does not exist, and its request to create it goes
    // unanswered (librdkafka would wait 60 s, its socket.timeout.ms).
    proxy.silence_topic_creation();
    enqueue(&mut scratch, &unique("never-created"));
    let waiting = Instant::now();
    while proxy.creations_silenced() == 0 {
        assert!(waiting.elapsed() < WAIT, "the worker never asked to create the topic");
        std::thread::sleep(Duration::from_millis(50));
    }
    // At once: a wait of 5 s for the answer, deaf meanwhile, would outlast DROP DATABASE's.
    drop_scratch_while_its_worker_waits(&c, scratch, "for the topic to be created");
}

/// DROP DATABASE scratch while its worker waits with one message in flight (`scratch` is a
/// session of that database, closed first).
fn drop_scratch_while_its_worker_waits(c: &Cluster, mut scratch: postgres::Client, waiting_for: &str) {
    let in_flight: i32 = scratch
        .query_one("SELECT in_flight FROM outbox.worker_status WHERE database = current_database()", &[])
        .unwrap()
        .get(0);
    assert_eq!(in_flight, 1, "the worker is waiting {waiting_for}");
    drop(scratch);
    // It succeeds only if the worker left within DROP DATABASE's own 5 s wait (else 55006).
    c.client_for("postgres").batch_execute("DROP DATABASE scratch").expect("DROP DATABASE succeeds");
    assert!(c.log().contains(LEAVING));
}

#[test]
fn drop_database_is_not_blocked_by_a_worker_sleeping_out_a_long_reconnect_backoff() {
    // Nobody listens on port 1: every attempt fails, and the worker waits 30 s between attempts.
    let c = Cluster::start_with_databases("127.0.0.1:1", "pg_outbox.retry_backoff = '30s'", &["shop", "scratch"]);
    let mut scratch = c.client_for("scratch");
    scratch.batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    scratch.batch_execute("SELECT outbox.enqueue_message('backoff', '1'::jsonb)").unwrap();
    wait_for_broker_state(&mut scratch, "unavailable", WAIT);
    wait_for("the worker between attempts, not waiting for a batch", WAIT, || {
        let in_flight: i32 = scratch
            .query_one("SELECT in_flight FROM outbox.worker_status WHERE database = current_database()", &[])
            .unwrap()
            .get(0);
        in_flight == 0
    });
    drop(scratch);
    // It succeeds only if the worker left within DROP DATABASE's own 5 s wait (else 55006).
    let started = Instant::now();
    c.client_for("postgres").batch_execute("DROP DATABASE scratch").expect("DROP DATABASE succeeds");
    eprintln!("DROP DATABASE took {:?}", started.elapsed());
    assert!(c.log().contains(LEAVING));
}

#[test]
fn a_database_dropped_and_created_again_more_times_than_there_are_worker_slots_still_gets_a_worker() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start_with_databases(&bootstrap, "pg_outbox.poll_interval = '100ms'", &["shop", "scratch"]);
    let mut postgres = c.client_for("postgres");
    // Each database created has an OID of its own: 34 of them and shop, for 32 slots in shared
    // memory.
    for round in 1..=33 {
        assert!(c.worker_pid_of("scratch", WAIT).is_some(), "no worker for scratch in round {round}");
        postgres.batch_execute("DROP DATABASE scratch").expect("DROP DATABASE succeeds");
        postgres.batch_execute("CREATE DATABASE scratch").unwrap();
    }
    c.client_for("scratch").batch_execute("CREATE EXTENSION pg_outbox").unwrap();
    let topic = unique("after-many-drops");
    c.client_for("scratch").batch_execute(&format!("SELECT outbox.enqueue_message('{topic}', '1'::jsonb)")).unwrap();
    assert_eq!(read_topic(&bootstrap, &topic, 1, WAIT).len(), 1, "the 34th scratch database forwards");
    assert!(!c.log().contains("no free worker slot"), "a worker found no slot");
}

#[test]
fn a_killed_worker_restarts_with_the_cluster_and_delivers_what_was_committed() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let topic = unique("sigkill");
    enqueue_numbers(&c, &topic, 0..10);
    let pid = c.worker_pid(WAIT).unwrap();
    std::process::Command::new("kill").arg("-9").arg(pid.to_string()).status().unwrap();
    // The postmaster restarts every backend; the committed messages are still there.
    std::thread::sleep(Duration::from_secs(2));
    let new_pid = c.worker_pid(WAIT).expect("worker back after crash restart");
    assert_ne!(new_pid, pid);
    enqueue_numbers(&c, &topic, 10..20);
    let mut seen = payloads(&read_topic(&bootstrap, &topic, 20, WAIT));
    seen.dedup();
    let mut distinct = seen.clone();
    distinct.sort_by_key(|s| s.parse::<i32>().unwrap());
    distinct.dedup();
    assert_eq!(distinct, numbers(0..20));
}

#[test]
fn an_immediate_shutdown_loses_nothing_committed() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let topic = unique("immediate");
    enqueue_numbers(&c, &topic, 0..200);
    c.stop("immediate");
    c.restart_stopped();
    enqueue_numbers(&c, &topic, 200..210);
    let records = read_topic(&bootstrap, &topic, 210, Duration::from_secs(60));
    let mut distinct: Vec<i32> = payloads(&records).iter().map(|s| s.parse().unwrap()).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct, (0..210).collect::<Vec<_>>());
    assert!(c.wait_until_drained(WAIT));
}

#[test]
fn a_message_of_an_asynchronous_commit_is_sent_only_once_that_commit_is_on_disk() {
    // The WAL writer flushes asynchronous commits every 10 s here: a crash of the machine within
    // that loses a commit the worker could already see, and its message must not be in Kafka then.
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "wal_writer_delay = '10s'");
    let mut db = c.client();
    db.batch_execute("CREATE TABLE orders (id int)").unwrap();
    db.batch_execute("SET synchronous_commit = off").unwrap();
    // Pages of WAL wake the WAL writer, which flushes them (its last flush was long ago); the
    // asynchronous commits after it wait for its next round, 10 s later.
    db.batch_execute("INSERT INTO orders SELECT generate_series(1000, 2000)").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let topic = unique("async-commit");
    let mut tx = db.transaction().unwrap();
    tx.batch_execute(&format!("INSERT INTO orders VALUES (1); SELECT outbox.enqueue_message('{topic}', '1'::jsonb)"))
        .unwrap();
    // Where the commit record goes: nothing else writes WAL between this and the COMMIT.
    let commit_at: String = tx.query_one("SELECT pg_current_wal_insert_lsn()::text", &[]).unwrap().get(0);
    tx.commit().unwrap();
    let started = Instant::now();
    assert_eq!(read_topic(&bootstrap, &topic, 1, WAIT).len(), 1);
    let (flushed, flush_at): (bool, String) = db
        .query_one(
            "SELECT pg_current_wal_flush_lsn() > $1::text::pg_lsn, pg_current_wal_flush_lsn()::text",
            &[&commit_at],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "read within the WAL writer's delay");
    assert!(flushed, "Kafka has the event of a commit at {commit_at} with the WAL flushed to {flush_at} only");
    // And what Kafka has survives a crash.
    c.stop("immediate");
    c.restart_stopped();
    let orders: i64 = c.client().query_one("SELECT count(*) FROM orders WHERE id = 1", &[]).unwrap().get(0);
    assert_eq!(orders, 1);
}

#[test]
fn a_hot_standby_forwards_nothing_until_it_is_promoted() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    // The primary cannot reach any broker, so its messages stay pending (and replicate as such).
    let nowhere = PrivateBroker::reserve(BrokerKind::Kafka);
    let primary = Cluster::start(&nowhere.bootstrap(), "");
    let topic = unique("standby");
    enqueue_numbers(&primary, &topic, 0..5);
    let standby = primary.start_standby(&bootstrap);
    let mut replica = standby.client();
    let deadline = Instant::now() + WAIT;
    while replica.query_one("SELECT count(*) FROM outbox.messages", &[]).unwrap().get::<_, i64>(0) < 5 {
        assert!(Instant::now() < deadline, "the standby never replayed the messages");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let outbox_processes: i64 = replica
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'pg_outbox%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(outbox_processes, 0, "nothing of pg_outbox runs on a standby");
    assert!(read_topic(&bootstrap, &topic, 1, Duration::from_secs(2)).is_empty());
    primary.stop("immediate");
    standby.promote();
    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 5, WAIT)), numbers(0..5));
    assert!(standby.worker_pid(WAIT).is_some());
}

#[test]
fn a_promoted_standby_gives_ids_above_every_id_the_old_primary_gave_after_the_standby_fell_behind() {
    // Nothing is forwarded anywhere: only the ids matter here.
    let nowhere = PrivateBroker::reserve(BrokerKind::Kafka);
    let primary = Cluster::start(&nowhere.bootstrap(), "");
    // A role that writes rows without enqueue_message and may only take ids (USAGE on the
    // sequence): reading the recorded timeline and moving the ids need more.
    primary
        .client()
        .batch_execute(
            "CREATE ROLE plain_writer LOGIN;
             GRANT USAGE ON SCHEMA outbox TO plain_writer;
             GRANT INSERT, SELECT ON outbox.messages TO plain_writer;
             GRANT USAGE ON SEQUENCE outbox.message_id_seq TO plain_writer;
             GRANT EXECUTE ON FUNCTION outbox._current_slot() TO plain_writer;",
        )
        .unwrap();
    let topic = unique("timeline");
    let count =
        |c: &Cluster| c.client().query_one("SELECT count(*) FROM outbox.messages", &[]).unwrap().get::<_, i64>(0);
    // A standby that falls behind `old`, promoted once `old` is gone; and the highest id `old`
    // gave after the standby fell behind, which the failover loses.
    let fail_over = |old: &Cluster| -> (Cluster, i64) {
        let standby = old.start_standby(&nowhere.bootstrap());
        let replayed = count(old);
        wait_for("the standby to replay the messages", WAIT, || count(&standby) == replayed);
        standby.stop("fast");
        enqueue_numbers(old, &topic, 0..200);
        let lost: i64 = old.client().query_one("SELECT max(id) FROM outbox.messages", &[]).unwrap().get(0);
        old.stop("immediate");
        standby.restart_stopped();
        standby.promote();
        (standby, lost)
    };
    enqueue_numbers(&primary, &topic, 0..5);

    // Timeline 2: the first id is a plain INSERT's, by the role that may only take ids.
    let (second, lost) = fail_over(&primary);
    let as_plain_writer = format!("{} user=plain_writer", second.dsn(&second.database));
    let mut plain = postgres::Client::connect(&as_plain_writer, postgres::NoTls).unwrap();
    let id: i64 = plain
        .query_one(
            "INSERT INTO outbox.messages (topic, key, json_payload) VALUES ($1, 'k', '1') RETURNING id",
            &[&topic],
        )
        .unwrap()
        .get(0);
    assert!(
        id > lost,
        "the new primary gave id {id}, which the old one gave after the standby fell behind (up to {lost})"
    );
    drop(plain);

    // Timeline 3: the first ids are enqueue_message's, in four sessions at once.
    let (third, lost) = fail_over(&second);
    let start = std::sync::Arc::new(std::sync::Barrier::new(4));
    let sessions: Vec<_> = (0..4)
        .map(|_| {
            let (dsn, topic, start) = (third.dsn(&third.database), topic.clone(), start.clone());
            std::thread::spawn(move || {
                let mut db = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
                start.wait();
                (0..50)
                    .map(|_| {
                        let row = db.query_one("SELECT outbox.enqueue_message($1, '1'::jsonb, key => 'k')", &[&topic]);
                        row.unwrap().get::<_, i64>(0)
                    })
                    .collect::<Vec<i64>>()
            })
        })
        .collect();
    let mut ids: Vec<i64> = sessions.into_iter().flat_map(|s| s.join().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 200, "every id given once");
    assert!(ids[0] > lost, "the new primary gave id {}, which the old one gave (up to {lost})", ids[0]);
    for promoted in [&second, &third] {
        let moves = promoted.log().matches("message ids go on after").count();
        assert_eq!(moves, 1, "the ids move once:\n{}", promoted.log());
    }
}

/// Waits for the broker state of the worker of `db`'s database.
fn wait_for_broker_state(db: &mut postgres::Client, wanted: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let state: Option<String> = db
            .query_opt("SELECT broker_state FROM outbox.worker_status WHERE database = current_database()", &[])
            .unwrap()
            .map(|r| r.get(0));
        if state.as_deref() == Some(wanted) {
            return;
        }
        assert!(Instant::now() < deadline, "worker_status never said the broker is {wanted} within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
