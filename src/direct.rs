//! What the worker reads and writes in every cycle, through the heap and index access methods
//! instead of the executor: the state row with the small tables beside it, a new window's
//! messages, and the watermark. At a moderate rate a cycle carries one or two messages, and the
//! executor set up for each of its three statements (the state row with four sub-selects, a new
//! window through four slot partitions and eight index scans, the watermark UPDATE) was most of
//! the worker's own CPU: about 300 us a cycle, 700 cycles a second at 1,000 commits a second
//! (docs/BENCHMARKS.profile.md, round 15).
//!
//! The rows found are the ones the statements in `store` find, in the same snapshot: a new window
//! is every row of a transaction settled in neither snapshot (txid at or past the done snapshot's
//! xmax, or in its xip list) that the transaction's snapshot sees, which for a new window is the
//! window itself. Whatever is not plain goes through those statements: a database that is not
//! UTF-8 (they convert text), a window that continues (a backlog, read in batches through the id
//! index), a table that is not as the extension made it, or a state row that moved.
use std::cell::Cell;
use std::ffi::{CStr, CString};

use pgrx::pg_sys::{self, Datum, Oid};

use pg_outbox_bgworker::text_forms::{parse_tid, tid_text};
use pg_outbox_bgworker::{parse_headers, OutboundMessage, SnapshotBounds};

use crate::message_reader::{utf8, varlena_bytes};
use crate::message_writer::insert_index_entries;
use crate::store::{CycleState, SLOTS};

/// Where the columns the worker reads are in one slot partition (0-based), and its txid index.
#[derive(Clone, Copy)]
struct SlotLayout {
    relid: Oid,
    txid_index: Oid,
    id: usize,
    topic: usize,
    key: usize,
    payload: usize,
    json_payload: usize,
    json_text: usize,
    headers: usize,
    deliver_at: usize,
}

/// The most indexes of worker_state written here (it has one, its primary key).
const MAX_STATE_INDEXES: usize = 4;

#[derive(Clone, Copy)]
struct StateLayout {
    relid: Oid,
    indexes: [Oid; MAX_STATE_INDEXES],
    index_count: usize,
    done_snapshot: usize,
    window_snapshot: usize,
    window_last_id: usize,
    current_slot: usize,
    delivered_total: usize,
}

#[derive(Clone, Copy)]
struct Layout {
    slots: [SlotLayout; SLOTS as usize],
    state: StateLayout,
    topics: Oid,
    topic_name: usize,
    topic_paused: usize,
    destinations: Oid,
    held: Oid,
}

thread_local! {
    /// Bumped by the worker's relation cache callback (`store`), on any change of any relation.
    static CHANGES: Cell<u64> = const { Cell::new(0) };
    /// The layout found, and the count of changes it was found at (None: not usable).
    static LAYOUT: Cell<Option<(u64, Option<Layout>)>> = const { Cell::new(None) };
}

/// Called by the relation cache callback: whatever was found about the tables is looked at again.
pub fn relations_changed() {
    CHANGES.with(|c| c.set(c.get().wrapping_add(1)));
}

fn changes() -> u64 {
    CHANGES.with(Cell::get)
}

fn layout() -> Option<Layout> {
    let now = changes();
    if let Some((seen, layout)) = LAYOUT.with(Cell::get) {
        if seen == now {
            return layout;
        }
    }
    let layout = unsafe { find_layout() };
    // Found at `now`: a change that came while looking makes the next call look again.
    LAYOUT.with(|l| l.set(Some((now, layout))));
    layout
}

