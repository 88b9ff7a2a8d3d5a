//! The one place where the worker opens transactions and talks SPI. Every function here runs one
//! short transaction and returns plain Rust values; the caller does network I/O only after it
//! returned, with no transaction or lock held.
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::ffi::CString;

use pgrx::pg_sys::{self, PgBuiltInOids, PgOid};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};

use pg_outbox_bgworker::{
    cut_held_runs, flush_before_sending, held_lines_to_read, HeldLine, OutboundMessage, SnapshotBounds, TopicCount,
};

use crate::{message_reader, shmem};

type SpiResult<T> = Result<T, pgrx::spi::Error>;

pub const SLOTS: i16 = 4;

/// A storage slot this large rotates before pg_outbox.rotation_interval (about 50,000 messages
/// of 300 bytes): at a high rate, the interval alone would let a slot grow with the rate.
const ROTATION_BYTES: i64 = 16 * 1024 * 1024;

/// Cancel requests (pg_cancel_backend) reach the worker only inside its transactions. Between
/// them (asleep on its latch, or sending to Kafka) it runs no statement to cancel, as a session
/// idle between statements does not; yet every CHECK_FOR_INTERRUPTS there (each log line runs one)
/// would end the worker with an ERROR, and the batch in flight would be sent again by the next
/// one. So cancels are held off outside transactions, as Postgres holds them off while it reads
/// a client's message, and one that came meanwhile is dropped when the next transaction begins.
/// Called once the worker is connected (while it connects, a cancel or a lock_timeout may end
/// it, as a session that has not started yet).
pub fn hold_cancels_between_transactions() {
    unsafe { pg_sys::QueryCancelHoldoffCount = 1 };
}

fn drop_cancel_request_held_between_transactions() {
    unsafe {
        if std::ptr::read_volatile(&raw const pg_sys::QueryCancelPending) != 0 {
            std::ptr::write_volatile(&raw mut pg_sys::QueryCancelPending, 0);
            log!("pg_outbox: the worker was asked to cancel between transactions, where it runs no statement; it goes on");
        }
    }
}

/// Runs `body` in its own transaction. REPEATABLE READ makes every statement, and
/// `pg_current_snapshot()`, see the same snapshot. An ERROR inside (a cancelled statement among
/// them) ends the worker process (exit code 1, never a crash); the launcher starts it again with
/// backoff.
pub fn transaction<R>(repeatable_read: bool, body: impl FnOnce() -> R) -> R {
    drop_cancel_request_held_between_transactions();
    // Inside, a cancel cancels the statement (the worker keeps lock_timeout off).
    // Set, not counted: an ERROR resets the count.
    unsafe {
        pg_sys::QueryCancelHoldoffCount = 0;
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        // Read committed otherwise, whatever the default says: rotate takes a new snapshot after
        // its lock, which repeatable read would silently keep the old one for.
        pg_sys::XactIsoLevel =
            if repeatable_read { pg_sys::XACT_REPEATABLE_READ } else { pg_sys::XACT_READ_COMMITTED } as i32;
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result = body();
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
    }
    hold_cancels_between_transactions();
    result
}

