use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka_sys::{
    rd_kafka_conf_res_t as RDKafkaConfRes, rd_kafka_vtype_t as vtype, rd_kafka_vu_s__bindgen_ty_1 as VuValue,
    rd_kafka_vu_t,
};

use crate::librdkafka_log::{without_secrets, LogLine, LIBRDKAFKA_LOG};
use crate::message::{MessageIds, MESSAGE_ID_HEADER};
use crate::{Outage, OutageWatch, OutboundMessage, Rebootstrap, SendFailure};

/// Everything the sink needs to know to talk to one Kafka cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SinkConfig {
    pub bootstrap_servers: String,
    /// librdkafka properties given by the user; they override our defaults.
    pub properties: Vec<(String, String)>,
    pub create_topics: bool,
    pub topic_partitions: i32,
    /// -1 leaves it to the broker's `default.replication.factor`.
    pub topic_replication_factor: i32,
}

/// Producer defaults: durable (acks=all, idempotent, so retries inside one producer session
/// neither duplicate nor reorder) and keyed like the Java client (murmur2), so a key lands on the
/// same partition as it would from any JVM producer. The message timeout is the Java client's
/// `delivery.timeout.ms` default: a message that times out in flight may still have been written,
/// and its batch is resent, so only a stall longer than this can cost duplicates. (At 30 s, a
/// 15 s freeze of a single-node broker on a busy machine cost 130: it took writes again only 26 s
/// after it was resumed, most likely the forgotten broker of `KafkaSink::flush`.)
const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("partitioner", "murmur2_random"),
    ("linger.ms", "1"),
    ("message.timeout.ms", "120000"),
    ("socket.keepalive.enable", "true"),
    ("client.id", "pg_outbox"),
    // Its log lines reach the server log (`LIBRDKAFKA_LOG`): which of its threads wrote one says
    // nothing to an operator that the line does not (a broker's line names the broker).
    ("log.thread.name", "false"),
];

/// Parses `key=value` pairs separated by `;` or newlines (the `pg_outbox.kafka_properties` format).
/// A piece that is not a pair is named by its place, not shown: it may be a piece of a password
/// that held a `;`.
pub fn parse_properties(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split([';', '\n'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .enumerate()
        .map(|(i, piece)| match piece.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(format!("property {} is not of the form key=value", i + 1)),
        })
        .collect()
}

/// Checks `key=value` properties as librdkafka will take them, one by one and in order: the
/// format, each name, and each value that librdkafka checks on its own. Combinations (`acks=1`
/// with idempotence, say) are refused only when a producer is created.
pub fn check_properties(text: &str) -> Result<(), String> {
    check_each(&parse_properties(text)?)
}

/// See `check_properties`. `plugin.library.paths` is not tried: librdkafka loads the plugins as
/// soon as it is set. A plugin's own properties are refused as unknown: the producer's properties
/// are set in no fixed order, so librdkafka may meet them before it has loaded the plugin.
/// librdkafka's hidden test properties are refused: one replaces the brokers with an in-process
/// mock (messages "delivered" nowhere), another makes a callback of a string (a crash).
fn check_each(properties: &[(String, String)]) -> Result<(), String> {
    let mut after_secret = false;
    for (i, (key, value)) in properties.iter().enumerate() {
        // A name that follows a secret may be a piece of it (a password that held a ';').
        let name = if after_secret { format!("property {}", i + 1) } else { format!("\"{key}\"") };
        after_secret = SECRETS.contains(&key.as_str());
        if key == "plugin.library.paths" {
            continue;
        }
        if key.starts_with("ut_") || key.starts_with("test.mock.") {
            return Err(format!("{name} is a librdkafka test property"));
        }
        let one: ClientConfig = [(key.clone(), value.clone())].into_iter().collect();
        match one.create_native_config() {
            Ok(_) => {}
            Err(KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN, ..)) => {
                return Err(format!("{name} is not a librdkafka property"));
            }
            Err(e) => return Err(without_values(&e)),
        }
    }
    Ok(())
}

/// librdkafka's sensitive properties (`_RK_SENSITIVE` in rdkafka_conf.c), and its alias of one.
const SECRETS: &[&str] = &[
    "sasl.oauthbearer.assertion.private.key.file",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
    "sasl.oauthbearer.client.credentials.client.secret",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.config",
    "sasl.password",
    "sasl.username",
    "ssl.ca.pem",
    "ssl.key.location",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl.keystore.password",
];

impl SinkConfig {
    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (k, v) in PRODUCER_DEFAULTS {
            config.set(*k, *v);
        }
        if self.create_topics {
            // Topics are created through the admin API with our partition count, not by the
            // broker's auto-creation with its defaults.
            config.set("allow.auto.create.topics", "false");
        }
        config.set("bootstrap.servers", &self.bootstrap_servers);
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        config.set_log_level(log_level(&self.properties));
        config
    }
}

/// How much of librdkafka's log the worker writes (`LIBRDKAFKA_LOG`): its errors and warnings,
/// unless a `debug` or `log_level` property asks for more, by librdkafka's own rule (`debug`
/// means every level). rdkafka would otherwise set the level after creation from the `log`
/// crate's, which nothing in the worker sets up.
fn log_level(properties: &[(String, String)]) -> RDKafkaLogLevel {
    let given = |name: &str| properties.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.trim());
    if given("debug").is_some_and(|contexts| !contexts.is_empty()) {
        return RDKafkaLogLevel::Debug;
    }
    match given("log_level").and_then(|level| level.parse::<i32>().ok()) {
        Some(0) => RDKafkaLogLevel::Emerg,
        Some(1) => RDKafkaLogLevel::Alert,
        Some(2) => RDKafkaLogLevel::Critical,
        Some(3) => RDKafkaLogLevel::Error,
        Some(5) => RDKafkaLogLevel::Notice,
        Some(6) => RDKafkaLogLevel::Info,
        Some(7) => RDKafkaLogLevel::Debug,
        _ => RDKafkaLogLevel::Warning,
    }
}

