//! Settings (`pg_outbox.*`). The worker re-reads them on SIGHUP (`SELECT pg_reload_conf()`).
use std::ffi::{c_char, c_void, CStr, CString};

use pg_outbox_bgworker::{check_properties, parse_properties, Backoff, SinkConfig};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::{pg_guard, pg_sys};

pub static DATABASES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static BOOTSTRAP_SERVERS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"localhost:9092"));
pub static KAFKA_PROPERTIES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static MAX_MESSAGE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static LINGER_MS: GucSetting<i32> = GucSetting::<i32>::new(50);
pub static CREATE_TOPICS: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static TOPIC_PARTITIONS: GucSetting<i32> = GucSetting::<i32>::new(3);
pub static TOPIC_REPLICATION_FACTOR: GucSetting<i32> = GucSetting::<i32>::new(-1);
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(5);
pub static RETRY_BACKOFF_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static RETRY_BACKOFF_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
pub static ROTATION_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(60_000);
pub static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(0);

pub fn init() {
    GucRegistry::define_string_guc(
        c"pg_outbox.database",
        c"Databases whose outbox is forwarded (comma-separated); one worker each.",
        c"A worker waits quietly in a database until CREATE EXTENSION pg_outbox has run there. On reload, a database added gets its worker and one removed loses it.",
        &DATABASES,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_outbox.kafka_bootstrap_servers",
        c"Kafka bootstrap servers (host:port, comma-separated).",
        c"",
        &BOOTSTRAP_SERVERS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // SAFETY: the hook is guarded (#[pg_guard]) and catches nothing of its own.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"pg_outbox.kafka_properties",
            c"Extra librdkafka producer properties, key=value separated by ';'.",
            c"Overrides pg_outbox's defaults (acks=all, enable.idempotence=true, ...). May hold secrets such as sasl.password, so only superusers can see it.",
            &KAFKA_PROPERTIES,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
            Some(check_kafka_properties),
            None,
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"pg_outbox.max_message_bytes",
        c"Largest payload enqueue_message accepts.",
        c"",
        &MAX_MESSAGE_BYTES,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.batch_size",
        c"Most messages the worker has in flight at once.",
        c"",
        &BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.poll_interval",
        c"How often the worker looks for messages when no commit woke it.",
        c"Commits that enqueued wake the worker at once; this covers COMMIT PREPARED and rows written without enqueue_message.",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.linger",
        c"How long the worker lets messages gather before reading them, once they arrive at 2,000 a second or more.",
        c"Fewer, larger batches cost the worker and the broker less per message and add up to this much latency under load; a trickle is forwarded at once. 0 never waits.",
        &LINGER_MS,
        0,
        1000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"pg_outbox.create_topics",
        c"Create missing topics through the Kafka admin API.",
        c"",
        &CREATE_TOPICS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.topic_partitions",
        c"Partitions of topics the worker creates.",
        c"",
        &TOPIC_PARTITIONS,
        1,
        100_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.topic_replication_factor",
        c"Replication factor of topics the worker creates (-1: the broker's default).",
        c"",
        &TOPIC_REPLICATION_FACTOR,
        -1,
        32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.max_attempts",
        c"Attempts before a message the broker refuses moves to outbox.dead_letters.",
        c"",
        &MAX_ATTEMPTS,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.retry_backoff",
        c"Delay before the first retry of a refused message; doubles with each attempt.",
        c"",
        &RETRY_BACKOFF_MS,
        1,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.retry_backoff_max",
        c"Longest delay between retries of a refused message, and between reconnects to the broker.",
        c"",
        &RETRY_BACKOFF_MAX_MS,
        1,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.rotation_interval",
        c"How long new messages go to one storage slot before the worker moves them to the next.",
        c"A slot is emptied with TRUNCATE once all its messages are delivered; this bounds outbox storage without per-row deletes.",
        &ROTATION_INTERVAL_MS,
        1000,
        86_400_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_outbox.retention",
        c"How long delivered messages stay stored for audit and outbox.replay (0: not kept).",
        c"Storage stays bounded: slots rotate at least every retention/2 and are truncated once their newest message is older than this.",
        &RETENTION_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
}

/// Refuses properties librdkafka would refuse, as Postgres refuses any bad setting: ALTER SYSTEM
/// fails (22023) and a reload logs it and keeps the value before. The message names the property,
/// never a value (they may be credentials). A bad value read at server start is let through:
/// refused there, the setting would fall back to no properties at all, and the worker would
/// connect without the TLS or SASL settings meant for it; instead it refuses the value and says
/// why (worker_status.last_error, the log). So is the value a parallel worker receives from its
/// leader: that may be this bad value, and refusing it would fail every parallel query, with the
/// whole value in the error's context.
#[pg_guard]
unsafe extern "C-unwind" fn check_kafka_properties(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress || pg_sys::InitializingParallelWorker }
        || newval.is_null()
    {
        return true;
    }
    let value = match unsafe { *newval } {
        value if value.is_null() => return true,
        value => unsafe { CStr::from_ptr(value) }.to_string_lossy(),
    };
    match check_properties(&value) {
        Ok(()) => true,
        Err(e) => {
            let message = CString::new(format!("invalid pg_outbox.kafka_properties: {e}")).unwrap_or_default();
            unsafe { pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(message.as_ptr()) };
            false
        }
    }
}

fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting.get().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The databases named in `pg_outbox.database`.
pub fn databases() -> Vec<String> {
    string(&DATABASES).split(',').map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect()
}

/// The sink settings as they are now, or a message saying which setting is wrong.
pub fn sink_config() -> Result<SinkConfig, String> {
    let properties =
        parse_properties(&string(&KAFKA_PROPERTIES)).map_err(|e| format!("invalid pg_outbox.kafka_properties: {e}"))?;
    Ok(SinkConfig {
        bootstrap_servers: string(&BOOTSTRAP_SERVERS),
        properties,
        create_topics: CREATE_TOPICS.get(),
        topic_partitions: TOPIC_PARTITIONS.get(),
        topic_replication_factor: TOPIC_REPLICATION_FACTOR.get(),
    })
}

/// Settings for a destination on another cluster: the default settings with its own bootstrap
/// servers and librdkafka properties.
pub fn sink_config_for(bootstrap: &str, properties: Option<&str>) -> Result<SinkConfig, String> {
    let mut config = sink_config()?;
    config.bootstrap_servers = bootstrap.to_string();
    if let Some(properties) = properties {
        config.properties = parse_properties(properties)
            .map_err(|e| format!("invalid kafka_properties in outbox.destinations: {e}"))?;
    }
    Ok(config)
}

pub fn retry_backoff() -> Backoff {
    Backoff {
        initial: std::time::Duration::from_millis(RETRY_BACKOFF_MS.get() as u64),
        max: std::time::Duration::from_millis(RETRY_BACKOFF_MAX_MS.get().max(RETRY_BACKOFF_MS.get()) as u64),
    }
}

/// Runs `f` with `search_path` set to `pg_catalog, pg_temp`, undone when it returns (or by the
/// abort, if it raises an error). The SECURITY DEFINER enqueue plans SQL of its own on first use,
/// as its owner: with the caller's search_path, an operator of the caller's schemas that matches
/// its argument types better than pg_catalog's (an `=(oid, regclass)`, say) would run as that
/// owner. A `SET search_path` clause on the function would do the same at the cost of a setting
/// saved and restored on every call; this is paid only when SQL is planned or run.
pub fn with_catalog_search_path<R>(f: impl FnOnce() -> R) -> R {
    unsafe {
        let level = pgrx::pg_sys::NewGUCNestLevel();
        pgrx::pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pgrx::pg_sys::GucContext::PGC_USERSET,
            pgrx::pg_sys::GucSource::PGC_S_SESSION,
            pgrx::pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        let result = f();
        pgrx::pg_sys::AtEOXact_GUC(true, level);
        result
    }
}