thread_local! {
    /// The statements the worker runs every cycle, planned once per process (SPI_keepplan).
    /// Postgres re-plans a kept plan by itself when the tables under it change (ALTER or DROP and
    /// CREATE EXTENSION); they are only run once the extension is known to be installed.
    static PLANS: RefCell<HashMap<&'static str, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// Plans `sql` (parameter `types`) once and keeps it under `name`.
fn prepare_once(client: &SpiClient, name: &'static str, sql: &str, types: &[PgOid]) -> SpiResult<()> {
    if !PLANS.with(|plans| plans.borrow().contains_key(name)) {
        let plan = client.prepare_mut(sql, types)?.keep();
        PLANS.with(|plans| plans.borrow_mut().insert(name, plan));
    }
    Ok(())
}

/// Runs `run` with the kept plan `name` (see `prepare_once`).
fn run_plan<R>(name: &'static str, run: impl FnOnce(&OwnedPreparedStatement) -> SpiResult<R>) -> SpiResult<R> {
    PLANS.with(|plans| match plans.borrow().get(name) {
        Some(plan) => run(plan),
        None => Err(pgrx::spi::Error::NoTupleTable),
    })
}

/// A read-only statement through a kept plan.
fn with_plan<R>(
    client: &SpiClient,
    name: &'static str,
    sql: &str,
    run: impl FnOnce(&OwnedPreparedStatement) -> SpiResult<R>,
) -> SpiResult<R> {
    prepare_once(client, name, sql, &[])?;
    run_plan(name, run)
}

fn oid(builtin: PgBuiltInOids) -> PgOid {
    PgOid::BuiltIn(builtin)
}

thread_local! {
    /// Where worker_state's one row is, as the worker last wrote it (empty: not known yet).
    static STATE_CTID: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Plans a statement on worker_state's row twice, under `names`: addressed by ctid (a TID scan),
/// and as a scan of the table. `sql` has `{row}` where the WHERE clause goes and returns the
/// row's ctid as text; the ctid is its last parameter (after `types`).
///
/// The worker rewrites that row every cycle, and while another session holds back the xmin
/// horizon none of its old versions can be pruned: a scan walks every one of them (84,000 after
/// two pinned minutes), a TID scan only the live one. Only the worker writes the row; should
/// anything else move it (an UPDATE by hand, VACUUM FULL), the TID scan finds nothing and the
/// statement runs once as a scan.
fn prepare_on_state_row(client: &SpiClient, names: [&'static str; 2], sql: &str, types: &[PgOid]) -> SpiResult<()> {
    let mut all_types = types.to_vec();
    all_types.push(oid(PgBuiltInOids::TEXTOID));
    let by_ctid = format!("WHERE ctid = ${}::tid", all_types.len());
    prepare_once(client, names[0], &sql.replace("{row}", &by_ctid), &all_types)?;
    prepare_once(client, names[1], &sql.replace("{row}", ""), &all_types)
}

/// Runs a statement of `prepare_on_state_row` through `run` (given the plan and the ctid), by
/// ctid first; remembers the ctid the row has now (the last column of the first row returned).
fn on_state_row<'c>(
    names: [&'static str; 2],
    mut run: impl FnMut(&OwnedPreparedStatement, String) -> SpiResult<pgrx::spi::SpiTupleTable<'c>>,
) -> SpiResult<pgrx::spi::SpiTupleTable<'c>> {
    let known = STATE_CTID.with(|c| c.borrow().clone());
    let mut rows = None;
    if !known.is_empty() {
        rows = Some(run_plan(names[0], |plan| run(plan, known.clone()))?).filter(|r| !r.is_empty());
    }
    let rows = match rows {
        Some(rows) => rows,
        None => run_plan(names[1], |plan| run(plan, known))?,
    }
    .first();
    let ctid = if rows.is_empty() { None } else { rows.get::<String>(rows.columns()?)? };
    STATE_CTID.with(|c| *c.borrow_mut() = ctid.unwrap_or_default());
    Ok(rows)
}

/// The version of the extension's SQL objects this library works with.
pub const SQL_VERSION: &str = "0.8.0";

/// The versions whose objects the worker uses as it does SQL_VERSION's (0.7.0 only added a CHECK
/// on outbox.destinations, 0.8.0 the default of outbox.messages.id): it forwards from them
/// without waiting for ALTER EXTENSION UPDATE.
pub const WORKER_SQL_VERSIONS: [&str; 3] = ["0.6.0", "0.7.0", SQL_VERSION];

/// The versions whose tables `enqueue_message` writes as it does at SQL_VERSION (a delayed
/// message through the version's own `_store_message`): between the install of this library and
/// ALTER EXTENSION UPDATE from one of them, enqueueing goes on (the worker waits for the update
/// from those it does not use).
pub const ENQUEUE_SQL_VERSIONS: [&str; 5] = ["0.4.0", "0.5.0", "0.6.0", "0.7.0", SQL_VERSION];

thread_local! {
    /// The extension's OID last seen, and when its SQL objects were last found at a version of
    /// WORKER_SQL_VERSIONS.
    /// A lookup costs two catalog reads (the OID by index, the version by SPI), which were a
    /// twelfth of the worker's main thread per cycle under load (docs/BENCHMARKS.profile.md,
    /// round 13); what was found is trusted until Postgres invalidates any relation (DROP
    /// EXTENSION drops the outbox's tables) or for EXTENSION_TRUSTED at most (ALTER EXTENSION
    /// UPDATE may change only functions, which no relation invalidation announces).
    static EXTENSION: std::cell::Cell<(pg_sys::Oid, Option<std::time::Instant>)> =
        const { std::cell::Cell::new((pg_sys::InvalidOid, None)) };
    static EXTENSION_STALE: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
    static EXTENSION_CALLBACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

const EXTENSION_TRUSTED: std::time::Duration = std::time::Duration::from_secs(1);

#[pg_guard]
unsafe extern "C-unwind" fn any_relation_changed(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    EXTENSION_STALE.with(|s| s.set(true));
    crate::direct::relations_changed();
}

/// Whether the extension exists, holding a share lock on it for the rest of the transaction: a
/// concurrent DROP EXTENSION then waits for this short transaction (or this one for it, and then
/// sees the extension gone), instead of dropping the tables under a running query.
/// The lock is taken on the extension last seen; taking it processes pending invalidations, so
/// if nothing was invalidated meanwhile, the extension locked is the one there.
fn extension_installed() -> bool {
    if !EXTENSION_CALLBACK.with(|c| c.replace(true)) {
        unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(any_relation_changed), pg_sys::Datum::from(0)) };
    }
    let (mut locked, current_since) = EXTENSION.with(|e| e.get());
    lock_extension(locked);
    if current_since.is_some_and(|t| t.elapsed() < EXTENSION_TRUSTED) && !EXTENSION_STALE.with(|s| s.get()) {
        return true;
    }
    EXTENSION_STALE.with(|s| s.set(false));
    loop {
        let oid = unsafe { pg_sys::get_extension_oid(c"pg_outbox".as_ptr(), true) };
        if oid == locked {
            EXTENSION.with(|e| e.set((oid, None)));
            return oid != pg_sys::InvalidOid;
        }
        // Dropped, or created anew since: lock what is there now and look again. (A lock on
        // an OID that is gone is released with the transaction.)
        locked = oid;
        lock_extension(locked);
    }
}

fn lock_extension(oid: pg_sys::Oid) {
    if oid != pg_sys::InvalidOid {
        let mode = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        unsafe { pg_sys::LockDatabaseObject(pg_sys::ExtensionRelationId, oid, 0, mode) };
    }
}

/// The installed version of the extension's SQL objects if it is not one this library's worker
/// works with. Only after extension_installed() said yes in this transaction.
fn extension_outdated(client: &SpiClient) -> SpiResult<Option<String>> {
    let (oid, current_since) = EXTENSION.with(|e| e.get());
    if current_since.is_some() {
        return Ok(None);
    }
    let version = extension_version(client)?;
    if !WORKER_SQL_VERSIONS.contains(&version.as_str()) {
        return Ok(Some(version));
    }
    EXTENSION.with(|e| e.set((oid, Some(std::time::Instant::now()))));
    Ok(None)
}

/// The installed version of the extension's SQL objects.
pub fn extension_version(client: &SpiClient) -> SpiResult<String> {
    with_plan(
        client,
        "extension_version",
        "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_outbox'",
        |plan| Ok(client.select(plan, Some(1), &[])?.first().get::<String>(1)?.unwrap_or_default()),
    )
}

/// True while another session waits to have this database to itself: DROP DATABASE, ALTER
/// DATABASE's RENAME and SET TABLESPACE hold an AccessExclusiveLock on the database object, and a
/// CREATE DATABASE copying it a ShareLock, while they wait for the database's backends to leave,
/// so a worker that cannot take the weak lock every backend takes at connection time must leave
/// now, or the command fails with "being accessed by other users". A session lock, taken
/// and released at once: it is also asked outside any transaction, while a batch waits for the
/// broker.
pub fn database_drop_pending() -> bool {
    unsafe {
        let tag = pg_sys::LOCKTAG {
            locktag_field1: 0,
            locktag_field2: pg_sys::DatabaseRelationId.to_u32(),
            locktag_field3: pg_sys::MyDatabaseId.to_u32(),
            locktag_field4: 0,
            locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
            locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
        };
        let mode = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let got = pg_sys::LockAcquire(&tag, mode, true, true);
        if got == pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL {
            return true;
        }
        pg_sys::LockRelease(&tag, mode, true);
        false
    }
}

/// What worker_state and the small tables beside it say at the start of a cycle.
pub struct CycleState {
    /// The watermark: every message of a transaction visible in it is settled.
    pub done: SnapshotBounds,
    /// The window being forwarded, or for a new one the transaction's snapshot (text form).
    pub window: String,
    pub new_window: bool,
    /// The last id of the window already taken (-1: none).
    pub last_id: i64,
    pub current_slot: i16,
    pub paused_topics: Vec<String>,
    pub destinations_exist: bool,
    pub held_exist: bool,
}

/// The cycle's state through a statement: when `direct` cannot read it (a database that is not
/// UTF-8, tables not as the extension made them, a state row that moved).
fn read_state(client: &SpiClient) -> SpiResult<CycleState> {
    let names = ["read_state", "read_state_scan"];
    prepare_on_state_row(
        client,
        names,
        "SELECT done_snapshot::text,
                coalesce(window_snapshot, pg_current_snapshot())::text,
                window_snapshot IS NULL,
                coalesce(window_last_id, -1),
                current_slot,
                ARRAY(SELECT topic FROM outbox.topics WHERE paused),
                EXISTS (SELECT 1 FROM outbox.destinations),
                EXISTS (SELECT 1 FROM outbox.held_messages),
                ctid::text
         FROM outbox.worker_state {row}",
        &[],
    )?;
    let state = on_state_row(names, |plan, ctid| client.select(plan, Some(1), &[ctid.into()]))?;
    let done: String = state.get(1)?.unwrap_or_default();
    let Some(done) = SnapshotBounds::parse(&done) else {
        error!("pg_outbox worker: the done snapshot \"{done}\" cannot be read");
    };
    Ok(CycleState {
        done,
        window: state.get(2)?.unwrap_or_default(),
        new_window: state.get(3)?.unwrap_or(true),
        last_id: state.get(4)?.unwrap_or(-1),
        current_slot: state.get(5)?.unwrap_or(0),
        paused_topics: state.get(6)?.unwrap_or_default(),
        destinations_exist: state.get(7)?.unwrap_or(false),
        held_exist: state.get(8)?.unwrap_or(false),
    })
}

/// What one read transaction found.
// One per cycle, moved once: boxing the batch would save nothing.
#[allow(clippy::large_enum_variant)]
pub enum Work {
    NoExtension,
    /// The SQL objects are older than this library: ALTER EXTENSION pg_outbox UPDATE is needed.
    OutdatedExtension(String),
    DatabaseDropping,
    Batch(Batch),
}

#[derive(Default)]
pub struct Batch {
    /// The snapshot window being forwarded (text form of a pg_snapshot).
    pub window: String,
    /// The window had more rows than the batch size: the next batch continues it.
    pub window_continues: bool,
    pub window_changed: bool,
    /// A new window of a batch or more (a backlog) starts after this id: its lowest id less one,
    /// found by a pass over every unsettled row.
    pub backlog_starts_after: Option<i64>,
    /// Fresh messages of the window, in delivery order.
    pub fresh: Vec<OutboundMessage>,
    /// Held messages that are due, topic not paused: a run of each key's line from its head (the
    /// head alone if it failed before; see held_lines_to_read), and those without a key.
    pub retries: Vec<OutboundMessage>,
    pub blocked_keys: HashSet<(String, String)>,
    pub paused_topics: HashSet<String>,
    /// Seconds until the next held message falls due (if any is waiting).
    pub next_due_in: Option<f64>,
    pub current_slot: i16,
    /// Per-topic routing from outbox.destinations.
    pub destinations: HashMap<String, Destination>,
    /// A WAL position at or after the commit record of every transaction this batch's messages
    /// come from that may not be on disk yet; 0 for none (see `commits_end`).
    pub commits_end: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Destination {
    pub kafka_topic: Option<String>,
    pub bootstrap_servers: Option<String>,
    pub kafka_properties: Option<String>,
}

/// Where a window being forwarded goes on: its snapshot and the last id already taken from it.
pub struct WindowPosition {
    pub window: String,
    pub last_id: i64,
}

/// Reads the next batch: fresh messages of the current window and held messages that are due.
/// `after` continues a window from a batch that is not recorded yet (read ahead while its
/// acknowledgements are outstanding); otherwise the window is worker_state's.
pub fn read_batch(batch_size: i64, after: Option<&WindowPosition>) -> Work {
    transaction(true, || {
        // First: a worker waiting for CREATE EXTENSION must leave for a DROP DATABASE too.
        if database_drop_pending() {
            return Work::DatabaseDropping;
        }
        if !extension_installed() {
            return Work::NoExtension;
        }
        Spi::connect_mut(|client| -> SpiResult<Work> {
            if let Some(version) = extension_outdated(client)? {
                return Ok(Work::OutdatedExtension(version));
            }
            let mut batch = Batch::default();
            let columns = message_reader::columns(false);
            let known = STATE_CTID.with(|c| c.borrow().clone());
            let state = match crate::direct::cycle_state(&known) {
                Some(state) => state,
                None => read_state(client)?,
            };
            batch.window = state.window;
            batch.current_slot = state.current_slot;
            batch.paused_topics.extend(state.paused_topics);
            let (mut new_window, mut last_id) = (state.new_window, state.last_id);
            let (destinations_exist, held_exist) = (state.destinations_exist, state.held_exist);
            if let Some(position) = after {
                batch.window = position.window.clone();
                last_id = position.last_id;
                new_window = false;
            }
            batch.window_changed = new_window;

            // The window's rows: unsettled (not visible in the done snapshot) and visible in the
            // window's. The text parameters are cast once (initplans), not once per row. Every
            // statement below takes the same parameters: the last id taken, the done snapshot's
            // xmax and xip, the window, the batch size.
            let unsettled = "(txid >= (SELECT $2::xid8) OR txid = ANY ((SELECT $3::xid8[])::xid8[]))
                             AND pg_visible_in_snapshot(txid, (SELECT $4::pg_snapshot))";
            let done_xip: Vec<String> = state.done.xip.iter().map(u64::to_string).collect();
            let mut args = [
                last_id.into(),
                state.done.xmax.to_string().into(),
                done_xip.into(),
                batch.window.clone().into(),
                batch_size.into(),
            ];
            let mut fresh = Vec::new();
            if new_window {
                // In steady state a new window is a few rows: read whole, through the txid index,
                // and ordered here; straight through the index where it can be (`direct`).
                // (No `id > $1`: nothing is taken yet, and with it the planner walked the id
                // index through every row stored, 35 ms a cycle with 30,000 rows in a slot.)
                // Planned once (a generic plan; see the worker's planner settings), the
                // statement costs microseconds instead of a planning of four partitions per commit.
                fresh = match crate::direct::new_window(&state.done, batch_size.max(0) as usize) {
                    Some(messages) => messages,
                    None => message_reader::select_messages(
                        "read_new_window",
                        &format!("SELECT {columns} FROM outbox.messages WHERE {unsettled} LIMIT $5"),
                        &args,
                        false,
                        (batch_size as usize).min(256),
                    ),
                };
                fresh.sort_unstable_by_key(|m| m.id);
            }
            let backlog = new_window && fresh.len() as i64 >= batch_size;
            if backlog {
                // A window of a batch or more starts at its lowest id and goes on in id order,
                // found in one pass over the unsettled rows through the txid index (`id + 0`:
                // min(id) would walk the id index from the oldest row stored, through every
                // settled one).
                let types = [
                    oid(PgBuiltInOids::INT8OID),
                    oid(PgBuiltInOids::TEXTOID),
                    oid(PgBuiltInOids::TEXTARRAYOID),
                    oid(PgBuiltInOids::TEXTOID),
                    oid(PgBuiltInOids::INT8OID),
                ];
                let sql = format!("SELECT min(id + 0) FROM outbox.messages WHERE {unsettled}");
                prepare_once(client, "window_first_id", &sql, &types)?;
                let first: Option<i64> =
                    run_plan("window_first_id", |plan| client.select(plan, Some(1), &args)?.first().get(1))?;
                if let Some(first) = first {
                    let after = first.saturating_sub(1);
                    batch.backlog_starts_after = Some(after);
                    args[0] = after.into();
                }
            }
            if !new_window || backlog {
                // A backlog, in batches: walks the id index from where the last batch ended (a
                // backlog is mostly window rows in id order).
                fresh = message_reader::select_messages(
                    "read_window_continued",
                    &format!(
                        "SELECT {columns} FROM outbox.messages WHERE id > $1 AND {unsettled} ORDER BY id LIMIT $5"
                    ),
                    &args,
                    false,
                    (batch_size as usize).min(65_536),
                );
            }
            batch.fresh = fresh;
            batch.window_continues = batch.fresh.len() as i64 >= batch_size;
            // A continued window that turns out empty (its row count was a multiple of the batch
            // size) must still be closed, or the watermark never moves past it.
            if !batch.fresh.is_empty() || !new_window {
                batch.window_changed = true;
            }

            if destinations_exist {
                read_destinations(client, &mut batch)?;
            }
            if held_exist {
                read_held(client, &mut batch, batch_size)?;
            }
            batch.commits_end = commits_end(!batch.retries.is_empty());
            Ok(Work::Batch(batch))
        })
        .unwrap_or_else(|e| error!("pg_outbox worker could not read the outbox: {e}"))
    })
}

fn read_destinations(client: &SpiClient, batch: &mut Batch) -> SpiResult<()> {
    for row in client.select(
        "SELECT topic, kafka_topic, bootstrap_servers, kafka_properties FROM outbox.destinations",
        None,
        &[],
    )? {
        if let Some(topic) = row.get::<String>(1)? {
            let destination =
                Destination { kafka_topic: row.get(2)?, bootstrap_servers: row.get(3)?, kafka_properties: row.get(4)? };
            batch.destinations.insert(topic, destination);
        }
    }
    Ok(())
}

/// Held messages in their key's line: all but the delayed ones not due yet, which block nothing
/// until `read_held` moves them in. Written as the predicate of held_messages_line_idx, so that
/// every statement over lines can use that index.
const IN_LINE: &str = "NOT h.delayed";

/// The topics with held messages in line, one index descent each.
const TOPICS_IN_LINE: &str = "topics(topic) AS (
        (SELECT h.topic FROM outbox.held_messages h WHERE NOT h.delayed ORDER BY h.topic LIMIT 1)
      UNION ALL
        SELECT (SELECT h.topic FROM outbox.held_messages h
                WHERE NOT h.delayed AND h.topic > t.topic ORDER BY h.topic LIMIT 1)
        FROM topics t WHERE t.topic IS NOT NULL
    )";

fn read_held(client: &mut SpiClient, batch: &mut Batch, batch_size: i64) -> SpiResult<()> {
    // Delayed messages that fell due join their keys' lines, by their seq (the place in delivery
    // order they were given when the worker first read them). They are found by their own
    // index: a million messages scheduled for tomorrow cost a cycle nothing today. Only the
    // worker changes held rows, so this write cannot meet a concurrent update in the repeatable
    // read transaction; it is made only when one is due (a write takes a transaction id and a
    // commit record), and the statements after it see it (see message_reader::select_messages).
    let due = "h.delayed AND h.next_attempt_at <= now()";
    // Planned once per process, like the statements after it: each runs on every cycle while
    // anything is held.
    let any_due = with_plan(
        client,
        "held_due",
        &format!("SELECT EXISTS (SELECT 1 FROM outbox.held_messages h WHERE {due})"),
        |plan| client.select(plan, None, &[])?.first().get::<bool>(1),
    )?;
    if any_due == Some(true) {
        client.update(&format!("UPDATE outbox.held_messages h SET delayed = false WHERE {due}"), None, &[])?;
    }
    // Each key's line by its head, found by skipping from key to key down the line index: a scan
    // of every held row per cycle grew with a paused topic's backlog. Every key with a message
    // in line blocks its fresh messages; the due heads of topics not paused lead what is read.
    // (These statements compare rows, or order by the key, where an equality would let the
    // primary key's seq order serve: with the table's statistics stale, as they mostly are, the
    // planner took that walk over every held row, filtered, per key.)
    let mut lines = Vec::new();
    let heads_sql = format!(
        "WITH RECURSIVE heads(topic, key, seq, attempts, next_attempt_at) AS (
                 (SELECT h.topic, h.key, h.seq, h.attempts, h.next_attempt_at
                  FROM outbox.held_messages h
                  WHERE h.key IS NOT NULL AND {IN_LINE}
                  ORDER BY h.topic, h.key, h.seq LIMIT 1)
               UNION ALL
                 SELECT n.* FROM heads k CROSS JOIN LATERAL (
                     SELECT h.topic, h.key, h.seq, h.attempts, h.next_attempt_at
                     FROM outbox.held_messages h
                     WHERE h.key IS NOT NULL AND (h.topic, h.key) > (k.topic, k.key) AND {IN_LINE}
                     ORDER BY h.topic, h.key, h.seq LIMIT 1) n
             )
             SELECT {}, {}, seq, attempts, extract(epoch FROM next_attempt_at - now())::float8,
                    EXISTS (SELECT 1 FROM outbox.topics t WHERE t.topic = heads.topic AND t.paused)
             FROM heads",
        message_reader::utf8_bytes("topic"),
        message_reader::utf8_bytes("key")
    );
    with_plan(client, "held_lines", &heads_sql, |plan| {
        for row in client.select(plan, None, &[])? {
            if let (Some(t), Some(k)) = (row.get::<Vec<u8>>(1)?, row.get::<Vec<u8>>(2)?) {
                batch.blocked_keys.insert((message_reader::utf8(t), message_reader::utf8(k)));
            }
            lines.push(HeldLine {
                head_seq: row.get(3)?.unwrap_or_default(),
                head_attempts: row.get(4)?.unwrap_or_default(),
                due_in: row.get(5)?.unwrap_or_default(),
                paused: row.get(6)?.unwrap_or(false),
            });
        }
        Ok(())
    })?;
    let heads_due_in = lines.iter().filter(|l| !l.paused).map(|l| l.due_in).reduce(f64::min);
    let (heads, counts): (Vec<i64>, Vec<i32>) =
        held_lines_to_read(lines, usize::try_from(batch_size).unwrap_or(1)).into_iter().unzip();
    // The keyed lines' runs, and messages without a key (each its own line) that are due, by
    // topic (a topic at a time down the same index), in line order.
    let mut held = message_reader::select_messages(
        "read_held_lines",
        &format!(
            "WITH RECURSIVE {TOPICS_IN_LINE}
             SELECT {} FROM (
                 SELECT r.* FROM unnest($1::int8[], $2::int4[]) AS l(head_seq, n)
                 JOIN outbox.held_messages hd ON hd.seq = l.head_seq
                 CROSS JOIN LATERAL (
                     SELECT h.* FROM outbox.held_messages h
                     WHERE h.topic = hd.topic AND (h.key, h.seq) >= (hd.key, hd.seq) AND h.key <= hd.key
                       AND {IN_LINE}
                     ORDER BY h.key, h.seq LIMIT l.n) r
               UNION ALL
                 SELECT r.* FROM topics t CROSS JOIN LATERAL (
                     SELECT h.* FROM outbox.held_messages h
                     WHERE h.topic = t.topic AND h.key IS NULL AND {IN_LINE} AND h.next_attempt_at <= now()
                     ORDER BY h.key, h.seq LIMIT $3) r
                 WHERE t.topic IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM outbox.topics p WHERE p.topic = t.topic AND p.paused)
             ) held
             ORDER BY seq LIMIT $3",
            message_reader::columns(true)
        ),
        &[heads.into(), counts.into(), batch_size.into()],
        true,
        // Usually a few; a batch while a resumed topic drains.
        0,
    );
    cut_held_runs(&mut held);
    batch.retries.extend(held);
    // Only needed to sleep until then: with messages to retry now the worker goes on at once.
    if !batch.retries.is_empty() {
        return Ok(());
    }
    // The next to fall due: a key's head, a message without a key (of a topic not paused), or a
    // delayed message (paused or not: it moves into its line when due).
    let others_due_in: Option<f64> = with_plan(
        client,
        "held_next_due",
        &format!(
            "WITH RECURSIVE {TOPICS_IN_LINE}
                 SELECT extract(epoch FROM least(
                     (SELECT min(h.next_attempt_at) FROM topics t
                      JOIN outbox.held_messages h ON h.topic = t.topic AND h.key IS NULL AND {IN_LINE}
                      WHERE NOT EXISTS (SELECT 1 FROM outbox.topics p WHERE p.topic = t.topic AND p.paused)),
                     (SELECT min(h.next_attempt_at) FROM outbox.held_messages h WHERE h.delayed)
                 ) - now())::float8"
        ),
        |plan| client.select(plan, Some(1), &[])?.first().get(1),
    )?;
    batch.next_due_in = [heads_due_in, others_due_in].into_iter().flatten().reduce(f64::min);
    Ok(())
}

