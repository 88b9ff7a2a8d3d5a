//! Runs a kept plan that selects messages and builds each `OutboundMessage` straight from the
//! executor's output slot. Going through SPI's tuple table instead copied every row into a new
//! heap tuple and decoded it column by column again: in a drain that was the largest part of the
//! worker's own CPU time (docs/BENCHMARKS.profile.md, rounds 7 and 8). Used by `store`, inside
//! its transactions.
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

use pg_outbox_bgworker::{parse_headers, OutboundMessage};

/// The columns a message statement selects, in this order. Every one but `id` and `attempts`
/// is read as its bytes: the SQL does any conversion to UTF-8 (see `columns`).
const ID: usize = 0;
const TOPIC: usize = 1;
const KEY: usize = 2;
const PAYLOAD: usize = 3;
const JSON_PAYLOAD: usize = 4;
const HEADERS: usize = 5;
/// Fresh messages only (false for held ones): not due yet, delayed by `deliver_after` /
/// `deliver_at`.
const SCHEDULED: usize = 6;
/// Held messages only: failed attempts so far.
const ATTEMPTS: usize = 7;

/// An SQL expression for the bytes of text `expr` as UTF-8 (a bytea), for `utf8` to read. In a
/// SQL_ASCII database the bytes are taken as they are: converting them would fail on the first
/// byte sequence that is not UTF-8 (SQL_ASCII checks nothing on input), every time the worker
/// read that row.
pub fn utf8_bytes(expr: &str) -> String {
    let sql_ascii = unsafe { pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_SQL_ASCII as i32 };
    format!("convert_to({expr}, '{}')", if sql_ascii { "SQL_ASCII" } else { "UTF8" })
}

/// The select list for messages of outbox.messages (`held` false) or outbox.held_messages. A
/// JSON payload is sent as UTF-8 text: enqueue_message stores it so (json_text); a row written
/// before 0.4.0, a delayed one and a held one have jsonb, rendered here. In a UTF-8 database text
/// already is UTF-8; in any other, the SQL converts it. A held message is never scheduled: a
/// delayed one is read only once it has moved into its line.
pub fn columns(held: bool) -> String {
    let utf8 = unsafe { pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_UTF8 as i32 };
    let text = |expr: &str| if utf8 { expr.to_string() } else { utf8_bytes(expr) };
    let (payload, rest) = if held {
        ("payload", "false, attempts")
    } else {
        ("coalesce(payload, json_text)", "coalesce(deliver_at > now(), false)")
    };
    format!(
        "id, {}, {}, {payload}, {}, {}, {rest}",
        text("topic"),
        text("key"),
        text("json_payload::text"),
        text("headers::text")
    )
}

thread_local! {
    /// Message statements, planned once per process (SPI_keepplan), like store's PLANS; these
    /// run through SPI_execute_plan_extended, which needs the plan itself.
    static PLANS: RefCell<HashMap<&'static str, usize>> = RefCell::new(HashMap::new());
}

/// Runs `sql` (kept under `name`) with `args` and returns the messages it selected, in order.
/// Held messages (`held`) carry their attempts in an eighth column. Room for `expected` messages
/// is made at once (callers bound it: a batch may be set to a million): growing a vector of
/// thousands of messages one doubling at a time was 8 % of the worker's time in a drain.
pub fn select_messages(
    name: &'static str,
    sql: &str,
    args: &[DatumWithOid],
    held: bool,
    expected: usize,
) -> Vec<OutboundMessage> {
    let plan = PLANS.with(|plans| *plans.borrow_mut().entry(name).or_insert_with(|| prepare(sql, args)));
    let mut receiver = MessageReceiver {
        dest: pg_sys::DestReceiver {
            receiveSlot: Some(receive_slot),
            rStartup: Some(startup),
            rShutdown: Some(nothing),
            rDestroy: Some(nothing),
            // What PL/pgSQL's RETURN QUERY passes through this same call.
            mydest: pg_sys::CommandDest::DestTuplestore,
        },
        messages: Vec::with_capacity(expected),
        held,
    };
    // The callbacks reach the whole receiver through the pointer to its first field.
    let receiver_ptr: *mut MessageReceiver = &raw mut receiver;
    unsafe {
        let params = pg_sys::makeParamList(args.len() as i32);
        (*params).numParams = args.len() as i32;
        for (param, arg) in (*params).params.as_mut_slice(args.len()).iter_mut().zip(args) {
            param.value = arg.datum().map(|d| d.sans_lifetime()).unwrap_or(pg_sys::Datum::from(0));
            param.isnull = arg.datum().is_none();
            param.pflags = pg_sys::PARAM_FLAG_CONST as u16;
            param.ptype = arg.oid();
        }
        // Read-only (the transaction's snapshot as it is) unless this transaction wrote: then
        // SPI advances the command counter first, so that the rows it wrote are seen as written.
        let read_only = pg_sys::GetCurrentTransactionIdIfAny() == pg_sys::InvalidTransactionId;
        let options = pg_sys::SPIExecuteOptions { params, read_only, dest: receiver_ptr.cast(), ..Default::default() };
        let status = pg_sys::SPI_execute_plan_extended(plan as pg_sys::SPIPlanPtr, &options);
        if status != pg_sys::SPI_OK_SELECT as i32 {
            error!("pg_outbox worker could not read messages: SPI status {status}");
        }
    }
    receiver.messages
}

