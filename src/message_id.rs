//! Message ids: `nextval('outbox.message_id_seq')`, moved ahead once when the server writes on a
//! timeline other than the one the ids were last given on (`pg_outbox_bgworker::timeline_ids`
//! says why). `enqueue_message` takes its ids here, and from SQL 0.8.0 on so does the default of
//! `outbox.messages.id` (`outbox._next_message_id`), so a row written by a plain INSERT gets one
//! too. The timeline is recorded in the sequence `outbox.message_id_timeline`: like the ids, it
//! is not rolled back, and it replicates with them.
use std::cell::Cell;

use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use pg_outbox_bgworker::timeline_ids::id_after_timeline_change;

use crate::guc;

unsafe extern "C-unwind" {
    // commands/sequence.h, which pgrx does not bind: what nextval() calls.
    fn nextval_internal(relid: Oid, check_permissions: bool) -> i64;
}

/// `nextval(sequence)`, its ERRORs (permission, limit reached, read-only) raised as Postgres
/// raises them.
unsafe fn nextval(sequence: Oid) -> i64 {
    pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(sequence, true))
}

thread_local! {
    /// The timeline this session found recorded as the ids' own. A server writes on one timeline
    /// from the end of its recovery, and a session looks only once recovery is over, so it looks
    /// once, before its first id: the values it then caches (CACHE > 1) come after any move.
    static CHECKED_TIMELINE: Cell<u32> = const { Cell::new(0) };
    /// Where it found it: outbox.message_id_timeline. Dropped (DROP EXTENSION) or replaced, it
    /// is looked at again.
    static RECORD: Cell<Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn relation_changed(_arg: Datum, relid: Oid) {
    if relid == pg_sys::InvalidOid || relid == RECORD.with(Cell::get) {
        CHECKED_TIMELINE.with(|c| c.set(0));
    }
}

#[no_mangle]
pub extern "C" fn pg_finfo_next_message_id() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// outbox._next_message_id(sequence regclass) RETURNS bigint (STRICT).
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn next_message_id(fcinfo: pg_sys::FunctionCallInfo) -> Datum {
    let sequence = Oid::from(pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0).value() as u32);
    Datum::from(next_id(sequence))
}

/// The next id of `sequence`; for the outbox's own, after the check of the timeline.
pub unsafe fn next_id(sequence: Oid) -> i64 {
    // On a standby nextval raises its ERROR (every transaction is read-only there).
    if !pg_sys::RecoveryInProgress() {
        let timeline = pg_sys::GetWALInsertionTimeLine();
        if CHECKED_TIMELINE.with(Cell::get) != timeline {
            check_timeline(sequence, timeline);
        }
    }
    nextval(sequence)
}

#[cold]
unsafe fn check_timeline(sequence: Oid, timeline: u32) {
    // Only the outbox's sequence: the function is anyone's (as nextval), and would otherwise
    // move a sequence its caller may only take values from.
    let namespace = pg_sys::get_namespace_oid(c"outbox".as_ptr(), true);
    let relation = |name: &std::ffi::CStr| match namespace {
        pg_sys::InvalidOid => pg_sys::InvalidOid,
        namespace => pg_sys::get_relname_relid(name.as_ptr(), namespace),
    };
    if relation(c"message_id_seq") != sequence {
        return;
    }
    // SQL objects older than 0.8.0 (before ALTER EXTENSION UPDATE) record no timeline: looked
    // for again at the next id, so that the first id after the update records it.
    let record = relation(c"message_id_timeline");
    if record == pg_sys::InvalidOid {
        return;
    }
    if !CALLBACK_REGISTERED.with(|r| r.replace(true)) {
        pg_sys::CacheRegisterRelcacheCallback(Some(relation_changed), Datum::from(0));
    }
    if as_owner_of(record, || recorded_timeline(record)) != timeline {
        // One session at a time looks and moves, so the sequence moves once. nextval's own lock
        // (RowExclusiveLock) does not conflict with this one: sessions that checked go on.
        let lock = pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE;
        pg_sys::LockRelationOid(sequence, lock);
        as_owner_of(record, || move_for(record, timeline));
        pg_sys::UnlockRelationOid(sequence, lock);
    }
    RECORD.with(|r| r.set(record));
    CHECKED_TIMELINE.with(|c| c.set(timeline));
}

