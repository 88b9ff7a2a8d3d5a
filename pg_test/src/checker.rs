//! A checker in the manner of Jepsen's Kafka checker. Clients run a mixed transactional workload
//! while a fault is injected and healed; every message carries a unique value, and the ground
//! truth (which values committed) is written in the same transactions as the enqueues. After a
//! final drain, a Kafka consumer's view is compared with the truth: lost, phantom, duplicated,
//! out of per-key commit order, and how long delivery took.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::{consumer, unique, BrokerKind, Cluster, PrivateBroker};

/// What the clients do.
#[derive(Clone, Debug)]
pub struct Workload {
    pub clients: usize,
    pub duration: Duration,
    pub topics: usize,
    pub keys_per_topic: usize,
}

impl Workload {
    pub fn short() -> Workload {
        Workload { clients: 6, duration: Duration::from_secs(20), topics: 3, keys_per_topic: 6 }
    }

    pub fn full() -> Workload {
        Workload { clients: 6, duration: Duration::from_secs(60), topics: 3, keys_per_topic: 8 }
    }
}

/// The fault injected a third into the run and healed at two thirds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The broker process is killed (SIGKILL), then started again on the same storage.
    BrokerKilled,
    /// The broker is frozen (SIGSTOP) for `seconds`, then resumed.
    BrokerFrozen {
        seconds: u64,
    },
    /// The broker is frozen for longer than the producer's message.timeout.ms (5 s here): messages
    /// time out "possibly persisted" and must be resent without reordering a key.
    BrokerSlowerThanMessageTimeout,
    /// pg_terminate_backend() on the worker (SIGTERM), three times.
    WorkerTerminated,
    /// SIGKILL to the worker: the postmaster restarts every backend.
    WorkerKilled,
    /// pg_ctl stop -m immediate while forwarding, then start.
    PostgresImmediateStop,
    /// A fatal idempotent-producer error (out-of-order sequence) injected into librdkafka.
    ProducerFatalError,
    /// CREATE EXTENSION runs after the server (and its worker) started.
    ExtensionCreatedAfterStart,
    /// In another database with its own worker: DROP EXTENSION, CREATE EXTENSION, then DROP
    /// DATABASE, while both workers forward. Must not hang, must not touch this database.
    NeighbourDatabaseDropped,
    /// The primary (synchronous replication to a hot standby) is stopped immediately; the
    /// standby is promoted and the clients continue on it.
    FailoverToStandby,
    /// Three-node cluster: the leader of a busy partition is killed; 5 s later a second node:
    /// with one in-sync replica left, writes must wait (min.insync.replicas 2) until both return.
    LeaderThenSecondBrokerLost,
}

impl Fault {
    pub fn describe(self) -> (&'static str, String) {
        let (fault, how) = match self {
            Fault::None => ("none (baseline)", "-"),
            Fault::BrokerKilled => ("broker killed and restarted", "SIGKILL to the broker, restart on the same storage after 8 s"),
            Fault::BrokerFrozen { seconds } => {
                return ("broker frozen", format!("SIGSTOP to the broker for {seconds} s, then SIGCONT"));
            }
            Fault::BrokerSlowerThanMessageTimeout => (
                "broker slower than the producer's message timeout",
                "message.timeout.ms=5000, broker SIGSTOPped for 12 s",
            ),
            Fault::WorkerTerminated => ("worker terminated", "pg_terminate_backend(worker) three times, 2 s apart"),
            Fault::WorkerKilled => ("worker killed", "SIGKILL to the worker (postmaster restarts all backends)"),
            Fault::PostgresImmediateStop => ("Postgres stopped mid-forwarding", "pg_ctl stop -m immediate, start after 3 s"),
            Fault::ProducerFatalError => (
                "fatal idempotent-producer error",
                "rd_kafka_test_fatal_error(OUT_OF_ORDER_SEQUENCE_NUMBER) via outbox._inject_producer_fatal_error()",
            ),
            Fault::ExtensionCreatedAfterStart => ("extension created after server start", "CREATE EXTENSION after the worker started"),
            Fault::NeighbourDatabaseDropped => (
                "DROP EXTENSION, CREATE EXTENSION, DROP DATABASE next door",
                "in a second database with its own worker and traffic; each must finish within 10 s",
            ),
            Fault::LeaderThenSecondBrokerLost => (
                "partition leader killed, then a second broker lost",
                "3 nodes, RF 3, min.insync.replicas 2: SIGKILL the leader of a busy partition, 5 s later another node; both restarted after 20 s",
            ),
            Fault::FailoverToStandby => (
                "failover to a hot standby",
                "synchronous standby; pg_ctl stop -m immediate on the primary, pg_ctl promote on the standby",
            ),
        };
        (fault, how.to_string())
    }

