//! Test harness: throwaway PostgreSQL clusters with pg_outbox preloaded (initdb'd as the
//! `postgres` OS user by scripts/pg.sh), real brokers on loopback, and a Kafka consumer that
//! reads topics back. No mocks: every test talks to the real server and the real broker.
use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

pub use postgres;

pub mod checker;
pub mod proxy;

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("pg_test lives in the project").to_path_buf()
}

fn script(name: &str) -> PathBuf {
    project_root().join("scripts").join(name)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` consecutive free ports; returns the first.
///
/// Ports come from below Linux's ephemeral range (32768+), so an outgoing connection cannot take one
/// while its server is down (a broker between kill and restart); each is handed out once per process.
pub fn free_ports(n: u16) -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut seed =
        std::process::id() as u64 ^ SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    loop {
        // xorshift: no dependency for a random port.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let first = 20000 + (seed % 12000) as u16;
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        let range = first..first + n;
        if handed_out.iter().any(|p| range.contains(p)) {
            continue;
        }
        if range.clone().all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            handed_out.extend(range);
            return first;
        }
    }
}

/// Two consecutive free ports (Kafka's controller listens on port + 1); returns the first.
pub fn free_port() -> u16 {
    free_ports(2)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process: for topics, directories.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn scratch_dir(name: &str) -> PathBuf {
    let base = std::env::var("PG_OUTBOX_TEST_DIR").unwrap_or_else(|_| "/tmp/pg_outbox_test".into());
    let dir = Path::new(&base).join(unique(name));
    std::fs::create_dir_all(dir.parent().expect("parent")).expect("create test dir");
    dir
}

/// Which broker a test talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    Kafka,
    Tansu,
    /// Three Apache Kafka nodes, replication factor 3, min.insync.replicas 2 (private only).
    KafkaCluster,
}

impl BrokerKind {
    /// The shared broker `make test` started (PG_OUTBOX_TEST_KAFKA / PG_OUTBOX_TEST_TANSU).
    pub fn shared_bootstrap(self) -> String {
        let var = match self {
            BrokerKind::Kafka => "PG_OUTBOX_TEST_KAFKA",
            BrokerKind::Tansu => "PG_OUTBOX_TEST_TANSU",
            BrokerKind::KafkaCluster => panic!("there is no shared three-node cluster; use PrivateBroker"),
        };
        std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the tests with `make test`"))
    }
}

/// A broker this test owns, so it can stop and start it.
pub struct PrivateBroker {
    pub kind: BrokerKind,
    pub dir: PathBuf,
    pub port: u16,
}

impl PrivateBroker {
    pub fn start(kind: BrokerKind) -> PrivateBroker {
        let port = if kind == BrokerKind::KafkaCluster { free_ports(6) } else { free_port() };
        let b = PrivateBroker { kind, dir: scratch_dir("broker"), port };
        b.resume();
        b
    }

    /// An Apache Kafka broker that tells clients to connect to `port` (a proxy in front of it).
    pub fn start_advertising(port: u16) -> PrivateBroker {
        let b = PrivateBroker { kind: BrokerKind::Kafka, dir: scratch_dir("broker-proxied"), port: free_port() };
        run(Command::new(b.script()).arg("start").arg(&b.dir).arg(b.port.to_string()).arg(port.to_string()));
        b
    }

    /// An Apache Kafka broker whose client listener speaks TLS; its certificate is `ca_pem()`.
    pub fn start_tls() -> PrivateBroker {
        let b = PrivateBroker { kind: BrokerKind::Kafka, dir: scratch_dir("broker-tls"), port: free_port() };
        run(Command::new(b.script()).env("KAFKA_TLS", "1").arg("start").arg(&b.dir).arg(b.port.to_string()));
        b
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A broker address nobody listens on yet (start it later with `resume`).
    pub fn reserve(kind: BrokerKind) -> PrivateBroker {
        PrivateBroker { kind, dir: scratch_dir("broker"), port: free_port() }
    }

    fn script(&self) -> PathBuf {
        script(match self.kind {
            BrokerKind::Kafka => "kafka.sh",
            BrokerKind::Tansu => "tansu.sh",
            BrokerKind::KafkaCluster => "kafka-cluster.sh",
        })
    }

    pub fn bootstrap(&self) -> String {
        match self.kind {
            BrokerKind::KafkaCluster => {
                (0..3).map(|i| format!("127.0.0.1:{}", self.port + 2 * i)).collect::<Vec<_>>().join(",")
            }
            _ => format!("127.0.0.1:{}", self.port),
        }
    }

    /// The node (1..3) of a three-node cluster that listens on `port`.
    pub fn node_of_port(&self, port: u16) -> u16 {
        (port - self.port) / 2 + 1
    }

    /// Three-node cluster only: SIGKILL node `n` (1..3).
    pub fn kill_node(&self, n: u16) {
        run(Command::new(self.script()).arg("kill-node").arg(&self.dir).arg(n.to_string()));
    }

    pub fn start_node(&self, n: u16) {
        run(Command::new(self.script()).arg("start-node").arg(&self.dir).arg(n.to_string()));
    }

    pub fn stop(&self) {
        run(Command::new(self.script()).arg("stop").arg(&self.dir));
    }

    fn pid(&self) -> Option<String> {
        let file = match self.kind {
            BrokerKind::Kafka => "kafka.pid",
            BrokerKind::Tansu => "tansu.pid",
            BrokerKind::KafkaCluster => "node1.pid",
        };
        std::fs::read_to_string(self.dir.join(file)).ok().map(|p| p.trim().to_string())
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").arg(format!("-{signal}")).arg(&pid).status();
        }
    }

    /// Kills the broker process outright (its storage stays; `resume` starts it again).
    pub fn kill(&self) {
        self.signal("KILL");
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new(self.script()).arg("stop").arg(&self.dir).output();
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    pub fn thaw(&self) {
        self.signal("CONT");
    }

    /// The broker's warnings, errors and fencing lines, the last `lines` of them, to explain a
    /// run that went wrong (the broker's directory is removed with it).
    pub fn notable_log(&self, lines: usize) -> String {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|f| {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.ends_with(".log") && !name.starts_with("gc") && !name.starts_with("format")
        });
        files.sort();
        let text: Vec<String> = files.iter().filter_map(|f| std::fs::read_to_string(f).ok()).collect();
        let notable: Vec<&str> = text
            .iter()
            .flat_map(|t| t.lines())
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.to_lowercase().contains("fenc"))
            .collect();
        notable[notable.len().saturating_sub(lines)..].join("\n")
    }

    pub fn resume(&self) {
        run(Command::new(self.script()).arg("start").arg(&self.dir).arg(self.port.to_string()));
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = Command::new(self.script()).arg("stop").arg(&self.dir).output();
        if std::env::var_os("PG_OUTBOX_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Where Postgres's programs are: `PG_BIN`, as for `scripts/pg.sh`, or Debian's PostgreSQL 15.
pub fn pg_bin() -> String {
    std::env::var("PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_string())
}

/// A PostgreSQL 15 cluster with pg_outbox preloaded and the extension created in `database`.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    pub database: String,
}

impl Cluster {
    /// Starts a cluster whose worker forwards to `bootstrap`; `extra_conf` goes to postgresql.conf.
    pub fn start(bootstrap: &str, extra_conf: &str) -> Cluster {
        let cluster = Cluster::start_without_extension(bootstrap, extra_conf);
        cluster.client().batch_execute("CREATE EXTENSION pg_outbox").expect("CREATE EXTENSION");
        cluster
    }

    pub fn start_without_extension(bootstrap: &str, extra_conf: &str) -> Cluster {
        Cluster::start_with_databases(bootstrap, extra_conf, &["shop"])
    }

    /// A cluster with a worker for each of `databases` (created, without the extension); the
    /// first one is `self.database`.
    pub fn start_with_databases(bootstrap: &str, extra_conf: &str, databases: &[&str]) -> Cluster {
        let cluster = Cluster { dir: scratch_dir("pg"), port: free_port(), database: databases[0].into() };
        let conf = format!("pg_outbox.poll_interval = '200ms'\nfsync = off\n{extra_conf}");
        run(Command::new(script("pg.sh"))
            .env("PG_OUTBOX_EXTRA_CONF", conf)
            .arg("start")
            .arg(&cluster.dir)
            .arg(cluster.port.to_string())
            .arg(bootstrap)
            .arg(databases.join(",")));
        cluster
    }

    pub fn dsn(&self, database: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={database}", self.port)
    }

    pub fn client(&self) -> postgres::Client {
        self.client_for(&self.database)
    }

    pub fn client_for(&self, database: &str) -> postgres::Client {
        postgres::Client::connect(&self.dsn(database), postgres::NoTls).expect("connect to the test cluster")
    }

    pub fn stop(&self, mode: &str) {
        run(Command::new(script("pg.sh")).arg("stop").arg(&self.dir).arg(mode));
    }

    /// Starts the cluster again after `stop` (same data directory and settings).
    pub fn restart_stopped(&self) {
        run(Command::new(script("pg.sh"))
            .arg("start")
            .arg(&self.dir)
            .arg(self.port.to_string())
            .arg("unused")
            .arg(&self.database));
    }

    /// A hot standby of this cluster (pg_basebackup -R), forwarding to `bootstrap` once promoted.
    pub fn start_standby(&self, bootstrap: &str) -> Cluster {
        let standby = Cluster { dir: scratch_dir("pg-standby"), port: free_port(), database: self.database.clone() };
        std::fs::create_dir_all(&standby.dir).expect("standby dir");
        run(Command::new("chown").arg("postgres:").arg(&standby.dir));
        run(Command::new("chmod").arg("700").arg(&standby.dir));
        let bin = pg_bin();
        let as_postgres = |cmd: String| {
            run(Command::new("su").args(["postgres", "-s", "/bin/bash", "-c", &cmd]));
        };
        // A fast checkpoint to start from: the default spreads it over most of checkpoint_timeout
        // (99 s of a test's 102).
        as_postgres(format!(
            "{bin}/pg_basebackup -h 127.0.0.1 -p {} -U postgres -D '{}' -R -X stream -c fast",
            self.port,
            standby.dir.display()
        ));
        let conf = standby.dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("standby postgresql.conf");
        text.push_str(&format!(
            "\nport = {}\nunix_socket_directories = '{}'\npg_outbox.kafka_bootstrap_servers = '{bootstrap}'\nhot_standby = on\n",
            standby.port,
            standby.dir.display()
        ));
        std::fs::write(&conf, text).expect("write standby postgresql.conf");
        let _ = std::fs::remove_file(standby.dir.join("postgres.log"));
        let start = Command::new("su")
            .args([
                "postgres",
                "-s",
                "/bin/bash",
                "-c",
                &format!("{bin}/pg_ctl -D '{0}' -l '{0}/postgres.log' -w -t 120 start", standby.dir.display()),
            ])
            .output()
            .expect("run pg_ctl");
        // pg_ctl itself says little: the server's log says why a standby did not come up.
        assert!(
            start.status.success(),
            "the standby did not start: {}{}\n--- its log:\n{}",
            String::from_utf8_lossy(&start.stdout),
            String::from_utf8_lossy(&start.stderr),
            standby.log()
        );
        standby
    }

    pub fn promote(&self) {
        run(Command::new("su").args([
            "postgres",
            "-s",
            "/bin/bash",
            "-c",
            &format!("/usr/lib/postgresql/15/bin/pg_ctl -D '{}' -w promote", self.dir.display()),
        ]));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// Appends settings to postgresql.conf and reloads (SIGHUP).
    pub fn reconfigure(&self, conf: &str) {
        let path = self.dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("read postgresql.conf");
        text.push('\n');
        text.push_str(conf);
        text.push('\n');
        std::fs::write(&path, text).expect("write postgresql.conf");
        self.client().batch_execute("SELECT pg_reload_conf()").expect("reload");
    }

    /// The pid of the running pg_outbox worker of `database`, waiting for it to appear.
    pub fn worker_pid(&self, timeout: Duration) -> Option<i32> {
        self.worker_pid_of(&self.database, timeout)
    }

    pub fn worker_pid_of(&self, database: &str, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let mut client = self.client_for("postgres");
        loop {
            let row = client
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_outbox worker' AND datname = $1",
                    &[&database],
                )
                .expect("pg_stat_activity");
            if let Some(row) = row {
                return Some(row.get(0));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until no committed message is pending (or the timeout passes).
    pub fn wait_until_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut client = self.client();
        loop {
            let pending: i64 =
                client.query_one("SELECT count(*) FROM outbox.pending_messages", &[]).expect("pending").get(0);
            if pending == 0 {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script("pg.sh")).arg("stop").arg(&self.dir).arg("immediate").output();
        if std::env::var_os("PG_OUTBOX_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
    /// Broker (or producer) timestamp in ms.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.payload.as_deref().unwrap_or(b"null")).expect("payload is JSON")
    }

    pub fn message_id(&self) -> &str {
        self.headers.get("pg_outbox_message_id").map(String::as_str).unwrap_or("")
    }
}

pub fn consumer(bootstrap: &str) -> BaseConsumer {
    consumer_with(bootstrap, &[])
}

/// Creates `topics` with three partitions (an existing one is left as it is). `replication` -1
/// takes the broker's default; `config` sets topic properties (e.g. message.timestamp.type).
/// Returns the topics the broker would not create, with its reason.
pub fn create_topics(
    bootstrap: &str,
    topics: &[&str],
    replication: i32,
    config: &[(&str, &str)],
) -> Vec<(String, RDKafkaErrorCode)> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("admin client");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| config.iter().fold(NewTopic::new(t, 3, TopicReplication::Fixed(replication)), |n, (k, v)| n.set(k, v)))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let results = runtime.block_on(admin.create_topics(&new, &AdminOptions::new())).expect("create topics");
    results
        .into_iter()
        .filter_map(Result::err)
        .filter(|(_, code)| *code != RDKafkaErrorCode::TopicAlreadyExists)
        .collect()
}

/// A consumer with extra librdkafka properties (e.g. TLS settings).
pub fn consumer_with(bootstrap: &str, properties: &[(&str, &str)]) -> BaseConsumer {
    let mut config = ClientConfig::new();
    for (k, v) in properties {
        config.set(*k, *v);
    }
    config
        .set("bootstrap.servers", bootstrap)
        // If a restarted broker reports our position out of range, re-read rather than skip
        // (readers drop offsets they already saw).
        .set("auto.offset.reset", "earliest")
        .set("group.id", unique("pg-outbox-test"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "20")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .expect("create consumer")
}

/// Reads `topic` from the beginning until `expected` records arrived, no more come for
/// `settle`, or `timeout` passes. Partitions are assigned directly (no group rebalance wait).
pub fn read_topic(bootstrap: &str, topic: &str, expected: usize, timeout: Duration) -> Vec<Record> {
    read_topic_settled(bootstrap, topic, expected, timeout, Duration::from_millis(500))
}

pub fn read_topic_settled(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<Record> {
    read_topic_with(bootstrap, &[], topic, expected, timeout, settle)
}

pub fn read_topic_with(
    bootstrap: &str,
    properties: &[(&str, &str)],
    topic: &str,
    expected: usize,
    timeout: Duration,
    settle: Duration,
) -> Vec<Record> {
    let consumer = consumer_with(bootstrap, properties);
    let deadline = Instant::now() + timeout;
    // The topic may not exist yet: wait for its metadata.
    let partitions = loop {
        let found = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(2))
            .ok()
            .and_then(|m| {
                m.topics().iter().find(|t| t.name() == topic && t.error().is_none()).map(|t| t.partitions().len())
            })
            .filter(|&n| n > 0);
        if let Some(n) = found {
            break n;
        }
        if Instant::now() > deadline {
            return Vec::new();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut records = Vec::new();
    let mut seen_offsets = HashSet::new();
    let mut last_arrival = Instant::now();
    while Instant::now() < deadline {
        if records.len() >= expected && last_arrival.elapsed() >= settle {
            break;
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            last_arrival = Instant::now();
            if !seen_offsets.insert((m.partition(), m.offset())) {
                continue;
            }
            let mut headers = HashMap::new();
            if let Some(hs) = m.headers() {
                for h in hs.iter() {
                    headers
                        .insert(h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned());
                }
            }
            records.push(Record {
                topic: m.topic().to_string(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                payload: m.payload().map(<[u8]>::to_vec),
                headers,
                timestamp_ms: m.timestamp().to_millis(),
            });
        }
    }
    records
}

/// The payloads of `records` as text, in order.
pub fn payloads(records: &[Record]) -> Vec<String> {
    records.iter().map(|r| String::from_utf8_lossy(r.payload.as_deref().unwrap_or_default()).into_owned()).collect()
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SQLSTATE of a failed statement.
pub fn sqlstate(err: &postgres::Error) -> String {
    err.code().map(|c| c.code().to_string()).unwrap_or_else(|| format!("no SQLSTATE: {err}"))
}
