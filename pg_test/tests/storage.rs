//! Storage: delivered messages are removed by rotating and truncating whole slots (no per-row
//! UPDATE or DELETE), without losing messages enqueued while the slots rotate.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pg_outbox_tests::{payloads, read_topic, unique, wait_for, BrokerKind, Cluster};

const WAIT: Duration = Duration::from_secs(30);

#[test]
fn delivered_messages_are_truncated_away_while_writers_keep_enqueueing() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "pg_outbox.rotation_interval = '1s'");
    let topic = unique("rotation");
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let dsn = c.dsn("shop");
            let topic = topic.clone();
            std::thread::spawn(move || {
                let mut db = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
                let started = Instant::now();
                let mut n = 0;
                while started.elapsed() < Duration::from_secs(6) {
                    let mut tx = db.transaction().unwrap();
                    for _ in 0..5 {
                        tx.execute(
                            "SELECT outbox.enqueue_message($1, jsonb_build_object('w', $2::int, 'n', $3::int), key => $2::text)",
                            &[&topic, &w, &n],
                        )
                        .unwrap();
                        n += 1;
                    }
                    tx.commit().unwrap();
                }
                n
            })
        })
        .collect();
    let total: i32 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let records = read_topic(&bootstrap, &topic, total as usize, Duration::from_secs(60));
    assert_eq!(records.len(), total as usize, "every message delivered exactly once");
    for w in 0..3 {
        let ns: Vec<i64> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(&w.to_string()))
            .map(|r| r.json()["n"].as_i64().unwrap())
            .collect();
        assert_eq!(ns, (0..ns.len() as i64).collect::<Vec<_>>(), "writer {w} in order");
    }
    let mut db = c.client();
    // Within a few rotations everything delivered is gone, by TRUNCATE: no dead tuples left.
    wait_until_empty(&mut db, "outbox.messages", Duration::from_secs(15));
    let dead: i64 = db
        .query_one(
            "SELECT coalesce(sum(n_dead_tup), 0)::bigint FROM pg_stat_user_tables WHERE relname LIKE 'messages_%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(dead, 0, "no dead tuples in the message tables");
}

#[test]
fn with_retention_delivered_messages_stay_for_the_retention_period_then_go() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "pg_outbox.rotation_interval = '1s'\npg_outbox.retention = '8s'");
    let topic = unique("retained");
    let mut db = c.client();
    let enqueued = Instant::now();
    for i in 0..20 {
        db.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::int))", &[&topic, &i]).unwrap();
    }
    assert_eq!(read_topic(&bootstrap, &topic, 20, Duration::from_secs(30)).len(), 20);
    assert!(c.wait_until_drained(Duration::from_secs(30)));
    let stored = |db: &mut postgres::Client| -> i64 {
        db.query_one("SELECT count(*) FROM outbox.messages", &[]).unwrap().get(0)
    };
    assert!(enqueued.elapsed() < Duration::from_secs(6), "delivery took {:?}", enqueued.elapsed());
    assert_eq!(stored(&mut db), 20, "delivered messages are kept during the retention period");
    while stored(&mut db) > 0 {
        assert!(enqueued.elapsed() < Duration::from_secs(30), "retained rows never truncated");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(enqueued.elapsed() >= Duration::from_secs(8), "gone after {:?}", enqueued.elapsed());
}

