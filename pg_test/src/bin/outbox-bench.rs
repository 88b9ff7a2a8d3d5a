//! `make bench`: measures pg_outbox against a bare INSERT, the broker's raw produce rate, and the
//! hand-made outbox most services have (scheme 2: a plain table plus a relay that polls it with
//! FOR UPDATE SKIP LOCKED), on a local Postgres 15 and Apache Kafka. Writes
//! target/bench/results.json and docs/BENCHMARKS.md. Sizes come from the environment (BENCH_*),
//! so a quick run and the full one use the same code.
use std::collections::BTreeMap;
use std::io::Read;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pg_outbox_tests::{consumer, create_topics, free_port, BrokerKind, Cluster, PrivateBroker};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

const PGBENCH: &str = "/usr/lib/postgresql/15/bin/pgbench";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

fn step(text: &str) {
    println!("==> {text}");
}

/// The 300-byte order event every benchmark sends.
fn payload(i: u64) -> String {
    let body = format!("{{\"order_id\": {i}, \"customer\": \"c{}\", \"total\": 99.50, \"pad\": \"", i % 1000);
    format!("{body}{}\"}}", "x".repeat(300 - body.len() - 2))
}

/// What a topic holds: record count, and the broker's append time of its first and last record
/// (seconds).
struct TopicSpan {
    count: i64,
    first: f64,
    last: f64,
}

impl TopicSpan {
    fn read(bootstrap: &str, topic: &str) -> TopicSpan {
        let c = consumer(bootstrap);
        let metadata = c.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("topic metadata");
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        let mut span = TopicSpan { count: 0, first: f64::MAX, last: 0.0 };
        for p in partitions {
            let (low, high) = c.fetch_watermarks(topic, p, Duration::from_secs(10)).expect("watermarks");
            if high <= low {
                continue;
            }
            span.count += high - low;
            for offset in [low, high - 1] {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(topic, p, Offset::Offset(offset)).expect("partition");
                c.assign(&tpl).expect("assign");
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                        let t = m.timestamp().to_millis().unwrap_or_default() as f64 / 1000.0;
                        span.first = span.first.min(t);
                        span.last = span.last.max(t);
                        break;
                    }
                }
            }
        }
        span
    }

    /// Messages per second from the first append to the last.
    fn rate(&self) -> f64 {
        self.count as f64 / (self.last - self.first).max(0.001)
    }
}

