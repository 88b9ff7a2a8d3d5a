use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Why one message was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendFailure {
    /// The broker could not be reached or could not take writes right now (timeout, transport,
    /// no leader, not enough replicas). Nothing is wrong with the message: the batch is resent
    /// later, in order, without counting an attempt. The record may still have been persisted
    /// ("possibly persisted"), which is why the whole batch is resent in its original order.
    Unavailable(String),
    /// The broker refuses this message for good (too large, invalid or forbidden topic). The
    /// message is retried with backoff and dead-lettered after `pg_outbox.max_attempts`.
    Refused(String),
    /// The producer itself is broken (an idempotence fatal error): it must be recreated and the
    /// unacknowledged rows resent from the table.
    Fatal(String),
}

impl SendFailure {
    pub fn from_kafka(err: &KafkaError) -> SendFailure {
        let text = err.to_string();
        match err.rdkafka_error_code() {
            Some(code) => classify(code, text),
            None => SendFailure::Unavailable(text),
        }
    }
}

/// Sorts librdkafka's error codes into the three ways the worker reacts.
pub fn classify(code: RDKafkaErrorCode, text: String) -> SendFailure {
    use RDKafkaErrorCode::*;
    match code {
        Fatal
        | OutOfOrderSequenceNumber
        | InvalidProducerEpoch
        | UnknownProducerId
        | ProducerFenced
        | InvalidProducerIdMapping => SendFailure::Fatal(text),
        MessageSizeTooLarge
        | InvalidMessageSize
        | MessageBatchTooLarge
        | InvalidMessage
        | InvalidTopic
        | TopicAuthorizationFailed
        | ClusterAuthorizationFailed
        | PolicyViolation
        | InvalidRecord
        | InvalidRequiredAcks
        | UnsupportedForMessageFormat
        | UnknownTopic
        | UnknownTopicOrPartition
        | UnknownPartition
        | InvalidArgument => SendFailure::Refused(text),
        _ => SendFailure::Unavailable(text),
    }
}

/// What happened to one batch, decided from its delivery reports.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Indexes (into the batch) of messages the broker acknowledged.
    pub delivered: Vec<usize>,
    /// Indexes of messages the broker refused, with the broker's reason.
    pub refused: Vec<(usize, String)>,
    /// Set when any message failed because the broker was unavailable: the batch must be resent.
    pub unavailable: Option<String>,
    /// Set when the producer hit a fatal error: recreate it and resend the batch.
    pub fatal: Option<String>,
}

impl BatchOutcome {
    pub fn from_reports(reports: Vec<Result<(), SendFailure>>) -> BatchOutcome {
        let mut outcome = BatchOutcome::default();
        for (i, report) in reports.into_iter().enumerate() {
            match report {
                Ok(()) => outcome.delivered.push(i),
                Err(SendFailure::Refused(e)) => outcome.refused.push((i, e)),
                Err(SendFailure::Unavailable(e)) => {
                    outcome.unavailable.get_or_insert(e);
                }
                Err(SendFailure::Fatal(e)) => {
                    outcome.fatal.get_or_insert(e);
                }
            }
        }
        outcome
    }

    /// True when the batch can be recorded: everything was either acked or refused for good.
    pub fn is_settled(&self) -> bool {
        self.unavailable.is_none() && self.fatal.is_none()
    }
}

/// Exponential backoff: `initial * 2^(attempt-1)`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Delay before attempt `attempt + 1`, after `attempt` failures (attempt >= 1).
    pub fn after_failures(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        self.initial.saturating_mul(1u32 << exp).min(self.max)
    }
}

/// Whether the worker's last record must reach disk before `sending` more messages go out: a
/// crash loses the records not yet flushed, and every delivery they recorded is sent again, with
/// the batch in flight. Keeping both within `batch_size` keeps the documented bound (at most
/// `pg_outbox.batch_size` messages resent) without a WAL flush per small batch.
pub fn flush_before_sending(unflushed_deliveries: i64, sending: i64, batch_size: i64) -> bool {
    unflushed_deliveries > 0 && unflushed_deliveries + sending > batch_size
}

