//! Keeps librdkafka properties, which may hold broker credentials, out of the server log where
//! Postgres itself would write them: a reload logs a changed setting's new value whole; a
//! statement is logged by `log_statement` and `log_min_duration_statement` (with its parameters)
//! and beside an error in it (`log_min_error_statement`); and an error about a row of the routes'
//! table quotes the row ("Failing row contains", COPY's context line). Our own messages never
//! repeat a value; these are Postgres's. What is matched is the statement's text: a statement
//! that writes a route without naming it (through a function of your own) is not recognised.
use std::ffi::{c_char, CStr};

use pgrx::{pg_guard, pg_sys, PgSqlErrorCode};

static mut PREVIOUS_HOOK: pg_sys::emit_log_hook_type = None;

pub fn init() {
    unsafe {
        PREVIOUS_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(redact);
    }
}

const SETTING_CHANGED: &CStr = c"parameter \"pg_outbox.kafka_properties\" changed (its value is not logged)";
const STATEMENT_HIDDEN: &CStr =
    c"statement not logged: it mentions kafka_properties or destinations, which may hold credentials";

#[pg_guard]
unsafe extern "C-unwind" fn redact(edata: *mut pg_sys::ErrorData) {
    if let Some(edata) = unsafe { edata.as_mut() } {
        unsafe { redact_error(edata) };
    }
    if let Some(previous) = unsafe { PREVIOUS_HOOK } {
        unsafe { previous(edata) };
    }
}

/// # Safety
/// `edata` is the error being emitted.
unsafe fn redact_error(edata: &mut pg_sys::ErrorData) {
    let (id, message) = unsafe { (text(edata.message_id), text(edata.message)) };
    let statement_mentions = unsafe { mentions(pg_sys::debug_query_string) };
    // Before the detail is cleared: an EXECUTE's log_statement line has what it prepared there.
    let detail_mentions = unsafe { mentions(edata.detail) };
    // An error about a row of the routes' table (Postgres's, found by the table it names, not by
    // its translated text; or our own refusal of a route or of the setting): its detail ("Failing
    // row contains"), context (COPY's line, a portal's parameters) and statement may quote it.
    let about_routes = unsafe { text(edata.schema_name) } == b"outbox"
        && unsafe { text(edata.table_name) } == b"destinations"
        || edata.sqlerrcode == PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32
            && (message.starts_with(b"route of topic \"")
                || message.starts_with(b"invalid pg_outbox.kafka_properties: "));
    if statement_mentions || about_routes {
        edata.hide_stmt = true;
    }
    // A prepared statement's text is not the EXECUTE's: what it set may be in its arguments.
    if contains(unsafe { text(pg_sys::debug_query_string) }, b"execute", true) {
        edata.hide_stmt = true;
    }
    for field in [&mut edata.detail, &mut edata.detail_log, &mut edata.context, &mut edata.internalquery] {
        // A deadlock's detail quotes the other backends' statements, whatever this one is.
        if statement_mentions || about_routes || unsafe { mentions(*field) } {
            unsafe { clear(field) };
        }
    }
    let replacement = match id {
        // Matched on the untranslated form; the name is spelled as in the file.
        b"parameter \"%s\" changed to \"%s\"" if contains(message, b"pg_outbox.kafka_properties", true) => {
            Some(SETTING_CHANGED)
        }
        // log_statement's lines (simple and extended protocol) and log_min_duration_statement's;
        // log_duration's bare line names no statement.
        b"statement: %s" | b"%s %s%s%s: %s" => Some(STATEMENT_HIDDEN),
        b"duration: %s ms" => None,
        _ if id.starts_with(b"duration: ") => Some(STATEMENT_HIDDEN),
        _ => None,
    }
    .filter(|r| *r == SETTING_CHANGED || statement_mentions || detail_mentions || unsafe { mentions(edata.message) });
    if let Some(replacement) = replacement {
        unsafe { replace_message(edata, replacement) };
        // A statement's detail holds its parameters ("parameters: $1 = '...'") or what it
        // prepared ("prepare: ...").
        unsafe {
            clear(&mut edata.detail);
            clear(&mut edata.detail_log);
        }
    }
}

/// Frees a field of the error (errfinish would) and leaves it out.
unsafe fn clear(field: &mut *mut c_char) {
    if !field.is_null() {
        unsafe { pg_sys::pfree(field.cast()) };
        *field = std::ptr::null_mut();
    }
}

/// Writes `replacement` over the message when it fits (nothing to allocate while an error is
/// being reported), else in a copy in the error's memory context (EmitErrorReport's current one).
unsafe fn replace_message(edata: &mut pg_sys::ErrorData, replacement: &CStr) {
    let bytes = replacement.to_bytes_with_nul();
    if !edata.message.is_null() && unsafe { text(edata.message) }.len() >= bytes.len() - 1 {
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), edata.message.cast::<u8>(), bytes.len()) };
    } else {
        let copy = unsafe { pg_sys::pstrdup(replacement.as_ptr()) };
        unsafe { clear(&mut edata.message) };
        edata.message = copy;
    }
}

/// # Safety
/// `s` is NULL or a NUL-terminated string that outlives the result.
unsafe fn text<'a>(s: *const c_char) -> &'a [u8] {
    if s.is_null() {
        &[]
    } else {
        unsafe { CStr::from_ptr(s) }.to_bytes()
    }
}

/// Whether a statement (or a message quoting one) names the setting, the column or the table,
/// as a word in any case (`shipping_destinations` is another table).
unsafe fn mentions(s: *const c_char) -> bool {
    let text = unsafe { text(s) };
    [&b"kafka_properties"[..], b"destinations"].iter().any(|word| contains(text, word, true))
}

fn contains(text: &[u8], word: &[u8], as_word: bool) -> bool {
    let is_name = |c: Option<&u8>| c.is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
    (0..text.len().saturating_sub(word.len() - 1)).any(|i| {
        text[i..i + word.len()].eq_ignore_ascii_case(word)
            && (!as_word
                || (!is_name(i.checked_sub(1).and_then(|j| text.get(j))) && !is_name(text.get(i + word.len()))))
    })
}
