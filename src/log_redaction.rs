//! Keeps librdkafka properties, which may hold broker credentials, out of the server log where
//! Postgres itself would write them: a reload logs a changed setting's new value whole, and a
//! statement is logged beside an error in it (`log_min_error_statement`) or by `log_statement`.
//! Our own messages never repeat a value; these are Postgres's.
use std::ffi::CStr;

use pgrx::{pg_guard, pg_sys};

static mut PREVIOUS_HOOK: pg_sys::emit_log_hook_type = None;

pub fn init() {
    unsafe {
        PREVIOUS_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(redact);
    }
}

/// What a statement must mention, in any case, to be kept out of the log: the setting's name and
/// the column's, or the routes' table (an INSERT need not name its columns).
const MENTIONS: [&[u8]; 2] = [b"kafka_properties", b"destinations"];

#[pg_guard]
unsafe extern "C-unwind" fn redact(edata: *mut pg_sys::ErrorData) {
    if let Some(edata) = unsafe { edata.as_mut() } {
        if !edata.hide_stmt && unsafe { mentions(pg_sys::debug_query_string) } {
            edata.hide_stmt = true;
        }
        let id = unsafe { text(edata.message_id) };
        let replacement: Option<&CStr> = match id {
            b"parameter \"%s\" changed to \"%s\"" if unsafe { starts_with(edata.message, b"parameter \"pg_outbox.kafka_properties\"") } => {
                Some(c"parameter \"pg_outbox.kafka_properties\" changed (the value is not logged: it may hold credentials)")
            }
            // log_statement and log_min_duration_statement.
            _ if (id.starts_with(b"statement: ") || id.starts_with(b"execute ") || id.starts_with(b"duration: "))
                && unsafe { mentions(edata.message) } =>
            {
                Some(c"statement not logged: it mentions kafka_properties or outbox.destinations, which may hold credentials")
            }
            _ => None,
        };
        if let Some(replacement) = replacement {
            // In the error's own memory context (EmitErrorReport switches to it).
            edata.message = unsafe { pg_sys::pstrdup(replacement.as_ptr()) };
        }
    }
    if let Some(previous) = unsafe { PREVIOUS_HOOK } {
        unsafe { previous(edata) };
    }
}

/// # Safety
/// `s` is NULL or a NUL-terminated string that outlives the result.
unsafe fn text<'a>(s: *const std::ffi::c_char) -> &'a [u8] {
    if s.is_null() {
        &[]
    } else {
        unsafe { CStr::from_ptr(s) }.to_bytes()
    }
}

unsafe fn mentions(s: *const std::ffi::c_char) -> bool {
    let text = unsafe { text(s) };
    MENTIONS.iter().any(|m| text.windows(m.len()).any(|w| w.eq_ignore_ascii_case(m)))
}

unsafe fn starts_with(s: *const std::ffi::c_char, prefix: &[u8]) -> bool {
    unsafe { text(s) }.starts_with(prefix)
}
