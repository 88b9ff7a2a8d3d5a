//! Writes an enqueued message's row into its storage slot without the executor: the row is formed
//! here and written with heap_insert and index_insert, the way Postgres writes its own catalog
//! rows (CatalogTupleInsert). A one-row INSERT through SPI set up and tore down a whole executor
//! for each call (the ModifyTable node, its projection and RETURNING list, the partition
//! constraint as an expression planned and evaluated), which cost more than the heap and index
//! inserts themselves (docs/BENCHMARKS.md, round 10).
//!
//! The row is the one the INSERT wrote: the columns' defaults are computed here as the table
//! defines them (`outbox._next_message_id('outbox.message_id_seq')`, `pg_current_xact_id()`,
//! `now()`), the partition's key is the slot it is written to, and every index of the partition
//! gets its entry. A partition that cannot be written that way — one that is not exactly its
//! slot's partition of outbox.messages, a trigger, a rule, row security, a CHECK constraint, an
//! index on an expression or with a predicate, a default other than the table's own, a column
//! this does not know with a default or NOT NULL, a privilege missing — is left to the INSERT
//! (`None`), which does all of it.
//!
//! What is known about each slot's partition is kept for the session and dropped when Postgres
//! invalidates any of them in its relation cache (ALTER, CREATE INDEX, TRUNCATE, DROP, GRANT).
use std::cell::{Cell, RefCell};
use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};

use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use crate::message_id;
use crate::store::SLOTS;

unsafe extern "C-unwind" {
    // catalog/partition.h, which pgrx does not bind.
    fn get_partition_parent(relid: Oid, even_if_detached: bool) -> Oid;
}

/// The values of one message row, as `enqueue_message` received them (NULL is `None`).
pub struct MessageRow {
    pub slot: i16,
    pub topic: Datum,
    pub key: Option<Datum>,
    pub payload: Option<Datum>,
    pub json_text: Option<Datum>,
    pub headers: Option<Datum>,
}

/// Where each column of a slot partition is (0-based attribute index).
#[derive(Clone, Copy)]
struct Columns {
    id: usize,
    txid: usize,
    slot: usize,
    topic: usize,
    key: usize,
    payload: usize,
    json_text: usize,
    headers: usize,
    enqueued_at: usize,
}

/// The widest row (attributes, dropped ones included) written here, and the widest index.
const MAX_ATTS: usize = 32;

/// The most indexes a slot partition written here may have (it has two).
const MAX_INDEXES: usize = 8;

#[derive(Clone, Copy)]
struct SlotTable {
    relid: Oid,
    sequence: Oid,
    natts: usize,
    columns: Columns,
    indexes: [Oid; MAX_INDEXES],
    index_count: usize,
}

#[derive(Clone, Copy)]
enum Slot {
    Unknown,
    Direct(SlotTable),
    /// Written through the INSERT (see the module comment).
    ThroughInsert,
}

struct Tables {
    generation: u64,
    slots: [Slot; SLOTS as usize],
}

