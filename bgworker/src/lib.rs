//! The forwarding engine of pg_outbox: everything the background worker does that does not need
//! Postgres. The worker (in the extension crate) reads rows in short transactions and hands them
//! here as [`OutboundMessage`]s; this crate decides what to send now and what to hold back
//! ([`plan`]), sends to Kafka ([`sink`]), and turns delivery reports into an [`policy::BatchOutcome`]
//! that the worker records in another short transaction.

pub mod counters;
pub mod librdkafka_log;
pub mod message;
pub mod outages;
pub mod plan;
pub mod policy;
pub mod sink;
pub mod text_forms;
pub mod timeline_ids;

pub use counters::{TopicCount, TopicCounters};
pub use librdkafka_log::{LogLine, LogRepeats, LIBRDKAFKA_LOG};
pub use message::{parse_headers, OutboundMessage};
pub use outages::{ClusterOutage, ClusterOutages};
pub use plan::{cut_held_runs, held_lines_to_read, plan_batch, HeldLine, Plan};
pub use policy::{
    flush_before_sending, replace_producer, Backoff, BatchOutcome, Coalescing, Outage, OutageWatch, Rebootstrap,
    SendFailure,
};
pub use sink::{check_properties, parse_properties, BatchError, KafkaSink, SinkConfig};
pub use text_forms::SnapshotBounds;