/// A configuration error names the property but never its value: values may be credentials, and
/// this text ends up in the server log and in outbox.worker_status.
fn without_values(err: &KafkaError) -> String {
    match err {
        KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN, _, key, _) => {
            format!("\"{key}\" is not a librdkafka property")
        }
        KafkaError::ClientConfig(_, description, key, value) => {
            format!("invalid value for property \"{key}\": {}", masked(description.trim_end(), value))
        }
        other => other.to_string(),
    }
}

/// librdkafka's description of a refused value with the value masked, in the forms librdkafka
/// prints it: `Invalid value "v" for configuration property "p"`, `... value v is outside allowed
/// range ...` (a number as parsed: 1e9 as 1e+09) and `Invalid value for configuration property
/// "p": v`. Any other form is masked wherever the value appears, if it is long enough to be a
/// secret (masking "1" everywhere would garble the allowed range).
fn masked(description: &str, value: &str) -> String {
    if let Some((_, after)) = description.strip_prefix("Invalid value \"").and_then(|d| d.rsplit_once("\" for ")) {
        return format!("Invalid value \"***\" for {after}");
    }
    if let Some((before, after)) = description.split_once(" value ") {
        if let Some((_, rest)) = after.split_once(" is outside") {
            return format!("{before} value *** is outside{rest}");
        }
    }
    if description.starts_with("Invalid value for ") {
        if let Some((before, _)) = description.split_once("\": ") {
            return format!("{before}\": ***");
        }
    }
    match value.len() {
        0..4 => description.to_string(),
        _ => description.replace(value, "***"),
    }
}

/// A Kafka producer plus what it takes to drive it from the worker's single thread: the
/// delivery reports of the batch in flight (librdkafka's polling thread files them; it never
/// touches Postgres), and the admin client, with a current-thread tokio runtime to await it, that
/// creates missing topics.
pub struct KafkaSink {
    config: SinkConfig,
    /// A handle per topic seen, so that producing a message does not look its topic up by name.
    /// Declared before the producer: handles are released before it is destroyed.
    topics: HashMap<String, TopicHandle>,
    producer: ThreadedProducer<Reports>,
    admin: AdminClient<DefaultClientContext>,
    runtime: tokio::runtime::Runtime,
    /// The bootstrap servers the producer was created with, to give it again (see `flush`).
    bootstrap_servers: CString,
    rebootstrap: Rebootstrap,
    /// Tries through this producer that failed since it last had a message acknowledged.
    failed_tries: u32,
}

/// librdkafka's handle of one topic of this producer.
struct TopicHandle(NonNull<rdkafka_sys::rd_kafka_topic_t>);

// librdkafka's topic handles may be used from any thread.
unsafe impl Send for TopicHandle {}

impl Drop for TopicHandle {
    fn drop(&mut self) {
        unsafe { rdkafka_sys::rd_kafka_topic_destroy(self.0.as_ptr()) };
    }
}

/// The reports of the batch in flight, filed by position. A message carries its position and
/// its batch's number as the delivery opaque (a plain integer: no allocation per message, as a
/// future per message would take); a late report of an earlier batch (one given up on when the
/// worker was asked to stop) has another number and is dropped.
#[derive(Default)]
pub struct Reports {
    filed: Mutex<Filed>,
    /// For librdkafka's log lines (`LIBRDKAFKA_LOG`): the cluster, and the values to mask.
    cluster: String,
    secrets: Vec<String>,
}

#[derive(Default)]
struct Filed {
    batch: u32,
    reports: Vec<Option<Result<(), SendFailure>>>,
    /// librdkafka's word that it has lost every broker, and when, until a message is
    /// acknowledged again: the worker learns of an outage from it while messages wait, not a
    /// message timeout later.
    brokers_down: Option<(String, Instant)>,
    /// librdkafka's latest error, until a message is acknowledged again: why it cannot reach or
    /// talk to a broker (a refused connection, a failed TLS handshake or SASL authentication).
    /// Its word that every broker is down only counts them, and a metadata request only times
    /// out, so without this an operator would read "timed out" where librdkafka knew the reason.
    /// With when it was heard: see `Filed::cause`.
    cause: Option<(String, Instant)>,
    /// Whether a message was acknowledged since `KafkaSink::failed_try` last asked.
    acknowledged: bool,
    /// Whether a message of the batch in flight was reported unavailable for another reason than
    /// a purge (a message timeout): see `KafkaSink::wait_batch`.
    failed_unpurged: bool,
}

impl Filed {
    /// librdkafka repeats a broker's error at least every 30 s while it lasts (it suppresses
    /// identical ones in between), so one older than this is about a problem that has passed,
    /// such as a restart of the broker while the worker was idle.
    const CAUSE_FRESH: Duration = Duration::from_secs(60);

    /// librdkafka's latest error, if it is recent enough to explain what is going on now.
    fn cause(&self, now: Instant) -> Option<&str> {
        self.cause
            .as_ref()
            .filter(|(_, at)| now.saturating_duration_since(*at) <= Self::CAUSE_FRESH)
            .map(|(reason, _)| reason.as_str())
    }
}

const POSITION_BITS: u32 = 32;
// The opaque packs the batch number above the position: it needs a 64-bit usize.
const _: () = assert!(usize::BITS >= 64);

fn opaque(batch: u32, position: usize) -> usize {
    ((batch as usize) << POSITION_BITS) | position
}