/// What happened to a batch, to be recorded in one transaction.
#[derive(Default)]
pub struct Settlement {
    pub window: String,
    pub window_continues: bool,
    pub window_changed: bool,
    pub last_fresh_id: Option<i64>,
    /// How many fresh and held messages the broker acknowledged.
    pub delivered: i64,
    /// Per-topic counts to add to outbox.topics (empty between its writes; see TopicCounters).
    pub topic_counts: Vec<TopicCount>,
    /// Held messages the broker acknowledged.
    pub delivered_held: Vec<i64>,
    /// Fresh messages to move to held_messages, in delivery order.
    pub hold_fresh: Vec<Hold>,
    /// Held messages the broker refused again: (id, error).
    pub refused_held: Vec<(i64, String)>,
    /// Held messages whose cluster is down: (id, error, seconds until it is tried again).
    pub postponed_held: Vec<(i64, String, f64)>,
}

/// A fresh message that goes to held_messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hold {
    pub id: i64,
    /// Failed attempts (1 when the broker refused it, 0 otherwise).
    pub attempts: i32,
    pub error: Option<String>,
    /// Seconds until it is tried, when its cluster is down; otherwise it is due after the retry
    /// backoff of its attempts, or at its deliver_at.
    pub wait: Option<f64>,
}