    /// What the server log must show for the fault to count as injected.
    fn evidence(self) -> Option<(&'static str, usize)> {
        match self {
            Fault::WorkerKilled => Some(("terminated by signal 9", 1)),
            Fault::WorkerTerminated => Some(("worker for database \"shop\" stopped", 3)),
            Fault::PostgresImmediateStop => Some(("received immediate shutdown request", 1)),
            Fault::ProducerFatalError => Some(("recreating it and resending", 1)),
            // A batch that waits 10 s without an acknowledgement says so (before any timeout).
            Fault::BrokerSlowerThanMessageTimeout | Fault::BrokerFrozen { .. } => Some(("Kafka is unavailable", 1)),
            _ => None,
        }
    }

    /// Whether at-least-once redelivery (duplicates) is expected from this fault.
    pub fn may_duplicate(self) -> bool {
        !matches!(
            self,
            Fault::None
                | Fault::ExtensionCreatedAfterStart
                | Fault::BrokerFrozen { .. }
                | Fault::NeighbourDatabaseDropped
        )
    }
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub broker: BrokerKind,
    pub fault: Fault,
}

impl Scenario {
    pub fn new(broker: BrokerKind, fault: Fault) -> Scenario {
        let name = format!("{:?}-{:?}", broker, fault).to_lowercase().replace([' ', '{', '}', ':'], "");
        Scenario { name, broker, fault }
    }
}

/// Every scenario the checker knows, against Apache Kafka, and the broker faults against Tansu.
pub fn all_scenarios() -> Vec<Scenario> {
    use BrokerKind::*;
    let mut v = vec![
        Scenario::new(Kafka, Fault::None),
        Scenario::new(Kafka, Fault::BrokerKilled),
        // Well inside the producer's 120 s message timeout, so it must cost no duplicate. After
        // SIGCONT the single-node broker's controller may fence it for a moment (its heartbeats
        // lapsed); its metadata then lists no broker, librdkafka forgets every broker it knew,
        // and the sink must give it the bootstrap servers again (KafkaSink::flush).
        Scenario::new(Kafka, Fault::BrokerFrozen { seconds: 15 }),
        Scenario::new(Kafka, Fault::BrokerSlowerThanMessageTimeout),
        Scenario::new(Kafka, Fault::WorkerTerminated),
        Scenario::new(Kafka, Fault::WorkerKilled),
        Scenario::new(Kafka, Fault::PostgresImmediateStop),
        Scenario::new(Kafka, Fault::ProducerFatalError),
        Scenario::new(Kafka, Fault::ExtensionCreatedAfterStart),
        Scenario::new(Kafka, Fault::NeighbourDatabaseDropped),
        Scenario::new(Kafka, Fault::FailoverToStandby),
        Scenario::new(KafkaCluster, Fault::LeaderThenSecondBrokerLost),
    ];
    v.extend([
        Scenario::new(Tansu, Fault::None),
        Scenario::new(Tansu, Fault::BrokerKilled),
        Scenario::new(Tansu, Fault::BrokerFrozen { seconds: 20 }),
    ]);
    v
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub scenario: String,
    pub broker: String,
    pub fault: String,
    pub how: String,
    pub committed: usize,
    pub delivered: usize,
    pub lost: usize,
    pub phantom: usize,
    pub duplicates: usize,
    pub order_violations: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// From the fault being healed (or injected, for faults that heal themselves) to the first
    /// delivery after it.
    pub recovery_ms: Option<f64>,
    pub batch_size: usize,
    pub duration_s: f64,
    pub may_duplicate: bool,
    /// False when the server log does not show that the fault took effect.
    pub fault_observed: bool,
    /// The server log's pg_outbox lines and errors, for a scenario that went wrong.
    pub server_log_tail: String,
}

