//! The C-language functions behind the SQL API in `sql/` (the SQL itself is hand-written there).
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::{pg_sys, JsonB, PgSqlErrorCode};

use pg_outbox_bgworker::message::validate_topic;
use pg_outbox_bgworker::{check_properties, parse_properties};

use crate::{guc, shmem};

/// Whether the current transaction enqueued, so that its commit wakes the worker.
static ENQUEUED_IN_XACT: AtomicBool = AtomicBool::new(false);
/// Whether it counts as an asynchronous commit pending (see `shmem::async_commit_starts`).
static COUNTED_ASYNC: AtomicBool = AtomicBool::new(false);
static CALLBACK_REGISTERED: AtomicBool = AtomicBool::new(false);

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        // Only synchronous_commit = off skips the flush at commit (local and remote_* flush
        // locally). Counted before the commit record exists, so that a worker whose snapshot
        // sees this transaction cannot miss it.
        XACT_EVENT_PRE_COMMIT
            if ENQUEUED_IN_XACT.load(Ordering::Relaxed)
                && unsafe { pg_sys::synchronous_commit } == pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_OFF as i32 =>
        {
            shmem::async_commit_starts();
            COUNTED_ASYNC.store(true, Ordering::Relaxed);
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT if ENQUEUED_IN_XACT.swap(false, Ordering::Relaxed) => {
            if COUNTED_ASYNC.swap(false, Ordering::Relaxed) {
                shmem::async_commit_ends(Some(unsafe { pg_sys::XactLastCommitEnd }));
            }
            shmem::wake_worker(unsafe { pg_sys::MyDatabaseId }.to_u32());
        }
        // A prepared transaction is committed later, maybe by another backend: the worker's
        // fallback poll picks it up. (PREPARE and COMMIT PREPARED always flush.)
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            ENQUEUED_IN_XACT.store(false, Ordering::Relaxed);
            if COUNTED_ASYNC.swap(false, Ordering::Relaxed) {
                shmem::async_commit_ends(None);
            }
        }
        _ => {}
    }
}

pub(crate) fn invalid(code: PgSqlErrorCode, message: String) -> ! {
    ereport!(ERROR, code, message);
}

/// Checks one message before `enqueue_message` inserts it, and arms the commit wake-up (the
/// PL/pgSQL `enqueue_message` of SQL versions before 0.3.0).
#[pg_extern(name = "_prepare_enqueue")]
fn prepare_enqueue(topic: Option<&str>, _key: Option<&str>, headers: Option<JsonB>, payload_bytes: Option<i32>) {
    check_message(topic, headers, payload_bytes);
    wake_on_commit();
}

/// Refuses a message Kafka would refuse, with a SQLSTATE the caller can act on.
pub(crate) fn check_message(topic: Option<&str>, headers: Option<JsonB>, payload_bytes: Option<i32>) {
    let Some(topic) = topic else {
        invalid(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "topic must not be NULL".into());
    };
    if let Err(e) = validate_topic(topic) {
        invalid(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e);
    }
    if let Some(JsonB(headers)) = headers {
        let serde_json::Value::Object(map) = headers else {
            invalid(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("headers must be a JSON object of string values, not {headers}"),
            );
        };
        if let Some((name, value)) = map.iter().find(|(_, v)| !v.is_string()) {
            invalid(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("header \"{name}\" must be a JSON string, not {value}"),
            );
        }
    }
    let limit = guc::MAX_MESSAGE_BYTES.get();
    if let Some(size) = payload_bytes.filter(|&size| size > limit) {
        invalid(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("payload is {size} bytes, more than pg_outbox.max_message_bytes ({limit})"),
        );
    }
}

/// Sets the worker's latch when the current transaction commits.
#[pg_extern(name = "_wake_on_commit")]
pub(crate) fn wake_on_commit() {
    if !CALLBACK_REGISTERED.swap(true, Ordering::Relaxed) {
        unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
    }
    ENQUEUED_IN_XACT.store(true, Ordering::Relaxed);
}

fn interval_duration(interval: &Interval) -> Duration {
    let micros = interval.micros() as i128
        + interval.days() as i128 * 86_400_000_000
        + interval.months() as i128 * 30 * 86_400_000_000;
    Duration::from_micros(micros.clamp(0, u64::MAX as i128) as u64)
}

/// Blocks until the broker acknowledged the message (true) or the timeout passed (false). Sleeps
/// on a condition variable the workers broadcast after recording deliveries; no busy-waiting.
#[pg_extern(name = "wait_for_delivery")]
fn wait_for_delivery(message_id: i64, timeout: Interval) -> bool {
    let deadline = Instant::now() + interval_duration(&timeout);
    let cv = shmem::delivered_cv();
    let delivered = loop {
        let status: Option<String> = Spi::get_one_with_args("SELECT outbox.message_status($1)", &[message_id.into()])
            .unwrap_or_else(|e| {
                invalid(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("cannot read message status: {e}"))
            });
        match status.as_deref() {
            Some("delivered") => break true,
            // Dead-lettered, or never committed: it will not be delivered by waiting.
            Some("dead") | None => break false,
            _ => {}
        }
        let now = Instant::now();
        if now >= deadline {
            break false;
        }
        let nap = (deadline - now).min(Duration::from_secs(1)).as_millis().max(1) as std::ffi::c_long;
        unsafe { pg_sys::ConditionVariableTimedSleep(cv, nap, pg_sys::PG_WAIT_EXTENSION) };
    };
    unsafe { pg_sys::ConditionVariableCancelSleep() };
    delivered
}

