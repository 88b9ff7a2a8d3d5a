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
    guc::init();
    log_redaction::init();
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::init();
        launcher::register();
    }
}
