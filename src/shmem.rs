//! Shared memory: one slot per worker, holding what other backends need from it — its latch (so
//! a committing transaction can wake it), the storage slot enqueuers write to, and the live
//! figures behind `outbox.worker_status`. Figures survive a worker restart (not a server restart).
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::atomics::PgAtomic;
use pgrx::lwlock::PgLwLock;
use pgrx::pg_guard;
use pgrx::pg_sys;
use pgrx::shmem::PGRXSharedMemory;

pub const MAX_WORKERS: usize = 32;
const ERROR_LEN: usize = 512;
const NAME_LEN: usize = 64;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum WorkerState {
    Starting,
    WaitingForExtension,
    OutdatedExtension,
    Standby,
    Idle,
    Forwarding,
    BrokerUnavailable,
    Stopped,
}

/// What `worker_status` shows for the current database when `pg_outbox.database` does not name it.
pub const NOT_LISTED: &str = "no worker: not in pg_outbox.database";

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::WaitingForExtension => "waiting for CREATE EXTENSION",
            WorkerState::OutdatedExtension => "waiting for ALTER EXTENSION pg_outbox UPDATE",
            WorkerState::Standby => "standby (read-only)",
            WorkerState::Idle => "idle",
            WorkerState::Forwarding => "forwarding",
            WorkerState::BrokerUnavailable => "broker unavailable",
            WorkerState::Stopped => "stopped",
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BrokerState {
    Unknown,
    Connected,
    Unavailable,
}

impl BrokerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerState::Unknown => "not connected yet",
            BrokerState::Connected => "connected",
            BrokerState::Unavailable => "unavailable",
        }
    }
}

#[derive(Copy, Clone)]
pub struct WorkerSlot {
    pub in_use: bool,
    pub database_oid: u32,
    database: [u8; NAME_LEN],
    pub pid: i32,
    /// Address of the worker's process latch (PGPROC lives in shared memory, mapped at the same
    /// address in every backend); 0 while no worker runs.
    pub latch: usize,
    pub current_slot: i16,
    /// The last worker left on purpose (SIGTERM, database dropped), not on an error.
    pub exited_cleanly: bool,
    /// Set by outbox._inject_producer_fatal_error(); taken by the worker before its next send.
    pub inject_fatal_error: bool,
    pub state: WorkerState,
    pub broker: BrokerState,
    pub batches: i64,
    pub delivered: i64,
    pub in_flight: i32,
    pub wakeups_commit: i64,
    pub wakeups_poll: i64,
    pub wakeups_empty: i64,
    last_error: [u8; ERROR_LEN],
    pub last_error_at: pg_sys::TimestampTz,
    pub started_at: pg_sys::TimestampTz,
}

impl WorkerSlot {
    const EMPTY: WorkerSlot = WorkerSlot {
        in_use: false,
        database_oid: 0,
        database: [0; NAME_LEN],
        pid: 0,
        latch: 0,
        current_slot: 0,
        exited_cleanly: false,
        inject_fatal_error: false,
        state: WorkerState::Stopped,
        broker: BrokerState::Unknown,
        batches: 0,
        delivered: 0,
        in_flight: 0,
        wakeups_commit: 0,
        wakeups_poll: 0,
        wakeups_empty: 0,
        last_error: [0; ERROR_LEN],
        last_error_at: 0,
        started_at: 0,
    };

    pub fn database(&self) -> String {
        text_of(&self.database)
    }

    pub fn last_error(&self) -> Option<String> {
        Some(text_of(&self.last_error)).filter(|s| !s.is_empty())
    }

    pub fn set_last_error(&mut self, message: &str) {
        copy_text(&mut self.last_error, message);
        self.last_error_at = unsafe { pg_sys::GetCurrentTimestamp() };
    }
}

fn text_of(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn copy_text(buf: &mut [u8], text: &str) {
    // Cut at a character boundary so the stored text stays valid UTF-8.
    let mut end = text.len().min(buf.len() - 1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    buf.fill(0);
    buf[..end].copy_from_slice(&text.as_bytes()[..end]);
}

#[derive(Copy, Clone)]
#[repr(C)]
pub struct Registry {
    pub slots: [WorkerSlot; MAX_WORKERS],
    /// Broadcast by a worker after it recorded deliveries; `wait_for_delivery` sleeps on it.
    /// Initialised with ConditionVariableInit() by its first user.
    delivered: pg_sys::ConditionVariable,
    delivered_ready: bool,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            slots: [WorkerSlot::EMPTY; MAX_WORKERS],
            delivered: pg_sys::ConditionVariable::default(),
            delivered_ready: false,
        }
    }
}

unsafe impl PGRXSharedMemory for Registry {}

pub static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"pg_outbox registry") };

/// Commits with synchronous_commit off of transactions that enqueued: how many are between their
/// pre-commit and their commit, and where the latest commit record among those done ends. Such a
/// commit is visible before it is on disk, so the worker flushes the WAL that far before it sends
/// (`store::commits_end`). With synchronous commits both stay 0 and it flushes nothing.
static ASYNC_COMMITS_PENDING: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_outbox async commits pending") };
static ASYNC_COMMITS_END: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"pg_outbox async commits end") };

pub fn init() {
    pgrx::pg_shmem_init!(REGISTRY);
    pgrx::pg_shmem_init!(ASYNC_COMMITS_PENDING);
    pgrx::pg_shmem_init!(ASYNC_COMMITS_END);
}

/// At pre-commit, before the transaction can be visible to anyone.
pub fn async_commit_starts() {
    ASYNC_COMMITS_PENDING.get().fetch_add(1, Ordering::SeqCst);
}