/// Bumped by the relation cache callback when one of the relations below changes.
static GENERATION: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static TABLES: RefCell<Tables> = RefCell::new(Tables { generation: u64::MAX, slots: std::array::from_fn(|_| Slot::Unknown) });
    /// The relations the kept knowledge is about: the slot partitions, their indexes, the sequence.
    /// Read by the callback, which must not look at anything that may be borrowed meanwhile.
    static WATCHED: Cell<[u32; 16]> = const { Cell::new([0; 16]) };
    /// More relations than WATCHED holds: every change of any relation counts.
    static WATCH_ALL: Cell<bool> = const { Cell::new(false) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn relation_changed(_arg: Datum, relid: Oid) {
    let relid = relid.to_u32();
    if relid == 0 || WATCH_ALL.with(Cell::get) || WATCHED.with(|w| w.get().contains(&relid)) {
        GENERATION.fetch_add(1, Ordering::Relaxed);
    }
}

fn watch(relids: impl IntoIterator<Item = Oid>) {
    let mut watched = WATCHED.with(Cell::get);
    for relid in relids {
        let relid = relid.to_u32();
        if watched.contains(&relid) {
            continue;
        }
        match watched.iter_mut().find(|w| **w == 0) {
            Some(free) => *free = relid,
            None => WATCH_ALL.with(|a| a.set(true)),
        }
    }
    WATCHED.with(|w| w.set(watched));
}

/// Inserts the row into its slot's partition and returns its id, or `None` if that partition
/// must be written through the INSERT.
pub fn insert(row: &MessageRow) -> Option<i64> {
    if !CALLBACK_REGISTERED.with(Cell::get) {
        unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(relation_changed), Datum::from(0)) };
        CALLBACK_REGISTERED.with(|c| c.set(true));
    }
    // What the executor checks before any INSERT: not in a read-only transaction (nor on a
    // standby, where every transaction is), not in parallel mode.
    if unsafe { pg_sys::XactReadOnly } {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "cannot execute enqueue_message() in a read-only transaction"
        );
    }
    if unsafe { pg_sys::IsInParallelMode() } {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE,
            "cannot execute enqueue_message() during a parallel operation"
        );
    }
    // Opening the partition takes its lock, and taking a lock processes pending invalidations:
    // if that changed what was known about it, look again.
    for _ in 0..3 {
        let generation = GENERATION.load(Ordering::Relaxed);
        let table = match slot_table(row.slot, generation) {
            Slot::Direct(table) => table,
            _ => return None,
        };
        let rel = unsafe { pg_sys::try_table_open(table.relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) };
        if rel.is_null() {
            GENERATION.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if GENERATION.load(Ordering::Relaxed) != generation || unsafe { (*(*rel).rd_att).natts } as usize != table.natts
        {
            GENERATION.fetch_add(1, Ordering::Relaxed);
            unsafe { pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE) };
            continue;
        }
        // As the INSERT checks it, every call: the privilege to insert, of the function's owner
        // (the function is SECURITY DEFINER). Without it the INSERT raises the usual error.
        let may_insert = unsafe {
            pg_sys::pg_class_aclcheck(table.relid, pg_sys::GetUserId(), pg_sys::ACL_INSERT as pg_sys::AclMode)
                == pg_sys::AclResult::ACLCHECK_OK
        };
        if !may_insert {
            unsafe { pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE) };
            return None;
        }
        let id = unsafe { write(rel, &table, row) };
        unsafe { pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE) };
        return Some(id);
    }
    None
}

/// What is known about the slot's partition, found out first if need be.
fn slot_table(slot: i16, generation: u64) -> Slot {
    let index = slot as usize;
    let known = TABLES.with(|t| {
        let mut tables = t.borrow_mut();
        if tables.generation != generation {
            // Everything is looked at again, and watched again as it is.
            tables.generation = generation;
            tables.slots = std::array::from_fn(|_| Slot::Unknown);
            WATCHED.with(|w| w.set([0; 16]));
            WATCH_ALL.with(|a| a.set(false));
        }
        tables.slots.get(index).copied()
    });
    match known {
        None => Slot::ThroughInsert,
        Some(Slot::Unknown) => {
            let found = unsafe { inspect(slot) };
            TABLES.with(|t| {
                let mut tables = t.borrow_mut();
                if tables.generation == generation {
                    tables.slots[index] = found;
                }
            });
            found
        }
        Some(known) => known,
    }
}

/// Looks at the slot's partition: can a row be written to it here exactly as the INSERT would?
unsafe fn inspect(slot: i16) -> Slot {
    let namespace = pg_sys::get_namespace_oid(c"outbox".as_ptr(), true);
    if namespace == pg_sys::InvalidOid {
        return Slot::ThroughInsert;
    }
    let relid = relation_in(namespace, &format!("messages_{slot}"));
    let sequence = relation_in(namespace, "message_id_seq");
    let messages = relation_in(namespace, "messages");
    if relid == pg_sys::InvalidOid || sequence == pg_sys::InvalidOid || messages == pg_sys::InvalidOid {
        return Slot::ThroughInsert;
    }
    // Watched before anything is looked at: opening the partition and its indexes takes locks,
    // which processes invalidations, and one that comes while this looks (a CREATE INDEX
    // CONCURRENTLY, say) must make the caller look again. Watched whatever is found, so that a
    // partition written through the INSERT is looked at again once it changes back.
    watch([relid, sequence]);
    let rel = pg_sys::try_table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
    if rel.is_null() {
        return Slot::ThroughInsert;
    }
    let found = inspect_open(rel, slot, Outbox { namespace, messages, sequence });
    pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    if let Slot::Direct(table) = &found {
        watch(table.indexes[..table.index_count].iter().copied());
    }
    found
}