thread_local! {
    /// The records not known to be flushed: the end of the last one's commit in the WAL, and how
    /// many deliveries they recorded (all of them would be sent again after a crash).
    static UNFLUSHED_RECORDS: std::cell::Cell<(pg_sys::XLogRecPtr, i64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Called before `sending` messages are sent: keeps what a crash can make the worker send again
/// within `batch_size` messages. The worker commits its records asynchronously; they reach disk
/// with the next commit of any session or with the WAL writer. Only when the deliveries recorded
/// since then, plus this batch, could exceed the bound is the last record flushed here first. So a
/// backlog (full batches) flushes before every batch, as a synchronous commit would, and a low
/// or moderate rate (small batches) keeps the flush off its commit-to-broker path.
pub fn flush_recorded(sending: i64, batch_size: i64) {
    let (lsn, unflushed) = UNFLUSHED_RECORDS.with(|u| u.get());
    if lsn == 0 {
        return;
    }
    if lsn <= unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) } {
        UNFLUSHED_RECORDS.with(|u| u.set((0, 0)));
        return;
    }
    if flush_before_sending(unflushed, sending, batch_size) {
        unsafe { pg_sys::XLogFlush(lsn) };
        UNFLUSHED_RECORDS.with(|u| u.set((0, 0)));
    }
}