impl Reports {
    fn filed(&self) -> MutexGuard<'_, Filed> {
        // A panic while holding the lock leaves plain data behind; the worker goes on with it.
        self.filed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The cluster is named by its bootstrap servers, as in the worker's other messages (and in
    /// `worker_status`), so a secret that is part of them (a user name that is also a host's)
    /// is not masked in the lines either: it would only garble the brokers' names.
    fn for_cluster(config: &SinkConfig) -> Reports {
        let secrets = config
            .properties
            .iter()
            .filter(|(k, v)| SECRETS.contains(&k.as_str()) && !config.bootstrap_servers.contains(v.as_str()))
            .map(|(_, v)| v.clone());
        Reports { cluster: config.bootstrap_servers.clone(), secrets: secrets.collect(), ..Reports::default() }
    }

    fn file(&self, opaque: usize, report: Result<(), SendFailure>) {
        self.file_as(opaque, report, false);
    }

    /// Files a report; `purged`: its message was purged (`KafkaSink::flush`).
    fn file_as(&self, opaque: usize, report: Result<(), SendFailure>, purged: bool) {
        let mut filed = self.filed();
        if report.is_ok() {
            filed.brokers_down = None;
            filed.cause = None;
            filed.acknowledged = true;
        }
        let (batch, position) = ((opaque >> POSITION_BITS) as u32, opaque & ((1 << POSITION_BITS) - 1));
        if batch == filed.batch {
            filed.failed_unpurged |= !purged && matches!(report, Err(SendFailure::Unavailable(_)));
            if let Some(slot) = filed.reports.get_mut(position) {
                *slot = Some(report);
            }
        }
    }
}

impl ClientContext for Reports {
    // Called on rdkafka's polling thread: it only files what it heard, for the worker to report.
    fn error(&self, error: KafkaError, reason: &str) {
        let mut filed = self.filed();
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            filed.brokers_down = Some((reason.to_string(), Instant::now()));
        } else {
            filed.cause = Some((reason.to_string(), Instant::now()));
        }
    }

    // Called on rdkafka's polling thread, as above: queued for the worker's thread to write.
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        LIBRDKAFKA_LOG.push(level as i32, || LogLine {
            level: level as i32,
            facility: facility.to_string(),
            message: without_secrets(message, &self.secrets),
            cluster: self.cluster.clone(),
        });
    }
}

impl ProducerContext for Reports {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let purged = result
            .as_ref()
            .err()
            .and_then(|(err, _)| err.rdkafka_error_code())
            .is_some_and(|code| matches!(code, RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight));
        let report = result.as_ref().map(|_| ()).map_err(|(err, _message)| SendFailure::from_kafka(err));
        self.file_as(opaque, report, purged);
    }
}

/// A produced batch whose delivery reports are still to come: its number and size.
pub struct InFlight {
    batch: u32,
    messages: usize,
    /// When the first message was handed over: an outage reported after it is news.
    since: Instant,
}

/// Why a batch was not sent at all.
#[derive(Debug, PartialEq, Eq)]
pub enum BatchError {
    /// The worker was asked to stop while waiting for the broker.
    Interrupted,
    /// A topic could not be looked up or created (broker unreachable).
    Unavailable(String),
}

/// `what` went wrong, with librdkafka's reason for it if it gave one.
fn with_cause(what: &str, cause: Option<&str>) -> String {
    match cause {
        Some(cause) if !what.contains(cause) => format!("{what} (librdkafka: {cause})"),
        _ => what.to_string(),
    }
}

impl KafkaSink {
    pub fn new(config: SinkConfig) -> Result<KafkaSink, String> {
        // In order, and without repeating what may be a secret, before librdkafka says it its way.
        check_each(&config.properties).map_err(|e| format!("cannot create Kafka producer: {e}"))?;
        let client_config = config.client_config();
        let producer: ThreadedProducer<Reports> = client_config
            .create_with_context(Reports::for_cluster(&config))
            .map_err(|e| format!("cannot create Kafka producer: {}", without_values(&e)))?;
        // Nothing reads the admin client's main queue (rdkafka's admin client polls another one),
        // where its log lines go, so it is asked for none: they would pile up there for as long
        // as it lives. (Those of its creation, before rdkafka sets the level, go with the error
        // events: `discard_admin_events`.) What it would say, the producer of the cluster says.
        let admin: AdminClient<DefaultClientContext> = client_config
            .clone()
            .set_log_level(RDKafkaLogLevel::Emerg)
            .create()
            .map_err(|e| format!("cannot create Kafka admin client: {}", without_values(&e)))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the delivery runtime: {e}"))?;
        let bootstrap_servers = client_config
            .get("bootstrap.servers")
            .and_then(|servers| CString::new(servers).ok())
            .ok_or_else(|| "bootstrap servers must be given, without NUL bytes".to_string())?;
        Ok(KafkaSink {
            config,
            topics: HashMap::new(),
            producer,
            admin,
            runtime,
            bootstrap_servers,
            rebootstrap: Rebootstrap::default(),
            failed_tries: 0,
        })
    }

    pub fn config(&self) -> &SinkConfig {
        &self.config
    }

    /// Counts a try through this producer that failed; returns how many failed in a row, since
    /// it last had a message acknowledged (see `replace_producer`).
    pub fn failed_try(&mut self) -> u32 {
        let acknowledged = std::mem::take(&mut self.producer.context().filed().acknowledged);
        self.failed_tries = if acknowledged { 1 } else { self.failed_tries + 1 };
        self.failed_tries
    }

    /// The producer's fatal error, if it has one (then it must be recreated).
    pub fn fatal_error(&self) -> Option<String> {
        self.producer.client().fatal_error().map(|(code, text)| format!("{code:?}: {text}"))
    }

    /// Fault injection for tests: makes librdkafka raise a fatal idempotent-producer error
    /// (out-of-order sequence), as a broker that lost track of the producer's sequence would.
    pub fn inject_fatal_error(&self) {
        unsafe {
            rdkafka_sys::rd_kafka_test_fatal_error(
                self.producer.client().native_ptr(),
                rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                c"injected by outbox._inject_producer_fatal_error()".as_ptr(),
            );
        }
    }