unsafe fn relation_in(namespace: Oid, name: &str) -> Oid {
    match CString::new(name) {
        Ok(name) => pg_sys::get_relname_relid(name.as_ptr(), namespace),
        Err(_) => pg_sys::InvalidOid,
    }
}

/// The objects of the extension a slot's partition is compared with.
#[derive(Clone, Copy)]
struct Outbox {
    namespace: Oid,
    messages: Oid,
    sequence: Oid,
}

unsafe fn inspect_open(rel: pg_sys::Relation, slot_number: i16, outbox: Outbox) -> Slot {
    let sequence = outbox.sequence;
    let class = &*(*rel).rd_rel;
    let plain_table = class.relkind as u8 == pg_sys::RELKIND_RELATION
        && class.relispartition
        && !class.relhasrules
        && (*rel).rd_rules.is_null()
        && (*rel).trigdesc.is_null()
        && !class.relrowsecurity;
    if !plain_table || !is_slot_partition(rel, slot_number, outbox.messages) {
        return Slot::ThroughInsert;
    }
    let desc = (*rel).rd_att;
    let natts = (*desc).natts as usize;
    let constr = (*desc).constr;
    if natts > MAX_ATTS || (!constr.is_null() && ((*constr).num_check > 0 || (*constr).has_generated_stored)) {
        return Slot::ThroughInsert;
    }
    // Each column this writes, by name and type, and whether it may be NULL; every other one must
    // be one the INSERT left NULL.
    let expected: [(&str, pg_sys::Oid, bool); 9] = [
        ("id", pg_sys::INT8OID, false),
        ("txid", pg_sys::XID8OID, false),
        ("slot", pg_sys::INT2OID, false),
        ("topic", pg_sys::TEXTOID, false),
        ("key", pg_sys::TEXTOID, true),
        ("payload", pg_sys::BYTEAOID, true),
        ("json_text", pg_sys::BYTEAOID, true),
        ("headers", pg_sys::JSONBOID, true),
        ("enqueued_at", pg_sys::TIMESTAMPTZOID, false),
    ];
    let mut found = [None; 9];
    for (i, att) in (*desc).attrs.as_slice(natts).iter().enumerate() {
        if att.attisdropped {
            continue;
        }
        let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_bytes();
        match expected.iter().position(|(n, _, _)| n.as_bytes() == name) {
            Some(k)
                if expected[k].1 == att.atttypid
                    && att.atttypmod == -1
                    && att.attidentity == 0
                    && att.attgenerated == 0
                    && !(expected[k].2 && att.attnotnull) =>
            {
                found[k] = Some(i)
            }
            Some(_) => return Slot::ThroughInsert,
            None if att.atthasdef || att.attnotnull || att.attgenerated != 0 => return Slot::ThroughInsert,
            None => {}
        }
    }
    let [Some(id), Some(txid), Some(slot), Some(topic), Some(key), Some(payload), Some(json_text), Some(headers), Some(enqueued_at)] =
        found
    else {
        return Slot::ThroughInsert;
    };
    // The defaults this computes must be the table's: nextval of the sequence, the transaction's
    // id and start time. (The other columns are always given a value, as the INSERT gave them.)
    // The id's is `outbox._next_message_id(sequence)` from SQL 0.8.0 on, nextval before: ids
    // written here are the function's either way.
    let id_default = default_calls(constr, id + 1, pg_sys::F_NEXTVAL, Some(sequence))
        || next_message_id_function(outbox.namespace)
            .is_some_and(|f| default_calls(constr, id + 1, f.to_u32(), Some(sequence)));
    let defaults_as_written = id_default
        && default_calls(constr, txid + 1, pg_sys::F_PG_CURRENT_XACT_ID, None)
        && default_calls(constr, enqueued_at + 1, pg_sys::F_NOW, None);
    if !defaults_as_written {
        return Slot::ThroughInsert;
    }
    let index_list = pg_sys::RelationGetIndexList(rel);
    let mut indexes = [pg_sys::InvalidOid; MAX_INDEXES];
    let count = if index_list.is_null() { 0 } else { (*index_list).length as usize };
    if count > MAX_INDEXES {
        return Slot::ThroughInsert;
    }
    for (n, slot_index) in indexes.iter_mut().enumerate().take(count) {
        let index_oid = pg_sys::list_nth_oid(index_list, n as i32);
        let index = pg_sys::index_open(index_oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let info = pg_sys::BuildIndexInfo(index);
        let plain = (*info).ii_Expressions.is_null()
            && (*info).ii_Predicate.is_null()
            && (*info).ii_ExclusionOps.is_null()
            && (*(*index).rd_index).indimmediate
            && (*info).ii_NumIndexAttrs as usize <= MAX_ATTS;
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        if !plain {
            return Slot::ThroughInsert;
        }
        *slot_index = index_oid;
    }
    pg_sys::list_free(index_list);
    let columns = Columns { id, txid, slot, topic, key, payload, json_text, headers, enqueued_at };
    Slot::Direct(SlotTable { relid: (*rel).rd_id, sequence, natts, columns, indexes, index_count: count })
}

/// Whether attribute `attnum`'s default is a call of function `funcid` (with the sequence as its
/// one argument, for nextval).
unsafe fn default_calls(constr: *mut pg_sys::TupleConstr, attnum: usize, funcid: u32, sequence: Option<Oid>) -> bool {
    if constr.is_null() {
        return false;
    }
    let defaults = std::slice::from_raw_parts((*constr).defval, (*constr).num_defval as usize);
    let Some(default) = defaults.iter().find(|d| d.adnum as usize == attnum) else { return false };
    let node = pg_sys::stringToNode(default.adbin) as *mut pg_sys::Node;
    if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_FuncExpr {
        return false;
    }
    let call = node as *mut pg_sys::FuncExpr;
    if (*call).funcid.to_u32() != funcid {
        return false;
    }
    let args = (*call).args;
    let arg_count = if args.is_null() { 0 } else { (*args).length };
    match sequence {
        None => arg_count == 0,
        Some(sequence) => {
            if arg_count != 1 {
                return false;
            }
            let arg = pg_sys::list_nth(args, 0) as *mut pg_sys::Node;
            if arg.is_null() || (*arg).type_ != pg_sys::NodeTag::T_Const {
                return false;
            }
            let value = arg as *mut pg_sys::Const;
            !(*value).constisnull && (*value).constvalue.value() as u32 == sequence.to_u32()
        }
    }
}

// Both looked up in the catalog caches, not with a query: a session's first statement through
// SPI (parsed, planned, pg_get_expr deparsing the bound) cost more than the rest of its first
// enqueue_message, and sessions that connect for one transaction pay it every time.

/// `outbox._next_message_id(regclass)`, if the extension's SQL objects have it (0.8.0 on).
unsafe fn next_message_id_function(namespace: Oid) -> Option<Oid> {
    let argument_types = pg_sys::buildoidvector([pg_sys::REGCLASSOID].as_ptr(), 1);
    let function = pg_sys::GetSysCacheOid(
        pg_sys::SysCacheIdentifier::PROCNAMEARGSNSP as i32,
        pg_sys::Anum_pg_proc_oid as pg_sys::AttrNumber,
        Datum::from(c"_next_message_id".as_ptr()),
        Datum::from(argument_types),
        Datum::from(namespace),
        Datum::from(0),
    );
    Some(function).filter(|&f| f != pg_sys::InvalidOid)
}

/// Whether `rel`, a partition, is one of outbox.messages (`messages`) holding exactly the rows
/// of slot `slot`: its bound is `FOR VALUES IN ('slot')`.
unsafe fn is_slot_partition(rel: pg_sys::Relation, slot: i16, messages: Oid) -> bool {
    let relid = (*rel).rd_id;
    if pg_sys::ffi::pg_guard_ffi_boundary(|| get_partition_parent(relid, true)) != messages {
        return false;
    }
    let reloid = pg_sys::SysCacheIdentifier::RELOID as i32;
    let class = pg_sys::SearchSysCache1(reloid, Datum::from(relid));
    if class.is_null() {
        return false;
    }
    let mut no_bound = true;
    let bound = pg_sys::SysCacheGetAttr(reloid, class, pg_sys::Anum_pg_class_relpartbound as _, &mut no_bound);
    let spec = match no_bound {
        true => std::ptr::null_mut(),
        false => pg_sys::stringToNode(pg_sys::text_to_cstring(bound.cast_mut_ptr())) as *mut pg_sys::PartitionBoundSpec,
    };
    pg_sys::ReleaseSysCache(class);
    if spec.is_null()
        || (*spec).type_ != pg_sys::NodeTag::T_PartitionBoundSpec
        || (*spec).strategy as u8 != pg_sys::PARTITION_STRATEGY_LIST
        || (*spec).is_default
    {
        return false;
    }
    let values = (*spec).listdatums;
    if values.is_null() || (*values).length != 1 {
        return false;
    }
    let value = pg_sys::list_nth(values, 0) as *mut pg_sys::Node;
    if value.is_null() || (*value).type_ != pg_sys::NodeTag::T_Const {
        return false;
    }
    let value = value as *mut pg_sys::Const;
    (*value).consttype == pg_sys::INT2OID && !(*value).constisnull && (*value).constvalue.value() as i16 == slot
}

/// Forms the row and writes it and its index entries (`rel` is open and locked).
unsafe fn write(rel: pg_sys::Relation, table: &SlotTable, row: &MessageRow) -> i64 {
    let c = table.columns;
    let mut values = [Datum::from(0); MAX_ATTS];
    let mut nulls = [true; MAX_ATTS];
    let mut set = |i: usize, value: Option<Datum>| {
        if let Some(v) = value {
            values[i] = v;
            nulls[i] = false;
        }
    };
    let id = message_id::next_id(table.sequence);
    set(c.id, Some(Datum::from(id)));
    set(c.txid, Some(Datum::from(pg_sys::GetTopFullTransactionId().value)));
    set(c.slot, Some(Datum::from(row.slot)));
    set(c.topic, Some(row.topic));
    set(c.key, row.key);
    set(c.payload, row.payload);
    set(c.json_text, row.json_text);
    set(c.headers, row.headers);
    set(c.enqueued_at, Some(Datum::from(pg_sys::GetCurrentTransactionStartTimestamp())));

    let tuple = pg_sys::heap_form_tuple((*rel).rd_att, values.as_mut_ptr(), nulls.as_mut_ptr());
    pg_sys::heap_insert(rel, tuple, pg_sys::GetCurrentCommandId(true), 0, std::ptr::null_mut());
    insert_index_entries(rel, &table.indexes[..table.index_count], &values, &nulls, &mut (*tuple).t_self);
    pg_sys::heap_freetuple(tuple);
    id
}

/// Writes the entries of the row at `tid` (its columns `values` and `nulls`) into `indexes` of
/// `rel`, as the executor does after a heap insert or a non-HOT update. Plain column indexes only:
/// the callers made sure there is no expression, predicate or deferred constraint.
pub(crate) unsafe fn insert_index_entries(
    rel: pg_sys::Relation,
    indexes: &[Oid],
    values: &[Datum],
    nulls: &[bool],
    tid: pg_sys::ItemPointer,
) {
    for &index_oid in indexes {
        let index = pg_sys::index_open(index_oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let info = pg_sys::BuildIndexInfo(index);
        // An index being built concurrently takes entries only once it is ready for them.
        if (*info).ii_ReadyForInserts {
            let mut key_values = [Datum::from(0); MAX_ATTS];
            let mut key_nulls = [true; MAX_ATTS];
            for k in 0..((*info).ii_NumIndexAttrs as usize).min(MAX_ATTS) {
                let att = (*info).ii_IndexAttrNumbers[k] as usize - 1;
                key_values[k] = values[att];
                key_nulls[k] = nulls[att];
            }
            let unique = if (*(*index).rd_index).indisunique {
                pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
            } else {
                pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
            };
            pg_sys::index_insert(index, key_values.as_mut_ptr(), key_nulls.as_mut_ptr(), tid, rel, unique, false, info);
        }
        pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
}
