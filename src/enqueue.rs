//! `outbox.enqueue_message()` (SQL version 0.3.0 on): the checks and the INSERT in one C
//! function, in the caller's transaction. A JSON payload is stored as the UTF-8 text Kafka
//! receives (0.4.0 on): it is rendered here once, for its size check and for the worker. It
//! writes straight into the current storage slot's partition through a plan kept for the
//! session, so a call costs no PL/pgSQL, no
//! `SET search_path` switch and no partition routing. The statements it runs name every object
//! with its schema and take typed parameters, so the caller's search_path cannot redirect them
//! (the function is SECURITY DEFINER).
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;

use pgrx::datum::DatumWithOid;
use pgrx::fcinfo::{pg_arg_is_null, pg_getarg_datum_raw};
use pgrx::pg_sys::{self, PgBuiltInOids, PgOid};
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use pgrx::varlena::{set_varsize_4b, varlena_to_byte_slice, varsize_any, varsize_any_exhdr};
use pgrx::{JsonB, PgSqlErrorCode};

use crate::api::{check_message, invalid, wake_on_commit};
use crate::message_writer::{self, MessageRow};
use crate::store::{extension_version, ENQUEUE_SQL_VERSIONS, SQL_VERSION};
use crate::{guc, shmem};

thread_local! {
    /// The INSERT into each slot's partition, planned on first use in this session.
    static INSERTS: RefCell<HashMap<i16, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
    /// Delayed messages (deliver_at / deliver_after) take the PL/pgSQL path: rare, and it
    /// stores the time they are due (before 0.6.0, it wrote them to held_messages).
    static DELAYED: RefCell<Option<OwnedPreparedStatement>> = const { RefCell::new(None) };
}

#[derive(Clone, Copy)]
enum PayloadKind {
    Json,
    Bytes,
}

#[no_mangle]
pub extern "C" fn pg_finfo_enqueue_json_message() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

#[no_mangle]
pub extern "C" fn pg_finfo_enqueue_bytea_message() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// enqueue_message(topic text, payload jsonb, key text, headers jsonb, deliver_after interval,
/// deliver_at timestamptz) RETURNS bigint
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn enqueue_json_message(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    enqueue(fcinfo, PayloadKind::Json)
}

/// enqueue_message(topic text, payload bytea, ...), as above.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn enqueue_bytea_message(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    enqueue(fcinfo, PayloadKind::Bytes)
}