/// Waits until `topic` holds `n` records; returns its span.
fn wait_for_topic(bootstrap: &str, topic: &str, n: i64, timeout: Duration) -> TopicSpan {
    let c = consumer(bootstrap);
    let deadline = Instant::now() + timeout;
    loop {
        let count: i64 = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .ok()
            .map(|m| {
                m.topics()
                    .iter()
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .filter_map(|p| c.fetch_watermarks(topic, p, Duration::from_secs(10)).ok())
                    .map(|(low, high)| high - low)
                    .sum()
            })
            .unwrap_or(0);
        if count >= n || Instant::now() > deadline {
            assert!(count >= n, "{topic}: only {count} of {n} records arrived");
            return TopicSpan::read(bootstrap, topic);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Bench {
    cluster: Cluster,
    broker: PrivateBroker,
    results: BTreeMap<String, f64>,
    notes: Vec<String>,
    batch_size: usize,
    linger: Option<u32>,
}

impl Bench {
    /// pgbench against the bench database, running `script` with `args`.
    fn pgbench_command(&self, script: &str, args: &[&str]) -> Command {
        let file = self.cluster.dir.parent().expect("dir").join(format!("bench-{}.sql", std::process::id()));
        std::fs::write(&file, script).expect("write pgbench script");
        let mut command = Command::new(PGBENCH);
        command
            .args(["-n", "-M", "prepared", "-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.cluster.port.to_string())
            .args(args)
            .arg("-f")
            .arg(&file)
            .arg("shop");
        command
    }

    fn pgbench(&self, script: &str, args: &[&str]) -> String {
        let out = self.pgbench_command(script, args).output().expect("run pgbench");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "pgbench failed: {text}");
        text
    }

    /// Runs pgbench until `done` holds (checked every 200 ms), then stops it with SIGTERM and
    /// returns what it printed meanwhile (its progress lines; there is no summary). Not SIGINT:
    /// a command a non-interactive shell starts in the background ignores SIGINT, and so does
    /// everything it runs (`make bench &` ran the sustained section to pgbench's own count,
    /// twice the messages asked for).
    fn pgbench_until(&self, script: &str, args: &[&str], done: impl Fn() -> bool) -> String {
        let mut child = self
            .pgbench_command(script, args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run pgbench");
        // Read on threads of their own, so that a full pipe never stalls pgbench.
        fn read_all(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        }
        let stdout = read_all(child.stdout.take().expect("piped stdout"));
        let stderr = read_all(child.stderr.take().expect("piped stderr"));
        loop {
            if let Some(status) = child.try_wait().expect("wait for pgbench") {
                let text = format!("{}{}", stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default());
                panic!("pgbench ended ({status}) before the run was done: {text}");
            }
            if done() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let _ = child.wait();
        format!("{}{}", stdout.join().unwrap_or_default(), stderr.join().unwrap_or_default())
    }

    fn tps(output: &str) -> f64 {
        output
            .lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    fn sql(&self, sql: &str) {
        self.cluster.client().batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn scalar_f64(&self, sql: &str) -> f64 {
        self.cluster.client().query_one(sql, &[]).map(|r| r.get::<_, f64>(0)).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn wait_for_broker_state(&self, condition: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let sql = format!("SELECT count(*)::float8 FROM outbox.worker_status WHERE {condition}");
        while self.scalar_f64(&sql) < 1.0 {
            assert!(Instant::now() < deadline, "the worker never showed {condition}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn delivered(&self, topic: &str) -> i64 {
        self.cluster
            .client()
            .query_opt("SELECT delivered_total FROM outbox.topic_stats WHERE topic = $1", &[&topic])
            .ok()
            .flatten()
            .map_or(0, |r| r.get(0))
    }

    /// Enqueue overhead (section 1): an order INSERT alone, plus enqueue_message, plus a plain
    /// INSERT of the same payload; alternating rounds, median of each.
    fn enqueue_overhead(&mut self) {
        let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
        let seconds = env_usize("BENCH_PGBENCH_SECONDS", 15).to_string();
        let clients = env_usize("BENCH_CLIENTS", 8).to_string();
        let pad = "x".repeat(230);
        let order =
            "\\set c random(1, 100000)\nBEGIN;\nINSERT INTO bench_orders (customer, total) VALUES (:c, 99.50);\n"
                .to_string();
        let scripts = [
            ("tps_order", format!("{order}COMMIT;\n")),
            (
                "tps_enqueue",
                format!("{order}SELECT outbox.enqueue_message('bench.orders', jsonb_build_object('order_id', :c::int, 'total', 99.50, 'pad', '{pad}'), key => :c::text);\nCOMMIT;\n"),
            ),
            (
                "tps_plain_insert",
                format!("{order}INSERT INTO bench_plain_outbox (topic, key, payload) VALUES ('bench.orders', :c::text, jsonb_build_object('order_id', :c::int, 'total', 99.50, 'pad', '{pad}'));\nCOMMIT;\n"),
            ),
        ];
        let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        // Round 0 is not counted: a broker that has just started compiles its produce path in
        // its first seconds (enqueue rounds 1 and 2 ran at 7,100-7,300 tps, round 3 at 8,800),
        // and each script's table and plans warm up too.
        for round in 0..=rounds {
            for (name, script) in &scripts {
                let which =
                    if round == 0 { "warm-up, not counted".to_string() } else { format!("round {round}/{rounds}") };
                step(&format!("enqueue overhead, {which}: {name} ({seconds} s, {clients} clients)"));
                let tps = Bench::tps(&self.pgbench(script, &["-c", &clients, "-j", "2", "-T", &seconds]));
                println!("    {tps:.0} tps");
                if round > 0 {
                    samples.entry(name).or_default().push(tps);
                }
            }
        }
        for (name, v) in samples {
            self.results.insert(name.into(), median(v));
        }
        let r = &self.results;
        let (a, b, c) = (r["tps_order"], r["tps_enqueue"], r["tps_plain_insert"]);
        self.results.insert("enqueue_vs_plain_insert".into(), b / c);
        self.results.insert("enqueue_vs_order".into(), b / a);
    }

    /// Section 2, drain: N pending messages over 16 keys, forwarded from first to last ack (the
    /// broker's append times of the first and last record on the topic). Like section 1, in
    /// alternating rounds (raw producer, pg_outbox, relay), median of each: one pair measured once
    /// put the same code at 0.61 and 0.92 of the raw producer in two runs, the raw rate alone
    /// swinging by 60 % from run to run with the broker's state.
    fn drain(&mut self) {
        let n = env_usize("BENCH_DRAIN_MESSAGES", 1_000_000);
        let rounds = env_usize("BENCH_DRAIN_ROUNDS", 3).max(1);
        let bootstrap = self.broker.bootstrap();
        let timeout = Duration::from_secs(3600);
        // The broker's JVM drains a third slower until it has compiled its produce path: whoever
        // went first paid for it (ours ran at 0.66-0.70 of the raw producer after a restarted
        // broker, 1.23 when the raw producer met a broker just started).
        step(&format!("drain: warm-up, not counted: raw rdkafka producer, {n} messages"));
        raw_produce(&bootstrap, "bench.drain_warmup", n, true);
        wait_for_topic(&bootstrap, "bench.drain_warmup", n as i64, timeout);
        let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for round in 1..=rounds {
            let topic = |what: &str| format!("bench.{what}.{round}");
            let names = ["raw", "raw_headerless", "drain", "relay"].map(topic);
            let refused = create_topics(
                &bootstrap,
                &names.iter().map(String::as_str).collect::<Vec<_>>(),
                1,
                &[("message.timestamp.type", "LogAppendTime")],
            );
            assert!(refused.is_empty(), "the broker refused bench topics: {refused:?}");
            let [raw_topic, headerless_topic, drain_topic, relay_topic] = &names;
            let mut sample = |key: &'static str, rate: f64| {
                println!("    {rate:.0} msg/s");
                samples.entry(key).or_default().push(rate);
            };

            step(&format!(
                "drain, round {round}/{rounds}: raw rdkafka producer, {n} messages of 300 bytes over 16 keys, each with a message id header"
            ));
            raw_produce(&bootstrap, raw_topic, n, true);
            sample("raw_broker_msgs_per_s", wait_for_topic(&bootstrap, raw_topic, n as i64, timeout).rate());
            step(&format!(
                "drain, round {round}/{rounds}: raw rdkafka producer, the same {n} messages without the header"
            ));
            raw_produce(&bootstrap, headerless_topic, n, false);
            sample(
                "raw_broker_headerless_msgs_per_s",
                wait_for_topic(&bootstrap, headerless_topic, n as i64, timeout).rate(),
            );

            // The backlog is written while the worker points at a port nobody listens on, not with
            // the broker stopped: a restarted broker's JVM drains cold, while the raw producer and
            // the relay meet it warm. The gate message shows the worker has taken the setting.
            step(&format!(
                "drain, round {round}/{rounds}: pg_outbox, {n} pending messages (written while the worker points at a port nobody listens on)"
            ));
            let nowhere = format!("127.0.0.1:{}", free_port());
            self.wait_for_broker_state("broker_state <> 'unavailable'");
            self.cluster.reconfigure(&format!("pg_outbox.kafka_bootstrap_servers = '{nowhere}'"));
            self.sql("SELECT outbox.enqueue_message('bench.drain_gate', '{}'::jsonb)");
            self.wait_for_broker_state("broker_state = 'unavailable'");
            let chunk = 100_000.min(n);
            let mut done = 0;
            while done < n {
                let this = chunk.min(n - done);
                self.sql(&format!(
                    "SELECT count(outbox.enqueue_message('{drain_topic}', jsonb_build_object('order_id', i, 'total', 99.50, 'pad', repeat('x', 240)), key => (i % 16)::text)) FROM generate_series({}, {}) i",
                    done + 1,
                    done + this
                ));
                done += this;
            }
            self.cluster.reconfigure(&format!("pg_outbox.kafka_bootstrap_servers = '{bootstrap}'"));
            sample("drain_msgs_per_s", wait_for_topic(&bootstrap, drain_topic, n as i64, timeout).rate());

            step(&format!(
                "drain, round {round}/{rounds}: scheme-2 relay (plain table, FOR UPDATE SKIP LOCKED, batches of {})",
                self.batch_size
            ));
            self.sql(&format!(
                "TRUNCATE bench_relay; INSERT INTO bench_relay (key, payload) SELECT (i % 16)::text, jsonb_build_object('order_id', i, 'total', 99.50, 'pad', repeat('x', 240)) FROM generate_series(1, {n}) i"
            ));
            Relay::new(&self.cluster.dsn("shop"), &bootstrap, "bench_relay", relay_topic, self.batch_size).drain(n);
            sample("relay_msgs_per_s", wait_for_topic(&bootstrap, relay_topic, n as i64, timeout).rate());
        }
        let rounds_of = |key: &str| samples[key].iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ");
        self.notes.push(format!(
            "Drain, msg/s by round: raw producer {}; without the header {}; pg_outbox {}; relay {}. The keys are the medians.",
            rounds_of("raw_broker_msgs_per_s"),
            rounds_of("raw_broker_headerless_msgs_per_s"),
            rounds_of("drain_msgs_per_s"),
            rounds_of("relay_msgs_per_s"),
        ));
        for (key, rates) in samples {
            self.results.insert(key.into(), median(rates));
        }
        let r = &self.results;
        let (ours, raw, headerless, relay) = (
            r["drain_msgs_per_s"],
            r["raw_broker_msgs_per_s"],
            r["raw_broker_headerless_msgs_per_s"],
            r["relay_msgs_per_s"],
        );
        self.results.insert("drain_vs_raw".into(), ours / raw);
        self.results.insert("drain_vs_raw_headerless".into(), ours / headerless);
        self.results.insert("drain_vs_relay".into(), ours / relay);
    }
    /// 3. Latency at a steady rate of one-message transactions: commit to consumer.
    fn latency(&mut self) {
        let rate = env_usize("BENCH_LATENCY_TPS", 1000).to_string();
        let seconds = env_usize("BENCH_LATENCY_SECONDS", 30);
        let pad = "x".repeat(230);
        step(&format!("latency: pg_outbox at {rate} tx/s for {seconds} s (after 5 s unmeasured)"));
        // The timestamp is taken by the last statement before COMMIT: the figure includes the
        // commit itself (an fsync with synchronous_commit on).
        let script = format!("\\set c random(1, 100000)\nBEGIN;\nINSERT INTO bench_orders (customer, total) VALUES (:c, 99.50);\nSELECT outbox.enqueue_message('bench.latency', jsonb_build_object('t', extract(epoch FROM clock_timestamp()), 'pad', '{pad}'), key => :c::text);\nCOMMIT;\n");
        // Warm-up, unmeasured: a broker that has just started is still compiling its hot paths.
        self.pgbench(&script, &["-c", "4", "-j", "2", "-R", &rate, "-T", "5"]);
        self.settle_writes();
        let probe = LatencyProbe::start(&self.broker.bootstrap(), "bench.latency");
        // pgbench logs each transaction's own duration: the database's tail at this rate, before
        // anything is forwarded.
        let log_prefix = self.cluster.dir.parent().expect("dir").join(format!("latency-tx-{}", std::process::id()));
        let log_prefix_arg = format!("--log-prefix={}", log_prefix.display());
        self.pgbench(&script, &["-c", "4", "-j", "2", "-R", &rate, "-T", &seconds.to_string(), "-l", &log_prefix_arg]);
        std::thread::sleep(Duration::from_secs(2));
        let l = probe.finish();
        println!(
            "    p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (to the broker's append: p99 {:.0} ms)",
            l.p50, l.p99, l.max, l.append_p99
        );
        self.results.insert("latency_p50_ms".into(), l.p50);
        self.results.insert("latency_p99_ms".into(), l.p99);
        self.results.insert("latency_max_ms".into(), l.max);
        self.results.insert("latency_append_p99_ms".into(), l.append_p99);
        let mut transactions = pgbench_logged_ms(&log_prefix);
        transactions.sort_by(f64::total_cmp);
        let (tx_p50, tx_p99) = (percentile(&transactions, 0.5), percentile(&transactions, 0.99));
        println!("    the transactions themselves (pgbench's log): p50 {tx_p50:.1} ms, p99 {tx_p99:.1} ms");
        self.results.insert("latency_tx_p50_ms".into(), tx_p50);
        self.results.insert("latency_tx_p99_ms".into(), tx_p99);

        step(&format!("latency: raw rdkafka producer at {rate} msg/s for {seconds} s (after 5 s unmeasured)"));
        let bootstrap = self.broker.bootstrap();
        let rate_per_s: f64 = rate.parse().unwrap_or(1000.0);
        // One producer for both runs: a new one holds its first messages until it has the
        // topic's metadata (about 200 ms here), which alone made a p99.
        let producer = PacedProducer::new(&bootstrap);
        producer.run("bench.raw_latency", rate_per_s, Duration::from_secs(5));
        let probe = LatencyProbe::start(&bootstrap, "bench.raw_latency");
        producer.run("bench.raw_latency", rate_per_s, Duration::from_secs(seconds as u64));
        std::thread::sleep(Duration::from_secs(2));
        let raw = probe.finish();
        println!("    p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms", raw.p50, raw.p99, raw.max);
        self.results.insert("raw_broker_latency_p50_ms".into(), raw.p50);
        self.results.insert("raw_broker_latency_p99_ms".into(), raw.p99);

        step(&format!("latency: scheme-2 relay polling every 100 ms, at {rate} tx/s for {seconds} s"));
        self.settle_writes();
        let probe = LatencyProbe::start(&self.broker.bootstrap(), "bench.relay_latency");
        let stop = Arc::new(AtomicBool::new(false));
        let relay = {
            let (dsn, bootstrap, stop, batch) =
                (self.cluster.dsn("shop"), self.broker.bootstrap(), stop.clone(), self.batch_size);
            std::thread::spawn(move || {
                Relay::new(&dsn, &bootstrap, "bench_relay_latency", "bench.relay_latency", batch).poll(&stop)
            })
        };
        self.pgbench(
            &format!("\\set c random(1, 100000)\nBEGIN;\nINSERT INTO bench_orders (customer, total) VALUES (:c, 99.50);\nINSERT INTO bench_relay_latency (key, payload) VALUES (:c::text, jsonb_build_object('t', extract(epoch FROM clock_timestamp()), 'pad', '{pad}'));\nCOMMIT;\n"),
            &["-c", "4", "-j", "2", "-R", &rate, "-T", &seconds.to_string()],
        );
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
        let _ = relay.join();
        let relay_p99 = probe.finish().p99;
        println!("    relay p99 {relay_p99:.1} ms");
        self.results.insert("relay_latency_p99_ms".into(), relay_p99);
    }

    /// Runs scripts/debezium.sh with `args`; `keep_slot` keeps the replication slot across stops.
    fn debezium_sh(&self, args: &[&str], keep_slot: bool) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/debezium.sh");
        let out = Command::new(script)
            .args(args)
            .env("DEBEZIUM_KEEP_SLOT", if keep_slot { "1" } else { "0" })
            .output()
            .expect("run scripts/debezium.sh");
        assert!(
            out.status.success(),
            "debezium.sh {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start_debezium(&self, dir: &str, poll_ms: Option<&str>, keep_slot: bool) {
        let (bootstrap, port) = (self.broker.bootstrap(), self.cluster.port.to_string());
        let mut args = vec!["start", dir, &bootstrap, "127.0.0.1", &port, "shop"];
        args.extend(poll_ms);
        self.debezium_sh(&args, keep_slot);
    }

    /// Section 6, the peer users would pick instead: Debezium's Postgres connector with its Outbox
    /// Event Router on a standalone Kafka Connect worker, reading a Debezium-style outbox table
    /// written in the same order transactions, producing with the same acks.
    fn debezium(&mut self) {
        let n = env_usize("BENCH_DRAIN_MESSAGES", 1_000_000);
        let rate = env_usize("BENCH_LATENCY_TPS", 1000).to_string();
        let seconds = env_usize("BENCH_LATENCY_SECONDS", 30).to_string();
        let bootstrap = self.broker.bootstrap();
        let dir = self.cluster.dir.parent().expect("dir").join(format!("debezium-{}", std::process::id()));
        let dir = dir.to_string_lossy().to_string();
        step("debezium: fetching Debezium 3.6.1.Final and Kafka Connect from Maven Central (cached)");
        self.debezium_sh(&["fetch"], false);
        self.sql(
            "CREATE TABLE IF NOT EXISTS outbox_event (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                 aggregatetype text NOT NULL, aggregateid text NOT NULL, type text NOT NULL, payload jsonb)",
        );

        step(&format!("drain: Debezium, {n} rows committed while its worker was stopped (slot kept)"));
        self.start_debezium(&dir, None, true);
        self.debezium_sh(&["stop", &dir], true);
        let chunk = 100_000.min(n);
        let mut done = 0;
        while done < n {
            let this = chunk.min(n - done);
            self.sql(&format!(
                "INSERT INTO outbox_event (aggregatetype, aggregateid, type, payload)
                 SELECT 'drain', (i % 16)::text, 'OrderCreated', jsonb_build_object('order_id', i, 'total', 99.50, 'pad', repeat('x', 240))
                 FROM generate_series({}, {}) i",
                done + 1,
                done + this
            ));
            done += this;
        }
        self.start_debezium(&dir, None, true);
        let dbz = wait_for_topic(&bootstrap, "outbox.event.drain", n as i64, Duration::from_secs(3600)).rate();
        self.debezium_sh(&["stop", &dir], false);
        println!("    {dbz:.0} msg/s");
        self.results.insert("debezium_msgs_per_s".into(), dbz);
        if let Some(ours) = self.results.get("drain_msgs_per_s").copied() {
            self.results.insert("drain_vs_debezium".into(), ours / dbz);
        }

        let pad = "x".repeat(230);
        for (poll, topic, key) in
            [(None, "latency", "debezium_latency"), (Some("10"), "latency_tuned", "debezium_tuned_latency")]
        {
            let what =
                poll.map_or("its default poll.interval.ms (500)".to_string(), |p| format!("poll.interval.ms={p}"));
            step(&format!("latency: Debezium with {what}, at {rate} tx/s for {seconds} s"));
            // A fresh slot: nothing of the drain is replayed.
            let _ = std::fs::remove_dir_all(&dir);
            self.start_debezium(&dir, poll, false);
            self.settle_writes();
            let probe = LatencyProbe::start(&bootstrap, &format!("outbox.event.{topic}"));
            self.pgbench(
                &format!("\\set c random(1, 100000)\nBEGIN;\nINSERT INTO bench_orders (customer, total) VALUES (:c, 99.50);\nINSERT INTO outbox_event (aggregatetype, aggregateid, type, payload) VALUES ('{topic}', :c::text, 'OrderCreated', jsonb_build_object('t', extract(epoch FROM clock_timestamp()), 'pad', '{pad}'));\nCOMMIT;\n"),
                &["-c", "4", "-j", "2", "-R", &rate, "-T", &seconds],
            );
            std::thread::sleep(Duration::from_secs(3));
            let l = probe.finish();
            self.debezium_sh(&["stop", &dir], false);
            println!(
                "    p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (to the broker's append: p99 {:.0} ms)",
                l.p50, l.p99, l.max, l.append_p99
            );
            self.results.insert(format!("{key}_p50_ms"), l.p50);
            self.results.insert(format!("{key}_p99_ms"), l.p99);
            self.results.insert(format!("{key}_max_ms"), l.max);
            self.results.insert(format!("{key}_append_p99_ms"), l.append_p99);
        }
        if let (Some(ours), Some(tuned)) =
            (self.results.get("latency_p99_ms").copied(), self.results.get("debezium_tuned_latency_p99_ms").copied())
        {
            self.results.insert("latency_p99_vs_debezium_tuned".into(), ours / tuned);
        }
    }

    /// Before a latency run: the previous section's writes (a million-row drain) are checkpointed
    /// and vacuumed, so that its writeback does not land in the next peer's commit latencies.
    fn settle_writes(&self) {
        self.sql("VACUUM");
        self.sql("CHECKPOINT");
    }

    fn outbox_bytes(&self) -> f64 {
        self.scalar_f64(OUTBOX_BYTES)
    }

    /// The worker's own memory (kB): `RssAnon`, its private heap. VmRSS would also count the pages
    /// of shared_buffers it has touched, which grow as it reads more of the outbox, not a leak.
    fn worker_memory_kb(&self, field: &str) -> f64 {
        let pid = self.cluster.worker_pid(Duration::from_secs(10)).unwrap_or(0);
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// 4. Sustained load: enqueue as fast as the machine takes while the worker forwards.
    fn sustained(&mut self) {
        let n = env_usize("BENCH_SUSTAINED_MESSAGES", 5_000_000);
        let clients = env_usize("BENCH_CLIENTS", 8);
        let pad = "x".repeat(230);
        step(&format!("sustained: {n} messages enqueued by {clients} clients as fast as possible"));
        let script = format!("\\set c random(1, 100000)\nBEGIN;\nINSERT INTO bench_orders (customer, total) VALUES (:c, 99.50);\nSELECT outbox.enqueue_message('bench.sustained', jsonb_build_object('order_id', :c::int, 'pad', '{pad}'), key => :c::text);\nCOMMIT;\n");
        let warm = 100_000.min(n / 10).max(1);
        // Storage is sampled every second: with rotation it is a sawtooth (a slot fills, the one
        // before is truncated), so one sample says where in a rotation it fell, not whether
        // storage grows. Growth compares the peaks of equal windows: the first `warm` messages
        // and the time the last `warm` took.
        let stop = Arc::new(AtomicBool::new(false));
        let max_backlog = Arc::new(AtomicU64::new(0));
        let sizes: Arc<std::sync::Mutex<Vec<(Instant, f64)>>> = Arc::default();
        let sampler = {
            let (dsn, stop, max_backlog, sizes) =
                (self.cluster.dsn("shop"), stop.clone(), max_backlog.clone(), sizes.clone());
            std::thread::spawn(move || {
                let mut db = postgres::Client::connect(&dsn, postgres::NoTls).expect("sampler");
                let mut tick = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(row) = db.query_one(OUTBOX_BYTES, &[]) {
                        sizes.lock().expect("sizes").push((Instant::now(), row.get::<_, f64>(0)));
                    }
                    if tick.is_multiple_of(2) {
                        if let Ok(row) = db.query_one("SELECT count(*) FROM outbox.pending_messages", &[]) {
                            max_backlog.fetch_max(row.get::<_, i64>(0) as u64, Ordering::Relaxed);
                        }
                    }
                    tick += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        };
        let warm_start = Instant::now();
        self.pgbench(&script, &["-c", &clients.to_string(), "-j", "2", "-t", &(warm / clients).to_string()]);
        let warm_end = Instant::now();
        let storage_start_sample = self.outbox_bytes();
        let (rss_start, vmrss_start) = (self.worker_memory_kb("RssAnon:"), self.worker_memory_kb("VmRSS:"));
        // Every client runs to the end: with a count per client (-t), clients finish one after
        // another and the last minute measures fewer of them (the tail of the run fell by a
        // third that way). So each gets more than its share and pgbench is stopped once the
        // orders table has grown by the rest of the messages.
        let orders_before = self.scalar_f64("SELECT last_value::float8 FROM bench_orders_id_seq");
        let out = self.pgbench_until(
            &script,
            &["-c", &clients.to_string(), "-j", "2", "-P", "10", "-t", &(2 * (n - warm) / clients).to_string()],
            || {
                self.scalar_f64("SELECT last_value::float8 FROM bench_orders_id_seq") - orders_before
                    >= (n - warm) as f64
            },
        );
        let main_end = Instant::now();
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        let peak = |from: Instant, to: Instant| {
            sizes.lock().expect("sizes").iter().filter(|(t, _)| *t >= from && *t <= to).map(|s| s.1).fold(0.0, f64::max)
        };
        let storage_start = peak(warm_start, warm_end).max(storage_start_sample);
        let storage_end = peak(main_end - (warm_end - warm_start), main_end);
        let progress: Vec<f64> = out
            .lines()
            // "progress: 10.0 s, 6543.2 tps, lat 1.222 ms stddev 0.456, 0 failed"
            .filter(|l| l.starts_with("progress:"))
            .filter_map(|l| l.split(',').nth(1)?.split_whitespace().next()?.parse().ok())
            .collect();
        // The whole series, so that a dip can be placed in time (a checkpoint, the broker's GC).
        println!("    tps every 10 s: {}", progress.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(" "));
        let minute = 6.min(progress.len() / 2).max(1);
        let first: f64 = progress.iter().take(minute).sum::<f64>() / minute as f64;
        let last: f64 = progress.iter().rev().take(minute).sum::<f64>() / minute as f64;
        let (_, _) = wait_delivered(|| self.delivered("bench.sustained"), n as i64, Duration::from_secs(3600));
        // The last few transactions pgbench ran past the count, delivered too.
        while self.scalar_f64("SELECT count(*)::float8 FROM outbox.pending_messages WHERE topic = 'bench.sustained'")
            > 0.0
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        // The per-topic counters are written at most once a second: read them after the pause.
        std::thread::sleep(Duration::from_secs(5));
        let n = self.delivered("bench.sustained") as usize;
        let storage_end_sample = self.outbox_bytes();
        let (rss_end, vmrss_end) = (self.worker_memory_kb("RssAnon:"), self.worker_memory_kb("VmRSS:"));
        println!(
            "    tps first {first:.0} / last {last:.0}; storage peak {:.1} MB in the first {warm} messages -> {:.1} MB in the last (samples {:.1} MB after the first, {:.1} MB once drained); worker private memory {rss_start:.0} kB -> {rss_end:.0} kB (VmRSS with shared buffers {vmrss_start:.0} -> {vmrss_end:.0}); max backlog {}",
            storage_start / 1e6,
            storage_end / 1e6,
            storage_start_sample / 1e6,
            storage_end_sample / 1e6,
            max_backlog.load(Ordering::Relaxed)
        );
        self.results.insert("sustained_messages".into(), n as f64);
        self.results.insert("max_backlog".into(), max_backlog.load(Ordering::Relaxed) as f64);
        self.results.insert("storage_growth_ratio".into(), storage_end / storage_start.max(1.0));
        self.results.insert("tps_end_vs_start".into(), last / first.max(1.0));
        self.results.insert("worker_rss_growth_ratio".into(), rss_end / rss_start.max(1.0));
        self.results.insert("worker_rss_anon_kb_start".into(), rss_start);
        self.results.insert("worker_rss_anon_kb_end".into(), rss_end);
        self.results.insert("worker_vmrss_kb_end".into(), vmrss_end);
        self.results.insert("tps_sustained_first_minute".into(), first);
        self.results.insert("tps_sustained_last_minute".into(), last);
        self.results.insert("outbox_mb_peak_first_100k".into(), storage_start / 1e6);
        self.results.insert("outbox_mb_peak_last_100k".into(), storage_end / 1e6);
        self.results.insert("outbox_mb_after_first_100k".into(), storage_start_sample / 1e6);
        self.results.insert("outbox_mb_at_end".into(), storage_end_sample / 1e6);
    }

    /// Bloat resistance (section 5): the enqueue + forward rate while a REPEATABLE READ
    /// transaction elsewhere pins the xmin horizon, against the same run without it.
    fn xmin_pinned(&mut self) {
        let seconds = env_usize("BENCH_XMIN_SECONDS", 120);
        let clients = env_usize("BENCH_CLIENTS", 8).to_string();
        let pad = "x".repeat(230);
        let script = format!("\\set c random(1, 100000)\nBEGIN;\nINSERT INTO bench_orders (customer, total) VALUES (:c, 99.50);\nSELECT outbox.enqueue_message('bench.xmin', jsonb_build_object('order_id', :c::int, 'pad', '{pad}'), key => :c::text);\nCOMMIT;\n");
        let dead = |b: &Bench| {
            b.scalar_f64(
                "SELECT coalesce(sum(n_dead_tup), 0)::float8 FROM pg_stat_user_tables WHERE schemaname = 'outbox'",
            )
        };
        let mut rates = Vec::new();
        for pinned in [false, true] {
            step(&format!("xmin: enqueue + forward for {seconds} s, {}", if pinned { "xmin pinned" } else { "clean" }));
            let mut holder = self.cluster.client();
            if pinned {
                holder.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_class;").unwrap();
            }
            let (dead_before, size_before, delivered_before) =
                (dead(self), self.outbox_bytes(), self.delivered("bench.xmin"));
            let tps = Bench::tps(&self.pgbench(&script, &["-c", &clients, "-j", "2", "-T", &seconds.to_string()]));
            let forwarded = (self.delivered("bench.xmin") - delivered_before) as f64 / seconds as f64;
            let (dead_after, size_after) = (dead(self), self.outbox_bytes());
            if pinned {
                holder.batch_execute("COMMIT").unwrap();
            }
            println!(
                "    {tps:.0} tps, {forwarded:.0} msg/s forwarded; dead tuples {dead_before:.0} -> {dead_after:.0}; outbox {:.1} MB -> {:.1} MB",
                size_before / 1e6,
                size_after / 1e6
            );
            let key = if pinned { "pinned" } else { "clean" };
            self.results.insert(format!("xmin_{key}_tps"), tps);
            self.results.insert(format!("xmin_{key}_forwarded_per_s"), forwarded);
            self.results.insert(format!("xmin_{key}_dead_tuples_after"), dead_after);
            self.results.insert(format!("xmin_{key}_outbox_mb_after"), size_after / 1e6);
            rates.push(tps.min(forwarded.max(1.0)));
        }
        self.results.insert("xmin_pinned_vs_clean".into(), rates[1] / rates[0].max(1.0));
    }
}

/// Waits until `delivered()` reaches `n`; returns (first delivery, last delivery) in seconds.
fn wait_delivered(delivered: impl Fn() -> i64, n: i64, timeout: Duration) -> (f64, f64) {
    let deadline = Instant::now() + timeout;
    let start = delivered();
    let mut first = None;
    loop {
        let d = delivered();
        if d > start && first.is_none() {
            first = Some(now_s());
        }
        if d - start >= n || d >= n || Instant::now() > deadline {
            return (first.unwrap_or_else(now_s), now_s());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Acks {
    count: AtomicU64,
    errors: AtomicU64,
}

impl Acks {
    /// Waits until `sent` records are acknowledged or refused, and fails the bench on a refusal.
    fn wait_for(&self, sent: u64, who: &str) {
        while self.count.load(Ordering::Relaxed) + self.errors.load(Ordering::Relaxed) < sent {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(self.errors.load(Ordering::Relaxed), 0, "{who}'s messages were refused");
    }
}

struct AckCounter(Arc<Acks>);

impl ClientContext for AckCounter {}

impl ProducerContext for AckCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let acks = &self.0;
        if result.is_ok() {
            acks.count.fetch_add(1, Ordering::Relaxed);
        } else {
            acks.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn producer_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    // pg_outbox's producer defaults.
    c.set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "120000");
    c
}

/// The header pg_outbox puts on every record, with an id of the same shape (`<system id>-<database
/// oid>-<id>`). The raw producer and the relay send it too, so that all three deliver the same
/// records: any at-least-once relay's consumers need an id to drop redeliveries by.
fn message_id_header(id: u64) -> OwnedHeaders {
    let value = format!("7441234567890123456-16384-{id}");
    OwnedHeaders::new_with_capacity(1).insert(Header { key: "pg_outbox_message_id", value: Some(value.as_bytes()) })
}

/// The broker's limit: a standalone rdkafka producer with pg_outbox's settings, as fast as it goes.
/// Without `with_header` it sends lighter records than pg_outbox does (shown for reference).
fn raw_produce(bootstrap: &str, topic: &str, n: usize, with_header: bool) {
    let acks = Arc::new(Acks { count: AtomicU64::new(0), errors: AtomicU64::new(0) });
    let producer: ThreadedProducer<AckCounter> =
        producer_config(bootstrap).create_with_context(AckCounter(acks.clone())).expect("raw producer");
    for i in 0..n as u64 {
        let (key, body) = ((i % 16).to_string(), payload(i));
        let mut record = BaseRecord::to(topic).key(&key).payload(&body);
        if with_header {
            record = record.headers(message_id_header(i + 1));
        }
        send_when_queued(&producer, record);
    }
    acks.wait_for(n as u64, "the raw producer");
}

/// Hands `record` to librdkafka, waiting while its queue is full; any other refusal ends the bench.
fn send_when_queued<K: ToBytes + ?Sized, P: ToBytes + ?Sized>(
    producer: &ThreadedProducer<AckCounter>,
    mut record: BaseRecord<'_, K, P>,
) {
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => panic!("the producer refused a record: {e}"),
        }
    }
}

/// Sends `{"t": <now>, "pad": ...}` records (the latency section's payload) at a steady rate, each
/// handed to the broker at once (`linger.ms` 0, as pg_outbox's flush does), with random keys: the
/// broker's and the consumer's own share of a commit-to-consumer latency.
struct PacedProducer {
    producer: ThreadedProducer<AckCounter>,
    acks: Arc<Acks>,
}

impl PacedProducer {
    fn new(bootstrap: &str) -> PacedProducer {
        let acks = Arc::new(Acks { count: AtomicU64::new(0), errors: AtomicU64::new(0) });
        let producer = producer_config(bootstrap)
            .set("linger.ms", "0")
            .create_with_context(AckCounter(acks.clone()))
            .expect("paced producer");
        PacedProducer { producer, acks }
    }

    /// Sends at `rate` a second for `duration`, then waits for every acknowledgement.
    fn run(&self, topic: &str, rate: f64, duration: Duration) {
        let pad = "x".repeat(230);
        let before = self.acks.count.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < duration {
            let due = started + Duration::from_secs_f64(sent as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let key = (sent.wrapping_mul(2_654_435_761) % 100_000).to_string();
            let body = format!("{{\"t\": {}, \"pad\": \"{pad}\"}}", now_s());
            send_when_queued(
                &self.producer,
                BaseRecord::to(topic).key(&key).payload(&body).headers(message_id_header(sent + 1)),
            );
            sent += 1;
        }
        self.acks.wait_for(before + sent, "the paced producer");
    }
}

/// The durations (ms) of the transactions pgbench logged under `prefix` (`-l --log-prefix`, one
/// file per thread); the files are removed. Under `-R` (always given here) the third field (microseconds) counts from
/// the transaction's scheduled start, so the seventh, how late it started, is taken off: what is
/// left is the transaction's own time.
fn pgbench_logged_ms(prefix: &std::path::Path) -> Vec<f64> {
    let (Some(dir), Some(name)) = (prefix.parent(), prefix.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    let mut durations = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().starts_with(name) {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        // A skipped or failed transaction logs a word instead of its time: not counted.
        durations.extend(text.lines().filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let since_scheduled: f64 = fields.get(2)?.parse().ok()?;
            let lag: f64 = fields.get(6).map_or(Ok(0.0), |f| f.parse()).ok()?;
            Some((since_scheduled - lag) / 1000.0)
        }));
        let _ = std::fs::remove_file(entry.path());
    }
    durations
}

/// The middle of an odd number of rounds (the upper middle of an even one).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The `q` quantile of sorted `values` (0 for none).
fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values[((values.len() - 1) as f64 * q) as usize]
    }
}

/// Scheme 2: a relay process polling a plain table.
struct Relay {
    db: postgres::Client,
    producer: rdkafka::producer::FutureProducer,
    table: String,
    topic: String,
    batch: usize,
}

impl Relay {
    fn new(dsn: &str, bootstrap: &str, table: &str, topic: &str, batch: usize) -> Relay {
        Relay {
            db: postgres::Client::connect(dsn, postgres::NoTls).expect("relay connection"),
            producer: producer_config(bootstrap).create().expect("relay producer"),
            table: table.into(),
            topic: topic.into(),
            batch,
        }
    }

    /// One batch: claim, send, wait for acks, mark sent. Returns how many it sent.
    fn batch(&mut self, runtime: &tokio::runtime::Runtime) -> usize {
        let mut tx = self.db.transaction().expect("relay transaction");
        let rows = tx
            .query(
                &format!(
                    "SELECT id, key, payload::text FROM {} WHERE NOT sent ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                    self.table
                ),
                &[&(self.batch as i64)],
            )
            .expect("relay select");
        let mut futures = Vec::with_capacity(rows.len());
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let (id, key, body): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
            let record = rdkafka::producer::FutureRecord::to(&self.topic)
                .key(&key)
                .payload(&body)
                .headers(message_id_header(id as u64));
            futures.push(self.producer.send_result(record).map_err(|(e, _)| e).expect("relay send"));
            ids.push(id);
        }
        for f in futures {
            // A relay marks a row sent only once the broker acknowledged it.
            match runtime.block_on(f) {
                Ok(Ok(_)) => {}
                other => panic!("relay delivery failed: {other:?}"),
            }
        }
        tx.execute(&format!("UPDATE {} SET sent = true WHERE id = ANY ($1)", self.table), &[&ids])
            .expect("relay update");
        tx.commit().expect("relay commit");
        rows.len()
    }

    fn drain(mut self, n: usize) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        let mut sent = 0;
        while sent < n {
            let k = self.batch(&runtime);
            if k == 0 {
                break;
            }
            sent += k;
        }
    }

    fn poll(mut self, stop: &AtomicBool) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
        while !stop.load(Ordering::Relaxed) {
            if self.batch(&runtime) == 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A consumer at the end of a topic that computes receive time minus the payload's "t", and the
/// broker's append time (LogAppendTime, whole milliseconds) minus "t".
struct LatencyProbe {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(Vec<f64>, Vec<f64>)>,
}

/// Percentiles of commit-to-consumer latency, and the p99 of commit-to-append.
struct Latencies {
    p50: f64,
    p99: f64,
    max: f64,
    append_p99: f64,
}

impl LatencyProbe {
    fn start(bootstrap: &str, topic: &str) -> LatencyProbe {
        let admin_consumer = consumer(bootstrap);
        let _ = admin_consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        let stop = Arc::new(AtomicBool::new(false));
        let (bootstrap, topic, flag) = (bootstrap.to_string(), topic.to_string(), stop.clone());
        // Only what is committed from now on counts: a section run twice (the first to warm the
        // broker's JIT up) measures its second run alone.
        let since = now_s();
        let handle = std::thread::spawn(move || {
            let c = consumer(&bootstrap);
            let mut assigned = false;
            let mut latencies = Vec::new();
            let mut appended = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if !assigned {
                    if let Ok(m) = c.fetch_metadata(Some(&topic), Duration::from_secs(1)) {
                        if let Some(t) = m.topics().iter().find(|t| t.error().is_none() && !t.partitions().is_empty()) {
                            let mut tpl = TopicPartitionList::new();
                            for p in t.partitions() {
                                let _ = tpl.add_partition_offset(&topic, p.id(), Offset::Beginning);
                            }
                            assigned = c.assign(&tpl).is_ok();
                        }
                    }
                    continue;
                }
                if let Some(Ok(m)) = c.poll(Duration::from_millis(20)) {
                    let now = now_s();
                    if let Some(t) = m
                        .payload()
                        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                        .and_then(|v| v["t"].as_f64())
                        .filter(|&t| t >= since)
                    {
                        latencies.push((now - t) * 1000.0);
                        if let Some(appended_ms) = m.timestamp().to_millis() {
                            appended.push(appended_ms as f64 - t * 1000.0);
                        }
                    }
                }
            }
            (latencies, appended)
        });
        std::thread::sleep(Duration::from_millis(500));
        LatencyProbe { stop, handle }
    }

    fn finish(self) -> Latencies {
        self.stop.store(true, Ordering::Relaxed);
        let (mut received, mut appended) = self.handle.join().unwrap_or_default();
        received.sort_by(f64::total_cmp);
        appended.sort_by(f64::total_cmp);
        Latencies {
            p50: percentile(&received, 0.5),
            p99: percentile(&received, 0.99),
            max: percentile(&received, 1.0),
            append_p99: percentile(&appended, 0.99),
        }
    }
}

fn main() {
    let batch_size = env_usize("BENCH_BATCH_SIZE", 5000);
    // Unset: the worker's own default, as users get it.
    let linger = std::env::var("BENCH_LINGER_MS").ok().and_then(|v| v.parse::<u32>().ok());
    step("starting Apache Kafka and Postgres 15 for the benchmark");
    let broker = PrivateBroker::start(BrokerKind::Kafka);
    // fsync and synchronous_commit on: the durability users run with.
    let cluster = Cluster::start(
        &broker.bootstrap(),
        &format!(
            "fsync = on
             synchronous_commit = on
             shared_buffers = '1GB'
             max_wal_size = '4GB'
             pg_outbox.batch_size = {batch_size}
             pg_outbox.poll_interval = '100ms'
             pg_outbox.retry_backoff_max = '1s'
             {}",
            linger.map(|ms| format!("pg_outbox.linger = '{ms}ms'")).unwrap_or_default()
        ),
    );
    // LogAppendTime: a record's timestamp is the moment the broker appended it, so every
    // forwarder's rate is read the same way, from the topic itself.
    let refused = create_topics(
        &broker.bootstrap(),
        &[
            "bench.drain_warmup",
            "bench.latency",
            "bench.raw_latency",
            "bench.relay_latency",
            "bench.sustained",
            "bench.xmin",
            "outbox.event.drain",
            "outbox.event.latency",
            "outbox.event.latency_tuned",
        ],
        1,
        &[("message.timestamp.type", "LogAppendTime")],
    );
    assert!(refused.is_empty(), "the broker refused bench topics: {refused:?}");
    let mut bench = Bench { cluster, broker, results: BTreeMap::new(), notes: Vec::new(), batch_size, linger };
    bench.sql(
        "CREATE TABLE bench_orders (id bigserial PRIMARY KEY, customer int NOT NULL, total numeric NOT NULL, created_at timestamptz DEFAULT now());
         CREATE TABLE bench_plain_outbox (id bigserial PRIMARY KEY, topic text NOT NULL, key text, payload jsonb NOT NULL, created_at timestamptz DEFAULT now(), sent boolean NOT NULL DEFAULT false);
         CREATE TABLE bench_relay (id bigserial PRIMARY KEY, key text, payload jsonb NOT NULL, sent boolean NOT NULL DEFAULT false);
         CREATE INDEX ON bench_relay (id) WHERE NOT sent;
         CREATE TABLE bench_relay_latency (LIKE bench_relay INCLUDING ALL);",
    );
    let sections: Vec<String> = std::env::var("BENCH_SECTIONS")
        .unwrap_or_else(|_| "enqueue,drain,latency,debezium,sustained,xmin".into())
        .split(',')
        .map(str::to_string)
        .collect();
    for s in &sections {
        match s.as_str() {
            "enqueue" => bench.enqueue_overhead(),
            "drain" => bench.drain(),
            "latency" => bench.latency(),
            "sustained" => bench.sustained(),
            "xmin" => bench.xmin_pinned(),
            "debezium" => bench.debezium(),
            other => eprintln!("unknown section {other}"),
        }
    }
    std::fs::create_dir_all("target/bench").expect("target/bench");
    let json = serde_json::to_string_pretty(&bench.results).expect("json");
    std::fs::write("target/bench/results.json", &json).expect("write results.json");
    println!("{json}");
    std::fs::write("docs/BENCHMARKS.md", markdown(&bench, &sections)).expect("write docs/BENCHMARKS.md");
    println!("wrote target/bench/results.json and docs/BENCHMARKS.md");
}

/// Outbox storage: heap, indexes and TOAST of every table in the schema.
const OUTBOX_BYTES: &str = "SELECT sum(pg_total_relation_size(c.oid))::float8 FROM pg_class c
                            JOIN pg_namespace n ON n.oid = c.relnamespace
                            WHERE n.nspname = 'outbox' AND c.relkind = 'r'";

/// The goals of issue 5, as (key, comparison, target).
const GOALS: &[(&str, &str, f64)] = &[
    ("enqueue_vs_plain_insert", ">=", 0.95),
    ("enqueue_vs_order", ">=", 0.80),
    ("drain_vs_raw", ">=", 0.70),
    ("drain_vs_relay", ">=", 5.0),
    ("latency_p99_ms", "<=", 10.0),
    ("latency_p50_ms", "<=", 3.0),
    ("latency_p99_vs_debezium_tuned", "<=", 0.2),
    ("drain_vs_debezium", ">=", 1.5),
    ("xmin_pinned_vs_clean", ">=", 0.95),
    ("storage_growth_ratio", "<=", 2.0),
    ("tps_end_vs_start", ">=", 0.9),
    ("worker_rss_growth_ratio", "<=", 1.1),
];

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{cores} cores ({cpu}), {mem:.0} GiB RAM; PostgreSQL 15 (Debian), Apache Kafka 4.1.1 (one KRaft node, Java 17, the JVM options of Kafka's own start scripts: 1 GB heap, G1 with `MaxGCPauseMillis=20`), all on loopback")
}

fn markdown(bench: &Bench, sections: &[String]) -> String {
    let mut md = String::from("# pg_outbox benchmarks\n\nGenerated by `make bench` (`pg_test/src/bin/outbox-bench.rs`). Every ratio is measured within one run, on one machine, so the noise of a shared 2-core box cancels as far as it can.\n\n");
    md.push_str(&format!("**Machine:** {}\n\n", machine()));
    md.push_str("## Goals\n\n| key | value | goal | met |\n|---|---|---|---|\n");
    for (key, cmp, target) in GOALS {
        match bench.results.get(*key) {
            Some(v) => {
                let met = if *cmp == ">=" { *v >= *target } else { *v <= *target };
                md.push_str(&format!(
                    "| `{key}` | {v:.3} | {cmp} {target} | {} |\n",
                    if met { "yes" } else { "**no**" }
                ));
            }
            None => md.push_str(&format!("| `{key}` | not measured | {cmp} {target} | **no** |\n")),
        }
    }
    md.push_str("\n## All figures\n\n| key | value |\n|---|---|\n");
    for (k, v) in &bench.results {
        md.push_str(&format!("| `{k}` | {v:.3} |\n"));
    }
    let env: Vec<String> =
        std::env::vars().filter(|(k, _)| k.starts_with("BENCH_")).map(|(k, v)| format!("`{k}={v}`")).collect();
    md.push_str(&format!(
        "\n## Settings\n\n- Sections run: {}.\n- Sizes: {} (defaults: 1,000,000 drained messages in each of 3 drain rounds, 5,000,000 sustained, 120 s per xmin run, 15 s per pgbench round, 3 rounds after one uncounted warm-up round, 8 clients, 1,000 tx/s for 30 s of latency).\n- Postgres: `fsync = on`, `synchronous_commit = on`, `shared_buffers = 1GB`, `pg_outbox.batch_size = {}`, `pg_outbox.poll_interval = 100ms`, {}.\n- Producer (pg_outbox, the raw producer and the relay alike): `acks=all`, `enable.idempotence=true`, `linger.ms=1`, `partitioner=murmur2_random`.\n- Payloads: ~300-byte JSON order events, keys spread over the orders' customers (16 keys for the drains). Every forwarder delivers the same records: pg_outbox puts a `pg_outbox_message_id` header on each (the id consumers drop redeliveries by), Debezium's Outbox Event Router an `id` header, and the raw producer and the relay send a `pg_outbox_message_id` header of the same shape. `raw_broker_headerless_msgs_per_s` is the raw producer without it, lighter records than any of the forwarders send (`drain_vs_raw_headerless`, for reference).\n- Drain: first an uncounted warm-up of the broker (the raw producer, the same number of messages), then alternating rounds of the raw producer (with and without the header), pg_outbox and the relay, each on a topic of its own per round; each `*_msgs_per_s` key is the median of its rounds and each ratio the ratio of the medians, as in the enqueue section (the rounds are listed under Notes). pg_outbox's backlog is written while its worker points at a port nobody listens on (`pg_outbox.kafka_bootstrap_servers`, reloaded), then pointed back: the broker stays up and warm, as the raw producer and the relay meet it.\n- Latency: from `clock_timestamp()` in the last statement before COMMIT (so the commit's own fsync is included) to a consumer receiving the record (`fetch.wait.max.ms=20`), after 5 s at the same rate that are not measured. The `*_append_p99_ms` keys measure to the broker's append instead (the record's LogAppendTime, in whole milliseconds, so they read up to 1 ms low): they show how much of a p99 is the consumer's fetch; the goals use the consumer's figures. Two references from the same section show this machine's own tail at that rate: `latency_tx_*` is the duration of the transactions themselves, from pgbench's log (`-l`) of the measured run, and `raw_broker_latency_*` a standalone rdkafka producer sending the same records at the same rate, each at once (`linger.ms=0`, as pg_outbox's flush does), to the same consumer, from the send instead of a commit.\n- Sustained: each of the 8 clients is given more transactions than its share and pgbench is stopped once the orders table has grown by the whole count, so every client runs until the end (with a count per client they finish one after another, and the last minute measured fewer of them). `sustained_messages` is the count delivered, a few hundred over.\n- Storage growth (sustained): outbox storage (heap, indexes, TOAST) is sampled every second; with slot rotation it is a sawtooth, so `storage_growth_ratio` compares its peak during the first 100,000 messages with its peak during the same length of time at the end of the run (the single samples after the first 100,000 and once drained are reported too).\n- The relay (scheme 2): `SELECT ... FOR UPDATE SKIP LOCKED` batches of the same size from a plain table, produce, wait for all acks, `UPDATE ... SET sent = true`, COMMIT; 100 ms poll when idle.\n\nRerun: `make bench` (sizes: `BENCH_DRAIN_MESSAGES=... BENCH_DRAIN_ROUNDS=... BENCH_SUSTAINED_MESSAGES=... make bench`; parts: `BENCH_SECTIONS=enqueue,drain,latency,debezium,sustained,xmin`; the worker's linger for an experiment: `BENCH_LINGER_MS=20`).\n",
        sections.join(", "),
        if env.is_empty() { "defaults".to_string() } else { env.join(", ") },
        bench.batch_size,
        bench.linger.map_or("`pg_outbox.linger` at its default (50 ms)".to_string(), |ms| format!("`pg_outbox.linger = {ms}ms`"))
    ));
    if !bench.notes.is_empty() {
        md.push_str("\n## Notes from this run\n\n");
        for n in &bench.notes {
            md.push_str(&format!("- {n}\n"));
        }
    }
    // The profile and what it led to are written by hand, kept across regenerations.
    md.push('\n');
    md.push_str(&std::fs::read_to_string("docs/BENCHMARKS.profile.md").unwrap_or_default());
    md
}