fn prepare(sql: &str, args: &[DatumWithOid]) -> usize {
    let Ok(sql) = CString::new(sql) else { error!("pg_outbox: a message statement contains a NUL byte") };
    let mut types: Vec<pg_sys::Oid> = args.iter().map(|a| a.oid()).collect();
    unsafe {
        let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
            let result = pg_sys::SPI_result;
            error!("pg_outbox worker could not plan a message statement: SPI result {result}");
        }
        plan as usize
    }
}

/// A DestReceiver that turns each row into an OutboundMessage. `dest` must come first: Postgres
/// calls back with a pointer to it.
#[repr(C)]
struct MessageReceiver {
    dest: pg_sys::DestReceiver,
    messages: Vec<OutboundMessage>,
    held: bool,
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(dest: *mut pg_sys::DestReceiver, _operation: i32, typeinfo: pg_sys::TupleDesc) {
    let receiver = &*(dest as *const MessageReceiver);
    let expected = if receiver.held { ATTEMPTS + 1 } else { SCHEDULED + 1 };
    if (*typeinfo).natts as usize != expected {
        error!("pg_outbox worker: a message statement returns {} columns, not {expected}", (*typeinfo).natts);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn nothing(_dest: *mut pg_sys::DestReceiver) {}

#[pg_guard]
unsafe extern "C-unwind" fn receive_slot(slot: *mut pg_sys::TupleTableSlot, dest: *mut pg_sys::DestReceiver) -> bool {
    let receiver = &mut *(dest as *mut MessageReceiver);
    pg_sys::slot_getallattrs(slot);
    let natts = (*(*slot).tts_tupleDescriptor).natts as usize;
    let values = std::slice::from_raw_parts((*slot).tts_values, natts);
    let nulls = std::slice::from_raw_parts((*slot).tts_isnull, natts);
    let value = |i: usize| (!nulls[i]).then_some(values[i]);
    let bytes = |i: usize| value(i).map(|d| varlena_bytes(d));
    let text = |i: usize| bytes(i).map(utf8);
    let headers = text(HEADERS);
    receiver.messages.push(OutboundMessage {
        id: value(ID).map_or(0, |d| d.value() as i64),
        topic: text(TOPIC).unwrap_or_default(),
        key: text(KEY),
        payload: bytes(PAYLOAD).or_else(|| bytes(JSON_PAYLOAD)),
        // enqueue_message validated them; a row written by hand with bad headers loses them
        // rather than stalling delivery.
        headers: parse_headers(headers.as_deref()).unwrap_or_default(),
        attempts: if receiver.held { value(ATTEMPTS).map_or(0, |d| d.value() as i32) } else { 0 },
        held: receiver.held,
        scheduled: value(SCHEDULED).is_some_and(|d| d.value() != 0),
    });
    true
}

/// Bytes the SQL made UTF-8, as a String (should a row hold anything else, it is not lost).
pub fn utf8(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A copy of a text or bytea value's bytes, detoasted if need be.
pub(crate) unsafe fn varlena_bytes(datum: pg_sys::Datum) -> Vec<u8> {
    let original = datum.cast_mut_ptr::<pg_sys::varlena>();
    let detoasted = pg_sys::pg_detoast_datum_packed(original);
    let bytes = pgrx::varlena::varlena_to_byte_slice(detoasted).to_vec();
    if detoasted != original {
        pg_sys::pfree(detoasted.cast());
    }
    bytes
}