#[test]
fn a_slot_still_within_the_retention_period_is_not_read_whole_every_second() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "pg_outbox.retention = '1h'");
    let topic = unique("retained-slot");
    let mut db = c.client();
    // A slot the enqueuers have left: delivered rows that aged out, then young ones after them.
    // The worker checks it every second for rows it must keep.
    let slot: i16 =
        db.query_one("SELECT ((current_slot + 1) % 4)::smallint FROM outbox.worker_state", &[]).unwrap().get(0);
    let table = format!("messages_{slot}");
    let insert = |rows: i32, age: &str| {
        format!(
            "INSERT INTO outbox.{table} (slot, topic, key, json_payload, enqueued_at)
             SELECT {slot}, '{topic}', (i % 16)::text, jsonb_build_object('i', i, 'pad', repeat('x', 240)), now() - interval '{age}'
             FROM generate_series(1, {rows}) i"
        )
    };
    db.batch_execute(&insert(40_000, "2 hours")).unwrap();
    db.batch_execute(&insert(500, "0 s")).unwrap();
    assert_eq!(read_topic(&bootstrap, &topic, 40_500, Duration::from_secs(120)).len(), 40_500);
    assert!(c.wait_until_drained(Duration::from_secs(30)));
    let blocks_read = |db: &mut postgres::Client| -> i64 {
        db.query_one(
            "SELECT heap_blks_read + heap_blks_hit FROM pg_statio_user_tables WHERE schemaname = 'outbox' AND relname = $1",
            &[&table],
        )
        .unwrap()
        .get(0)
    };
    let blocks: i64 = db
        .query_one(&format!("SELECT pg_relation_size('outbox.{table}') / current_setting('block_size')::bigint"), &[])
        .unwrap()
        .get(0);
    std::thread::sleep(Duration::from_secs(2));
    let before = blocks_read(&mut db);
    std::thread::sleep(Duration::from_secs(5));
    let read = blocks_read(&mut db) - before;
    assert!(read < blocks / 2, "the worker read {read} blocks of a {blocks}-block slot in 5 s");
    // Once the young rows age out too, the slot is truncated.
    c.reconfigure("pg_outbox.retention = '2s'");
    wait_until_empty(&mut db, &format!("outbox.{table}"), Duration::from_secs(30));
}

/// An enqueuer that wrote to a slot before it stopped being the current one, and commits while
/// the worker's rotation check is about to lock that slot: the check must see its message, or the
/// TRUNCATE takes it unsent (a committed message lost). The worker is held at that point with gdb.
/// With wal_level = minimal: above it, the lock's WAL record gives the transaction an xid, and by
/// chance its later statements a new snapshot.
#[test]
fn a_message_committed_while_the_rotation_waits_to_lock_its_slot_is_not_truncated_unsent() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "wal_level = minimal\nmax_wal_senders = 0\npg_outbox.rotation_interval = '1h'");
    let topic = unique("rotation-race");
    let mut db = c.client();
    let slot_of =
        |db: &mut postgres::Client| -> i16 { db.query_one("SELECT outbox._current_slot()", &[]).unwrap().get(0) };
    // A delivered message in the slot, so the check does not find the slot empty.
    let slot = slot_of(&mut db);
    db.execute("SELECT outbox.enqueue_message($1, '\"delivered\"'::jsonb, key => 'k')", &[&topic]).unwrap();
    assert_eq!(read_topic(&bootstrap, &topic, 1, WAIT).len(), 1);
    wait_for("its delivery to be recorded", WAIT, || {
        db.query_one("SELECT count(*) FROM outbox.pending_messages", &[]).unwrap().get::<_, i64>(0) == 0
    });
    let mut enqueuer = c.client();
    let mut late = enqueuer.transaction().unwrap();
    let id: i64 =
        late.query_one("SELECT outbox.enqueue_message($1, '\"late\"'::jsonb, key => 'k')", &[&topic]).unwrap().get(0);
    assert_eq!(slot_of(&mut db), slot, "both messages are in one slot");
    c.reconfigure("pg_outbox.rotation_interval = '1s'");
    wait_for("the slot to stop being the current one", WAIT, || slot_of(&mut db) != slot);

    // Held at its next try to lock a slot (the enqueuer's, the only other one with rows) until
    // the enqueuer has committed.
    let worker = c.worker_pid(WAIT).expect("a worker");
    let hold = GdbHold::at_function(worker, "ConditionalLockRelationOid", &c.dir.join("gdb-flags"));
    late.commit().unwrap();
    let held_at = hold.release();
    assert!(held_at.contains("try_lock_exclusive"), "held somewhere else:\n{held_at}");

    assert_eq!(payloads(&read_topic(&bootstrap, &topic, 2, WAIT)), vec!["\"delivered\"", "\"late\""]);
    // Settled: delivered, or already truncated once delivered (NULL).
    let status: Option<String> = db.query_one("SELECT outbox.message_status($1)", &[&id]).unwrap().get(0);
    assert!(matches!(status.as_deref(), Some("delivered") | None), "{status:?}");
}