impl Report {
    /// The guarantees: nothing lost or phantom, per-key order kept, duplicates only where a
    /// crash can make a batch go twice, at most one batch per crash.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.lost > 0 {
            v.push(format!("{} lost", self.lost));
        }
        if self.phantom > 0 {
            v.push(format!("{} phantom", self.phantom));
        }
        if self.order_violations > 0 {
            v.push(format!("{} per-key order violations", self.order_violations));
        }
        if !self.may_duplicate && self.duplicates > 0 {
            v.push(format!("{} duplicates without a crash", self.duplicates));
        }
        // Three injections at most (worker terminated three times).
        if self.duplicates > 3 * self.batch_size {
            v.push(format!("{} duplicates: more than the in-flight batches", self.duplicates));
        }
        if !self.fault_observed {
            v.push("the fault did not show in the server log".into());
        }
        if self.committed == 0 {
            v.push("nothing committed".into());
        }
        v
    }

    pub fn markdown_row(&self) -> String {
        let recovery = self.recovery_ms.map_or("-".to_string(), |ms| format!("{:.1} s", ms / 1000.0));
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} / {:.0} / {:.0} | {} |",
            self.fault,
            self.broker,
            self.how,
            self.committed,
            self.delivered,
            self.lost,
            self.phantom,
            self.duplicates,
            self.order_violations,
            self.latency_p50_ms,
            self.latency_p99_ms,
            self.latency_max_ms,
            recovery
        )
    }
}

pub const MARKDOWN_HEADER: &str = "| fault | broker | how injected | committed | delivered | lost | phantom | duplicates | order violations | latency p50 / p99 / max (ms) | recovery |\n|---|---|---|---|---|---|---|---|---|---|---|";

fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or_default()
}

/// A tiny deterministic PRNG (xorshift): the workload needs variety, not cryptography.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Debug)]
struct Received {
    value: i64,
    topic: String,
    partition: i32,
    offset: i64,
    key: String,
    n: i64,
    at_ms: f64,
}

impl Received {
    fn from_message(m: &rdkafka::message::BorrowedMessage<'_>, at_ms: f64) -> Option<Received> {
        let v = serde_json::from_slice::<serde_json::Value>(m.payload()?).ok()?;
        Some(Received {
            value: v["v"].as_i64().unwrap_or(-1),
            n: v["n"].as_i64().unwrap_or(-1),
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
            at_ms,
        })
    }
}

const BATCH_SIZE: usize = 500;

