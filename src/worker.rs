//! The forwarding worker of one database: a loop of read (short transaction) -> send (no
//! transaction) -> record (short transaction), asleep on its latch when there is nothing to do.
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use pg_outbox_bgworker::message::MessageIds;
use pg_outbox_bgworker::sink::BatchError;
use pg_outbox_bgworker::{
    plan_batch, replace_producer, BatchOutcome, ClusterOutages, Coalescing, KafkaSink, LogRepeats, OutboundMessage,
    SendFailure, SinkConfig, TopicCounters, LIBRDKAFKA_LOG,
};

use crate::guc;
use crate::shmem::{self, BrokerState, WorkerState};
use crate::store::{self, Batch, Destination, Hold, Settlement, WindowPosition, Work};

/// How often storage rotation is looked at.
const ROTATION_CHECK: Duration = Duration::from_secs(1);
/// How often per-topic counters are written to outbox.topics (see TopicCounters).
const COUNTERS_INTERVAL: Duration = Duration::from_secs(1);

/// How long a cluster found down, one of several, may take to answer when it is tried again.
const CLUSTER_PROBE: Duration = Duration::from_secs(1);
/// How long an exiting worker waits at most for its producers to be destroyed (should
/// librdkafka wedge): as long as a destroy on its own thread would have taken, otherwise.
const RETIRE_AT_EXIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Wake {
    Latch,
    Timeout,
}

/// What the worker says when it leaves so that a command can have its database to itself.
const LEAVING_FOR_A_DATABASE_COMMAND: &str = "pg_outbox: another session needs the database to itself (DROP DATABASE, ALTER DATABASE ... RENAME or SET TABLESPACE, or CREATE DATABASE ... TEMPLATE it), worker exits";

/// How long the worker sleeps at most before it looks for a DROP DATABASE: DROP DATABASE waits
/// 5 s for the database's sessions to leave, and on Postgres 15 nothing wakes a background worker
/// for it, while a reconnect backoff or `pg_outbox.poll_interval` can be a minute.
const DROP_CHECK: Duration = Duration::from_secs(1);

/// Sleeps on the latch; a commit that enqueued (or SIGHUP/SIGTERM) sets it. Returns early, as a
/// timeout, when the database is being dropped: the next cycle's read sees it and the worker exits.
fn wait(timeout: Duration) -> Wake {
    let deadline = Instant::now() + timeout;
    loop {
        write_librdkafka_log();
        let slice = deadline.saturating_duration_since(Instant::now()).min(DROP_CHECK);
        let millis = slice.as_millis().clamp(1, i64::from(i32::MAX) as u128) as std::ffi::c_long;
        let flags = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
        let rc = unsafe {
            let rc = pg_sys::WaitLatch(pg_sys::MyLatch, flags as i32, millis, pg_sys::PG_WAIT_EXTENSION);
            pg_sys::ResetLatch(pg_sys::MyLatch);
            pg_sys::check_for_interrupts!();
            rc
        };
        if rc & pg_sys::WL_LATCH_SET as i32 != 0 {
            return Wake::Latch;
        }
        if Instant::now() >= deadline || store::database_drop_pending() {
            return Wake::Timeout;
        }
    }
}

fn stop_requested() -> bool {
    BackgroundWorker::sigterm_received()
}

/// While a batch waits for the broker (up to the message timeout when it is down), the worker
/// also leaves for a DROP DATABASE, which would otherwise fail after its 5 s wait. Asked between
/// the waits of a batch, it is also when what librdkafka logged meanwhile is written.
fn stop_or_drop_requested() -> bool {
    write_librdkafka_log();
    stop_requested() || store::database_drop_pending()
}

thread_local! {
    /// Which of librdkafka's lines were written lately (see `LogRepeats`).
    static LIBRDKAFKA_REPEATS: RefCell<LogRepeats> = RefCell::default();
}

/// Writes what librdkafka logged since the last call to the server log: its threads may not.
fn write_librdkafka_log() {
    let (lines, dropped) = LIBRDKAFKA_LOG.take();
    // Asked every millisecond while a batch waits; mostly there is nothing.
    if lines.is_empty() && dropped == 0 {
        return;
    }
    let now = Instant::now();
    LIBRDKAFKA_REPEATS.with_borrow_mut(|repeats| {
        for line in &lines {
            let Some(unsaid) = repeats.admit(line, now) else { continue };
            let repeated = match unsaid {
                0 => String::new(),
                n => format!(" [{n} more times since it was last logged]"),
            };
            let text = format!(
                "pg_outbox: librdkafka (Kafka cluster {}) {}: {}{repeated}",
                line.cluster, line.facility, line.message
            );
            match line.is_warning() {
                true => warning!("{text}"),
                false => log!("{text}"),
            }
        }
    });
    if dropped > 0 {
        warning!("pg_outbox: {dropped} lines of librdkafka's log were left out: it wrote them faster than the worker passes them on");
    }
}