/// Runs `f` as the owner of `relation`, the record (the extension's owner, who made it): reading
/// it and setval need privileges a role that may INSERT into outbox.messages does not have (it
/// needs only USAGE on the ids' sequence). An ERROR on the way restores the caller's identity
/// with the (sub)transaction's abort.
unsafe fn as_owner_of<R>(relation: Oid, f: impl FnOnce() -> R) -> R {
    let reloid = pg_sys::SysCacheIdentifier::RELOID as i32;
    let class = pg_sys::SearchSysCache1(reloid, Datum::from(relation));
    if class.is_null() {
        timeline_error("the owner of outbox.message_id_timeline was not found".to_string());
    }
    let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(class)).relowner;
    pg_sys::ReleaseSysCache(class);
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
    pg_sys::SetUserIdAndSecContext(owner, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    let result = f();
    pg_sys::SetUserIdAndSecContext(user, context);
    result
}

/// The timeline ids were last given on, in `record`; 0 before any was recorded (the extension
/// was just created or updated to 0.8.0: the sequence was never set, and has no last value).
/// Read without a query, as the owner reads it (its privileges are checked): every session
/// reads it before its first id, and a session's first query through SPI cost more than the
/// rest of its first enqueue_message.
unsafe fn recorded_timeline(record: Oid) -> u32 {
    let last_value = pgrx::direct_function_call::<i64>(pg_sys::pg_sequence_last_value, &[Some(Datum::from(record))]);
    last_value.and_then(|timeline| u32::try_from(timeline).ok()).unwrap_or(0)
}

/// Moves the ids' sequence ahead for `timeline`, unless another session did meanwhile, and
/// records it. Nothing moves while none was recorded: the ids are this timeline's own.
unsafe fn move_for(record: Oid, timeline: u32) {
    let recorded = recorded_timeline(record);
    if recorded == timeline {
        return;
    }
    guc::with_catalog_search_path(|| {
        if recorded != 0 {
            let state = Spi::get_three::<i64, i64, i64>(
                "SELECT s.last_value, p.seqmax, p.seqincrement
                 FROM outbox.message_id_seq s, pg_catalog.pg_sequence p
                 WHERE p.seqrelid OPERATOR(pg_catalog.=) 'outbox.message_id_seq'::pg_catalog.regclass",
            );
            let Ok((Some(last_value), Some(max_value), Some(increment))) = state else {
                timeline_error(format!("outbox.message_id_seq could not be read ({state:?})"))
            };
            match id_after_timeline_change(last_value, recorded, timeline, max_value, increment) {
                Some(target) => {
                    set("outbox.message_id_seq", target);
                    log!(
                        "pg_outbox: the server writes on timeline {timeline} (a promotion or a recovery), ids were given on timeline {recorded}: message ids go on after {target}, above every id timeline {recorded} can have given since"
                    );
                }
                None => warning!(
                    "pg_outbox: the server writes on timeline {timeline}, ids were given on timeline {recorded}, and outbox.message_id_seq cannot move ahead from {last_value} (its MAXVALUE or INCREMENT): ids timeline {recorded} gave after the point this one started from are given again"
                ),
            }
        }
        set("outbox.message_id_timeline", i64::from(timeline));
    })
}

fn set(sequence: &str, value: i64) {
    let done = Spi::get_one_with_args::<i64>(
        &format!("SELECT pg_catalog.setval('{sequence}'::pg_catalog.regclass, $1)"),
        &[value.into()],
    );
    if let Err(e) = done {
        timeline_error(format!("setval of {sequence} failed: {e}"));
    }
}

fn timeline_error(why: String) -> ! {
    ereport!(
        ERROR,
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("pg_outbox: could not check the timeline message ids were given on: {why}"),
        "On a new timeline (after a promotion or a point-in-time recovery) message ids move ahead of every id given before."
    );
}