/// Runs one scenario and returns its report.
pub fn run(scenario: &Scenario, workload: &Workload) -> Report {
    let started = Instant::now();
    let broker = PrivateBroker::start(scenario.broker);
    let bootstrap = broker.bootstrap();
    let mut conf = format!(
        "pg_outbox.batch_size = {BATCH_SIZE}
         pg_outbox.poll_interval = '200ms'
         pg_outbox.retry_backoff = '200ms'
         pg_outbox.retry_backoff_max = '2s'
         max_connections = 50"
    );
    if scenario.fault == Fault::BrokerSlowerThanMessageTimeout {
        conf.push_str("\npg_outbox.kafka_properties = 'message.timeout.ms=5000'");
    }
    let cluster = match scenario.fault {
        Fault::ExtensionCreatedAfterStart => {
            let c = Cluster::start_without_extension(&bootstrap, &conf);
            assert!(c.worker_pid(Duration::from_secs(30)).is_some(), "worker waits for the extension");
            std::thread::sleep(Duration::from_secs(2));
            c.client().batch_execute("CREATE EXTENSION pg_outbox").expect("CREATE EXTENSION");
            c
        }
        Fault::NeighbourDatabaseDropped => {
            let c = Cluster::start_with_databases(&bootstrap, &conf, &["shop", "scratch"]);
            for db in ["shop", "scratch"] {
                c.client_for(db).batch_execute("CREATE EXTENSION pg_outbox").expect("CREATE EXTENSION");
            }
            c
        }
        _ => Cluster::start(&bootstrap, &conf),
    };
    // The standby takes over the primary's role (and its clients) when the fault strikes.
    let standby = (scenario.fault == Fault::FailoverToStandby).then(|| {
        let standby = cluster.start_standby(&bootstrap);
        // Synchronous: a commit the clients saw is on the standby, so a failover loses nothing.
        cluster.client().batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'").expect("sync standby");
        cluster.client().batch_execute("SELECT pg_reload_conf()").expect("reload");
        standby
    });
    let prefix = unique("chk");
    let topics: Vec<String> = (0..workload.topics).map(|i| format!("{prefix}-t{i}")).collect();
    setup_schema(&cluster, &topics, workload);
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    // A broker that will not create them up front (Tansu may not) gets them from the worker.
    let _ = crate::create_topics(&bootstrap, &names, -1, &[]);

    let stop_consumer = Arc::new(AtomicBool::new(false));
    let received: Arc<Mutex<Vec<Received>>> = Arc::new(Mutex::new(Vec::new()));
    let consumer_thread = {
        let (bootstrap, topics, stop, received) =
            (bootstrap.clone(), topics.clone(), stop_consumer.clone(), received.clone());
        std::thread::spawn(move || consume(&bootstrap, &topics, &stop, &received))
    };

    let deadline = Instant::now() + workload.duration;
    let mut dsns = vec![cluster.dsn("shop")];
    dsns.extend(standby.as_ref().map(|s| s.dsn("shop")));
    let clients: Vec<_> = (0..workload.clients)
        .map(|c| {
            let (dsns, topics, w) = (dsns.clone(), topics.clone(), workload.clone());
            std::thread::spawn(move || client_loop(c, &dsns, &topics, &w, deadline))
        })
        .collect();
    let neighbour_stop = Arc::new(AtomicBool::new(false));
    let neighbour = (scenario.fault == Fault::NeighbourDatabaseDropped).then(|| {
        let (dsn, topic, stop) = (cluster.dsn("scratch"), format!("{prefix}-scratch"), neighbour_stop.clone());
        std::thread::spawn(move || neighbour_traffic(&dsn, &topic, deadline, &stop))
    });

    let healed_ms = if let Some(n) = neighbour {
        // The neighbour's clients stop (DROP EXTENSION under live writers can deadlock with them,
        // which Postgres reports as an error); its worker stays attached and is what is tested.
        std::thread::sleep(workload.duration / 3);
        neighbour_stop.store(true, Ordering::Relaxed);
        let _ = n.join();
        inject(scenario.fault, &broker, &cluster, standby.as_ref(), &topics, Duration::ZERO)
    } else {
        inject(scenario.fault, &broker, &cluster, standby.as_ref(), &topics, workload.duration)
    };
    // After a failover the standby is the database of record.
    let cluster = standby.as_ref().unwrap_or(&cluster);
    let mut commit_times: HashMap<i64, f64> = HashMap::new();
    for c in clients {
        commit_times.extend(c.join().expect("client thread"));
    }
    // Prepared transactions orphaned by a crash hold row locks: a transaction manager would
    // commit them; so does the checker (their messages then count as committed).
    resolve_prepared(cluster);
    let drained = wait_drained(cluster, Duration::from_secs(180));
    // Let the consumer catch up: stop once nothing new arrived for 3 s.
    let mut last_len = 0;
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(250));
        let len = received.lock().map(|r| r.len()).unwrap_or(0);
        if len != last_len {
            last_len = len;
            quiet_since = Instant::now();
        }
    }
    stop_consumer.store(true, Ordering::Relaxed);
    let _ = consumer_thread.join();
    let mut records = received.lock().map(|r| r.clone()).unwrap_or_default();
    // The same record (position and value) seen by both readers counts once.
    let live: HashSet<(String, i32, i64, i64)> =
        records.iter().map(|r| (r.topic.clone(), r.partition, r.offset, r.value)).collect();
    records.extend(
        read_to_end(&bootstrap, &topics, Duration::from_secs(120))
            .into_iter()
            .filter(|r| !live.contains(&(r.topic.clone(), r.partition, r.offset, r.value))),
    );
    let truth = read_truth(cluster);
    let (fault, how) = scenario.fault.describe();
    let mut report = analyze(&truth, &records, &commit_times, healed_ms.filter(|h| !h.is_nan()));
    report.scenario = scenario.name.clone();
    report.broker = match scenario.broker {
        BrokerKind::Kafka => "Apache Kafka 4.1".into(),
        BrokerKind::Tansu => "Tansu".into(),
        BrokerKind::KafkaCluster => "Apache Kafka 4.1, 3 nodes".into(),
    };
    report.fault = fault.into();
    report.how = how;
    report.batch_size = BATCH_SIZE;
    report.may_duplicate = scenario.fault.may_duplicate();
    report.fault_observed = !healed_ms.is_some_and(f64::is_nan)
        && scenario.fault.evidence().is_none_or(|(text, times)| cluster.log().matches(text).count() >= times);
    report.duration_s = started.elapsed().as_secs_f64();
    if !drained {
        report.how.push_str(" (outbox not drained after 180 s)");
    }
    let log = cluster.log();
    // The workload's own failing statements (client backends' ERRORs, hundreds of them) would
    // push the worker's lines out of the tail.
    let notable: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("pg_outbox")
                || (["ERROR", "FATAL", "PANIC"].iter().any(|w| l.contains(w)) && !l.contains("client backend"))
        })
        .collect();
    report.server_log_tail = notable[notable.len().saturating_sub(60)..].join("\n");
    if !drained {
        // The worker logs an outage once; what it is doing now is in its status.
        let dsn = format!("{} connect_timeout=5", cluster.dsn(&cluster.database));
        let status = postgres::Client::connect(&dsn, postgres::NoTls)
            .and_then(|mut db| db.query("SELECT row_to_json(s)::text FROM outbox.worker_status s", &[]))
            .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join("\n"))
            .unwrap_or_else(|e| format!("cannot read outbox.worker_status: {e}"));
        report.server_log_tail.push_str(&format!("\noutbox.worker_status at the end:\n{status}"));
        let broker_log = broker.notable_log(40);
        report.server_log_tail.push_str(&format!("\nbroker log (warnings, errors, fencing; last 40):\n{broker_log}"));
    }
    report
}