struct Worker {
    slot: usize,
    database_oid: u32,
    system_identifier: u64,
    /// One producer per Kafka cluster: the default one, and those of outbox.destinations.
    sinks: HashMap<SinkConfig, KafkaSink>,
    /// With several clusters, those found down, by bootstrap servers: a SIGHUP that changes the
    /// properties every route inherits changes every `SinkConfig`, not which clusters are down.
    /// (With one cluster, an outage holds the whole batch.)
    outages: ClusterOutages<String>,
    /// Threads destroying producers (`retire`), joined before the worker exits.
    retiring: Vec<std::thread::JoinHandle<()>>,
    /// Errors of routes whose properties do not parse, as logged (once each).
    invalid_routes: HashSet<String>,
    state: WorkerState,
    broker: BrokerState,
    unavailable_since: Option<Instant>,
    reconnect_failures: u32,
    last_rotation_check: Option<Instant>,
    counters: TopicCounters,
    /// The next batch of a backlog, read while the acknowledgements of the one before it were
    /// outstanding; taken by the next cycle if that batch came back clean.
    read_ahead: Option<Batch>,
    coalescing: Coalescing,
}

/// What the loop does after one cycle.
enum Next {
    /// More messages are waiting: go again at once.
    Continue,
    /// Nothing to do: sleep until woken or for this long.
    Sleep(Duration),
    Exit,
}

impl Worker {
    fn set_state(&mut self, state: WorkerState) {
        if self.state != state {
            self.state = state;
            shmem::update(self.slot, |s| s.state = state);
        }
    }

    /// A failed attempt: counts towards the reconnect backoff.
    fn broker_unavailable(&mut self, error: &str) {
        self.reconnect_failures += 1;
        self.report_outage(error);
    }

    /// Says the broker is unavailable (logged once per outage) without counting an attempt: a
    /// batch still waiting for its acknowledgements is not a failed one yet.
    fn report_outage(&mut self, error: &str) {
        if self.broker != BrokerState::Unavailable {
            log!("pg_outbox: Kafka is unavailable, messages wait in the outbox and will be retried: {error}");
            self.unavailable_since = Some(Instant::now());
        }
        self.broker = BrokerState::Unavailable;
        shmem::update(self.slot, |s| {
            s.broker = BrokerState::Unavailable;
            s.set_last_error(error);
        });
        self.set_state(WorkerState::BrokerUnavailable);
    }

    fn broker_connected(&mut self) {
        if self.broker == BrokerState::Unavailable {
            let down = self.unavailable_since.map(|t| t.elapsed().as_secs_f64()).unwrap_or_default();
            log!("pg_outbox: Kafka is reachable again after {down:.1} s, delivery resumed");
        }
        self.broker = BrokerState::Connected;
        self.reconnect_failures = 0;
        self.unavailable_since = None;
        // With several clusters, one down is enough for worker_status to say so.
        self.show_broker_state();
    }

    /// A batch the cluster did not take waits in the table and goes again after the backoff,
    /// through a new producer when `replace_producer` says so (`timed_out`: its messages timed
    /// out "possibly persisted").
    fn wait_for_broker(&mut self, error: &str, timed_out: bool) -> Next {
        self.broker_unavailable(error);
        // One cluster: the producer of the batch is the only one.
        let failed_tries = self.sinks.values_mut().map(KafkaSink::failed_try).max().unwrap_or(0);
        if replace_producer(failed_tries, timed_out) {
            self.retire_all();
        }
        Next::Sleep(self.reconnect_delay())
    }

    /// Backoff before talking to an unavailable broker again.
    fn reconnect_delay(&self) -> Duration {
        guc::retry_backoff().after_failures(self.reconnect_failures.max(1))
    }

    /// The producer of one cluster, created on first use.
    fn take_sink(&mut self, config: &SinkConfig) -> Result<KafkaSink, String> {
        let sink = match self.sinks.remove(config) {
            Some(sink) => sink,
            None => KafkaSink::new(config.clone())?,
        };
        if shmem::update(self.slot, |s| std::mem::take(&mut s.inject_fatal_error)) {
            sink.inject_fatal_error();
        }
        Ok(sink)
    }