/// A process held by gdb at the first call of a function, until released; released (and gdb
/// ended) also when the test fails first.
struct GdbHold {
    gdb: Option<std::process::Child>,
    go: PathBuf,
}

impl GdbHold {
    fn at_function(pid: i32, function: &str, flags: &Path) -> GdbHold {
        std::fs::create_dir_all(flags).unwrap();
        let (held, go) = (flags.join("held"), flags.join("go"));
        let gdb = Command::new("gdb")
            .args(["-p", &pid.to_string(), "-batch"])
            // Postgres signals its processes (SIGUSR1 for latches and barriers, SIGHUP on reload).
            .args(["-ex", "handle SIGUSR1 SIGUSR2 SIGHUP SIGALRM SIGPIPE nostop noprint pass"])
            .args(["-ex", &format!("break {function}"), "-ex", "continue", "-ex", "bt 3"])
            .args(["-ex", &format!("shell touch {}", held.display())])
            .args(["-ex", &format!("shell for i in $(seq 600); do [ -e {} ] && break; sleep 0.1; done", go.display())])
            .args(["-ex", "delete", "-ex", "detach"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gdb (scripts/deps.sh build installs it)");
        let mut hold = GdbHold { gdb: Some(gdb), go };
        wait_for(&format!("gdb to hold PID {pid} at {function}"), WAIT, || {
            // gdb that could not attach (no ptrace permission, say) has exited: say why.
            if let Some(gdb) = hold.gdb.take_if(|gdb| !matches!(gdb.try_wait(), Ok(None))) {
                let out = gdb.wait_with_output().unwrap();
                panic!("gdb ended before holding PID {pid}: {}", String::from_utf8_lossy(&out.stderr));
            }
            held.exists()
        });
        hold
    }

    /// Lets the process go on; returns what gdb said (the backtrace where it was held).
    fn release(mut self) -> String {
        std::fs::write(&self.go, "").unwrap();
        let out = self.gdb.take().expect("held").wait_with_output().unwrap();
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for GdbHold {
    fn drop(&mut self) {
        if let Some(mut gdb) = self.gdb.take() {
            let _ = std::fs::write(&self.go, "");
            let _ = gdb.kill();
            let _ = gdb.wait();
        }
    }
}

fn wait_until_empty(db: &mut postgres::Client, table: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let rows: i64 = db.query_one(&format!("SELECT count(*) FROM {table}"), &[]).unwrap().get(0);
        if rows == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{rows} rows still stored in {table} after {timeout:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_backlog_of_exactly_a_whole_number_of_batches_does_not_stall_later_messages() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "pg_outbox.batch_size = 10");
    let topic = unique("whole-batches");
    let mut db = c.client();
    // One commit of 20 messages: a snapshot window of exactly two full batches.
    db.execute(
        "SELECT count(outbox.enqueue_message($1, to_jsonb(i), key => 'k')) FROM generate_series(0, 19) i",
        &[&topic],
    )
    .unwrap();
    assert_eq!(read_topic(&bootstrap, &topic, 20, Duration::from_secs(30)).len(), 20);
    db.execute("SELECT outbox.enqueue_message($1, to_jsonb(20), key => 'k')", &[&topic]).unwrap();
    let records = read_topic(&bootstrap, &topic, 21, Duration::from_secs(30));
    assert_eq!(pg_outbox_tests::payloads(&records).last().map(String::as_str), Some("20"));
}

#[test]
fn a_window_of_several_batches_is_delivered_whole_from_its_lowest_id_in_key_order() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    // Written while the worker cannot reach the broker: once it can, every message below is in
    // one snapshot window, six batches long.
    let nowhere = format!("127.0.0.1:{}", pg_outbox_tests::free_port());
    let c = Cluster::start(&nowhere, "pg_outbox.batch_size = 10\npg_outbox.retry_backoff_max = '500ms'");
    let topic = unique("big-window");
    let enqueue = "SELECT outbox.enqueue_message($1, to_jsonb($3::int), key => $2)";
    // Two transactions take turns, so their ids interleave, and commit last; a third one
    // commits first with the highest ids.
    let (mut a, mut b) = (c.client(), c.client());
    let (mut ta, mut tb) = (a.transaction().unwrap(), b.transaction().unwrap());
    for n in 0..20 {
        ta.execute(enqueue, &[&topic, &"a", &n]).unwrap();
        tb.execute(enqueue, &[&topic, &"b", &n]).unwrap();
    }
    c.client()
        .execute(
            "SELECT count(outbox.enqueue_message($1, to_jsonb(n), key => 'c')) FROM generate_series(0, 19) n",
            &[&topic],
        )
        .unwrap();
    tb.commit().unwrap();
    ta.commit().unwrap();
    c.reconfigure(&format!("pg_outbox.kafka_bootstrap_servers = '{bootstrap}'"));
    let records = read_topic(&bootstrap, &topic, 60, Duration::from_secs(60));
    assert_eq!(records.len(), 60, "every message once");
    for key in ["a", "b", "c"] {
        let ns: Vec<i64> =
            records.iter().filter(|r| r.key.as_deref() == Some(key)).map(|r| r.json().as_i64().unwrap()).collect();
        assert_eq!(ns, (0..20).collect::<Vec<_>>(), "key {key} in order");
    }
}

#[test]
fn tables_rewritten_and_a_state_row_moved_under_the_worker_lose_nothing_and_stop_nothing() {
    let bootstrap = BrokerKind::Kafka.shared_bootstrap();
    let c = Cluster::start(&bootstrap, "");
    let topic = unique("rewritten");
    let worker = c.worker_pid(Duration::from_secs(30)).expect("the worker runs");
    let writer = {
        let (dsn, topic) = (c.dsn("shop"), topic.clone());
        std::thread::spawn(move || {
            let mut db = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
            let started = Instant::now();
            let mut n = 0;
            while started.elapsed() < Duration::from_secs(5) {
                db.execute("SELECT outbox.enqueue_message($1, to_jsonb($2::int), key => 'k')", &[&topic, &n]).unwrap();
                n += 1;
            }
            n
        })
    };
    // Meanwhile the worker's state row goes to a new file and moves by hand, and the slots'
    // indexes are rebuilt: what the worker remembered of where they are no longer holds.
    let mut db = c.client();
    let mut rounds = 0;
    while !writer.is_finished() {
        for statement in [
            "VACUUM FULL outbox.worker_state",
            "UPDATE outbox.worker_state SET delivered_total = delivered_total",
            "VACUUM FULL outbox.topics",
            "REINDEX TABLE outbox.messages",
        ] {
            db.batch_execute(statement).unwrap();
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let total: i32 = writer.join().unwrap();
    assert!(rounds >= 3, "only {rounds} rewrites while the writer ran");
    let records = read_topic(&bootstrap, &topic, total as usize, Duration::from_secs(60));
    let ns: Vec<i64> = records.iter().map(|r| r.json().as_i64().unwrap()).collect();
    assert_eq!(ns, (0..total as i64).collect::<Vec<_>>(), "every message once, in order");
    assert_eq!(c.worker_pid(Duration::from_secs(5)), Some(worker), "the worker never stopped");
}