/// Where the WAL must be flushed to before this batch is sent, so that no transaction whose
/// messages it holds can be lost by a crash after they went out. Read after the batch's snapshot
/// was taken: an asynchronous commit visible in it counted itself as pending before it committed,
/// and published its end before it stopped counting. While one is pending its end is not known
/// yet, so the end of all WAL inserted stands for it. Held messages may also depend on the
/// worker's own last record (which moved them there), not flushed at its commit.
fn commits_end(with_held: bool) -> u64 {
    let (pending, end) = shmem::async_commits();
    let commits = if pending > 0 {
        // (Not GetXLogInsertRecPtr: at a page boundary that is past the header of a page not
        // written yet, which XLogFlush refuses with an ERROR.)
        unsafe { pg_sys::GetXLogInsertEndRecPtr() }
    } else {
        end
    };
    if with_held {
        commits.max(UNFLUSHED_RECORDS.with(|u| u.get().0))
    } else {
        commits
    }
}

/// Makes sure the commits of the messages about to be sent are on disk. A transaction committed
/// with synchronous_commit off is visible before its commit record is flushed: sent at once, its
/// message would outlive it if the server crashed before the WAL writer came round (a phantom
/// event, as if it had been sent before COMMIT). With synchronous commits only, there is nothing
/// to flush.
pub fn flush_commits(commits_end: u64) {
    unsafe {
        if commits_end > 0 && pg_sys::XLogNeedsFlush(commits_end) {
            pg_sys::XLogFlush(commits_end);
        }
    }
}