unsafe fn find_layout() -> Option<Layout> {
    if pg_sys::GetDatabaseEncoding() != pg_sys::pg_enc::PG_UTF8 as i32 {
        return None;
    }
    let namespace = pg_sys::get_namespace_oid(c"outbox".as_ptr(), true);
    if namespace == pg_sys::InvalidOid {
        return None;
    }
    let relid = |name: &str| -> Option<Oid> {
        let name = CString::new(name).ok()?;
        let relid = pg_sys::get_relname_relid(name.as_ptr(), namespace);
        (relid != pg_sys::InvalidOid).then_some(relid)
    };
    let column = |relid: Oid, name: &CStr, type_oid: Oid| -> Option<usize> {
        let attnum = pg_sys::get_attnum(relid, name.as_ptr());
        (attnum > 0 && pg_sys::get_atttype(relid, attnum) == type_oid).then(|| attnum as usize - 1)
    };
    let slot = |n: i16| -> Option<SlotLayout> {
        let relid = relid(&format!("messages_{n}"))?;
        let txid = column(relid, c"txid", pg_sys::XID8OID)?;
        Some(SlotLayout {
            relid,
            txid_index: txid_index(relid, txid)?,
            id: column(relid, c"id", pg_sys::INT8OID)?,
            topic: column(relid, c"topic", pg_sys::TEXTOID)?,
            key: column(relid, c"key", pg_sys::TEXTOID)?,
            payload: column(relid, c"payload", pg_sys::BYTEAOID)?,
            json_payload: column(relid, c"json_payload", pg_sys::JSONBOID)?,
            json_text: column(relid, c"json_text", pg_sys::BYTEAOID)?,
            headers: column(relid, c"headers", pg_sys::JSONBOID)?,
            deliver_at: column(relid, c"deliver_at", pg_sys::TIMESTAMPTZOID)?,
        })
    };
    let slots: Vec<SlotLayout> = (0..SLOTS).map(slot).collect::<Option<_>>()?;
    let state = relid("worker_state")?;
    let (indexes, index_count) = plain_indexes(state)?;
    let topics = relid("topics")?;
    Some(Layout {
        slots: slots.try_into().ok()?,
        state: StateLayout {
            relid: state,
            indexes,
            index_count,
            done_snapshot: column(state, c"done_snapshot", pg_sys::PG_SNAPSHOTOID)?,
            window_snapshot: column(state, c"window_snapshot", pg_sys::PG_SNAPSHOTOID)?,
            window_last_id: column(state, c"window_last_id", pg_sys::INT8OID)?,
            current_slot: column(state, c"current_slot", pg_sys::INT2OID)?,
            delivered_total: column(state, c"delivered_total", pg_sys::INT8OID)?,
        },
        topics,
        topic_name: column(topics, c"topic", pg_sys::TEXTOID)?,
        topic_paused: column(topics, c"paused", pg_sys::BOOLOID)?,
        destinations: relid("destinations")?,
        held: relid("held_messages")?,
    })
}