fn setup_schema(cluster: &Cluster, topics: &[String], w: &Workload) {
    let mut db = cluster.client();
    db.batch_execute(
        "CREATE TABLE checker_keys (topic text, key text, n int NOT NULL DEFAULT 0, PRIMARY KEY (topic, key));
         CREATE TABLE checker_truth (value bigint PRIMARY KEY, topic text NOT NULL, key text NOT NULL, n int NOT NULL);",
    )
    .expect("checker schema");
    for t in topics {
        for k in 0..w.keys_per_topic {
            db.execute("INSERT INTO checker_keys (topic, key) VALUES ($1, $2)", &[t, &format!("k{k}")]).unwrap();
        }
        for c in 0..w.clients {
            db.execute("INSERT INTO checker_keys (topic, key) VALUES ($1, $2)", &[t, &format!("long{c}")]).unwrap();
        }
    }
}

fn consume(bootstrap: &str, topics: &[String], stop: &AtomicBool, received: &Mutex<Vec<Received>>) {
    let consumer = consumer(bootstrap);
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..3 {
            let _ = tpl.add_partition_offset(t, p, Offset::Beginning);
        }
    }
    let _ = consumer.assign(&tpl);
    let mut seen_offsets = HashSet::new();
    while !stop.load(Ordering::Relaxed) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else { continue };
        // A re-read after an offset reset is the consumer's, not a redelivery.
        if !seen_offsets.insert((m.topic().to_string(), m.partition(), m.offset())) {
            continue;
        }
        let Some(record) = Received::from_message(&m, now_ms()) else { continue };
        if let Ok(mut r) = received.lock() {
            r.push(record);
        }
    }
}

/// The final drain: a fresh consumer reads every partition from the beginning to its high
/// watermark. The live consumer may still be in reconnect backoff after a broker fault; this
/// read is what makes "lost" mean lost. Records only seen here carry the broker's timestamp.
fn read_to_end(bootstrap: &str, topics: &[String], timeout: Duration) -> Vec<Received> {
    let deadline = Instant::now() + timeout;
    let consumer = consumer(bootstrap);
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..3 {
            let high = loop {
                match consumer.fetch_watermarks(t, p, Duration::from_secs(5)) {
                    Ok((_, high)) => break high,
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                    Err(e) => panic!("final drain: no watermarks for {t}/{p}: {e}"),
                }
            };
            if high > 0 {
                ends.insert((t.clone(), p), high);
                let _ = tpl.add_partition_offset(t, p, Offset::Beginning);
            }
        }
    }
    let _ = consumer.assign(&tpl);
    let mut records = Vec::new();
    while !ends.is_empty() && Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else { continue };
        let part = (m.topic().to_string(), m.partition());
        if ends.get(&part).is_some_and(|high| m.offset() + 1 >= *high) {
            ends.remove(&part);
        }
        let at_ms = m.timestamp().to_millis().map_or_else(now_ms, |t| t as f64);
        records.extend(Received::from_message(&m, at_ms));
    }
    assert!(ends.is_empty(), "final drain: partitions not read to the end in {timeout:?}: {ends:?}");
    records
}