/// Argument `n` as it came, or NULL.
unsafe fn raw_arg(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Option<pg_sys::Datum> {
    (!pg_arg_is_null(fcinfo, n)).then(|| pg_getarg_datum_raw(fcinfo, n))
}

unsafe fn enqueue(fcinfo: pg_sys::FunctionCallInfo, kind: PayloadKind) -> pg_sys::Datum {
    let topic_datum = raw_arg(fcinfo, 0);
    let payload = raw_arg(fcinfo, 1);
    let key = raw_arg(fcinfo, 2);
    let headers = raw_arg(fcinfo, 3);
    let deliver_after = raw_arg(fcinfo, 4);
    let deliver_at = raw_arg(fcinfo, 5);

    // As UTF-8, whatever the database encoding: a topic that is not valid UTF-8 here (a non-ASCII
    // one in a LATIN1 database) is refused by the topic check, and headers are checked as the
    // JSON text Kafka will receive.
    let topic = topic_datum.map(|d| String::from_utf8_lossy(text_bytes(d)).into_owned());
    let header_values = headers.map(|d| match serde_json::from_slice(varlena_to_byte_slice(json_text(d))) {
        Ok(value) => JsonB(value),
        Err(e) => invalid(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("headers cannot be read: {e}")),
    });
    let json_text = match kind {
        PayloadKind::Json => payload.map(|d| json_text(d)),
        PayloadKind::Bytes => None,
    };
    let payload_bytes = match kind {
        PayloadKind::Json => json_text.map(|t| varsize_any_exhdr(t)),
        PayloadKind::Bytes => payload.map(|d| (pg_sys::toast_raw_datum_size(d) - pg_sys::VARHDRSZ) as usize),
    };
    check_message(topic.as_deref(), header_values, payload_bytes.map(|len| i32::try_from(len).unwrap_or(i32::MAX)));

    let (json, bytes) = match kind {
        PayloadKind::Json => (payload, None),
        PayloadKind::Bytes => (None, payload),
    };
    let arg = |datum: Option<pg_sys::Datum>, oid: PgBuiltInOids| match datum {
        Some(d) => DatumWithOid::new(d, oid.value()),
        None => DatumWithOid::null_oid(oid.value()),
    };
    let id = if deliver_after.is_some() || deliver_at.is_some() {
        guc::with_catalog_search_path(|| {
            insert_delayed(&[
                arg(topic_datum, TEXT),
                arg(key, TEXT),
                arg(bytes, BYTEA),
                arg(json, JSONB),
                arg(headers, JSONB),
                arg(deliver_at, TIMESTAMPTZ),
                arg(deliver_after, INTERVAL),
            ])
        })
    } else {
        let slot = shmem::current_slot(pg_sys::MyDatabaseId.to_u32());
        let json_text = json_text.map(pg_sys::Datum::from);
        // check_message refused a NULL topic.
        let row = topic_datum.map(|topic| MessageRow { slot, topic, key, payload: bytes, json_text, headers });
        match row.as_ref().and_then(message_writer::insert) {
            Some(id) => Ok(id),
            None => guc::with_catalog_search_path(|| {
                insert(
                    slot,
                    &[
                        arg(topic_datum, TEXT),
                        arg(key, TEXT),
                        arg(bytes, BYTEA),
                        arg(json_text, BYTEA),
                        arg(headers, JSONB),
                    ],
                )
            }),
        }
    };
    let id = match id {
        Ok(id) => id,
        Err(StoreError::OutdatedSql(version)) => {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!(
                    "pg_outbox's SQL objects are version {version}, its library needs {SQL_VERSION}: run ALTER EXTENSION pg_outbox UPDATE"
                )
            );
        }
        Err(StoreError::Spi(e)) => {
            ereport!(ERROR, PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, format!("cannot store the message: {e}"));
        }
    };
    wake_on_commit();
    pg_sys::Datum::from(id)
}

/// A text argument's bytes, in the database encoding.
unsafe fn text_bytes<'a>(datum: pg_sys::Datum) -> &'a [u8] {
    varlena_to_byte_slice(pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr()))
}

/// A JSON payload as the UTF-8 text Kafka receives, as a bytea: jsonb's own text form, written
/// straight after a varlena header (no copy), and converted if the database encoding is not UTF-8.
/// Allocated in the current memory context.
pub(crate) unsafe fn json_text(datum: pg_sys::Datum) -> *mut pg_sys::varlena {
    let jsonb = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) as *mut pg_sys::Jsonb;
    let mut out: pg_sys::StringInfoData = std::mem::zeroed();
    pg_sys::initStringInfo(&mut out);
    pg_sys::appendStringInfoSpaces(&mut out, pg_sys::VARHDRSZ as i32);
    pg_sys::JsonbToCString(&mut out, &mut (*jsonb).root, varsize_any(jsonb as *const pg_sys::varlena) as i32);
    let text = out.data.add(pg_sys::VARHDRSZ);
    let utf8 = pg_sys::pg_server_to_any(text, out.len - pg_sys::VARHDRSZ as i32, pg_sys::pg_enc::PG_UTF8 as i32);
    if utf8 == text {
        let bytea = out.data as *mut pg_sys::varlena;
        set_varsize_4b(bytea, out.len);
        return bytea;
    }
    // Converted into a new string. JSON text has no NUL (jsonb refuses \u0000).
    let len = CStr::from_ptr(utf8).to_bytes().len();
    let bytea = pg_sys::palloc(pg_sys::VARHDRSZ + len) as *mut pg_sys::varlena;
    std::ptr::copy_nonoverlapping(utf8, (bytea as *mut std::ffi::c_char).add(pg_sys::VARHDRSZ), len);
    set_varsize_4b(bytea, (pg_sys::VARHDRSZ + len) as i32);
    bytea
}