/// A valid btree index of the partition on txid alone, as the extension made it.
unsafe fn txid_index(relid: Oid, txid: usize) -> Option<Oid> {
    let rel = pg_sys::try_table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    if rel.is_null() {
        return None;
    }
    let indexes = pg_sys::RelationGetIndexList(rel);
    let count = if indexes.is_null() { 0 } else { (*indexes).length };
    let mut found = None;
    for n in 0..count {
        let oid = pg_sys::list_nth_oid(indexes, n);
        let index = pg_sys::try_relation_open(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if index.is_null() {
            continue;
        }
        let form = &*(*index).rd_index;
        let info = pg_sys::BuildIndexInfo(index);
        let on_txid = (*(*index).rd_rel).relam == pg_sys::BTREE_AM_OID
            && form.indisvalid
            && form.indnatts == 1
            && form.indkey.values.as_slice(1)[0] as usize == txid + 1
            && (*info).ii_Expressions.is_null()
            && (*info).ii_Predicate.is_null();
        pg_sys::relation_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        if on_txid {
            found = Some(oid);
            break;
        }
    }
    pg_sys::list_free(indexes);
    pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    found
}

/// The indexes of a table whose UPDATE does nothing but write the new row version and its index
/// entries (no trigger, rule or row security; indexes on plain columns, checked at once); None
/// for any other table.
unsafe fn plain_indexes(relid: Oid) -> Option<([Oid; MAX_STATE_INDEXES], usize)> {
    let rel = pg_sys::try_table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    if rel.is_null() {
        return None;
    }
    let class = &*(*rel).rd_rel;
    let mut plain = (*rel).trigdesc.is_null() && (*rel).rd_rules.is_null() && !class.relrowsecurity;
    let list = pg_sys::RelationGetIndexList(rel);
    let count = if list.is_null() { 0 } else { (*list).length as usize };
    plain &= count <= MAX_STATE_INDEXES;
    let mut indexes = [pg_sys::InvalidOid; MAX_STATE_INDEXES];
    for (n, slot) in indexes.iter_mut().enumerate().take(count) {
        *slot = pg_sys::list_nth_oid(list, n as i32);
        let index = pg_sys::try_relation_open(*slot, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        if index.is_null() {
            plain = false;
            continue;
        }
        let info = pg_sys::BuildIndexInfo(index);
        plain &= (*info).ii_Expressions.is_null()
            && (*info).ii_Predicate.is_null()
            && (*info).ii_ExclusionOps.is_null()
            && (*(*index).rd_index).indimmediate
            && (&(*info).ii_IndexAttrNumbers)[..(*info).ii_NumIndexAttrs as usize].iter().all(|&a| a > 0);
        pg_sys::relation_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    pg_sys::list_free(list);
    pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    plain.then_some((indexes, count))
}

/// The state row at `ctid` as the transaction's snapshot sees it, with the paused topics and
/// whether any route or held message exists; None if the row is not there (it moved) or the
/// tables are not as expected.
pub fn cycle_state(ctid: &str) -> Option<CycleState> {
    let seen = changes();
    let layout = layout()?;
    let tid = parse_ctid(ctid)?;
    unsafe {
        let snapshot = pg_sys::GetActiveSnapshot();
        let l = layout.state;
        let rel = open_table(l.relid, pg_sys::AccessShareLock, seen)?;
        let row = fetch_row(rel, snapshot, tid).map(|(values, nulls, _)| {
            let done = snapshot_text(values[l.done_snapshot]);
            let window = (!nulls[l.window_snapshot]).then(|| snapshot_text(values[l.window_snapshot]));
            let last_id = (!nulls[l.window_last_id]).then(|| values[l.window_last_id].value() as i64);
            let current_slot = if nulls[l.current_slot] { 0 } else { values[l.current_slot].value() as i16 };
            (done, window, last_id, current_slot)
        });
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        let (done, window, last_id, current_slot) = row?;
        let done = SnapshotBounds::parse(&done)?;
        let new_window = window.is_none();
        let window = match window {
            Some(window) => window,
            None => current_snapshot_text()?,
        };
        let mut paused_topics = Vec::new();
        scan_table(layout.topics, snapshot, seen, |values, nulls| {
            if !nulls[layout.topic_paused] && values[layout.topic_paused].value() != 0 && !nulls[layout.topic_name] {
                paused_topics.push(utf8(varlena_bytes(values[layout.topic_name])));
            }
            true
        })?;
        let destinations_exist = has_rows(layout.destinations, snapshot, seen)?;
        let held_exist = has_rows(layout.held, snapshot, seen)?;
        Some(CycleState {
            done,
            window,
            new_window,
            last_id: last_id.unwrap_or(-1),
            current_slot,
            paused_topics,
            destinations_exist,
            held_exist,
        })
    }
}

/// Every message of a new window, at most `limit` (None: read it through the statements).
pub fn new_window(done: &SnapshotBounds, limit: usize) -> Option<Vec<OutboundMessage>> {
    let layout = layout()?;
    let seen = changes();
    let mut messages = Vec::with_capacity(limit.min(256));
    for slot in &layout.slots {
        if messages.len() >= limit {
            break;
        }
        unsafe { read_slot(slot, seen, done, limit, &mut messages)? };
    }
    Some(messages)
}

/// Reads one slot's unsettled messages through its txid index: the range past the done
/// snapshot's xmax, then each transaction that was in progress in it.
unsafe fn read_slot(
    slot: &SlotLayout,
    seen: u64,
    done: &SnapshotBounds,
    limit: usize,
    messages: &mut Vec<OutboundMessage>,
) -> Option<()> {
    let rel = open_table(slot.relid, pg_sys::AccessShareLock, seen)?;
    let index = pg_sys::try_relation_open(slot.txid_index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    if index.is_null() || changes() != seen {
        if !index.is_null() {
            pg_sys::relation_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        return None;
    }
    let scan = pg_sys::index_beginscan(rel, index, pg_sys::GetActiveSnapshot(), 1, 0);
    let tuple = pg_sys::table_slot_create(rel, std::ptr::null_mut());
    let columns =
        [slot.id, slot.topic, slot.key, slot.payload, slot.json_payload, slot.json_text, slot.headers, slot.deliver_at];
    let last_column = columns.into_iter().max().unwrap_or(0);
    let keys = std::iter::once((pg_sys::BTGreaterEqualStrategyNumber, pg_sys::F_XID8GE, done.xmax))
        .chain(done.xip.iter().map(|&xid| (pg_sys::BTEqualStrategyNumber, pg_sys::F_XID8EQ, xid)));
    'keys: for (strategy, procedure, xid) in keys {
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        pg_sys::ScanKeyInit(&mut key, 1, strategy as u16, Oid::from(procedure), Datum::from(xid));
        pg_sys::index_rescan(scan, &mut key, 1, std::ptr::null_mut(), 0);
        while pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, tuple) {
            pg_sys::slot_getsomeattrs(tuple, last_column as i32 + 1);
            let values = std::slice::from_raw_parts((*tuple).tts_values, last_column + 1);
            let nulls = std::slice::from_raw_parts((*tuple).tts_isnull, last_column + 1);
            messages.push(message(slot, values, nulls));
            if messages.len() >= limit {
                break 'keys;
            }
        }
    }
    pg_sys::index_endscan(scan);
    pg_sys::ExecDropSingleTupleTableSlot(tuple);
    pg_sys::relation_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
    pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    Some(())
}

/// The message of a row, as `message_reader` builds it from the statements' columns.
unsafe fn message(slot: &SlotLayout, values: &[Datum], nulls: &[bool]) -> OutboundMessage {
    let value = |i: usize| (!nulls[i]).then_some(values[i]);
    let bytes = |i: usize| value(i).map(|d| varlena_bytes(d));
    let json = |i: usize| value(i).map(|d| varlena_bytes(Datum::from(crate::enqueue::json_text(d))));
    let headers = json(slot.headers).map(utf8);
    OutboundMessage {
        id: value(slot.id).map_or(0, |d| d.value() as i64),
        topic: bytes(slot.topic).map(utf8).unwrap_or_default(),
        key: bytes(slot.key).map(utf8),
        payload: bytes(slot.payload).or_else(|| bytes(slot.json_text)).or_else(|| json(slot.json_payload)),
        // As message_reader: a row written by hand with bad headers loses them.
        headers: parse_headers(headers.as_deref()).unwrap_or_default(),
        attempts: 0,
        held: false,
        // As the statements' `deliver_at > now()`: now() is the transaction's start.
        scheduled: value(slot.deliver_at)
            .is_some_and(|d| d.value() as i64 > pg_sys::GetCurrentTransactionStartTimestamp()),
    }
}

/// Advances the watermark in the state row at `ctid` as store's statement does, and returns
/// where the row is now; None if it is not there (the statement then finds it).
pub fn advance_watermark(
    ctid: &str,
    window: &str,
    continues: bool,
    last_id: Option<i64>,
    delivered: i64,
) -> Option<String> {
    let seen = changes();
    let layout = layout()?;
    let tid = parse_ctid(ctid)?;
    let l = layout.state;
    unsafe {
        let rel = open_table(l.relid, pg_sys::RowExclusiveLock, seen)?;
        let Some((mut values, mut nulls, old)) = fetch_row(rel, pg_sys::GetActiveSnapshot(), tid) else {
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            return None;
        };
        let (desc, natts) = ((*rel).rd_att, values.len());
        let total = if nulls[l.delivered_total] { 0 } else { values[l.delivered_total].value() as i64 };
        let mut replace = vec![false; natts];
        let mut set = |column: usize, value: Option<Datum>| {
            replace[column] = true;
            nulls[column] = value.is_none();
            values[column] = value.unwrap_or(Datum::from(0));
        };
        let Some(window) = snapshot_datum(window) else {
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            return None;
        };
        // A window that continues keeps its place by id; a finished one becomes the watermark.
        if continues {
            set(l.window_snapshot, Some(window));
            set(l.window_last_id, last_id.map(Datum::from));
        } else {
            set(l.done_snapshot, Some(window));
            set(l.window_snapshot, None);
            set(l.window_last_id, None);
        }
        set(l.delivered_total, Some(Datum::from(total + delivered)));
        let new = pg_sys::heap_modify_tuple(old, desc, values.as_mut_ptr(), nulls.as_mut_ptr(), replace.as_mut_ptr());
        let mut failure: pg_sys::TM_FailureData = std::mem::zeroed();
        let mut lock_mode: pg_sys::LockTupleMode::Type = 0;
        let result = pg_sys::heap_update(
            rel,
            &mut (*old).t_self,
            new,
            pg_sys::GetCurrentCommandId(true),
            std::ptr::null_mut(),
            true,
            &mut failure,
            &mut lock_mode,
        );
        // Updated by someone else meanwhile (by hand: only the worker writes it): the statement
        // follows the row to its new version.
        if result != pg_sys::TM_Result::TM_Ok {
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            return None;
        }
        if (*(*new).t_data).t_infomask2 as u32 & pg_sys::HEAP_ONLY_TUPLE == 0 {
            insert_index_entries(rel, &l.indexes[..l.index_count], &values, &nulls, &mut (*new).t_self);
        }
        let moved_to = (*new).t_self;
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        Some(tid_text(block_number(&moved_to), moved_to.ip_posid))
    }
}

/// Opens (and locks, for the rest of the transaction) a table the layout names, if it still is
/// as found: taking the lock processes pending invalidations, and one of them may say otherwise.
unsafe fn open_table(relid: Oid, lock: u32, seen: u64) -> Option<pg_sys::Relation> {
    let rel = pg_sys::try_table_open(relid, lock as pg_sys::LOCKMODE);
    if rel.is_null() {
        return None;
    }
    if changes() != seen {
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        return None;
    }
    Some(rel)
}

/// A copy of the row at `tid` of the open table `rel` if `snapshot` sees it, and its columns.
unsafe fn fetch_row(
    rel: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    tid: pg_sys::ItemPointerData,
) -> Option<(Vec<Datum>, Vec<bool>, pg_sys::HeapTuple)> {
    // A ctid kept from a table dropped and created again may point past the end of this one
    // (a bad offset, heap_fetch itself reports as not found).
    if block_number(&tid) >= pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM) {
        return None;
    }
    let mut tuple: pg_sys::HeapTupleData = std::mem::zeroed();
    tuple.t_self = tid;
    let mut buffer: pg_sys::Buffer = 0;
    if !pg_sys::heap_fetch(rel, snapshot, &mut tuple, &mut buffer, false) {
        return None;
    }
    let copy = pg_sys::heap_copytuple(&mut tuple);
    pg_sys::ReleaseBuffer(buffer);
    let natts = (*(*rel).rd_att).natts as usize;
    let mut values = vec![Datum::from(0); natts];
    let mut nulls = vec![true; natts];
    pg_sys::heap_deform_tuple(copy, (*rel).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
    Some((values, nulls, copy))
}

/// Calls `row` with each row of the table that `snapshot` sees, until it returns false.
unsafe fn scan_table(
    relid: Oid,
    snapshot: pg_sys::Snapshot,
    seen: u64,
    mut row: impl FnMut(&[Datum], &[bool]) -> bool,
) -> Option<()> {
    let rel = open_table(relid, pg_sys::AccessShareLock, seen)?;
    let desc = (*rel).rd_att;
    let natts = (*desc).natts as usize;
    let mut values = vec![Datum::from(0); natts];
    let mut nulls = vec![true; natts];
    let scan = pg_sys::table_beginscan(rel, snapshot, 0, std::ptr::null_mut());
    loop {
        let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
        if tuple.is_null() {
            break;
        }
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        if !row(&values, &nulls) {
            break;
        }
    }
    pg_sys::table_endscan(scan);
    pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    Some(())
}

unsafe fn has_rows(relid: Oid, snapshot: pg_sys::Snapshot, seen: u64) -> Option<bool> {
    let mut any = false;
    scan_table(relid, snapshot, seen, |_, _| {
        any = true;
        false
    })?;
    Some(any)
}

/// A pg_snapshot's text form (`xmin:xmax:xip,...`), as `::text` gives it.
unsafe fn snapshot_text(snapshot: Datum) -> String {
    let text = pgrx::direct_function_call_as_datum(pg_sys::pg_snapshot_out, &[Some(snapshot)]);
    text.map(|t| CStr::from_ptr(t.cast_mut_ptr()).to_string_lossy().into_owned()).unwrap_or_default()
}

/// The transaction's snapshot, as `pg_current_snapshot()::text` gives it.
unsafe fn current_snapshot_text() -> Option<String> {
    pgrx::direct_function_call_as_datum(pg_sys::pg_current_snapshot, &[]).map(|snapshot| snapshot_text(snapshot))
}

unsafe fn snapshot_datum(text: &str) -> Option<Datum> {
    let text = CString::new(text).ok()?;
    pgrx::direct_function_call_as_datum(pg_sys::pg_snapshot_in, &[Some(Datum::from(text.as_ptr().cast_mut()))])
}

/// A ctid's text form as an item pointer.
fn parse_ctid(text: &str) -> Option<pg_sys::ItemPointerData> {
    let (block, offset) = parse_tid(text)?;
    Some(pg_sys::ItemPointerData {
        ip_blkid: pg_sys::BlockIdData { bi_hi: (block >> 16) as u16, bi_lo: (block & 0xffff) as u16 },
        ip_posid: offset,
    })
}

fn block_number(tid: &pg_sys::ItemPointerData) -> u32 {
    (u32::from(tid.ip_blkid.bi_hi) << 16) | u32::from(tid.ip_blkid.bi_lo)
}