/// One client: a loop of transactions of every kind until the deadline. Returns the commit time
/// of every value whose COMMIT (or COMMIT PREPARED) returned success.
fn client_loop(id: usize, dsns: &[String], topics: &[String], w: &Workload, deadline: Instant) -> HashMap<i64, f64> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut committed = HashMap::new();
    let mut seq: i64 = 0;
    let mut db: Option<postgres::Client> = None;
    while Instant::now() < deadline {
        let client = match db.as_mut().filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => {
                // The first server that accepts writes (after a failover: the promoted standby).
                for dsn in dsns {
                    if let Ok(mut c) = postgres::Client::connect(dsn, postgres::NoTls) {
                        let writable = c
                            .query_one("SELECT NOT pg_is_in_recovery()", &[])
                            .map(|r| r.get::<_, bool>(0))
                            .unwrap_or(false);
                        if writable {
                            let _ = c.batch_execute("SET lock_timeout = '2s'; SET statement_timeout = '20s'");
                            db = Some(c);
                            break;
                        }
                    }
                }
                if db.is_none() {
                    std::thread::sleep(Duration::from_millis(200));
                }
                continue;
            }
        };
        let kind = rng.below(100);
        let mut pairs: Vec<(String, String)> = (0..=rng.below(3))
            .map(|_| {
                let t = &topics[rng.below(topics.len() as u64) as usize];
                (t.clone(), format!("k{}", rng.below(w.keys_per_topic as u64)))
            })
            .collect();
        pairs.sort();
        pairs.dedup();
        let mut next_value = || {
            seq += 1;
            id as i64 * 1_000_000_000 + seq
        };
        let result = match kind {
            // Long transaction: enqueues first, commits late.
            0..=4 => {
                let t = topics[rng.below(topics.len() as u64) as usize].clone();
                let values = vec![next_value()];
                run_txn(client, &[(t, format!("long{id}"))], &values, |c| {
                    std::thread::sleep(Duration::from_millis(300 + (id as u64 * 97) % 500));
                    c.batch_execute("COMMIT").map(|_| true)
                })
                .map(|ok| if ok { values } else { vec![] })
            }
            // Rollback.
            5..=14 => {
                let values: Vec<i64> = pairs.iter().map(|_| next_value()).collect();
                run_txn(client, &pairs, &values, |c| c.batch_execute("ROLLBACK").map(|_| false)).map(|_| vec![])
            }
            // Rollback to savepoint: the first message stays, the rest go.
            15..=24 => {
                let values: Vec<i64> = pairs.iter().map(|_| next_value()).collect();
                savepoint_txn(client, &pairs, &values)
            }
            // A failing statement aborts the transaction.
            25..=29 => {
                let values: Vec<i64> = pairs.iter().map(|_| next_value()).collect();
                let _ = run_txn(client, &pairs, &values, |c| c.batch_execute("SELECT 1/0").map(|_| false));
                let _ = client.batch_execute("ROLLBACK");
                Ok(vec![])
            }
            // Two-phase commit, then COMMIT PREPARED or ROLLBACK PREPARED.
            30..=39 => {
                let values: Vec<i64> = pairs.iter().map(|_| next_value()).collect();
                let gid = format!("chk-{id}-{seq}");
                let commit = rng.below(2) == 0;
                run_txn(client, &pairs, &values, |c| {
                    c.batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))?;
                    let finish = if commit { "COMMIT PREPARED" } else { "ROLLBACK PREPARED" };
                    c.batch_execute(&format!("{finish} '{gid}'")).map(|_| commit)
                })
                .map(|ok| if ok { values } else { vec![] })
            }
            // Plain commit of one to three messages over topics and keys.
            _ => {
                let values: Vec<i64> = pairs.iter().map(|_| next_value()).collect();
                run_txn(client, &pairs, &values, |c| c.batch_execute("COMMIT").map(|_| true)).map(|ok| {
                    if ok {
                        values
                    } else {
                        vec![]
                    }
                })
            }
        };
        match result {
            Ok(values) => {
                let at = now_ms();
                for v in values {
                    committed.insert(v, at);
                }
            }
            Err(_) => {
                if let Some(c) = db.as_mut() {
                    if !c.is_closed() {
                        let _ = c.batch_execute("ROLLBACK");
                    }
                }
            }
        }
    }
    committed
}

const ENQUEUE: &str = "WITH k AS (UPDATE checker_keys SET n = n + 1 WHERE topic = $1 AND key = $2 RETURNING n),
                           t AS (INSERT INTO checker_truth SELECT $3, $1, $2, n FROM k RETURNING n)
                      SELECT outbox.enqueue_message($1, jsonb_build_object('v', $3::bigint, 'n', n), key => $2) FROM t";

fn run_txn(
    c: &mut postgres::Client,
    pairs: &[(String, String)],
    values: &[i64],
    finish: impl FnOnce(&mut postgres::Client) -> Result<bool, postgres::Error>,
) -> Result<bool, postgres::Error> {
    c.batch_execute("BEGIN")?;
    for ((topic, key), value) in pairs.iter().zip(values) {
        c.execute(ENQUEUE, &[topic, key, value])?;
    }
    finish(c)
}

