use std::time::{Duration, Instant};

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
    /// Its cluster, one of several that messages are routed to, is down (see `ClusterOutages`):
    /// the message was not sent, or not acknowledged, and waits in held_messages `until` the
    /// cluster is tried again, without counting an attempt, while the other clusters' messages go on.
    Deferred { error: String, until: Instant },
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
    /// Whether any of those timed out in flight ("possibly persisted"), whichever came first.
    pub timed_out: bool,
    /// Set when the producer hit a fatal error: recreate it and resend the batch.
    pub fatal: Option<String>,
    /// Indexes of messages whose cluster is down, with why and until when they wait.
    pub deferred: Vec<(usize, String, Instant)>,
}

impl BatchOutcome {
    pub fn from_reports(reports: Vec<Result<(), SendFailure>>) -> BatchOutcome {
        let mut outcome = BatchOutcome::default();
        for (i, report) in reports.into_iter().enumerate() {
            match report {
                Ok(()) => outcome.delivered.push(i),
                Err(SendFailure::Refused(e)) => outcome.refused.push((i, e)),
                Err(SendFailure::Unavailable(e)) => {
                    outcome.timed_out |= e.contains("timed out");
                    outcome.unavailable.get_or_insert(e);
                }
                Err(SendFailure::Fatal(e)) => {
                    outcome.fatal.get_or_insert(e);
                }
                Err(SendFailure::Deferred { error, until }) => outcome.deferred.push((i, error, until)),
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

/// Whether a cluster's next try goes through a new producer (a new idempotent producer id,
/// new connections), after `failures` failed tries in a row through the one it has (counted by
/// `KafkaSink::failed_try`). Always after messages timed out
/// "possibly persisted" (`timed_out`): the batch is resent from the table, in order. Otherwise
/// every third failure: a producer may be wedged on connections that went silent, which
/// librdkafka waits out for `socket.timeout.ms` (60 s), or know no broker left to ask (a lone
/// broker fenced by its controller lists none); while one merely slow to connect (TLS and SASL
/// across an ocean) gets two more tries to get there, connecting in the background meanwhile.
pub fn replace_producer(failures: u32, timed_out: bool) -> bool {
    const EVERY: u32 = 3;
    timed_out || (failures > 0 && failures.is_multiple_of(EVERY))
}

/// Whether the worker's last record must reach disk before `sending` more messages go out: a
/// crash loses the records not yet flushed, and every delivery they recorded is sent again, with
/// the batch in flight. Keeping both within `batch_size` keeps the documented bound (at most
/// `pg_outbox.batch_size` messages resent) without a WAL flush per small batch.
pub fn flush_before_sending(unflushed_deliveries: i64, sending: i64, batch_size: i64) -> bool {
    unflushed_deliveries > 0 && unflushed_deliveries + sending > batch_size
}

/// Fewer, larger batches when messages come at a busy rate.
///
/// Each cycle has a fixed cost (two short transactions, a produce request, a broker round trip).
/// Without lingering the worker cycles back to back at any rate above a few hundred messages a
/// second, every cycle carrying a handful, so that fixed cost is paid hundreds of times a second,
/// by the worker and by the broker, on the cores the writers need: at 2,500 commits/s about 700
/// cycles a second, up to 185 us of CPU per message between the two, almost half a core
/// (docs/BENCHMARKS.profile.md, round 15). Once messages arrive at BUSY_RATE or more, the
/// worker lets them gather for a moment after it is woken, as a Kafka producer's `linger.ms`
/// does. The rate is averaged twice, over about the last 32 and the last 4 cycles, and both must
/// reach it: the long average keeps the random bursts of a moderate rate from setting it off (at
/// 1,500/s a single 8-cycle average crossed 2,000/s for 391 of 40,000 cycles a minute, each a
/// linger, in a simulation of Poisson arrivals), the short one ends it a few cycles after a
/// burst (cycles that last a linger each: from 8,000/s back to 1,000/s, a few hundred ms at
/// 50 ms). Only fresh messages count, and one cycle at most MOST_PER_CYCLE times the busy rate:
/// retries coming due, or one transaction of a thousand messages, are not a rate. Only cycles
/// the worker entered from a wait count: the batches of a catch-up (after a stall, or a backlog)
/// follow one another at once and measure how fast a backlog drains, not how fast messages
/// arrive. A wakeup that came after the worker had been idle for longer than a cycle takes never
/// waits, however busy the cycles before it were. Lingering does not change the rate measured,
/// so it does not keep itself going. A pause of half a second (a linger not counted) starts the
/// averages over, and lingering waits for TRUSTED_AFTER cycles of them. Below BUSY_RATE nothing
/// waits: at 1,000 commits/s a 20 ms linger took the bench's p99 from 16 to 27 ms (round 14).
#[derive(Debug, Clone)]
pub struct Coalescing {
    /// When the last cycle entered from a wait read; None after a cycle that went on at once.
    previous_read: Option<Instant>,
    /// How long the last cycle that sent something worked.
    work: Duration,
    /// The linger before the next read, if any: part of the gap for the rate, not of the wait.
    lingered: Duration,
    /// The arrival rate, over about the last 32 and the last 4 cycles entered from a wait since
    /// the worker was last idle for a while, and how many cycles that is.
    long: RateAverage,
    short: RateAverage,
    observed: u32,
}

/// Messages read per cycle and the time between reads, averaged apart (an average of per-cycle
/// rates would be ruled by the shortest gaps), each cycle weighing 1/`cycles`.
#[derive(Debug, Clone)]
struct RateAverage {
    cycles: f64,
    messages: f64,
    gap: f64,
}

impl RateAverage {
    fn new(cycles: f64) -> Self {
        RateAverage { cycles, messages: 0.0, gap: 0.0 }
    }

    fn add(&mut self, messages: f64, gap: f64) {
        self.messages += (messages - self.messages) / self.cycles;
        self.gap += (gap - self.gap) / self.cycles;
    }

    fn at_least(&self, per_second: f64) -> bool {
        self.gap > 0.0 && self.messages >= per_second * self.gap
    }
}

impl Coalescing {
    /// Messages a second from which the worker lingers.
    const BUSY_RATE: f64 = 2000.0;
    /// A wait this long between two reads (besides a linger) starts the averages over: whatever
    /// rate came before is over.
    const IDLE: Duration = Duration::from_millis(500);
    /// Cycles after such a start before the averages are trusted: both start at zero, and their
    /// ratio is the rate from the first cycle on, but a rate of a few cycles is a guess.
    const TRUSTED_AFTER: u32 = 16;
    /// One cycle counts at most this many times BUSY_RATE over its gap: a single large
    /// transaction, or a pile of retries coming due at once, is not a rate.
    const MOST_PER_CYCLE: f64 = 4.0;

    pub fn new() -> Self {
        Coalescing {
            previous_read: None,
            work: Duration::ZERO,
            lingered: Duration::ZERO,
            long: RateAverage::new(32.0),
            short: RateAverage::new(4.0),
            observed: 0,
        }
    }

    /// Records a cycle that read `messages` fresh messages (0 for a wakeup that found nothing;
    /// retries are not arrivals) at `read_at` and was done with them at `done_at`. It counts
    /// toward the rate only if the worker entered it from a wait (see `continued`).
    pub fn observe(&mut self, messages: usize, read_at: Instant, done_at: Instant) {
        if messages > 0 {
            self.work = done_at.saturating_duration_since(read_at);
        }
        let lingered = std::mem::take(&mut self.lingered);
        if let Some(previous) = self.previous_read.filter(|&p| read_at > p) {
            let gap = read_at - previous;
            if gap.saturating_sub(lingered) >= Self::IDLE {
                *self = Coalescing { previous_read: self.previous_read, work: self.work, ..Coalescing::new() };
            } else {
                let gap = gap.as_secs_f64();
                let counted = (messages as f64).min(Self::MOST_PER_CYCLE * Self::BUSY_RATE * gap);
                self.long.add(counted, gap);
                self.short.add(counted, gap);
                self.observed = self.observed.saturating_add(1);
            }
        }
        self.previous_read = Some(read_at);
    }

    /// Records a cycle that went on at once after the one before (a backlog): the next cycle
    /// entered from a wait starts a new measurement instead of counting the backlog as a rate.
    pub fn continued(&mut self) {
        self.previous_read = None;
        self.lingered = Duration::ZERO;
    }

    /// How long to let messages gather after a wakeup that came `idle` after the last cycle, if
    /// at all: `configured` while they arrive at a busy rate, none for a commit that comes alone
    /// (its latency is all there is).
    pub fn linger(&mut self, configured: Duration, idle: Duration) -> Option<Duration> {
        let busy = self.observed >= Self::TRUSTED_AFTER
            && self.long.at_least(Self::BUSY_RATE)
            && self.short.at_least(Self::BUSY_RATE);
        let linger = (busy && idle <= self.work && !configured.is_zero()).then_some(configured);
        self.lingered = linger.unwrap_or(Duration::ZERO);
        linger
    }
}

impl Default for Coalescing {
    fn default() -> Self {
        Self::new()
    }
}

/// Decides, while a batch waits for its acknowledgements, when the broker is to be called
/// unavailable (once per wait): at once when librdkafka reports every broker lost during the wait;
/// for a loss reported before it (perhaps long over, as nothing was sent since), once the wait has
/// gone `STALE_LOSS` without a report; and for a broker that takes requests but answers none (a
/// frozen or black-holed one, which librdkafka calls lost only after its 60 s socket timeout),
/// after `SILENCE` without a report. The message timeout is far longer: it decides when a batch
/// is resent, this only what `worker_status` says meanwhile.
pub struct OutageWatch {
    started: Instant,
    last_report: Instant,
    reports: usize,
    reported: bool,
}

/// Why a waiting batch made the broker unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    BrokersLost,
    Silent(Duration),
}

impl OutageWatch {
    pub const STALE_LOSS: Duration = Duration::from_secs(2);
    pub const SILENCE: Duration = Duration::from_secs(10);

    pub fn new(now: Instant) -> OutageWatch {
        OutageWatch { started: now, last_report: now, reports: 0, reported: false }
    }

    /// `reports`: delivery reports of the batch so far; `lost_at`: when librdkafka last reported
    /// every broker lost, if no message was acknowledged since.
    pub fn check(&mut self, now: Instant, reports: usize, lost_at: Option<Instant>) -> Option<Outage> {
        if reports != self.reports {
            self.reports = reports;
            self.last_report = now;
        }
        if self.reported {
            return None;
        }
        let quiet = now.saturating_duration_since(self.last_report);
        let outage = match lost_at {
            Some(at) if at >= self.started || quiet >= Self::STALE_LOSS => Some(Outage::BrokersLost),
            _ if quiet >= Self::SILENCE => Some(Outage::Silent(quiet)),
            _ => None,
        };
        self.reported = outage.is_some();
        outage
    }

    /// Whether a wait that may be given up (a cluster among several, whose outage must not hold
    /// back the others) is to be: when librdkafka reports every broker lost during the wait, or
    /// after `SILENCE` without a report. A loss reported before the wait is not enough: it may
    /// be an idle connection the broker closed, and the first acknowledgement only slow.
    pub fn gives_up(&self, now: Instant, lost_at: Option<Instant>) -> bool {
        lost_at.is_some_and(|at| at >= self.started) || now.saturating_duration_since(self.last_report) >= Self::SILENCE
    }
}

/// When to hand librdkafka its bootstrap servers again while it has lost every broker: once the
/// loss has lasted `AFTER` (its own reconnects come first), then every `EVERY` while it lasts.
/// Why this is needed is told at `KafkaSink::flush`.
#[derive(Debug, Default)]
pub struct Rebootstrap {
    last: Option<Instant>,
}

impl Rebootstrap {
    pub const AFTER: Duration = Duration::from_secs(2);
    pub const EVERY: Duration = Duration::from_secs(5);

    /// `lost_at`: when librdkafka last reported every broker lost, if nothing was acknowledged since.
    pub fn due(&mut self, now: Instant, lost_at: Option<Instant>) -> bool {
        let Some(lost_at) = lost_at else {
            self.last = None;
            return false;
        };
        let due = now.saturating_duration_since(lost_at) >= Self::AFTER
            && self.last.is_none_or(|last| now.saturating_duration_since(last) >= Self::EVERY);
        if due {
            self.last = Some(now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_producer_is_replaced_after_a_timeout_and_every_third_failure_in_a_row() {
        let replaced: Vec<u32> = (1..=9).filter(|&f| replace_producer(f, false)).collect();
        assert_eq!(replaced, [3, 6, 9]);
        assert!(replace_producer(1, true), "messages that timed out go again through a new producer");
        assert!(!replace_producer(0, false));
    }

    #[test]
    fn bootstrap_servers_are_given_again_only_while_every_broker_stays_lost() {
        let lost = Instant::now();
        let at = |ms: u64| lost + Duration::from_millis(ms);
        let mut rebootstrap = Rebootstrap::default();
        assert!(!rebootstrap.due(at(1000), Some(lost)), "librdkafka's own reconnects come first");
        assert!(rebootstrap.due(at(2000), Some(lost)));
        assert!(!rebootstrap.due(at(2100), Some(lost)), "not on every check");
        assert!(!rebootstrap.due(at(6900), Some(lost)));
        assert!(rebootstrap.due(at(7000), Some(lost)), "again while the loss lasts");
        assert!(!rebootstrap.due(at(60_000), None), "never once a message was acknowledged");
        let lost_again = at(61_000);
        assert!(!rebootstrap.due(at(62_000), Some(lost_again)));
        assert!(rebootstrap.due(at(63_000), Some(lost_again)), "a new loss starts over");
    }

    #[test]
    fn brokers_lost_during_the_wait_are_reported_at_once_and_only_once() {
        let start = Instant::now();
        let mut watch = OutageWatch::new(start);
        assert_eq!(watch.check(start + Duration::from_millis(100), 0, None), None);
        let lost = start + Duration::from_millis(150);
        assert_eq!(watch.check(start + Duration::from_millis(200), 0, Some(lost)), Some(Outage::BrokersLost));
        assert_eq!(watch.check(start + Duration::from_secs(30), 0, Some(lost)), None);
    }

    #[test]
    fn a_loss_reported_before_the_wait_counts_only_once_reports_stop_for_a_while() {
        let lost_before = Instant::now();
        let start = lost_before + Duration::from_secs(60);
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut still_down = OutageWatch::new(start);
        assert_eq!(still_down.check(at(1000), 0, Some(lost_before)), None);
        assert_eq!(still_down.check(at(2000), 0, Some(lost_before)), Some(Outage::BrokersLost));
        // Each report starts the wait for the next one over.
        let mut slowly = OutageWatch::new(start);
        assert_eq!(slowly.check(at(1500), 1, Some(lost_before)), None);
        assert_eq!(slowly.check(at(3000), 1, Some(lost_before)), None);
        assert_eq!(slowly.check(at(3600), 1, Some(lost_before)), Some(Outage::BrokersLost));
        let mut flowing = OutageWatch::new(start);
        for s in 1..=30 {
            assert_eq!(flowing.check(at(s * 1000), s as usize, Some(lost_before)), None, "a report every second");
        }
    }

    #[test]
    fn a_loss_at_the_very_start_of_the_wait_is_news() {
        let start = Instant::now();
        let mut watch = OutageWatch::new(start);
        assert_eq!(watch.check(start + Duration::from_millis(100), 0, Some(start)), Some(Outage::BrokersLost));
    }

    #[test]
    fn a_cluster_among_several_is_given_up_on_a_fresh_loss_or_a_silence_not_on_an_old_loss() {
        let lost_before = Instant::now();
        let start = lost_before + Duration::from_secs(60);
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut watch = OutageWatch::new(start);
        assert!(!watch.gives_up(at(100), None));
        assert!(watch.gives_up(at(100), Some(at(50))), "lost during the wait");
        watch.check(at(3000), 0, Some(lost_before));
        assert!(!watch.gives_up(at(3000), Some(lost_before)), "a loss from before the wait, 3 s quiet");
        assert!(watch.gives_up(at(10_000), Some(lost_before)), "10 s without a report");
        let mut slow = OutageWatch::new(start);
        slow.check(at(9_000), 5, None);
        assert!(!slow.gives_up(at(15_000), None), "a report 6 s ago");
    }

    #[test]
    fn a_broker_that_answers_nothing_is_unavailable_after_the_silence_but_a_slow_one_is_not() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut frozen = OutageWatch::new(start);
        assert_eq!(frozen.check(at(9), 0, None), None);
        assert_eq!(frozen.check(at(10), 0, None), Some(Outage::Silent(Duration::from_secs(10))));
        let mut slow = OutageWatch::new(start);
        for s in 1..=30 {
            assert_eq!(slow.check(at(s), s as usize * 10, None), None, "reports keep coming at {s} s");
        }
    }

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
    fn a_message_that_timed_out_anywhere_in_the_batch_is_noticed_not_only_the_first_failure() {
        let outcome = BatchOutcome::from_reports(vec![
            Err(SendFailure::Unavailable("Local: Broker transport failure".into())),
            Err(SendFailure::Unavailable(
                "Message production error: MessageTimedOut (Local: Message timed out)".into(),
            )),
        ]);
        assert_eq!(outcome.unavailable.as_deref(), Some("Local: Broker transport failure"));
        assert!(outcome.timed_out);
        let outcome = BatchOutcome::from_reports(vec![Err(SendFailure::Unavailable("purged".into()))]);
        assert!(!outcome.timed_out);
    }

    #[test]
    fn messages_of_a_cluster_that_is_down_are_deferred_and_the_rest_of_the_batch_settles() {
        let until = Instant::now() + Duration::from_secs(2);
        let outcome = BatchOutcome::from_reports(vec![
            Ok(()),
            Err(SendFailure::Deferred { error: "b is down".into(), until }),
            Err(SendFailure::Refused("too big".into())),
        ]);
        assert_eq!(outcome.delivered, vec![0]);
        assert_eq!(outcome.refused, vec![(2, "too big".to_string())]);
        assert_eq!(outcome.deferred, vec![(1, "b is down".to_string(), until)]);
        assert!(outcome.is_settled());
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

    /// Runs `c` for `seconds` of messages arriving steadily at `rate` (per second), each cycle
    /// working `work`: it reads what arrived since the read before, sleeps until a message has
    /// come (not at all if one came while it worked), then lingers if `c` says so. Returns the
    /// number of cycles that lingered and the longest a message waited to be read.
    fn run(c: &mut Coalescing, clock: &mut Instant, seconds: f64, rate: f64, work: Duration) -> (usize, Duration) {
        const LINGER: Duration = Duration::from_millis(5);
        let (start, end) = (*clock, *clock + Duration::from_secs_f64(seconds));
        let arrival = |k: f64| start + Duration::from_secs_f64(k / rate);
        let (mut read_upto, mut lingered, mut longest_wait) = (0.0_f64, 0, Duration::ZERO);
        while *clock < end {
            let arrived = (((*clock - start).as_secs_f64() * rate).floor() - read_upto).max(0.0);
            if arrived > 0.0 {
                longest_wait = longest_wait.max(*clock - arrival(read_upto + 1.0));
            }
            read_upto += arrived;
            c.observe(arrived as usize, *clock, *clock + work);
            let done = *clock + work;
            let idle = arrival(read_upto + 1.0).saturating_duration_since(done);
            *clock = done + idle;
            if let Some(linger) = c.linger(LINGER, idle) {
                *clock += linger;
                lingered += 1;
            }
        }
        (lingered, longest_wait)
    }

    #[test]
    fn messages_linger_only_at_a_busy_rate() {
        let work = Duration::from_micros(1500);
        let (mut c, mut clock) = (Coalescing::new(), Instant::now());
        let (lingered, longest_wait) = run(&mut c, &mut clock, 1.0, 1000.0, work);
        assert_eq!(lingered, 0, "1,000/s: a cycle keeps up with one or two at a time");
        assert!(longest_wait <= work, "{longest_wait:?}");
        let (lingered, _) = run(&mut c, &mut clock, 1.0, 8000.0, work);
        assert!(lingered > 100, "8,000/s outpace 1.5 ms cycles: they gather ({lingered} lingers)");
        let (lingered, longest_wait) = run(&mut c, &mut clock, 1.0, 20.0, work);
        assert_eq!(lingered, 0, "a trickle right after a burst never waits ({longest_wait:?})");
        run(&mut c, &mut clock, 1.0, 8000.0, work);
        let (lingered, _) = run(&mut c, &mut clock, 1.0, 1000.0, work);
        assert!(lingered <= 8, "back to 1,000/s: a few cycles notice, then no lingering ({lingered} lingers)");
        run(&mut c, &mut clock, 1.0, 8000.0, work);
        assert_eq!(c.linger(Duration::ZERO, Duration::ZERO), None, "lingering turned off");
    }

    /// As `run`, with arrivals at random (a Poisson process at `rate`, from a fixed seed).
    fn run_random(c: &mut Coalescing, clock: &mut Instant, seconds: f64, rate: f64, work: Duration) -> usize {
        const LINGER: Duration = Duration::from_millis(20);
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next_gap = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let uniform = (seed >> 11) as f64 / (1u64 << 53) as f64;
            Duration::from_secs_f64(-(1.0 - uniform).ln() / rate)
        };
        let end = *clock + Duration::from_secs_f64(seconds);
        let (mut next_arrival, mut lingered) = (*clock + next_gap(), 0);
        while *clock < end {
            let idle = next_arrival.saturating_duration_since(*clock);
            *clock += idle;
            if let Some(linger) = c.linger(LINGER, idle) {
                *clock += linger;
                lingered += 1;
            }
            let mut arrived = 0;
            while next_arrival <= *clock {
                arrived += 1;
                next_arrival += next_gap();
            }
            c.observe(arrived, *clock, *clock + work);
            *clock += work;
        }
        lingered
    }

    #[test]
    fn a_busy_rate_gathers_even_while_each_cycle_keeps_up() {
        // 2,500/s against 1.4 ms cycles: three or four arrive during a cycle, so it could keep up
        // one cycle after another, 700 cycles a second.
        let (mut c, mut clock) = (Coalescing::new(), Instant::now());
        let (lingered, _) = run(&mut c, &mut clock, 1.0, 2500.0, Duration::from_micros(1400));
        assert!(lingered > 100, "{lingered} lingers");
    }

    #[test]
    fn random_bursts_of_a_moderate_rate_do_not_make_the_worker_linger() {
        let (mut c, mut clock) = (Coalescing::new(), Instant::now());
        let work = Duration::from_micros(1400);
        assert_eq!(run_random(&mut c, &mut clock, 20.0, 1000.0, work), 0, "1,000/s at random");
        assert_eq!(run_random(&mut c, &mut clock, 20.0, 1500.0, work), 0, "1,500/s at random");
        assert!(run_random(&mut c, &mut clock, 5.0, 3000.0, work) > 100, "3,000/s at random");
    }

    #[test]
    fn after_a_pause_the_rate_is_measured_anew_before_anything_waits() {
        let work = Duration::from_micros(1400);
        let (mut c, mut clock) = (Coalescing::new(), Instant::now());
        run(&mut c, &mut clock, 1.0, 5000.0, work);
        clock += Duration::from_secs(2);
        // The first cycles after the pause at 5,000/s again: no linger until enough have been seen.
        for _ in 0..Coalescing::TRUSTED_AFTER {
            c.observe(7, clock, clock + work);
            assert_eq!(c.linger(Duration::from_millis(20), Duration::ZERO), None);
            clock += work;
        }
        c.observe(7, clock, clock + work);
        assert!(c.linger(Duration::from_millis(20), Duration::ZERO).is_some());
    }

    #[test]
    fn a_linger_longer_than_the_idle_mark_keeps_lingering_at_a_busy_rate() {
        // Cycles of 1.5 ms at 5,000/s with a 600 ms linger: each read comes more than half a
        // second after the one before, all of it lingering, none of it idle.
        let (mut c, mut clock) = (Coalescing::new(), Instant::now());
        let work = Duration::from_micros(1500);
        run(&mut c, &mut clock, 0.5, 5000.0, work);
        let linger = Duration::from_millis(600);
        let mut lingered = 0;
        for _ in 0..10 {
            if c.linger(linger, Duration::ZERO).is_some() {
                clock += linger;
                lingered += 1;
            }
            // What came since the read before: 3,000 after a linger, a handful otherwise.
            let arrived = if lingered > 0 { 3000 } else { 8 };
            c.observe(arrived, clock, clock + work);
            clock += work;
        }
        assert_eq!(lingered, 10, "every cycle lingers");
    }

    #[test]
    fn one_large_cycle_at_a_moderate_rate_does_not_make_the_worker_linger() {
        // 1,000/s, and once a transaction of a thousand messages (or as many retries come due).
        let (mut c, mut clock) = (Coalescing::new(), Instant::now());
        let work = Duration::from_micros(1400);
        run(&mut c, &mut clock, 1.0, 1000.0, work);
        c.observe(1000, clock, clock + Duration::from_millis(20));
        clock += Duration::from_millis(20);
        let (lingered, longest_wait) = run(&mut c, &mut clock, 1.0, 1000.0, work);
        assert_eq!(lingered, 0, "the cycles after it do not wait ({longest_wait:?})");
    }

    #[test]
    fn slow_acknowledgements_at_a_moderate_rate_do_not_make_the_worker_linger() {
        let (mut c, mut clock) = (Coalescing::new(), Instant::now());
        let (lingered, longest_wait) = run(&mut c, &mut clock, 2.0, 1000.0, Duration::from_millis(12));
        assert_eq!(lingered, 0, "1,000/s while each cycle waits 12 ms for the broker ({longest_wait:?})");
        let (lingered, _) = run(&mut c, &mut clock, 1.0, 4000.0, Duration::from_millis(12));
        assert!(lingered > 10, "4,000/s with the same cycles: they gather ({lingered} lingers)");
    }

    #[test]
    fn a_catch_up_after_a_stall_does_not_make_the_worker_linger() {
        const LINGER: Duration = Duration::from_millis(5);
        let work = Duration::from_millis(1);
        let (mut c, mut clock) = (Coalescing::new(), Instant::now());
        run(&mut c, &mut clock, 1.0, 1000.0, work);
        // The broker stalled for 400 ms (less than the idle mark): 2,000 messages wait (at 5,000/s
        // meanwhile), read as 20 full batches of 100 one right after the other.
        clock += Duration::from_millis(400);
        for _ in 0..20 {
            c.observe(100, clock, clock + Duration::from_millis(5));
            c.continued();
            clock += Duration::from_millis(5);
        }
        // The latch was set all along: the first wait returns at once.
        c.observe(5, clock, clock + work);
        assert_eq!(c.linger(LINGER, Duration::ZERO), None);
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