/// Records a settled batch: advances the watermark, moves what must wait, counts deliveries.
pub fn record(s: &Settlement, max_attempts: i32, backoff_secs: &[f64]) {
    record_batch(s, max_attempts, backoff_secs);
    let end = unsafe { pg_sys::XactLastCommitEnd };
    UNFLUSHED_RECORDS.with(|u| u.set((end, u.get().1 + s.delivered)));
}

fn record_batch(s: &Settlement, max_attempts: i32, backoff_secs: &[f64]) {
    transaction(false, || {
        // Dropped since the batch was read: nothing left to record.
        if !extension_installed() {
            return;
        }
        // Most cycles only advance the watermark: straight into the state row where it can be.
        let only_watermark = s.hold_fresh.is_empty()
            && s.delivered_held.is_empty()
            && s.refused_held.is_empty()
            && s.postponed_held.is_empty()
            && s.topic_counts.is_empty();
        if only_watermark && !s.window_changed {
            return;
        }
        if only_watermark {
            let known = STATE_CTID.with(|c| c.borrow().clone());
            let moved =
                crate::direct::advance_watermark(&known, &s.window, s.window_continues, s.last_fresh_id, s.delivered);
            if let Some(ctid) = moved {
                STATE_CTID.with(|c| *c.borrow_mut() = ctid);
                return;
            }
        }
        Spi::connect_mut(|client| -> SpiResult<()> {
            if !s.hold_fresh.is_empty() {
                let ids: Vec<i64> = s.hold_fresh.iter().map(|h| h.id).collect();
                let attempts: Vec<i32> = s.hold_fresh.iter().map(|h| h.attempts).collect();
                let errors: Vec<Option<String>> = s.hold_fresh.iter().map(|h| h.error.clone()).collect();
                let waits: Vec<Option<f64>> = s.hold_fresh.iter().map(|h| h.wait).collect();
                // A message not due yet (it was never sent) waits outside its line until then
                // (delayed); it has its place in the line from now, in delivery order.
                client.update(
                    "INSERT INTO outbox.held_messages
                         (id, topic, key, payload, json_payload, headers, enqueued_at, attempts,
                          next_attempt_at, last_error, last_error_at, delayed)
                     SELECT m.id, m.topic, m.key, m.payload,
                            coalesce(m.json_payload, convert_from(m.json_text, 'UTF8')::jsonb),
                            m.headers, m.enqueued_at, u.attempts,
                            CASE WHEN u.wait IS NOT NULL THEN now() + make_interval(secs => u.wait)
                                 WHEN u.attempts > 0
                                 THEN now() + make_interval(secs => coalesce(($4::float8[])[u.attempts], 0))
                                 ELSE greatest(now(), m.deliver_at) END,
                            u.error, CASE WHEN u.error IS NOT NULL THEN now() END,
                            u.attempts = 0 AND coalesce(m.deliver_at > now(), false)
                     FROM unnest($1::int8[], $2::int4[], $3::text[], $5::float8[]) WITH ORDINALITY
                          AS u(id, attempts, error, wait, ord)
                     JOIN outbox.messages m ON m.id = u.id
                     ORDER BY u.ord
                     ON CONFLICT (id) DO NOTHING",
                    None,
                    &[ids.into(), attempts.into(), errors.into(), backoff_secs.to_vec().into(), waits.into()],
                )?;
            }
            if !s.delivered_held.is_empty() {
                client.update(
                    "DELETE FROM outbox.held_messages WHERE id = ANY ($1)",
                    None,
                    &[s.delivered_held.clone().into()],
                )?;
            }
            if !s.refused_held.is_empty() {
                let ids: Vec<i64> = s.refused_held.iter().map(|r| r.0).collect();
                let errors: Vec<String> = s.refused_held.iter().map(|r| r.1.clone()).collect();
                client.update(
                    "UPDATE outbox.held_messages h
                     SET attempts = h.attempts + 1,
                         next_attempt_at = now() + make_interval(secs => coalesce(($3::float8[])[h.attempts + 1],
                                                                   ($3::float8[])[array_upper($3::float8[], 1)])),
                         last_error = u.error, last_error_at = now()
                     FROM unnest($1::int8[], $2::text[]) AS u(id, error)
                     WHERE h.id = u.id",
                    None,
                    &[ids.into(), errors.into(), backoff_secs.to_vec().into()],
                )?;
            }
            if !s.postponed_held.is_empty() {
                let ids: Vec<i64> = s.postponed_held.iter().map(|p| p.0).collect();
                let errors: Vec<String> = s.postponed_held.iter().map(|p| p.1.clone()).collect();
                let waits: Vec<f64> = s.postponed_held.iter().map(|p| p.2).collect();
                client.update(
                    "UPDATE outbox.held_messages h
                     SET next_attempt_at = now() + make_interval(secs => u.wait),
                         last_error = u.error, last_error_at = now()
                     FROM unnest($1::int8[], $2::text[], $3::float8[]) AS u(id, error, wait)
                     WHERE h.id = u.id",
                    None,
                    &[ids.into(), errors.into(), waits.into()],
                )?;
            }
            // The messages refused in this batch that have had their last attempt, found by id:
            // a sweep of every held row by attempts read every message waiting for a paused topic
            // or scheduled for later, each time a batch held one more.
            let refused: Vec<i64> = s
                .hold_fresh
                .iter()
                .filter(|h| h.attempts > 0)
                .map(|h| h.id)
                .chain(s.refused_held.iter().map(|r| r.0))
                .collect();
            if !refused.is_empty() {
                client.update(
                    "WITH dead AS (
                         DELETE FROM outbox.held_messages WHERE id = ANY ($2) AND attempts >= $1 RETURNING *
                     )
                     INSERT INTO outbox.dead_letters
                         (id, topic, key, payload, json_payload, headers, enqueued_at, attempts, last_error)
                     SELECT id, topic, key, payload, json_payload, headers, enqueued_at, attempts, last_error
                     FROM dead
                     ON CONFLICT (id) DO NOTHING",
                    None,
                    &[max_attempts.into(), refused.into()],
                )?;
            }
            if !s.topic_counts.is_empty() {
                let names: Vec<String> = s.topic_counts.iter().map(|c| c.topic.clone()).collect();
                let delivered: Vec<i64> = s.topic_counts.iter().map(|c| c.delivered).collect();
                let refused: Vec<i64> = s.topic_counts.iter().map(|c| c.refused).collect();
                prepare_once(
                    client,
                    "count_deliveries",
                    "INSERT INTO outbox.topics AS t (topic, delivered_total, failed_attempts, last_delivered_at, delivery_rate)
                     SELECT topic, delivered, refused, CASE WHEN delivered > 0 THEN now() END, delivered / 60.0
                     FROM unnest($1::text[], $2::int8[], $3::int8[]) AS u(topic, delivered, refused)
                     ON CONFLICT (topic) DO UPDATE
                     SET delivered_total = t.delivered_total + excluded.delivered_total,
                         -- Deliveries per second over about the last minute, decayed.
                         delivery_rate = t.delivery_rate
                             * exp(-greatest(extract(epoch FROM now() - coalesce(t.last_delivered_at, now())), 0) / 60)
                             + excluded.delivered_total / 60.0,
                         failed_attempts = t.failed_attempts + excluded.failed_attempts,
                         last_delivered_at = coalesce(excluded.last_delivered_at, t.last_delivered_at)",
                    &[oid(PgBuiltInOids::TEXTARRAYOID), oid(PgBuiltInOids::INT8ARRAYOID), oid(PgBuiltInOids::INT8ARRAYOID)],
                )?;
                run_plan("count_deliveries", |plan| {
                    client.update(plan, None, &[names.into(), delivered.into(), refused.into()]).map(drop)
                })?;
            }
            if s.window_changed {
                // A window that continues keeps its place by id; a finished one becomes the
                // watermark.
                let names = ["advance_watermark", "advance_watermark_scan"];
                prepare_on_state_row(
                    client,
                    names,
                    "UPDATE outbox.worker_state
                     SET done_snapshot = CASE WHEN $2 THEN done_snapshot ELSE $1::pg_snapshot END,
                         window_snapshot = CASE WHEN $2 THEN $1::pg_snapshot END,
                         window_last_id = CASE WHEN $2 THEN $3 END,
                         delivered_total = delivered_total + $4
                     {row}
                     RETURNING ctid::text",
                    &[
                        oid(PgBuiltInOids::TEXTOID),
                        oid(PgBuiltInOids::BOOLOID),
                        oid(PgBuiltInOids::INT8OID),
                        oid(PgBuiltInOids::INT8OID),
                    ],
                )?;
                on_state_row(names, |plan, ctid| {
                    let args = [
                        s.window.clone().into(),
                        s.window_continues.into(),
                        s.last_fresh_id.into(),
                        s.delivered.into(),
                        ctid.into(),
                    ];
                    client.update(plan, None, &args)
                })?;
            }
            Ok(())
        })
        .unwrap_or_else(|e| error!("pg_outbox worker could not record deliveries: {e}"))
    })
}