fn savepoint_txn(
    c: &mut postgres::Client,
    pairs: &[(String, String)],
    values: &[i64],
) -> Result<Vec<i64>, postgres::Error> {
    c.batch_execute("BEGIN")?;
    c.execute(ENQUEUE, &[&pairs[0].0, &pairs[0].1, &values[0]])?;
    c.batch_execute("SAVEPOINT s")?;
    for ((topic, key), value) in pairs.iter().zip(values).skip(1) {
        c.execute(ENQUEUE, &[topic, key, value])?;
    }
    c.batch_execute("ROLLBACK TO SAVEPOINT s")?;
    c.batch_execute("COMMIT")?;
    Ok(vec![values[0]])
}

/// Enqueues in the neighbour database until it is dropped.
fn neighbour_traffic(dsn: &str, topic: &str, deadline: Instant, stop: &AtomicBool) {
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        if let Ok(mut db) = postgres::Client::connect(dsn, postgres::NoTls) {
            while Instant::now() < deadline
                && !stop.load(Ordering::Relaxed)
                && db.execute("SELECT outbox.enqueue_message($1, '{\"v\": -1}'::jsonb)", &[&topic]).is_ok()
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `sql` in `database`, returning whether it finished within `limit`.
fn finishes_within(cluster: &Cluster, database: &str, sql: &str, limit: Duration) -> bool {
    let started = Instant::now();
    let ok = cluster.client_for(database).batch_execute(sql).is_ok();
    ok && started.elapsed() < limit
}

/// Injects the fault at a third of the run and heals it at two thirds; returns when (ms since
/// the epoch) it was healed.
fn inject(
    fault: Fault,
    broker: &PrivateBroker,
    cluster: &Cluster,
    standby: Option<&Cluster>,
    topics: &[String],
    duration: Duration,
) -> Option<f64> {
    std::thread::sleep(duration / 3);
    let injected = now_ms();
    let healed = match fault {
        Fault::None | Fault::ExtensionCreatedAfterStart => return None,
        Fault::BrokerKilled => {
            broker.kill();
            std::thread::sleep(Duration::from_secs(8));
            broker.resume();
            now_ms()
        }
        Fault::BrokerFrozen { seconds } => {
            broker.freeze();
            std::thread::sleep(Duration::from_secs(seconds));
            broker.thaw();
            now_ms()
        }
        Fault::BrokerSlowerThanMessageTimeout => {
            broker.freeze();
            std::thread::sleep(Duration::from_secs(12));
            broker.thaw();
            now_ms()
        }
        Fault::WorkerTerminated => {
            for _ in 0..3 {
                if let Some(pid) = cluster.worker_pid(Duration::from_secs(10)) {
                    let _ = cluster.client_for("postgres").execute("SELECT pg_terminate_backend($1)", &[&pid]);
                }
                std::thread::sleep(Duration::from_secs(2));
            }
            injected
        }
        Fault::WorkerKilled => {
            if let Some(pid) = cluster.worker_pid(Duration::from_secs(10)) {
                let _ = std::process::Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
            injected
        }
        Fault::PostgresImmediateStop => {
            cluster.stop("immediate");
            std::thread::sleep(Duration::from_secs(3));
            cluster.restart_stopped();
            now_ms()
        }
        Fault::ProducerFatalError => {
            let _ = cluster.client().execute("SELECT outbox._inject_producer_fatal_error()", &[]);
            injected
        }
        Fault::NeighbourDatabaseDropped => {
            let limit = Duration::from_secs(10);
            let dropped_ext = finishes_within(cluster, "scratch", "DROP EXTENSION pg_outbox", limit);
            let created_ext = finishes_within(cluster, "scratch", "CREATE EXTENSION pg_outbox", limit);
            std::thread::sleep(Duration::from_secs(2));
            // Its clients go; its worker (still attached) must leave by itself.
            let _ = cluster.client_for("postgres").batch_execute(
                "ALTER DATABASE scratch ALLOW_CONNECTIONS false;
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = 'scratch' AND backend_type = 'client backend';",
            );
            // A worker the launcher is just starting can make one attempt fail ("being accessed
            // by other users"), as any connecting client can: a second attempt must succeed.
            let dropped_db = finishes_within(cluster, "postgres", "DROP DATABASE scratch", limit)
                || finishes_within(cluster, "postgres", "DROP DATABASE IF EXISTS scratch", limit);
            if !(dropped_ext && created_ext && dropped_db) {
                eprintln!("neighbour: DROP EXTENSION {dropped_ext}, CREATE EXTENSION {created_ext}, DROP DATABASE {dropped_db}");
                return Some(f64::NAN);
            }
            injected
        }
        Fault::LeaderThenSecondBrokerLost => {
            let Some(leader) = leader_port(&broker.bootstrap(), &topics[0]) else { return Some(f64::NAN) };
            let first = broker.node_of_port(leader);
            let second = if first == 1 { 2 } else { 1 };
            broker.kill_node(first);
            std::thread::sleep(Duration::from_secs(5));
            broker.kill_node(second);
            std::thread::sleep(Duration::from_secs(15));
            let healed = now_ms();
            broker.start_node(first);
            broker.start_node(second);
            healed
        }
        Fault::FailoverToStandby => {
            cluster.stop("immediate");
            if let Some(standby) = standby {
                standby.promote();
            }
            now_ms()
        }
    };
    Some(healed)
}

/// The port of the broker leading partition 0 of `topic`.
fn leader_port(bootstrap: &str, topic: &str) -> Option<u16> {
    let consumer = consumer(bootstrap);
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).ok()?;
    let leader = metadata.topics().first()?.partitions().iter().find(|p| p.id() == 0)?.leader();
    metadata.brokers().iter().find(|b| b.id() == leader).map(|b| b.port() as u16)
}

fn resolve_prepared(cluster: &Cluster) {
    for _ in 0..50 {
        if let Ok(mut db) = postgres::Client::connect(&cluster.dsn("shop"), postgres::NoTls) {
            if let Ok(rows) = db.query("SELECT gid FROM pg_prepared_xacts", &[]) {
                for row in rows {
                    let gid: String = row.get(0);
                    let _ = db.batch_execute(&format!("COMMIT PREPARED '{gid}'"));
                }
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_drained(cluster: &Cluster, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(mut db) = postgres::Client::connect(&cluster.dsn("shop"), postgres::NoTls) {
            if db
                .query_one("SELECT count(*) FROM outbox.pending_messages", &[])
                .map(|r| r.get::<_, i64>(0) == 0)
                .unwrap_or(false)
            {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

struct Truth {
    value: i64,
}

fn read_truth(cluster: &Cluster) -> Vec<Truth> {
    let mut db = cluster.client();
    db.query("SELECT value FROM checker_truth", &[])
        .expect("read the truth")
        .iter()
        .map(|r| Truth { value: r.get(0) })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn analyze(truth: &[Truth], records: &[Received], commit_times: &HashMap<i64, f64>, healed_ms: Option<f64>) -> Report {
    let committed: HashSet<i64> = truth.iter().map(|t| t.value).collect();
    let mut first_seen: HashMap<i64, f64> = HashMap::new();
    for r in records {
        first_seen.entry(r.value).or_insert(r.at_ms);
    }
    let delivered = committed.iter().filter(|v| first_seen.contains_key(v)).count();
    let phantom = first_seen.keys().filter(|v| !committed.contains(v)).count();
    let duplicates = records.len() - first_seen.len();
    // Per key, the counter values in the order Kafka holds them (first occurrences) must rise.
    let mut per_key: HashMap<(String, String), Vec<i64>> = HashMap::new();
    let mut seen = HashSet::new();
    for r in records {
        if seen.insert(r.value) {
            per_key.entry((r.topic.clone(), r.key.clone())).or_default().push(r.n);
        }
    }
    let order_violations = per_key.values().map(|ns| ns.windows(2).filter(|w| w[1] <= w[0]).count()).sum::<usize>();
    let mut latencies: Vec<f64> =
        commit_times.iter().filter_map(|(v, at)| first_seen.get(v).map(|seen| (seen - at).max(0.0))).collect();
    latencies.sort_by(f64::total_cmp);
    let recovery_ms = healed_ms.and_then(|h| {
        records
            .iter()
            .filter(|r| r.at_ms >= h)
            .map(|r| r.at_ms - h)
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.min(x))))
    });
    Report {
        committed: committed.len(),
        delivered,
        lost: committed.len() - delivered,
        phantom,
        duplicates,
        order_violations,
        latency_p50_ms: percentile(&latencies, 0.5),
        latency_p99_ms: percentile(&latencies, 0.99),
        latency_max_ms: latencies.last().copied().unwrap_or_default(),
        recovery_ms,
        ..Report::default()
    }
}