enum StoreError {
    Spi(pgrx::spi::Error),
    /// The extension's SQL objects are not the version this library writes to.
    OutdatedSql(String),
}

impl From<pgrx::spi::Error> for StoreError {
    fn from(e: pgrx::spi::Error) -> Self {
        StoreError::Spi(e)
    }
}

const TEXT: PgBuiltInOids = PgBuiltInOids::TEXTOID;
const BYTEA: PgBuiltInOids = PgBuiltInOids::BYTEAOID;
const JSONB: PgBuiltInOids = PgBuiltInOids::JSONBOID;
const TIMESTAMPTZ: PgBuiltInOids = PgBuiltInOids::TIMESTAMPTZOID;
const INTERVAL: PgBuiltInOids = PgBuiltInOids::INTERVALOID;

fn types(oids: &[PgBuiltInOids]) -> Vec<PgOid> {
    oids.iter().map(|&oid| PgOid::BuiltIn(oid)).collect()
}

fn insert(slot: i16, args: &[DatumWithOid]) -> Result<i64, StoreError> {
    Spi::connect_mut(|client| {
        // Out of its cell while it runs: the INSERT can fire a trigger (on the outbox's tables)
        // that enqueues in turn, and that call must find the cell free. It plans a statement of
        // its own; the one put back last is kept.
        let plan = match INSERTS.with(|plans| plans.borrow_mut().remove(&slot)) {
            Some(kept) => kept,
            None => {
                // After a new library is installed and before ALTER EXTENSION UPDATE, the
                // table may lack a column this INSERT names: say what to do instead.
                let version = extension_version(client)?;
                if !ENQUEUE_SQL_VERSIONS.contains(&version.as_str()) {
                    return Err(StoreError::OutdatedSql(version));
                }
                let sql = format!(
                    "INSERT INTO outbox.messages_{slot} (slot, topic, key, payload, json_text, headers)
                     VALUES ('{slot}', $1, $2, $3, $4, $5) RETURNING id"
                );
                let types = types(&[TEXT, TEXT, BYTEA, BYTEA, JSONB]);
                client.prepare_mut(&sql, &types)?.keep()
            }
        };
        let id = client.update(&plan, Some(1), args).and_then(|rows| rows.first().get_one::<i64>());
        INSERTS.with(|plans| plans.borrow_mut().insert(slot, plan));
        Ok(id?.ok_or(pgrx::spi::Error::NoTupleTable)?)
    })
}

fn insert_delayed(args: &[DatumWithOid]) -> Result<i64, StoreError> {
    Spi::connect_mut(|client| {
        // Out of its cell while it runs, as in `insert`.
        let plan = match DELAYED.with(|plan| plan.borrow_mut().take()) {
            Some(kept) => kept,
            None => {
                let sql = "SELECT outbox._store_message($1, $2, $3, $4, $5,
                                  coalesce($6, pg_catalog.now() OPERATOR(pg_catalog.+) $7))";
                let types = types(&[TEXT, TEXT, BYTEA, JSONB, JSONB, TIMESTAMPTZ, INTERVAL]);
                client.prepare_mut(sql, &types)?.keep()
            }
        };
        let id = client.update(&plan, Some(1), args).and_then(|rows| rows.first().get_one::<i64>());
        DELAYED.with(|kept| kept.borrow_mut().replace(plan));
        Ok(id?.ok_or(pgrx::spi::Error::NoTupleTable)?)
    })
}