    /// Makes sure every topic exists, creating missing ones if allowed. A topic that does not exist
    /// and may not be created is left alone: its messages are refused by the broker and follow
    /// the retry/dead-letter path.
    pub fn ensure_topics<'a>(
        &mut self,
        topics: impl IntoIterator<Item = &'a str>,
        should_stop: &dyn Fn() -> bool,
    ) -> Result<(), BatchError> {
        let mut previous = None;
        let wanted: Vec<String> = topics
            .into_iter()
            // A batch is mostly runs of one topic: a comparison with the one before, not a hash each.
            .filter(|t| previous.replace(*t) != Some(*t) && !self.topics.contains_key(*t))
            .map(str::to_string)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for topic in wanted {
            let metadata = self.topic_metadata(&topic, should_stop)?;
            let exists = metadata
                .topics()
                .iter()
                .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
            if !exists && self.config.create_topics {
                self.create_topic(&topic, should_stop)?;
            }
            let name = CString::new(topic.as_str())
                .map_err(|_| BatchError::Unavailable(format!("topic name \"{topic}\" contains a NUL byte")))?;
            let handle = unsafe {
                rdkafka_sys::rd_kafka_topic_new(
                    self.producer.client().native_ptr(),
                    name.as_ptr(),
                    std::ptr::null_mut(),
                )
            };
            let handle = NonNull::new(handle)
                .ok_or_else(|| BatchError::Unavailable(format!("librdkafka refused a handle for topic \"{topic}\"")))?;
            self.topics.insert(topic, TopicHandle(handle));
        }
        Ok(())
    }

    /// The broker's metadata for `topic`, asked for in attempts of a second, up to 5 s in all, so
    /// that `should_stop` is heard between them (a DROP DATABASE waits only 5 s for the worker).
    fn topic_metadata(&self, topic: &str, should_stop: &dyn Fn() -> bool) -> Result<Metadata, BatchError> {
        const ATTEMPT: Duration = Duration::from_secs(1);
        let deadline = Instant::now() + 5 * ATTEMPT;
        loop {
            let started = Instant::now();
            let error = match self.producer.client().fetch_metadata(Some(topic), ATTEMPT) {
                Ok(metadata) => return Ok(metadata),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(BatchError::Unavailable(self.explained(&format!("cannot fetch metadata: {error}"))));
            }
            if should_stop() {
                return Err(BatchError::Interrupted);
            }
            // An attempt that failed at once is not retried in a tight loop.
            std::thread::sleep(ATTEMPT.saturating_sub(started.elapsed()));
        }
    }

    /// Whether the cluster answers a metadata request for `topic` within `timeout`. Asked of a
    /// cluster found down before its messages are handed over again, so that a try of a cluster
    /// still down holds the others back no longer than this.
    pub fn probe(&self, topic: &str, timeout: Duration) -> Result<(), String> {
        match self.producer.client().fetch_metadata(Some(topic), timeout) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.explained(&format!("cannot fetch metadata: {e}"))),
        }
    }

    /// `what` went wrong, with librdkafka's latest error since a message was last acknowledged.
    fn explained(&self, what: &str) -> String {
        with_cause(what, self.producer.context().filed().cause(Instant::now()))
    }

    /// Drops what waits in the admin client's main queue, which nothing reads: librdkafka puts
    /// an error event there for every connection to a broker that fails (the same error at most
    /// twice in 30 s), whatever the client asked for, and they would pile up for as long as the
    /// admin client lives (an idle worker's, through a long outage, one per metadata refresh).
    /// Done whenever the sink is used, it keeps them to what came since.
    fn discard_admin_events(&self) {
        unsafe {
            let queue = rdkafka_sys::rd_kafka_queue_get_main(self.admin.inner().native_ptr());
            loop {
                let event = rdkafka_sys::rd_kafka_queue_poll(queue, 0);
                if event.is_null() {
                    break;
                }
                rdkafka_sys::rd_kafka_event_destroy(event);
            }
            rdkafka_sys::rd_kafka_queue_destroy(queue);
        }
    }

    /// Creates `topic`, waiting for the answer in slices of a second, up to 5 s in all, so that
    /// `should_stop` is heard meanwhile. Left to itself, the admin client waits for an answer as
    /// long as `socket.timeout.ms` (60 s) on a connection that went silent (a firewall that
    /// forgot it), and the worker would not hear a SIGTERM or a DROP DATABASE for that long.
    fn create_topic(&self, topic: &str, should_stop: &dyn Fn() -> bool) -> Result<(), BatchError> {
        self.discard_admin_events();
        const SLICE: Duration = Duration::from_secs(1);
        const LIMIT: Duration = Duration::from_secs(5);
        let replication = TopicReplication::Fixed(self.config.topic_replication_factor);
        let new_topic = NewTopic::new(topic, self.config.topic_partitions, replication);
        // The broker's own wait for the creation ends first, so that a slow controller's answer
        // still arrives within the request's.
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(3))).request_timeout(Some(LIMIT));
        let mut created = std::pin::pin!(self.admin.create_topics([&new_topic], &options));
        let deadline = Instant::now() + LIMIT;
        let results = loop {
            // The timer is made inside the runtime: it needs the runtime's clock.
            match self.runtime.block_on(async { tokio::time::timeout(SLICE, created.as_mut()).await }) {
                Ok(results) => {
                    break results.map_err(|e| {
                        BatchError::Unavailable(self.explained(&format!("cannot create topic \"{topic}\": {e}")))
                    })?
                }
                Err(_) if should_stop() => return Err(BatchError::Interrupted),
                Err(_) if Instant::now() >= deadline => {
                    return Err(BatchError::Unavailable(self.explained(&format!(
                        "cannot create topic \"{topic}\": no answer from Kafka within {} s",
                        LIMIT.as_secs()
                    ))));
                }
                Err(_) => {}
            }
        };
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                // The controller did not finish in time: a try that failed, not a refusal.
                Err((_, RDKafkaErrorCode::RequestTimedOut)) => {
                    return Err(BatchError::Unavailable(self.explained(&format!(
                        "cannot create topic \"{topic}\": Kafka did not finish creating it in time"
                    ))));
                }
                // Anything else (e.g. not authorized) surfaces as refused produce requests.
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// Hands every message to librdkafka, in order, without waiting for the broker: its threads
    /// send them while the caller does something else, then collects the reports (`wait_batch`).
    /// `should_stop` is polled while librdkafka's queue is full and while waiting, so that SIGTERM
    /// is honoured promptly.
    pub fn produce_batch(
        &mut self,
        messages: &[OutboundMessage],
        message_ids: &MessageIds,
        should_stop: &dyn Fn() -> bool,
    ) -> Result<InFlight, BatchError> {
        self.discard_admin_events();
        self.ensure_topics(messages.iter().map(|m| m.topic.as_str()), should_stop)?;
        let since = Instant::now();
        let batch = {
            let mut filed = self.producer.context().filed();
            filed.batch = filed.batch.wrapping_add(1);
            filed.reports.clear();
            filed.reports.resize(messages.len(), None);
            filed.failed_unpurged = false;
            filed.batch
        };
        let mut topic: Option<(&str, *mut rdkafka_sys::rd_kafka_topic_t)> = None;
        let mut message_id = String::new();
        for (position, m) in messages.iter().enumerate() {
            let handle = match topic {
                Some((name, handle)) if name == m.topic => handle,
                _ => {
                    let handle = self
                        .topics
                        .get(&m.topic)
                        .map(|h| h.0.as_ptr())
                        .ok_or_else(|| BatchError::Unavailable(format!("no handle for topic \"{}\"", m.topic)))?;
                    topic = Some((&m.topic, handle));
                    handle
                }
            };
            let message_id = message_ids.write(m.id, &mut message_id);
            if let Err(failure) = self.enqueue(handle, m, message_id, opaque(batch, position), should_stop)? {
                self.producer.context().file(opaque(batch, position), Err(failure));
            }
        }
        Ok(InFlight { batch, messages: messages.len(), since })
    }

    /// Waits for every delivery report of a produced batch; one report per message, in order.
    /// `outage` hears, once, if the broker looks unavailable meanwhile (`OutageWatch`). With
    /// `may_give_up`, the batch is given up when the cluster looks down (`OutageWatch::gives_up`):
    /// what librdkafka still holds of it is purged and reported unavailable, and the producer
    /// must not be used again (a purged message may still have been written, and its sequence
    /// numbers are lost). Returns the reports, and whether the batch was given up with none of
    /// its messages failed but by the purge: then, within each partition, what was acknowledged
    /// came before what was purged.
    pub fn wait_batch(
        &mut self,
        in_flight: InFlight,
        should_stop: &dyn Fn() -> bool,
        may_give_up: bool,
        outage: &mut dyn FnMut(&str),
    ) -> Result<(Vec<Result<(), SendFailure>>, bool), BatchError> {
        let gave_up = self.flush(in_flight.since, should_stop, may_give_up, outage)?;
        // A message counts as in librdkafka's queue until its report has been filed, so after
        // the flush every report is here; the loop only guards against a report still on its way.
        loop {
            {
                let mut filed = self.producer.context().filed();
                if filed.batch == in_flight.batch && filed.reports.iter().all(Option::is_some) {
                    let mut reports = Vec::with_capacity(in_flight.messages);
                    reports.extend(std::mem::take(&mut filed.reports).into_iter().take(in_flight.messages).flatten());
                    return Ok((reports, gave_up && !filed.failed_unpurged));
                }
            }
            if should_stop() {
                return Err(BatchError::Interrupted);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sends what was produced now, not after `linger.ms`: the worker waits for every report of
    /// the batch anyway, and the linger would only add to each message's commit-to-broker latency.
    /// (librdkafka treats linger as elapsed while a flush is under way; rdkafka's own `flush`
    /// calls it with a zero timeout, which ends the flush before the broker thread sees it.)
    ///
    /// While every broker stays lost, the bootstrap servers are given to librdkafka again. It
    /// forgets each broker a metadata response leaves out, and a lone broker that its controller
    /// fenced (it came back from a pause longer than its session timeout) lists none, itself
    /// included. librdkafka 2.12 then mostly re-bootstraps by itself, but was seen not to (by its
    /// code, a re-bootstrap still marked in progress from before) and to wait, with nobody to ask for
    /// metadata, until the message timeout, when the batch is resent and duplicated. With a
    /// bootstrap broker to ask, it finds the leader once the broker is unfenced and resends the
    /// same messages with the same sequence numbers, which the broker deduplicates.
    fn flush(
        &mut self,
        since: Instant,
        should_stop: &dyn Fn() -> bool,
        may_give_up: bool,
        outage: &mut dyn FnMut(&str),
    ) -> Result<bool, BatchError> {
        use rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__TIMED_OUT;
        let mut watch = OutageWatch::new(since);
        let mut gave_up = false;
        loop {
            let err = unsafe { rdkafka_sys::rd_kafka_flush(self.producer.client().native_ptr(), 100) };
            if err != RD_KAFKA_RESP_ERR__TIMED_OUT {
                // Done, or an error the delivery reports will name.
                return Ok(gave_up);
            }
            if should_stop() {
                return Err(BatchError::Interrupted);
            }
            // Read under the lock, reported after it: librdkafka's threads file reports meanwhile.
            let (reports, lost, cause) = {
                let filed = self.producer.context().filed();
                let cause = filed.cause(Instant::now()).map(str::to_string);
                (filed.reports.iter().filter(|r| r.is_some()).count(), filed.brokers_down.clone(), cause)
            };
            let lost_at = lost.as_ref().map(|(_, at)| *at);
            if self.rebootstrap.due(Instant::now(), lost_at) {
                // Adds only what librdkafka does not hold as a bootstrap broker already.
                unsafe {
                    rdkafka_sys::rd_kafka_brokers_add(
                        self.producer.client().native_ptr(),
                        self.bootstrap_servers.as_ptr(),
                    )
                };
            }
            let now = Instant::now();
            let what = match watch.check(now, reports, lost_at) {
                Some(Outage::BrokersLost) => Some(lost.map_or("every broker is down".to_string(), |(why, _)| why)),
                Some(Outage::Silent(quiet)) => Some(format!("no acknowledgement from Kafka for {} s", quiet.as_secs())),
                None => None,
            };
            if let Some(what) = what {
                outage(&with_cause(&what, cause.as_deref()));
            }
            if may_give_up && !gave_up && watch.gives_up(now, lost_at) {
                // Each purged message is reported (ERR__PURGE_QUEUE or ERR__PURGE_INFLIGHT, both
                // unavailable) on librdkafka's next poll; the flush goes on until they are. Not
                // blocking: a broker thread busy elsewhere (a slow DNS lookup) must not stall the
                // worker, which would then miss a DROP DATABASE.
                let flags = rdkafka_sys::RD_KAFKA_PURGE_F_QUEUE
                    | rdkafka_sys::RD_KAFKA_PURGE_F_INFLIGHT
                    | rdkafka_sys::RD_KAFKA_PURGE_F_NON_BLOCKING;
                unsafe { rdkafka_sys::rd_kafka_purge(self.producer.client().native_ptr(), flags) };
                gave_up = true;
            }
        }
    }

    /// Hands one message to librdkafka (which copies it), waiting while its local queue is full.
    /// Straight through librdkafka's C API with the topic's handle: rdkafka's `send` would copy
    /// the topic name into a new C string and look the topic up by it, and copy every header
    /// name too, for each message.
    fn enqueue(
        &self,
        topic: *mut rdkafka_sys::rd_kafka_topic_t,
        m: &OutboundMessage,
        message_id: &str,
        opaque: usize,
        should_stop: &dyn Fn() -> bool,
    ) -> Result<Result<(), SendFailure>, BatchError> {
        let bytes = |b: Option<&[u8]>| VuValue {
            mem: rdkafka_sys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                ptr: b.map_or(std::ptr::null_mut(), |b| b.as_ptr() as *mut _),
                size: b.map_or(0, <[u8]>::len),
            },
        };
        loop {
            let headers = unsafe { rdkafka_sys::rd_kafka_headers_new(m.headers.len() + 1) };
            let names_and_values = m.headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes()));
            for (name, value) in names_and_values.chain([(MESSAGE_ID_HEADER.as_bytes(), message_id.as_bytes())]) {
                unsafe {
                    rdkafka_sys::rd_kafka_header_add(
                        headers,
                        name.as_ptr().cast(),
                        name.len() as isize,
                        value.as_ptr().cast(),
                        value.len() as isize,
                    )
                };
            }
            let fields = [
                rd_kafka_vu_t { vtype: vtype::RD_KAFKA_VTYPE_RKT, u: VuValue { rkt: topic } },
                rd_kafka_vu_t { vtype: vtype::RD_KAFKA_VTYPE_PARTITION, u: VuValue { i32_: -1 } },
                rd_kafka_vu_t {
                    vtype: vtype::RD_KAFKA_VTYPE_MSGFLAGS,
                    u: VuValue { i: rdkafka_sys::RD_KAFKA_MSG_F_COPY },
                },
                rd_kafka_vu_t { vtype: vtype::RD_KAFKA_VTYPE_VALUE, u: bytes(m.payload.as_deref()) },
                rd_kafka_vu_t { vtype: vtype::RD_KAFKA_VTYPE_KEY, u: bytes(m.key.as_ref().map(String::as_bytes)) },
                rd_kafka_vu_t { vtype: vtype::RD_KAFKA_VTYPE_OPAQUE, u: VuValue { ptr: opaque as *mut _ } },
                rd_kafka_vu_t { vtype: vtype::RD_KAFKA_VTYPE_HEADERS, u: VuValue { headers } },
            ];
            let error = unsafe {
                rdkafka_sys::rd_kafka_produceva(self.producer.client().native_ptr(), fields.as_ptr(), fields.len())
            };
            if error.is_null() {
                // librdkafka owns the headers now.
                return Ok(Ok(()));
            }
            let code: RDKafkaErrorCode = unsafe { rdkafka_sys::rd_kafka_error_code(error) }.into();
            unsafe {
                rdkafka_sys::rd_kafka_error_destroy(error);
                rdkafka_sys::rd_kafka_headers_destroy(headers);
            }
            if code != RDKafkaErrorCode::QueueFull {
                return Ok(Err(SendFailure::from_kafka(&KafkaError::MessageProduction(code))));
            }
            if should_stop() {
                return Err(BatchError::Interrupted);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_are_key_value_pairs() {
        assert_eq!(
            parse_properties("linger.ms=5; compression.type = lz4\nsasl.password=a=b").unwrap(),
            vec![
                ("linger.ms".to_string(), "5".to_string()),
                ("compression.type".to_string(), "lz4".to_string()),
                ("sasl.password".to_string(), "a=b".to_string()),
            ]
        );
        assert!(parse_properties("").unwrap().is_empty());
        assert!(parse_properties("linger.ms").is_err());
    }

    #[test]
    fn properties_are_checked_as_librdkafka_takes_them_without_repeating_a_value() {
        assert_eq!(check_properties("linger.ms=5; compression.type=lz4; sasl.password=s3cret"), Ok(()));
        assert_eq!(check_properties(""), Ok(()));
        assert_eq!(check_properties("lingerms=5"), Err("\"lingerms\" is not a librdkafka property".to_string()));
        // The first refused in the order given.
        assert_eq!(check_properties("linger.ms=5; b=1; a=2"), Err("\"b\" is not a librdkafka property".to_string()));
        for (property, refused) in [
            ("compression.type=s3cret", "invalid value for property \"compression.type\": Invalid value \"***\" for configuration property \"compression.codec\""),
            ("message.timeout.ms=-5", "invalid value for property \"message.timeout.ms\": Configuration property \"message.timeout.ms\" value *** is outside allowed range 0..2147483647"),
            ("socket.timeout.ms=1", "invalid value for property \"socket.timeout.ms\": Configuration property \"socket.timeout.ms\" value *** is outside allowed range 10..300000"),
            ("linger.ms=1e9", "invalid value for property \"linger.ms\": Configuration property \"queue.buffering.max.ms\" value *** is outside allowed range 0..900000"),
            ("acks=e", "invalid value for property \"acks\": Invalid value for configuration property \"request.required.acks\""),
            ("partitioner=qq", "invalid value for property \"partitioner\": Invalid value for configuration property \"partitioner\": ***"),
            ("enable.idempotence=tr", "invalid value for property \"enable.idempotence\": Expected bool value for \"enable.idempotence\": true or false"),
            ("debug=all,foo", "invalid value for property \"debug\": Invalid value \"***\" for configuration property \"debug\""),
        ] {
            assert_eq!(check_properties(property), Err(refused.to_string()), "{property}");
        }
        // Valid alone; librdkafka refuses it with idempotence only when the producer is created.
        assert_eq!(check_properties("acks=1"), Ok(()));
        assert_eq!(
            check_properties("partitioner=se\": cret"),
            Err("invalid value for property \"partitioner\": Invalid value for configuration property \"partitioner\": ***".into())
        );
        // The plugin is not loaded here (only by the worker); its own properties are refused.
        assert_eq!(check_properties("plugin.library.paths=monitoring-interceptor; linger.ms=5"), Ok(()));
        assert!(check_properties("plugin.library.paths=p; confluent.monitoring.interceptor.topic=m").is_err());
    }

    #[test]
    fn librdkafkas_test_properties_are_refused() {
        for property in ["test.mock.num.brokers=1", "ut_handle_ProduceResponse=x"] {
            let name = property.split('=').next().unwrap();
            assert_eq!(check_properties(property), Err(format!("\"{name}\" is a librdkafka test property")));
        }
    }

    #[test]
    fn an_unknown_name_after_a_secret_is_not_shown_it_may_be_the_secrets_end() {
        assert_eq!(
            check_properties("sasl.password=ab;cd=ef"),
            Err("property 2 is not a librdkafka property".to_string())
        );
        assert_eq!(
            check_properties("linger.ms=5; sasl.password=Xq;Zr7=Lm"),
            Err("property 3 is not a librdkafka property".to_string())
        );
        assert_eq!(
            check_properties("sasl.password=a;ut_b=c"),
            Err("property 2 is a librdkafka test property".to_string())
        );
        assert_eq!(check_properties("linger.ms=5;cd=ef"), Err("\"cd\" is not a librdkafka property".to_string()));
    }

    #[test]
    fn a_piece_that_is_not_a_pair_is_named_by_its_place_not_shown() {
        assert_eq!(parse_properties("s3cret"), Err("property 1 is not of the form key=value".to_string()));
        assert_eq!(
            parse_properties("linger.ms=5; sasl.password=Xq;Zr7=Lm;Tw"),
            Err("property 4 is not of the form key=value".to_string())
        );
    }

    #[test]
    fn user_properties_override_the_durable_defaults() {
        let config = SinkConfig {
            bootstrap_servers: "b:9092".into(),
            properties: vec![("linger.ms".into(), "20".into())],
            create_topics: true,
            topic_partitions: 3,
            topic_replication_factor: -1,
        }
        .client_config();
        assert_eq!(config.get("acks"), Some("all"));
        assert_eq!(config.get("enable.idempotence"), Some("true"));
        assert_eq!(config.get("linger.ms"), Some("20"));
        assert_eq!(config.get("bootstrap.servers"), Some("b:9092"));
    }

    #[test]
    fn librdkafkas_warnings_and_errors_are_logged_unless_a_property_asks_for_more() {
        let level = |properties: &[(&str, &str)]| {
            log_level(&properties.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>()) as i32
        };
        assert_eq!(level(&[]), RDKafkaLogLevel::Warning as i32);
        assert_eq!(level(&[("log_level", "6")]), RDKafkaLogLevel::Info as i32);
        assert_eq!(level(&[("log_level", "6"), ("log_level", "3")]), RDKafkaLogLevel::Error as i32, "the last one");
        assert_eq!(level(&[("log_level", "3"), ("debug", "broker,topic")]), RDKafkaLogLevel::Debug as i32);
        assert_eq!(level(&[("debug", "")]), RDKafkaLogLevel::Warning as i32);
    }

    #[test]
    fn a_clusters_log_lines_name_it_and_mask_its_secrets() {
        let cluster = |bootstrap: &str, user: &str| SinkConfig {
            bootstrap_servers: bootstrap.into(),
            properties: vec![("sasl.username".into(), user.into()), ("linger.ms".into(), "20".into())],
            create_topics: true,
            topic_partitions: 3,
            topic_replication_factor: -1,
        };
        // One test takes from the process's queue: two would take each other's lines.
        Reports::for_cluster(&cluster("b:9092", "orders-svc")).log(
            RDKafkaLogLevel::Error,
            "SASL",
            "orders-svc failed to authenticate after 20 ms",
        );
        let acme = "acme.kafka.example:9092";
        Reports::for_cluster(&cluster(acme, "acme")).log(
            RDKafkaLogLevel::Error,
            "FAIL",
            "acme.kafka.example:9092/bootstrap: SASL authentication error",
        );
        let (lines, _) = LIBRDKAFKA_LOG.take();
        let line = lines.iter().find(|l| l.facility == "SASL").expect("queued");
        assert_eq!(line.message, "*** failed to authenticate after 20 ms", "not a secret's value, the rest as it was");
        assert_eq!((line.level, line.cluster.as_str()), (3, "b:9092"));
        let line = lines.iter().find(|l| l.facility == "FAIL").expect("queued");
        assert_eq!(
            (line.cluster.as_str(), line.message.as_str()),
            (acme, "acme.kafka.example:9092/bootstrap: SASL authentication error"),
            "a secret that is part of the brokers' names, which every message shows, is left"
        );
    }

    /// A sink for a port nobody listens on, with `properties`.
    fn sink_for_a_closed_port(properties: &[(&str, &str)], create_topics: bool) -> Result<KafkaSink, String> {
        KafkaSink::new(SinkConfig {
            bootstrap_servers: "127.0.0.1:1".into(),
            properties: properties.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            create_topics,
            topic_partitions: 1,
            topic_replication_factor: -1,
        })
    }

    /// What waits unread in the admin client's main queue.
    fn unread_by_the_admin_client(sink: &KafkaSink) -> i32 {
        unsafe {
            let queue = rdkafka_sys::rd_kafka_queue_get_main(sink.admin.inner().native_ptr());
            let length = rdkafka_sys::rd_kafka_queue_length(queue);
            rdkafka_sys::rd_kafka_queue_destroy(queue);
            length as i32
        }
    }

    #[test]
    fn the_admin_clients_error_events_are_dropped_when_the_sink_is_used_again() {
        let sink = sink_for_a_closed_port(&[("reconnect.backoff.max.ms", "100")], true)
            .expect("a sink for a port nobody listens on");
        // Each try connects, is refused, and waits 5 s for an answer.
        let tried = sink.create_topic("never-created", &|| false);
        assert!(matches!(tried, Err(BatchError::Unavailable(_))), "{tried:?}");
        let unread = unread_by_the_admin_client(&sink);
        assert!(unread > 0, "librdkafka queues the refusals for nobody");
        // The next try drops them; its own refusals are the same error, which librdkafka does
        // not say again within 30 s.
        let tried = sink.create_topic("never-created", &|| false);
        assert!(matches!(tried, Err(BatchError::Unavailable(_))), "{tried:?}");
        assert_eq!(unread_by_the_admin_client(&sink), 0, "{unread} before");
    }

    #[test]
    fn a_bad_property_value_is_not_repeated_in_the_error() {
        let err = sink_for_a_closed_port(&[("security.protocol", "hunter2-secret")], false)
            .err()
            .expect("librdkafka rejects the value");
        assert!(err.contains("security.protocol"), "{err}");
        assert!(!err.contains("hunter2-secret"), "{err}");
    }

    #[test]
    fn reports_are_filed_by_position_and_a_late_one_of_an_earlier_batch_is_dropped() {
        let reports = Reports::default();
        {
            let mut filed = reports.filed();
            filed.batch = 7;
            filed.reports = vec![None, None, None];
        }
        reports.file(opaque(6, 0), Ok(()));
        reports.file(opaque(7, 2), Err(SendFailure::Refused("too large".into())));
        reports.file(opaque(7, 1), Ok(()));
        reports.file(opaque(7, 3), Ok(()));
        let filed = reports.filed();
        assert!(filed.reports[0].is_none(), "batch 6's report is not batch 7's first");
        assert!(matches!(filed.reports[1], Some(Ok(()))));
        assert!(matches!(filed.reports[2], Some(Err(SendFailure::Refused(_)))));
        assert_eq!(filed.reports.len(), 3, "a position past the batch is ignored");
    }

    #[test]
    fn an_outage_is_reported_with_librdkafkas_latest_error_and_an_acknowledgement_clears_it() {
        let reports = Reports::default();
        reports.filed().reports = vec![None];
        reports.error(
            KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused",
        );
        reports.error(KafkaError::Global(RDKafkaErrorCode::AllBrokersDown), "1/1 brokers are down");
        let now = Instant::now();
        {
            let filed = reports.filed();
            let down = &filed.brokers_down.as_ref().expect("every broker is down").0;
            assert_eq!(
                with_cause(down, filed.cause(now)),
                "1/1 brokers are down (librdkafka: 127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused)"
            );
            assert_eq!(
                filed.cause(now + Filed::CAUSE_FRESH + Duration::from_secs(1)),
                None,
                "an old error is not news"
            );
        }
        reports.file(opaque(0, 0), Ok(()));
        assert_eq!(reports.filed().cause(now), None, "a broker that acknowledged is reachable again");
        assert_eq!(with_cause("every broker is down", None), "every broker is down");
        assert_eq!(with_cause("failed: Connection refused", Some("Connection refused")), "failed: Connection refused");
    }

    #[test]
    fn a_batch_remembers_a_failure_that_no_purge_caused() {
        let reports = Reports::default();
        reports.filed().reports = vec![None; 3];
        reports.file(opaque(0, 0), Ok(()));
        reports.file_as(opaque(0, 1), Err(SendFailure::Unavailable("purged".into())), true);
        assert!(!reports.filed().failed_unpurged, "acknowledged, then purged");
        reports.file(opaque(0, 2), Err(SendFailure::Unavailable("timed out".into())));
        assert!(reports.filed().failed_unpurged);
        reports.filed().failed_unpurged = false;
        reports.file(opaque(1, 0), Err(SendFailure::Unavailable("another batch's report".into())));
        assert!(!reports.filed().failed_unpurged, "a report of another batch is dropped");
    }

    #[test]
    fn properties_librdkafka_refuses_only_together_fail_at_creation_with_librdkafkas_reason() {
        // Valid alone; not beside the idempotence the worker asks for.
        let err =
            sink_for_a_closed_port(&[("acks", "1")], false).err().expect("librdkafka refuses acks=1 with idempotence");
        assert!(err.starts_with("cannot create Kafka producer: ") && err.contains("acks"), "{err}");
    }
}
