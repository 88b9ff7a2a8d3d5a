//! The launcher: one static background worker, connected to no database, that starts a forwarding
//! worker for each database in `pg_outbox.database` that exists, and starts it again (with
//! backoff) when it exits. A worker exits when another session needs its database to itself
//! (DROP DATABASE, ALTER DATABASE ... RENAME, CREATE DATABASE ... TEMPLATE), when its database
//! is taken off `pg_outbox.database`, on an unexpected error, or on SIGTERM; it is never
//! restarted by the postmaster itself, so a dropped database does not turn into a restart loop.
//! The launcher itself is: the workers go on meanwhile, and the next launcher leaves the ones
//! running alone.
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::{guc, shmem};

pub const WORKER_TYPE: &str = "pg_outbox worker";
pub const LAUNCHER_TYPE: &str = "pg_outbox launcher";

/// A worker that ran this long before exiting is restarted at once, not with backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

pub fn register() {
    BackgroundWorkerBuilder::new("pg_outbox launcher")
        .set_type(LAUNCHER_TYPE)
        .set_library("pg_outbox")
        .set_function("pg_outbox_launcher_main")
        .enable_spi_access()
        // On a hot standby nothing may be written: start only once recovery is over (promotion).
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

struct Tracked {
    handle: Option<DynamicBackgroundWorker>,
    started: Instant,
    failures: u32,
    not_before: Instant,
}

/// Names of the databases that exist and accept connections (not left invalid by an interrupted
/// DROP DATABASE). A heap scan of pg_database, as the autovacuum launcher does: with no database
/// selected, the catalog's indexes cannot be used.
fn existing_databases() -> Vec<String> {
    let mut names = Vec::new();
    unsafe {
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            // datconnlimit -2 (DATCONNLIMIT_INVALID_DB, from 15.4 on): a DROP DATABASE was
            // interrupted, and connecting to what is left fails.
            if (*form).datallowconn && (*form).datconnlimit != -2 {
                names.push(CStr::from_ptr((*form).datname.data.as_ptr()).to_string_lossy().into_owned());
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        pg_sys::PopActiveSnapshot();
        pg_sys::CommitTransactionCommand();
    }
    names
}

fn start_worker(database: &str) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("pg_outbox worker for database {database}"))
        .set_type(WORKER_TYPE)
        .set_library("pg_outbox")
        .set_function("pg_outbox_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_extra(database)
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_outbox_launcher_main(_arg: pg_sys::Datum) {
    // A cancel request (pg_cancel_backend) only wakes the launcher: it runs no statement to
    // cancel, and Postgres' handler would end it with an ERROR. (So would a lock_timeout in
    // postgresql.conf, which Postgres delivers as a cancel: its scan of pg_database waits for
    // its lock instead.)
    BackgroundWorker::attach_signal_handlers(
        SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM | SignalWakeFlags::SIGINT,
    );
    BackgroundWorker::connect_worker_to_spi(None, None);
    let mut workers: HashMap<String, Tracked> = HashMap::new();
    let mut warned_no_slot = false;
    // Listed databases found missing: said once each (per launcher), and again should one go after
    // it came.
    let mut missing: HashSet<String> = HashSet::new();
    loop {
        let now = Instant::now();
        let existing = existing_databases();
        let listed = guc::databases();
        missing.retain(|database| listed.contains(database));
        for database in listed {
            if !existing.contains(&database) {
                if missing.insert(database.clone()) {
                    warning!(
                        "pg_outbox: database \"{database}\" named in pg_outbox.database does not exist or does not allow connections; nothing is forwarded for it"
                    );
                }
            } else if missing.remove(&database) {
                log!("pg_outbox: database \"{database}\" named in pg_outbox.database now exists; its worker starts");
            }
            let tracked = workers.entry(database.clone()).or_insert(Tracked {
                handle: None,
                started: now,
                failures: 0,
                not_before: now,
            });
            if let Some(handle) = &tracked.handle {
                match handle.pid() {
                    Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted) => continue,
                    Err(BackgroundWorkerStatus::PostmasterDied) => return,
                    Err(_) => {
                        tracked.handle = None;
                        // An error exit backs off (1, 2, 4 ... 30 s); a worker stopped on purpose
                        // (pg_terminate_backend, its database being dropped) comes back after 1 s.
                        let clean = shmem::exited_cleanly(&database);
                        tracked.failures =
                            if clean || now - tracked.started >= HEALTHY_RUN { 0 } else { tracked.failures + 1 };
                        let delay = Duration::from_secs(1u64 << tracked.failures.min(5)).min(MAX_RESTART_DELAY);
                        tracked.not_before = now + delay;
                    }
                }
            }
            // Started by the launcher before this one, and still running.
            if tracked.handle.is_none() && shmem::running_worker(&database).is_some() {
                continue;
            }
            if now < tracked.not_before || !existing.contains(&database) {
                continue;
            }
            match start_worker(&database) {
                Some(handle) => {
                    tracked.handle = Some(handle);
                    tracked.started = now;
                    warned_no_slot = false;
                }
                None if !warned_no_slot => {
                    warning!(
                        "pg_outbox: cannot start a worker for database \"{database}\": no free background worker slot (raise max_worker_processes)"
                    );
                    warned_no_slot = true;
                }
                None => {}
            }
        }
        // Woken early when a worker starts or stops (bgw_notify_pid), or on SIGHUP/SIGTERM.
        if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
    // SIGTERM: at shutdown the postmaster stops the workers itself, and starts nothing again.
    // Otherwise someone ended the launcher (pg_terminate_backend): exit code 1 has the postmaster
    // start it again after its restart time (code 0 would unregister it until the server
    // restarts, and no worker that stops would be started again), and the workers, left alone,
    // forward meanwhile.
    unsafe { pg_sys::proc_exit(1) };
}
