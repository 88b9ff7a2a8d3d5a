//! pg_outbox: a transactional outbox inside PostgreSQL. `outbox.enqueue_message()` writes a
//! message in the caller's transaction; a background worker per database forwards committed
//! messages to Kafka. This crate is the Postgres glue (SQL functions, settings, shared memory,
//! the workers' entry points); the forwarding engine is the `pg_outbox_bgworker` crate.
use pgrx::prelude::*;

mod api;
mod direct;
mod enqueue;
mod guc;
mod launcher;
mod log_redaction;
mod message_id;
mod message_reader;
mod message_writer;
mod shmem;
mod store;
mod worker;

::pgrx::pg_module_magic!();

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // Loaded by a session instead (CREATE EXTENSION, or a call, on a server started without it):
    // shared memory and the launcher can only be set up at server start, and without them nothing
    // would ever forward the messages written. (It used to end the session instead, with a FATAL
    // about a setting that then needed a restart.)
    if unsafe { !pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_outbox must be loaded at server start",
            pgrx::function_name!(),
        )
        .set_hint("Add pg_outbox to shared_preload_libraries in postgresql.conf and restart the server.")
        .report(PgLogLevel::ERROR);
    }
    guc::init();
    log_redaction::init();
    shmem::init();
    launcher::register();
}