    /// Produces `messages` through the sink of each one's destination and returns one report per
    /// message, in order. Producers whose settings changed (SIGHUP) are replaced.
    /// With one cluster, `meanwhile` runs while the acknowledgements are outstanding (with
    /// several, not at all).
    fn send(
        &mut self,
        messages: &[OutboundMessage],
        destinations: &HashMap<String, Destination>,
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<Result<(), SendFailure>>, BatchError> {
        let default_config = guc::sink_config().map_err(BatchError::Unavailable)?;
        // The cluster of each route that names one, or why its properties do not parse.
        let routes: HashMap<&str, Result<SinkConfig, String>> = destinations
            .iter()
            .filter_map(|(topic, d)| {
                let bootstrap = d.bootstrap_servers.as_deref()?;
                let cluster = guc::sink_config_for(bootstrap, d.kafka_properties.as_deref())
                    .map_err(|e| format!("the route of topic \"{topic}\": {e}"));
                Some((topic.as_str(), cluster))
            })
            .collect();
        let in_use =
            |config: &SinkConfig| *config == default_config || routes.values().any(|r| r.as_ref() == Ok(config));
        let unused: Vec<KafkaSink> = self.sinks.extract_if(|config, _| !in_use(config)).map(|(_, sink)| sink).collect();
        unused.into_iter().for_each(|sink| self.retire(sink));
        let several = routes.values().any(|r| r.as_ref() != Ok(&default_config));
        let outages = self.outages.len();
        match several {
            true => self.outages.retain(|bootstrap| {
                default_config.bootstrap_servers == *bootstrap
                    || routes.values().any(|r| r.as_ref().is_ok_and(|c| c.bootstrap_servers == *bootstrap))
            }),
            false => self.outages = ClusterOutages::default(),
        }
        if self.outages.len() < outages {
            self.show_broker_state();
        }
        // A route fixed and broken again is logged again.
        self.invalid_routes.retain(|e| routes.values().any(|r| r.as_ref().err() == Some(e)));
        if !several {
            // No routes, or routes that only rename topics: one cluster.
            let renamed: Vec<OutboundMessage>;
            let messages = if destinations.is_empty() {
                messages
            } else {
                renamed = messages.iter().map(|m| renamed_for(m, destinations)).collect();
                &renamed
            };
            return self.send_to_one_cluster(default_config, messages, meanwhile);
        }
        let groups = group_by_cluster(messages, destinations, &routes, &default_config);
        self.send_routed(messages.len(), groups)
    }

    /// Every message to one cluster. An outage of it holds the whole batch, which waits in place
    /// and goes again as it was (see `cycle`).
    fn send_to_one_cluster(
        &mut self,
        config: SinkConfig,
        messages: &[OutboundMessage],
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<Result<(), SendFailure>>, BatchError> {
        let message_ids = MessageIds::new(self.system_identifier, self.database_oid);
        let mut sink = self.take_sink(&config).map_err(BatchError::Unavailable)?;
        let reports = sink.produce_batch(messages, &message_ids, &stop_or_drop_requested).and_then(|in_flight| {
            meanwhile();
            let waited =
                sink.wait_batch(in_flight, &stop_or_drop_requested, false, &mut |reason| self.report_outage(reason));
            waited.map(|(reports, _)| reports)
        });
        self.sinks.insert(config, sink);
        reports
    }

    /// Several clusters: each cluster's messages (a group of `group_by_cluster`) go through its
    /// own producer, all clusters at once. A cluster that is down (or that was, and is not to be
    /// tried yet) holds back only its own messages: they are reported `Deferred`, to wait in
    /// held_messages, while the others are delivered.
    fn send_routed(
        &mut self,
        count: usize,
        mut groups: Vec<ClusterGroup>,
    ) -> Result<Vec<Result<(), SendFailure>>, BatchError> {
        let message_ids = MessageIds::new(self.system_identifier, self.database_oid);
        let mut reports: Vec<Option<Result<(), SendFailure>>> = vec![None; count];
        let defer = |reports: &mut [Option<Result<(), SendFailure>>], indexes: &[usize], error: &str, until| {
            for &i in indexes {
                reports[i] = Some(Err(SendFailure::Deferred { error: error.to_string(), until }));
            }
        };
        // The clusters that are up first: a cluster found down is probed, and its probe must not
        // delay what the others can take.
        groups.sort_by_key(|g| g.0.as_ref().is_ok_and(|config| self.outages.is_down(&config.bootstrap_servers)));
        let mut in_flight = Vec::new();
        for (route, indexes, routed) in groups {
            let config = match route {
                Ok(config) => config,
                Err(error) => {
                    // A route whose properties do not parse: its messages wait for it to be fixed.
                    let until = Instant::now() + guc::retry_backoff().max;
                    self.route_invalid(&error);
                    defer(&mut reports, &indexes, &error, until);
                    continue;
                }
            };
            if let Some((outage, _)) = self.outages.waiting(&config.bootstrap_servers, Instant::now()) {
                defer(&mut reports, &indexes, &outage.error, outage.retry_at);
                continue;
            }
            let mut sink = match self.take_sink(&config) {
                Ok(sink) => sink,
                Err(error) => {
                    let (until, error) = self.cluster_failed(&config, &error);
                    defer(&mut reports, &indexes, &error, until);
                    continue;
                }
            };
            // A cluster found down is asked for metadata first, briefly: a try of one still down
            // then holds the other clusters back for no longer than that.
            let ready = match self.outages.is_down(&config.bootstrap_servers) {
                true => sink.probe(&routed[0].topic, CLUSTER_PROBE).map_err(BatchError::Unavailable),
                false => Ok(()),
            };
            match ready.and_then(|()| sink.produce_batch(&routed, &message_ids, &stop_or_drop_requested)) {
                Ok(batch) => in_flight.push((config, indexes, sink, batch)),
                Err(BatchError::Unavailable(error)) => {
                    // Nothing of it was handed over: the producer keeps connecting in the
                    // background, for the next try (a cluster slow to connect, TLS and SASL
                    // across an ocean, could never answer a new producer's probe in time),
                    // unless `replace_producer` says it may be wedged.
                    let (until, error) = self.cluster_failed(&config, &error);
                    let sink = match replace_producer(sink.failed_try(), false) {
                        // Made now, so that it is connecting while the messages wait.
                        true => {
                            self.retire(sink);
                            KafkaSink::new(config.clone()).ok()
                        }
                        false => Some(sink),
                    };
                    if let Some(sink) = sink {
                        self.sinks.insert(config.clone(), sink);
                    }
                    defer(&mut reports, &indexes, &error, until);
                }
                Err(interrupted) => {
                    // Destroyed off this thread, as below: each destroy may wait on a cluster that
                    // is down, and so they wait side by side (see `retire_before_exit`).
                    self.retire(sink);
                    in_flight.into_iter().for_each(|(_, _, sink, _)| self.retire(sink));
                    return Err(interrupted);
                }
            }
        }
        let mut in_flight = in_flight.into_iter();
        while let Some((config, indexes, mut sink, batch)) = in_flight.next() {
            let mut outage = None;
            let waited =
                sink.wait_batch(batch, &stop_or_drop_requested, true, &mut |reason| outage = Some(reason.to_string()));
            let (group_reports, purged_cleanly) = match waited {
                Ok(waited) => waited,
                Err(interrupted) => {
                    self.retire(sink);
                    in_flight.for_each(|(_, _, sink, _)| self.retire(sink));
                    return Err(interrupted);
                }
            };
            let unavailable = group_reports.iter().find_map(|r| match r {
                Err(SendFailure::Unavailable(e)) => Some(e.clone()),
                _ => None,
            });
            let Some(error) = outage.filter(|_| unavailable.is_some()).or(unavailable) else {
                // A fatal error is not a recovery: the whole batch goes again (see `cycle`).
                let fatal = group_reports.iter().any(|r| matches!(r, Err(SendFailure::Fatal(_))));
                if let Some(down) = self.outages.recovered(&config.bootstrap_servers, Instant::now()).filter(|_| !fatal)
                {
                    log!(
                        "pg_outbox: Kafka cluster {} is reachable again after {:.1} s",
                        config.bootstrap_servers,
                        down.as_secs_f64()
                    );
                }
                for (i, report) in indexes.into_iter().zip(group_reports) {
                    reports[i] = Some(report);
                }
                self.sinks.insert(config, sink);
                continue;
            };
            let (until, error) = self.cluster_failed(&config, &error);
            // Given up with nothing failed before: what was acknowledged of a key came before
            // what was purged (a partition's requests complete in order), and stays delivered.
            // Otherwise (a message timeout) a key's later message may have been acknowledged
            // after an earlier one expired: then the cluster's whole part waits and goes again,
            // in order.
            for (i, report) in indexes.into_iter().zip(group_reports) {
                reports[i] = Some(match report {
                    Ok(()) | Err(SendFailure::Refused(_)) if purged_cleanly => report,
                    Err(SendFailure::Fatal(e)) => Err(SendFailure::Fatal(e)),
                    _ => Err(SendFailure::Deferred { error: error.clone(), until }),
                });
            }
            // The next try starts over with a new idempotent producer (as `cycle` does with one
            // cluster after messages timed out "possibly persisted"), made now so that it is
            // connecting while the cluster's messages wait.
            self.retire(sink);
            if let Ok(fresh) = KafkaSink::new(config.clone()) {
                self.sinks.insert(config, fresh);
            }
        }
        Ok(reports.into_iter().map(|r| r.unwrap_or_else(|| Err(SendFailure::Unavailable("not sent".into())))).collect())
    }

    /// Destroys a producer on a thread of its own: librdkafka's destroy waits for its broker
    /// threads, which a cluster that is down can hold up (in a connect or a DNS lookup), and the
    /// worker must stay responsive to SIGTERM and DROP DATABASE. The thread touches nothing of
    /// Postgres.
    fn retire(&mut self, sink: KafkaSink) {
        self.retiring.retain(|t| !t.is_finished());
        // The thread starts with every signal blocked (it inherits the mask), as librdkafka's
        // own threads do: Postgres's handlers are for the worker's thread. Without a thread,
        // the closure, and the producer with it, is dropped here.
        unsafe { pg_sys::BackgroundWorkerBlockSignals() };
        let thread = std::thread::Builder::new().name("pg_outbox retire".into()).spawn(move || drop(sink));
        unsafe { pg_sys::BackgroundWorkerUnblockSignals() };
        if let Ok(thread) = thread {
            self.retiring.push(thread);
        }
    }

    /// Every producer, to be made again on next use.
    fn retire_all(&mut self) {
        let sinks: Vec<KafkaSink> = self.sinks.drain().map(|(_, sink)| sink).collect();
        sinks.into_iter().for_each(|sink| self.retire(sink));
    }

    /// Before the worker exits: every producer is destroyed, and the worker waits for it. The
    /// process must not exit while a destroy is under way on another thread: `exit` runs
    /// OpenSSL's cleanup beneath it.
    fn retire_before_exit(&mut self) {
        self.retire_all();
        let deadline = Instant::now() + RETIRE_AT_EXIT;
        while self.retiring.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A route's properties do not parse: said once per distinct error (`invalid_routes`).
    fn route_invalid(&mut self, error: &str) {
        if self.invalid_routes.insert(error.to_string()) {
            log!("pg_outbox: {error}; the messages of its topic wait until outbox.destinations is fixed");
        }
        shmem::update(self.slot, |s| s.set_last_error(error));
    }

    /// What worker_status shows: unavailable while the broker is, or while any of several
    /// clusters is down.
    fn show_broker_state(&self) {
        let shown = if self.outages.is_empty() { self.broker } else { BrokerState::Unavailable };
        shmem::update(self.slot, |s| s.broker = shown);
    }

    /// A try of one of several clusters failed: its messages wait until the time returned, with
    /// the error returned (which names the cluster). The outage is logged once, when it starts
    /// (its end, by `send_routed`).
    fn cluster_failed(&mut self, config: &SinkConfig, error: &str) -> (Instant, String) {
        let now = Instant::now();
        if !self.outages.is_down(&config.bootstrap_servers) {
            log!(
                "pg_outbox: Kafka cluster {} is unavailable, its messages wait while the other clusters' go on: {error}",
                config.bootstrap_servers
            );
        }
        let error = format!("Kafka cluster {}: {error}", config.bootstrap_servers);
        let wait = self.outages.failed(&config.bootstrap_servers, &error, now, &guc::retry_backoff());
        shmem::update(self.slot, |s| {
            s.broker = BrokerState::Unavailable;
            s.set_last_error(&error);
        });
        (now + wait, error)
    }

    fn maybe_rotate(&mut self) {
        if self.last_rotation_check.is_some_and(|t| t.elapsed() < ROTATION_CHECK) {
            return;
        }
        self.last_rotation_check = Some(Instant::now());
        let interval = f64::from(guc::ROTATION_INTERVAL_MS.get()) / 1000.0;
        let retention = f64::from(guc::RETENTION_S.get());
        if let Some(current) = store::rotate(interval, retention) {
            shmem::update(self.slot, |s| s.current_slot = current);
        }
    }

    fn cycle(&mut self) -> Next {
        if unsafe { pg_sys::RecoveryInProgress() } {
            self.set_state(WorkerState::Standby);
            return Next::Sleep(poll_interval());
        }
        let batch_size = i64::from(guc::BATCH_SIZE.get());
        let read_at = Instant::now();
        let prefetched = self.read_ahead.take();
        let was_read_ahead = prefetched.is_some();
        let read = match prefetched {
            Some(batch) => Work::Batch(batch),
            None => store::read_batch(batch_size, None),
        };
        let batch = match read {
            Work::NoExtension => {
                self.set_state(WorkerState::WaitingForExtension);
                return Next::Sleep(poll_interval());
            }
            Work::OutdatedExtension(version) => {
                if self.state != WorkerState::OutdatedExtension {
                    log!(
                        "pg_outbox: the extension's SQL objects are version {version}, this library needs {}: run ALTER EXTENSION pg_outbox UPDATE",
                        store::SQL_VERSION
                    );
                }
                self.set_state(WorkerState::OutdatedExtension);
                return Next::Sleep(poll_interval());
            }
            Work::DatabaseDropping => {
                log!("{LEAVING_FOR_A_DATABASE_COMMAND}");
                return Next::Exit;
            }
            Work::Batch(batch) => batch,
        };
        // (A batch read ahead may predate the last rotation.)
        if !was_read_ahead {
            shmem::update(self.slot, |s| s.current_slot = batch.current_slot);
        }
        let retry_count = batch.retries.len();
        let next_due_in = batch.next_due_in;
        let backlog_starts_after = batch.backlog_starts_after;
        let plan = plan_batch(batch.retries, batch.fresh, &batch.blocked_keys, &batch.paused_topics);
        let mut settlement = Settlement {
            window: batch.window,
            window_continues: batch.window_continues,
            window_changed: batch.window_changed,
            ..Settlement::default()
        };
        // Fresh messages in delivery order, with where they went (Some(index in plan.send)).
        let fresh_ids: Vec<i64> = {
            let mut ids: Vec<i64> = plan.send.iter().skip(retry_count).chain(plan.hold.iter()).map(|m| m.id).collect();
            ids.sort_unstable();
            ids
        };
        settlement.last_fresh_id = fresh_ids.last().copied();

        if plan.send.is_empty() && plan.hold.is_empty() {
            settlement.topic_counts = self.counters.take_due(Instant::now());
            if settlement.window_changed || !settlement.topic_counts.is_empty() {
                store::record(&settlement, guc::MAX_ATTEMPTS.get(), &backoff_table());
            }
            self.maybe_rotate();
            self.set_state(WorkerState::Idle);
            let wait = self.idle_wait(next_due_in);
            self.coalescing.observe(0, read_at, Instant::now());
            shmem::update(self.slot, |s| s.wakeups_empty += 1);
            return Next::Sleep(wait);
        }

        let mut read_ahead = None;
        let reports = if plan.send.is_empty() {
            Vec::new()
        } else {
            self.set_state(WorkerState::Forwarding);
            store::flush_commits(batch.commits_end);
            store::flush_recorded(plan.send.len() as i64, batch_size);
            shmem::update(self.slot, |s| s.in_flight = plan.send.len() as i32);
            // A backlog of plain fresh messages: read the next batch while the broker acknowledges
            // this one, so the database and the broker work at the same time. Only such a batch
            // can be followed at once by the next: with nothing held, paused or routed, the next
            // batch's plan does not depend on how this one ends. It is used only if this one
            // comes back clean (see below).
            let position = match settlement.last_fresh_id {
                Some(last_id)
                    if settlement.window_continues
                        && retry_count == 0
                        && plan.hold.is_empty()
                        && batch.destinations.is_empty() =>
                {
                    Some(WindowPosition { window: settlement.window.clone(), last_id })
                }
                _ => None,
            };
            let sent = self.send(&plan.send, &batch.destinations, &mut || {
                if let Some(position) = &position {
                    read_ahead = Some(store::read_batch(batch_size, Some(position)));
                }
            });
            shmem::update(self.slot, |s| s.in_flight = 0);
            match sent {
                Ok(reports) => reports,
                Err(BatchError::Interrupted) => {
                    if !stop_requested() {
                        log!("{LEAVING_FOR_A_DATABASE_COMMAND}");
                    }
                    return Next::Exit;
                }
                Err(BatchError::Unavailable(e)) => {
                    keep_backlog_window(&settlement.window, backlog_starts_after);
                    return self.wait_for_broker(&e, false);
                }
            }
        };
        let outcome = BatchOutcome::from_reports(reports);
        if let Some(fatal) = &outcome.fatal {
            log!("pg_outbox: the Kafka producer failed ({fatal}); recreating it and resending unacknowledged messages");
            self.retire_all();
            shmem::update(self.slot, |s| s.set_last_error(fatal));
            keep_backlog_window(&settlement.window, backlog_starts_after);
            return Next::Continue;
        }
        if let Some(e) = &outcome.unavailable {
            keep_backlog_window(&settlement.window, backlog_starts_after);
            return self.wait_for_broker(e, outcome.timed_out);
        }
        // Only a batch that went to the broker says it is reachable (one of held messages only,
        // or of clusters that are down, did not ask it).
        if outcome.deferred.len() < plan.send.len() {
            self.broker_connected();
        }
        if outcome.refused.is_empty() {
            self.read_ahead = match read_ahead {
                Some(Work::Batch(next)) => Some(next),
                _ => None,
            };
        }
        settle(&mut settlement, &mut self.counters, &plan.send, &plan.hold, &outcome);
        settlement.topic_counts = self.counters.take_due(Instant::now());
        store::record(&settlement, guc::MAX_ATTEMPTS.get(), &backoff_table());
        shmem::announce_deliveries();
        let delivered = outcome.delivered.len() as i64;
        if let Some((_, error)) = outcome.refused.first() {
            shmem::update(self.slot, |s| s.set_last_error(error));
        }
        self.coalescing.observe(fresh_ids.len(), read_at, Instant::now());
        shmem::update(self.slot, |s| {
            s.batches += 1;
            s.delivered += delivered;
        });
        self.maybe_rotate();
        // Go again at once only if there is known work. Otherwise wait on the latch: a commit
        // that lands while this cycle ran has set it, so the wait returns at once; without one,
        // reading again would only find nothing.
        let more = settlement.window_continues || retry_count > 0 || !settlement.hold_fresh.is_empty();
        if more {
            return Next::Continue;
        }
        self.set_state(WorkerState::Idle);
        Next::Sleep(self.idle_wait(next_due_in))
    }

    /// How long to sleep: until the next held message falls due or counts are to be written.
    fn idle_wait(&self, next_due_in: Option<f64>) -> Duration {
        let wait = until_due(next_due_in);
        self.counters.due_in(Instant::now()).map_or(wait, |due| wait.min(due))
    }

    /// Writes the counts not written yet (the worker is stopping).
    fn write_counters(&mut self) {
        let settlement = Settlement { topic_counts: self.counters.take_all(Instant::now()), ..Settlement::default() };
        if !settlement.topic_counts.is_empty() {
            store::record(&settlement, guc::MAX_ATTEMPTS.get(), &backoff_table());
        }
    }
}

/// The messages of one cluster, in delivery order: the cluster (or why its route's properties do
/// not parse), their indexes in the batch, and the messages under their Kafka topic names.
type ClusterGroup = (Result<SinkConfig, String>, Vec<usize>, Vec<OutboundMessage>);

/// Each cluster's messages (see `ClusterGroup`); `routes` has the cluster of each route that names one.
fn group_by_cluster(
    messages: &[OutboundMessage],
    destinations: &HashMap<String, Destination>,
    routes: &HashMap<&str, Result<SinkConfig, String>>,
    default_config: &SinkConfig,
) -> Vec<ClusterGroup> {
    let mut groups: Vec<ClusterGroup> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let cluster = routes.get(m.topic.as_str()).cloned().unwrap_or_else(|| Ok(default_config.clone()));
        let routed = renamed_for(m, destinations);
        match groups.iter_mut().find(|g| g.0 == cluster) {
            Some(group) => {
                group.1.push(i);
                group.2.push(routed);
            }
            None => groups.push((cluster, vec![i], vec![routed])),
        }
    }
    groups
}

/// The message under the Kafka topic name its route gives it.
fn renamed_for(m: &OutboundMessage, destinations: &HashMap<String, Destination>) -> OutboundMessage {
    let mut routed = m.clone();
    if let Some(topic) = destinations.get(&m.topic).and_then(|d| d.kafka_topic.clone()) {
        routed.topic = topic;
    }
    routed
}

/// A batch that starts a new backlog window did not get through: records where the window
/// starts, so that the next attempt goes on from there. Otherwise each attempt would read the
/// window anew and pass over every unsettled row to find its lowest id, once per reconnect while
/// the broker is down, over a backlog that grows all the while.
fn keep_backlog_window(window: &str, starts_after: Option<i64>) {
    let Some(after) = starts_after else { return };
    let position = Settlement {
        window: window.to_string(),
        window_continues: true,
        window_changed: true,
        last_fresh_id: Some(after),
        ..Settlement::default()
    };
    store::record(&position, guc::MAX_ATTEMPTS.get(), &backoff_table());
}

/// Turns delivery reports into what the record transaction writes.
fn settle(
    s: &mut Settlement,
    counters: &mut TopicCounters,
    sent: &[OutboundMessage],
    held_back: &[OutboundMessage],
    outcome: &BatchOutcome,
) {
    s.delivered = outcome.delivered.len() as i64;
    for &i in &outcome.delivered {
        let m = &sent[i];
        counters.count(&m.topic, 1, 0);
        if m.held {
            s.delivered_held.push(m.id);
        }
    }
    let mut hold: Vec<Hold> = held_back.iter().map(|m| Hold { id: m.id, ..Hold::default() }).collect();
    for (i, error) in &outcome.refused {
        let m = &sent[*i];
        counters.count(&m.topic, 0, 1);
        if m.held {
            s.refused_held.push((m.id, error.clone()));
        } else {
            hold.push(Hold { id: m.id, attempts: 1, error: Some(error.clone()), wait: None });
        }
    }
    // Not an attempt: their cluster is down. They wait until it is tried again.
    let now = Instant::now();
    for (i, error, until) in &outcome.deferred {
        let m = &sent[*i];
        let wait = until.saturating_duration_since(now).as_secs_f64();
        if m.held {
            s.postponed_held.push((m.id, error.clone(), wait));
        } else {
            hold.push(Hold { id: m.id, attempts: 0, error: Some(error.clone()), wait: Some(wait) });
        }
    }
    // Held rows queue up in delivery (id) order within the window.
    hold.sort_by_key(|h| h.id);
    s.hold_fresh = hold;
}

/// How long to sleep: until the next held message falls due, at most the poll interval.
fn until_due(next_due_in: Option<f64>) -> Duration {
    next_due_in.map_or(poll_interval(), |secs| Duration::from_secs_f64(secs.max(0.001)).min(poll_interval()))
}

fn poll_interval() -> Duration {
    Duration::from_millis(guc::POLL_INTERVAL_MS.get().max(10) as u64)
}

/// Retry delay in seconds after n failed attempts, indexed 1..=max_attempts+1 (SQL arrays).
fn backoff_table() -> Vec<f64> {
    let backoff = guc::retry_backoff();
    (1..=guc::MAX_ATTEMPTS.get().max(1) as u32 + 1).map(|n| backoff.after_failures(n).as_secs_f64()).collect()
}

/// A setting for this process only, which postgresql.conf reloads do not undo.
fn worker_setting(name: &std::ffi::CStr, value: &std::ffi::CStr) {
    unsafe {
        pg_sys::SetConfigOption(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        )
    };
}

#[pg_guard]
unsafe extern "C-unwind" fn on_worker_exit(_code: i32, arg: pg_sys::Datum) {
    let slot = arg.value();
    shmem::update(slot, |s| {
        s.pid = 0;
        s.latch = 0;
        s.in_flight = 0;
        s.state = WorkerState::Stopped;
    });
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_outbox_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = BackgroundWorker::get_extra().to_string();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    store::hold_cancels_between_transactions();
    // The worker's own commits (the watermark, held and dead messages, rotation) do not wait for
    // their WAL flush; store::flush_recorded() flushes before a send only when a crash could
    // otherwise resend more than pg_outbox.batch_size messages. WAL is flushed in order: no later
    // state survives an earlier lost one.
    worker_setting(c"synchronous_commit", c"off");
    // The worker runs as the bootstrap superuser: a function or operator a database owner puts in
    // public (convert_from, say, with argument types that match better) must not be what it calls.
    worker_setting(c"search_path", c"pg_catalog, pg_temp");
    // Settings of the database or the role (ALTER DATABASE shop SET ...) reach the worker too. A
    // database made read-only for maintenance had it fail at its first write and restart, again
    // and again, forwarding nothing; and its reads are built for read committed, a snapshot per
    // statement.
    worker_setting(c"default_transaction_read_only", c"off");
    worker_setting(c"default_transaction_isolation", c"read committed");
    // A lock_timeout meant for the applications' sessions ended the worker whenever it waited
    // behind one of them (an open transaction that paused a topic, an ALTER EXTENSION UPDATE),
    // and a batch in flight was sent again by the next one. It waits instead; a cancel still
    // ends the wait.
    worker_setting(c"lock_timeout", c"0");
    // Every statement of the worker is built to walk an index, and the statistics of the slot
    // partitions are always stale (insert-only, TRUNCATEd every few seconds), so the planner
    // cannot see how few rows are unsettled or that a backlog is read in id order. When it
    // guessed, it picked a sequential scan of a slot per cycle, and for each batch of a 300,000
    // message backlog a sort of the whole rest of it (230 ms a batch instead of 4 ms). With scans
    // pinned to the indexes and no sorting of what an index already orders, the per-cycle
    // statements are also planned once per process (generic plans) instead of once per cycle.
    worker_setting(c"enable_seqscan", c"off");
    worker_setting(c"enable_sort", c"off");
    worker_setting(c"plan_cache_mode", c"force_generic_plan");
    // Short statements only; and a plan whose only path is a disabled sequential scan costs
    // more than jit_above_cost, which would JIT-compile it on every run.
    worker_setting(c"jit", c"off");
    let database_oid = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let slot = match shmem::claim_slot(database_oid, &database) {
        shmem::Claim::Claimed(slot) => slot,
        shmem::Claim::Forwarded(pid) => {
            log!("pg_outbox: database \"{database}\" is forwarded by worker PID {pid} already; this one leaves");
            return;
        }
        shmem::Claim::NoFreeSlot => {
            warning!("pg_outbox: no free worker slot for database \"{database}\"");
            return;
        }
    };
    unsafe { pg_sys::before_shmem_exit(Some(on_worker_exit), pg_sys::Datum::from(slot)) };
    shmem::update(slot, |s| {
        s.pid = unsafe { pg_sys::MyProcPid };
        s.latch = unsafe { pg_sys::MyLatch } as usize;
        s.state = WorkerState::Starting;
        s.broker = BrokerState::Unknown;
        s.started_at = unsafe { pg_sys::GetCurrentTimestamp() };
        s.exited_cleanly = false;
    });
    let mut worker = Worker {
        slot,
        database_oid,
        system_identifier: unsafe { pg_sys::GetSystemIdentifier() },
        sinks: HashMap::new(),
        outages: ClusterOutages::default(),
        invalid_routes: HashSet::new(),
        retiring: Vec::new(),
        state: WorkerState::Starting,
        broker: BrokerState::Unknown,
        unavailable_since: None,
        reconnect_failures: 0,
        last_rotation_check: None,
        counters: TopicCounters::new(COUNTERS_INTERVAL),
        read_ahead: None,
        coalescing: Coalescing::new(),
    };
    log!("pg_outbox: worker started for database \"{database}\"");
    // Started just as a reload took the database off the list, it got no SIGHUP for it.
    let mut look_at_the_list = true;
    loop {
        if stop_requested() {
            worker.write_counters();
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            look_at_the_list = true;
        }
        // The launcher starts workers only for the databases listed: one that is no longer
        // stays stopped.
        if std::mem::take(&mut look_at_the_list) && !guc::databases().contains(&database) {
            log!("pg_outbox: database \"{database}\" is no longer in pg_outbox.database, worker exits");
            worker.write_counters();
            break;
        }
        // As a backend does between transactions (it sends at most once a second): without it the
        // worker's writes to worker_state and topics never reach pg_stat_user_tables, and
        // autovacuum never sees their dead row versions.
        unsafe { pg_sys::pgstat_report_stat(false) };
        let next = worker.cycle();
        write_librdkafka_log();
        match next {
            Next::Continue => worker.coalescing.continued(),
            Next::Exit => break,
            Next::Sleep(timeout) => {
                let asleep_since = Instant::now();
                let woke = wait(timeout);
                let idle = asleep_since.elapsed();
                shmem::update(slot, |s| match woke {
                    Wake::Latch => s.wakeups_commit += 1,
                    Wake::Timeout => s.wakeups_poll += 1,
                });
                let configured = Duration::from_millis(guc::LINGER_MS.get().max(0) as u64);
                if let (Wake::Latch, Some(linger)) = (woke, worker.coalescing.linger(configured, idle)) {
                    unsafe { pg_sys::pg_usleep(linger.as_micros() as std::ffi::c_long) };
                }
            }
        }
    }
    worker.retire_before_exit();
    write_librdkafka_log();
    shmem::update(slot, |s| s.exited_cleanly = true);
    log!("pg_outbox: worker for database \"{database}\" stopped");
}