/// The CHECK of `outbox.destinations`: refuses a route the worker could not follow, when it is
/// written, instead of holding its topic's messages back later. Values are never repeated (they
/// may be credentials).
#[pg_extern(name = "_check_destination", immutable, parallel_safe)]
fn check_destination(
    topic: Option<&str>,
    kafka_topic: Option<&str>,
    bootstrap_servers: Option<&str>,
    kafka_properties: Option<&str>,
) -> bool {
    let topic = topic.unwrap_or_default();
    let refuse = |problem: String| -> ! {
        // No context lines: COPY's ("COPY destinations, line 3: ...") shows the row, credentials
        // and all. The handler that catches the error puts the stack back.
        unsafe { pg_sys::error_context_stack = std::ptr::null_mut() };
        invalid(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("route of topic \"{topic}\": {problem}"))
    };
    if let Err(e) = validate_topic(topic) {
        refuse(e);
    }
    if kafka_topic.is_none() && bootstrap_servers.is_none() {
        refuse("a route names a kafka_topic, a bootstrap_servers, or both".into());
    }
    if let Some(Err(e)) = kafka_topic.map(validate_topic) {
        refuse(format!("kafka_topic is invalid: {e}"));
    }
    if bootstrap_servers.is_some_and(|b| b.trim().is_empty()) {
        refuse("bootstrap_servers is empty: name the cluster's brokers (host:port,...), or set it to NULL for the default cluster".into());
    }
    if let Some(properties) = kafka_properties {
        if bootstrap_servers.is_none() {
            refuse("kafka_properties apply to the route's own cluster, but bootstrap_servers is NULL (the default cluster's properties are pg_outbox.kafka_properties)".into());
        }
        if let Err(e) = check_properties(properties) {
            refuse(format!("invalid kafka_properties: {e}"));
        }
        // The worker would load or run what these name. A route is a row a superuser may let
        // other roles write; loading code stays with the superuser-only setting.
        let loads_code = ["plugin.library.paths", "ssl.engine.location", "ssl.providers", "sasl.kerberos.kinit.cmd"];
        let properties = parse_properties(properties).unwrap_or_default();
        if let Some((key, _)) = properties.iter().find(|(k, _)| loads_code.contains(&k.as_str())) {
            refuse(format!(
                "\"{key}\" makes the worker load or run code: it may be set only in pg_outbox.kafka_properties"
            ));
        }
    }
    true
}

/// Fault injection (tests, `make reliability`): the worker of this database gets a fatal
/// idempotent-producer error on its next send, and must recreate its producer and resend.
#[pg_extern(name = "_inject_producer_fatal_error")]
fn inject_producer_fatal_error() -> bool {
    let database_oid = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let mut registry = shmem::REGISTRY.exclusive();
    match registry.slots.iter_mut().find(|s| s.in_use && s.database_oid == database_oid && s.pid != 0) {
        Some(slot) => {
            slot.inject_fatal_error = true;
            true
        }
        None => false,
    }
}

/// The storage slot new messages go to (the DEFAULT of `outbox.messages.slot`).
#[pg_extern(name = "_current_slot")]
fn current_slot() -> i16 {
    shmem::current_slot(unsafe { pg_sys::MyDatabaseId }.to_u32())
}

fn timestamp(ts: pg_sys::TimestampTz) -> Option<TimestampWithTimeZone> {
    (ts != 0).then(|| unsafe { TimestampWithTimeZone::from_datum(pg_sys::Datum::from(ts), false) }).flatten()
}

#[allow(clippy::type_complexity)]
#[pg_extern(name = "_worker_status")]
fn worker_status() -> TableIterator<
    'static,
    (
        name!(database, String),
        name!(pid, Option<i32>),
        name!(state, String),
        name!(broker_state, String),
        name!(batches, i64),
        name!(messages_delivered, i64),
        name!(in_flight, i32),
        name!(wakeups_by_commit, i64),
        name!(wakeups_by_poll, i64),
        name!(empty_wakeups, i64),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<TimestampWithTimeZone>),
        name!(started_at, Option<TimestampWithTimeZone>),
    ),
> {
    let listed = guc::databases();
    let mut rows: Vec<_> = shmem::snapshot()
        .into_iter()
        .map(|s| {
            let database = s.database();
            // A worker that left because its database was taken off the list.
            let state = if s.pid == 0 && !listed.contains(&database) { shmem::NOT_LISTED } else { s.state.as_str() };
            (
                database,
                (s.pid != 0).then_some(s.pid),
                state.to_string(),
                s.broker.as_str().to_string(),
                s.batches,
                s.delivered,
                s.in_flight,
                s.wakeups_commit,
                s.wakeups_poll,
                s.wakeups_empty,
                s.last_error(),
                timestamp(s.last_error_at),
                timestamp(s.started_at),
            )
        })
        .collect();
    // A database with the extension that no worker forwards would otherwise show no row at all,
    // and its messages wait unexplained.
    let current = unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        (!name.is_null()).then(|| std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned())
    };
    if let Some(current) = current.filter(|name| !listed.contains(name)) {
        if !rows.iter().any(|row| row.0 == current) {
            rows.push((
                current,
                None,
                shmem::NOT_LISTED.to_string(),
                shmem::BrokerState::Unknown.as_str().to_string(),
                0,
                0,
                0,
                0,
                0,
                0,
                None,
                None,
                None,
            ));
        }
    }
    TableIterator::new(rows)
}