/// Fewer, larger batches when commits come faster than the worker cycles.
///
/// Each cycle has a fixed cost (two short transactions, a produce request, a broker round trip).
/// At a few thousand commits a second every commit wakes the worker and each cycle carries a
/// handful of messages, so that fixed cost is paid hundreds of times a second on the cores the
/// writers need. Once the batches have been that size for a while, the worker lets commits gather
/// for a moment after it is woken, as librdkafka's `linger.ms` does for a producer. A single
/// large batch (a catch-up after a stall) does not count: only a sustained rate does, so a steady
/// low rate keeps its millisecond latency.
#[derive(Debug, Clone)]
pub struct Coalescing {
    /// Messages per batch, averaged over about the last 20 batches.
    average: f64,
}

impl Coalescing {
    /// Batches this large, on average, mean the commits outpace the worker.
    const BUSY_AVERAGE: f64 = 6.0;
    /// How long commits may gather: about what one cycle takes.
    pub const LINGER: Duration = Duration::from_millis(1);

    pub fn new() -> Self {
        Coalescing { average: 0.0 }
    }

    /// Records the size of a batch (0 for a wakeup that found nothing).
    pub fn observe(&mut self, messages: usize) {
        self.average += (messages as f64 - self.average) / 20.0;
    }

    /// How long to let commits gather after a wakeup, if at all.
    pub fn linger(&self) -> Option<Duration> {
        (self.average >= Self::BUSY_AVERAGE).then_some(Self::LINGER)
    }
}

impl Default for Coalescing {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_outages_are_retried_without_counting_attempts() {
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::QueueFull,
        ] {
            assert!(matches!(classify(code, String::new()), SendFailure::Unavailable(_)), "{code:?}");
        }
    }

    #[test]
    fn messages_the_broker_will_never_take_are_refused() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::InvalidTopic,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ] {
            assert!(matches!(classify(code, String::new()), SendFailure::Refused(_)), "{code:?}");
        }
    }

    #[test]
    fn idempotence_breakage_recreates_the_producer() {
        assert!(matches!(classify(RDKafkaErrorCode::OutOfOrderSequenceNumber, String::new()), SendFailure::Fatal(_)));
    }

    #[test]
    fn one_unavailable_report_makes_the_whole_batch_unsettled() {
        let outcome = BatchOutcome::from_reports(vec![
            Ok(()),
            Err(SendFailure::Refused("too big".into())),
            Err(SendFailure::Unavailable("timed out".into())),
            Ok(()),
        ]);
        assert_eq!(outcome.delivered, vec![0, 3]);
        assert_eq!(outcome.refused, vec![(1, "too big".to_string())]);
        assert_eq!(outcome.unavailable.as_deref(), Some("timed out"));
        assert!(!outcome.is_settled());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(10) };
        assert_eq!(b.after_failures(1), Duration::from_secs(1));
        assert_eq!(b.after_failures(2), Duration::from_secs(2));
        assert_eq!(b.after_failures(4), Duration::from_secs(8));
        assert_eq!(b.after_failures(5), Duration::from_secs(10));
        assert_eq!(b.after_failures(60), Duration::from_secs(10));
    }

    #[test]
    fn a_sustained_rate_lingers_a_steady_trickle_or_one_catch_up_does_not() {
        let mut c = Coalescing::new();
        for _ in 0..100 {
            c.observe(1);
        }
        assert_eq!(c.linger(), None, "one message per cycle");
        c.observe(60);
        assert_eq!(c.linger(), None, "a single catch-up batch after a stall");
        for _ in 0..40 {
            c.observe(10);
        }
        assert_eq!(c.linger(), Some(Coalescing::LINGER), "commits outpace the cycles");
        for _ in 0..40 {
            c.observe(0);
        }
        assert_eq!(c.linger(), None, "the rate fell");
    }

    #[test]
    fn a_record_is_flushed_first_only_when_a_crash_could_resend_more_than_a_batch() {
        assert!(!flush_before_sending(0, 1000, 1000), "nothing recorded since the last flush");
        assert!(!flush_before_sending(3, 2, 1000), "small batches at a moderate rate");
        assert!(!flush_before_sending(998, 2, 1000));
        assert!(flush_before_sending(999, 2, 1000));
        assert!(flush_before_sending(1000, 1000, 1000), "a backlog: full batches");
    }
}