/// Storage rotation: moves enqueuers to the next slot once the current one has been written long
/// enough and the next one is empty, and TRUNCATEs every other slot whose messages are all
/// settled. Returns the current slot. TRUNCATE needs an AccessExclusiveLock, taken only if it is
/// free right now, so an enqueuer still writing to an old slot is never blocked nor lost.
pub fn rotate(rotation_interval_secs: f64, retention_secs: f64) -> Option<i16> {
    transaction(false, || {
        if !extension_installed() {
            return None;
        }
        Spi::connect_mut(|client| -> SpiResult<Option<i16>> {
            let names = ["rotation_state", "rotation_state_scan"];
            prepare_on_state_row(
                client,
                names,
                "SELECT current_slot, extract(epoch FROM now() - slot_switched_at)::float8,
                        pg_snapshot_xmax(done_snapshot)::text,
                        ARRAY(SELECT pg_snapshot_xip(done_snapshot)::text),
                        ctid::text
                 FROM outbox.worker_state {row}",
                &[],
            )?;
            let state = on_state_row(names, |plan, ctid| client.select(plan, Some(1), &[ctid.into()]))?;
            let mut current: i16 = state.get(1)?.unwrap_or(0);
            let age: f64 = state.get(2)?.unwrap_or(0.0);
            let done_xmax: String = state.get(3)?.unwrap_or_default();
            let done_xip: Vec<String> = state.get(4)?.unwrap_or_default();
            // Which slots are empty, and how large each one's heap is: one statement, kept.
            let slots_sql = (0..SLOTS)
                .map(|slot| format!("NOT EXISTS (SELECT 1 FROM outbox.messages_{slot})"))
                .chain((0..SLOTS).map(|slot| format!("pg_relation_size('outbox.messages_{slot}'::regclass)")))
                .collect::<Vec<_>>()
                .join(", ");
            let (empty, size) = with_plan(client, "rotation_slots", &format!("SELECT {slots_sql}"), |plan| {
                let row = client.select(plan, Some(1), &[])?.first();
                let mut empty = [false; SLOTS as usize];
                let mut size = [0i64; SLOTS as usize];
                for slot in 0..SLOTS as usize {
                    empty[slot] = row.get::<bool>(slot + 1)?.unwrap_or(false);
                    size[slot] = row.get::<i64>(SLOTS as usize + slot + 1)?.unwrap_or(0);
                }
                Ok((empty, size))
            })?;
            for slot in (0..SLOTS).filter(|&s| s != current) {
                let table = format!("outbox.messages_{slot}");
                if empty[slot as usize] || !try_lock_exclusive(&table) {
                    continue;
                }
                // Until the lock was granted, an enqueuer may have been writing to the slot; if it
                // committed after this transaction's snapshot, that snapshot cannot see its rows,
                // and the slot would be truncated with its messages unsent. The checks read a
                // snapshot taken now, with the lock held (read committed, as the worker keeps it:
                // SPI's read-only statements use the active snapshot, the others one of their own).
                take_a_snapshot_now();
                let keep = unsettled_rows(client, &table, &done_xmax, &done_xip)?
                    || (retention_secs > 0.0 && retained_rows(client, &table, size[slot as usize], retention_secs)?);
                if !keep {
                    client.update(&format!("TRUNCATE {table}"), None, &[])?;
                }
            }
            let next = (current + 1) % SLOTS;
            // Four slots must cover the retention period: rotate at least every retention / 2.
            // Without retention, a busy slot also rotates once its heap reaches ROTATION_BYTES,
            // so storage stays about two slots of that size whatever the rate.
            let full = retention_secs <= 0.0 && size[current as usize] >= ROTATION_BYTES;
            if full || age >= rotation_interval_secs.max(retention_secs / 2.0) {
                // Empty before this check, or truncated by it just now.
                let next_empty = empty[next as usize]
                    || client
                        .select(&format!("SELECT NOT EXISTS (SELECT 1 FROM outbox.messages_{next})"), Some(1), &[])?
                        .first()
                        .get(1)?
                        .unwrap_or(false);
                if next_empty {
                    let moved = client.update(
                        "UPDATE outbox.worker_state SET current_slot = $1, slot_switched_at = now() RETURNING ctid::text",
                        None,
                        &[next.into()],
                    )?;
                    let ctid = moved.first().get_one::<String>()?.unwrap_or_default();
                    STATE_CTID.with(|c| *c.borrow_mut() = ctid);
                    current = next;
                }
            }
            Ok(Some(current))
        })
        .unwrap_or_else(|e| error!("pg_outbox worker could not rotate storage: {e}"))
    })
}