/// After the commit (`end`, the end of its record) or the abort (`None`). The end is published
/// before the count drops: a worker that reads the count as 0 then finds every end.
pub fn async_commit_ends(end: Option<u64>) {
    if let Some(end) = end {
        ASYNC_COMMITS_END.get().fetch_max(end, Ordering::SeqCst);
    }
    ASYNC_COMMITS_PENDING.get().fetch_sub(1, Ordering::SeqCst);
}

/// How many asynchronous commits are pending, and where the latest one done ends, in this order.
pub fn async_commits() -> (u64, u64) {
    let pending = ASYNC_COMMITS_PENDING.get().load(Ordering::SeqCst);
    (pending, ASYNC_COMMITS_END.get().load(Ordering::SeqCst))
}

/// How a starting worker's claim on its database's slot went.
pub enum Claim {
    Claimed(usize),
    /// The worker of this process ID, still running, forwards the database already: one started
    /// by an earlier launcher (it was cancelled or terminated, and started again).
    Forwarded(i32),
    NoFreeSlot,
}

/// Whether `pid`, written into a slot by a worker, is still a background worker connected to
/// the slot's database. A worker clears its pid when it exits (even on an ERROR), and a crash
/// resets shared memory; this only keeps a slot from being lost to a pid nobody cleared, since
/// reused by another process.
fn running(pid: i32, database_oid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let proc = unsafe { pg_sys::BackendPidGetProc(pid) };
    !proc.is_null() && unsafe { (*proc).isBackgroundWorker && (*proc).databaseId.to_u32() == database_oid }
}

/// Finds (or claims) the slot of the worker for `database_oid`, keeping earlier figures. Once
/// every slot has been used, the one of the worker that stopped longest ago is taken over: a
/// database dropped and created again gets a new OID, and would otherwise keep its old slot
/// forever. A slot whose worker still runs is not taken: two workers of one database would each
/// send every message.
pub fn claim_slot(database_oid: u32, database: &str) -> Claim {
    let mut registry = REGISTRY.exclusive();
    let slots = &registry.slots;
    let Some(index) = slots
        .iter()
        .position(|s| s.in_use && s.database_oid == database_oid)
        .or_else(|| slots.iter().position(|s| !s.in_use))
        .or_else(|| {
            (0..slots.len())
                .filter(|&i| !running(slots[i].pid, slots[i].database_oid))
                .min_by_key(|&i| slots[i].started_at)
        })
    else {
        return Claim::NoFreeSlot;
    };
    let slot = &mut registry.slots[index];
    let me = unsafe { pg_sys::MyProcPid };
    if slot.in_use && slot.database_oid == database_oid && slot.pid != me && running(slot.pid, database_oid) {
        return Claim::Forwarded(slot.pid);
    }
    if !slot.in_use || slot.database_oid != database_oid {
        *slot = WorkerSlot::EMPTY;
        slot.in_use = true;
        slot.database_oid = database_oid;
    }
    copy_text(&mut slot.database, database);
    // Under the same lock: a slot without a running worker may be taken over by the next to start.
    slot.pid = me;
    Claim::Claimed(index)
}

/// The process ID of the worker that forwards `database`, if one runs: after a restart, the
/// launcher finds the workers its predecessor started.
pub fn running_worker(database: &str) -> Option<i32> {
    let registry = REGISTRY.share();
    registry
        .slots
        .iter()
        .find(|s| s.in_use && s.database() == database && running(s.pid, s.database_oid))
        .map(|s| s.pid)
}

/// Whether the last worker of `database` left on purpose (then it is restarted without backoff).
/// The slot started last answers: an older one may be of a database of that name dropped since.
pub fn exited_cleanly(database: &str) -> bool {
    let registry = REGISTRY.share();
    let last = registry.slots.iter().filter(|s| s.in_use && s.database() == database).max_by_key(|s| s.started_at);
    last.is_some_and(|s| s.exited_cleanly)
}

/// Sets the latch of the worker serving `database_oid`, if one runs.
pub fn wake_worker(database_oid: u32) {
    let latch = {
        let registry = REGISTRY.share();
        registry.slots.iter().find(|s| s.in_use && s.database_oid == database_oid && s.latch != 0).map(|s| s.latch)
    };
    if let Some(latch) = latch {
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

/// The storage slot that enqueuers of this database write to (0 until a worker has published it).
pub fn current_slot(database_oid: u32) -> i16 {
    REGISTRY.share().slots.iter().find(|s| s.in_use && s.database_oid == database_oid).map_or(0, |s| s.current_slot)
}

pub fn update<R>(index: usize, f: impl FnOnce(&mut WorkerSlot) -> R) -> R {
    f(&mut REGISTRY.exclusive().slots[index])
}

/// The condition variable deliveries are announced on. It lives in shared memory, so the pointer
/// stays valid after the lock guard is gone.
pub fn delivered_cv() -> *mut pg_sys::ConditionVariable {
    let mut registry = REGISTRY.exclusive();
    let cv = &mut registry.delivered as *mut pg_sys::ConditionVariable;
    if !registry.delivered_ready {
        unsafe { pg_sys::ConditionVariableInit(cv) };
        registry.delivered_ready = true;
    }
    cv
}

pub fn announce_deliveries() {
    unsafe { pg_sys::ConditionVariableBroadcast(delivered_cv()) };
}

pub fn snapshot() -> Vec<WorkerSlot> {
    REGISTRY.share().slots.iter().filter(|s| s.in_use).copied().collect()
}