/// Whether `table` holds a message the done snapshot does not cover, read from the txid index:
/// its highest txid, and a lookup of each transaction in progress. (Tested in one statement with
/// `enqueued_at`, this could only scan the slot: every delivered row was read before each
/// TRUNCATE, 9 % of the worker's samples in a drain that met a slot of 1.6 million. As
/// `txid >= $1 OR txid = ANY ($2)` it was planned as a walk of the whole index.)
fn unsettled_rows(client: &SpiClient, table: &str, done_xmax: &str, done_xip: &[String]) -> SpiResult<bool> {
    Ok(client
        .select(
            &format!(
                "SELECT coalesce((SELECT max(txid) FROM {table}) >= $1::xid8, false)
                        OR EXISTS (SELECT 1 FROM {table} WHERE txid = ANY ($2::xid8[]))"
            ),
            Some(1),
            &[done_xmax.into(), done_xip.to_vec().into()],
        )?
        .first()
        .get(1)?
        .unwrap_or(true))
}

/// Whether `table` (of `bytes`) holds a message enqueued within the retention period. A slot is
/// only appended to until it is truncated, so the youngest rows are in its last pages: those are
/// read first, and the whole slot only when they hold none. Scanning from the start instead
/// read every row that had aged out, every second, until the youngest one did too. The second
/// tail covers the empty pages a busy relation extension leaves at the end.
fn retained_rows(client: &SpiClient, table: &str, bytes: i64, retention_secs: f64) -> SpiResult<bool> {
    let blocks = u64::try_from(bytes).unwrap_or(0) / u64::from(pg_sys::BLCKSZ);
    for tail in [16, 1024, u64::MAX] {
        let first_block = blocks.saturating_sub(tail);
        let retained = client
            .select(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {table}
                                    WHERE ctid >= format('(%s,0)', $1::bigint)::tid
                                      AND enqueued_at > now() - make_interval(secs => $2))"
                ),
                Some(1),
                &[(first_block as i64).into(), retention_secs.into()],
            )?
            .first()
            .get(1)?
            .unwrap_or(true);
        if retained || first_block == 0 {
            return Ok(retained);
        }
    }
    Ok(true)
}

/// Replaces the transaction's active snapshot with one taken now.
fn take_a_snapshot_now() {
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
}

fn try_lock_exclusive(table: &str) -> bool {
    let Ok(name) = CString::new(table) else { return false };
    unsafe {
        let names = pg_sys::stringToQualifiedNameList(name.as_ptr());
        let rv = pg_sys::makeRangeVarFromNameList(names);
        let relid = pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::NoLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        );
        relid != pg_sys::InvalidOid
            && pg_sys::ConditionalLockRelationOid(relid, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE)
    }
}
