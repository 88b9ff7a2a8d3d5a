//! librdkafka's own log: the lines its threads write, queued for the worker's thread (Postgres's
//! logging is for that thread only), and which of them reach the server log (`LogRepeats`).
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A line of librdkafka's log, from the producer of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// syslog's levels, as librdkafka uses them: 3 an error, 4 a warning, 7 a debug line.
    pub level: i32,
    /// librdkafka's name for what the line is about (`CONFWARN`, `FAIL`, ...).
    pub facility: String,
    pub message: String,
    /// The cluster's bootstrap servers.
    pub cluster: String,
}

impl LogLine {
    /// librdkafka's errors and warnings are the server's warnings; the rest (what a `log_level`
    /// or `debug` property asks for) is logged.
    pub fn is_warning(&self) -> bool {
        self.level <= 4
    }
}

/// Lines filed on librdkafka's threads, taken on the worker's. Bounded: the worker writes them
/// between its waits, and a `debug` property can make librdkafka write thousands a second.
pub struct LogQueue(Mutex<Queued>);

struct Queued {
    lines: VecDeque<LogLine>,
    /// Lines that found the queue full since the worker last took it.
    dropped: u64,
}

impl LogQueue {
    const BOUND: usize = 1000;
    /// Room kept for errors and warnings: other lines (which a `debug` or `log_level` property
    /// asks for) may fill the queue only up to this below its bound, so that a flood of them
    /// does not push out what went wrong.
    const KEPT_FOR_WARNINGS: usize = 100;

    pub const fn new() -> Self {
        LogQueue(Mutex::new(Queued { lines: VecDeque::new(), dropped: 0 }))
    }

    fn queued(&self) -> MutexGuard<'_, Queued> {
        // A panic while holding the lock leaves plain data behind.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues the line `make` makes, at `level`, if there is room for it; made only then, on
    /// librdkafka's thread that also files delivery reports.
    pub fn push(&self, level: i32, make: impl FnOnce() -> LogLine) {
        let mut queued = self.queued();
        let room = match level {
            ..=4 => Self::BOUND,
            _ => Self::BOUND - Self::KEPT_FOR_WARNINGS,
        };
        if queued.lines.len() < room {
            queued.lines.push_back(make());
        } else {
            queued.dropped += 1;
        }
    }

    /// Every line queued, and how many found the queue full.
    pub fn take(&self) -> (Vec<LogLine>, u64) {
        let mut queued = self.queued();
        if queued.lines.is_empty() && queued.dropped == 0 {
            return (Vec::new(), 0);
        }
        (queued.lines.drain(..).collect(), std::mem::take(&mut queued.dropped))
    }
}

impl Default for LogQueue {
    fn default() -> Self {
        Self::new()
    }
}

/// The worker process's queue: each of its producers files its lines here.
pub static LIBRDKAFKA_LOG: LogQueue = LogQueue::new();

/// Which lines reach the server log. A line that says again what one of the same cluster said
/// (librdkafka's "after Xms in state Y" aside) is told again only `REPEAT_AFTER`
/// later, with how often it came meanwhile: librdkafka repeats a broker's error every 30 s while
/// it lasts, and an outage of hours would otherwise add a line every 30 s to the worker's one.
/// Debug lines, which only a `debug` or `log_level` property asks for, are all told.
#[derive(Default)]
pub struct LogRepeats {
    seen: HashMap<(String, String), Seen>,
}

struct Seen {
    told_at: Instant,
    /// Times it came since it was last told.
    since: u32,
}

impl LogRepeats {
    pub const REPEAT_AFTER: Duration = Duration::from_secs(600);
    /// Lines remembered at most: past this, those told longer than `REPEAT_AFTER` ago are
    /// forgotten, and if all are more recent, the one told first.
    const REMEMBERED: usize = 1000;

    /// Whether `line` is to be told now, and if so, how many times it came unsaid before it.
    pub fn admit(&mut self, line: &LogLine, now: Instant) -> Option<u32> {
        if line.level >= 7 {
            return Some(0);
        }
        let key = (line.cluster.clone(), format!("{} {}", line.facility, without_particulars(&line.message)));
        if let Some(seen) = self.seen.get_mut(&key) {
            if now.saturating_duration_since(seen.told_at) < Self::REPEAT_AFTER {
                seen.since += 1;
                return None;
            }
            let unsaid = seen.since;
            *seen = Seen { told_at: now, since: 0 };
            return Some(unsaid);
        }
        if self.seen.len() >= Self::REMEMBERED {
            self.seen.retain(|_, seen| now.saturating_duration_since(seen.told_at) < Self::REPEAT_AFTER);
        }
        if self.seen.len() >= Self::REMEMBERED {
            let first = self.seen.iter().min_by_key(|(_, seen)| seen.told_at).map(|(key, _)| key.clone());
            if let Some(key) = first {
                self.seen.remove(&key);
            }
        }
        self.seen.insert(key, Seen { told_at: now, since: 0 });
        Some(0)
    }
}

/// A line as compared with the ones before it: without librdkafka's trailing "(after Xms in state
/// Y, N identical error(s) suppressed)". Its other numbers stay: they tell brokers apart.
fn without_particulars(message: &str) -> &str {
    match message.rfind(" (after ") {
        Some(at) if message.ends_with(')') => &message[..at],
        _ => message,
    }
}

/// `message` with each secret value in it masked. Values of three characters or fewer are left:
/// masking "1" everywhere would garble the line and hide nothing.
pub fn without_secrets(message: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|secret| secret.len() > 3)
        .fold(message.to_string(), |text, secret| text.replace(secret.as_str(), "***"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(level: i32, facility: &str, message: &str) -> LogLine {
        LogLine { level, facility: facility.into(), message: message.into(), cluster: "kafka:9092".into() }
    }

    /// As librdkafka 2.12 writes a broker that refuses connections, 30 s apart.
    const REFUSED: &str =
        "kafka:9092/bootstrap: Connect to ipv4#10.0.0.7:9092 failed: Connection refused (after 0ms in state CONNECT)";
    const REFUSED_AGAIN: &str = "kafka:9092/bootstrap: Connect to ipv4#10.0.0.7:9092 failed: Connection refused (after 3ms in state CONNECT, 14 identical error(s) suppressed)";

    #[test]
    fn a_broker_error_repeated_through_an_outage_is_told_once_per_ten_minutes_with_its_count() {
        let mut repeats = LogRepeats::default();
        let start = Instant::now();
        assert_eq!(repeats.admit(&line(3, "FAIL", REFUSED), start), Some(0));
        for i in 1..20 {
            let at = start + Duration::from_secs(30 * i);
            assert_eq!(repeats.admit(&line(3, "FAIL", REFUSED_AGAIN), at), None, "{i}");
        }
        let later = start + LogRepeats::REPEAT_AFTER;
        assert_eq!(repeats.admit(&line(3, "FAIL", REFUSED_AGAIN), later), Some(19));
        assert_eq!(repeats.admit(&line(3, "FAIL", REFUSED), later + Duration::from_secs(1)), None);
    }

    #[test]
    fn another_error_another_facility_or_another_cluster_is_told_at_once() {
        let mut repeats = LogRepeats::default();
        let now = Instant::now();
        assert_eq!(repeats.admit(&line(3, "FAIL", REFUSED), now), Some(0));
        let timed_out = REFUSED.replace("Connection refused", "Connection timed out");
        assert_eq!(repeats.admit(&line(3, "FAIL", &timed_out), now), Some(0));
        assert_eq!(repeats.admit(&line(3, "ERROR", REFUSED), now), Some(0));
        let other_cluster = LogLine { cluster: "other:9092".into(), ..line(3, "FAIL", REFUSED) };
        assert_eq!(repeats.admit(&other_cluster, now), Some(0));
    }

    #[test]
    fn debug_lines_asked_for_are_all_told() {
        let mut repeats = LogRepeats::default();
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(
                repeats.admit(&line(7, "SEND", "Sent ProduceRequest (v9, 120 bytes @ 0, CorrId 5)"), now),
                Some(0)
            );
        }
    }

    #[test]
    fn many_distinct_lines_are_remembered_up_to_a_bound_the_oldest_forgotten_first() {
        let mut repeats = LogRepeats::default();
        let start = Instant::now();
        let numbered = |i: usize| line(4, "CONFWARN", &format!("property p{i} is deprecated"));
        for i in 0..LogRepeats::REMEMBERED {
            repeats.admit(&numbered(i), start + Duration::from_millis(i as u64));
        }
        let soon = start + Duration::from_secs(2);
        assert_eq!(repeats.admit(&line(4, "CONFWARN", "something new"), soon), Some(0));
        assert_eq!(repeats.seen.len(), LogRepeats::REMEMBERED, "bounded while every line is recent");
        assert_eq!(repeats.admit(&numbered(0), soon), Some(0), "the one told first was forgotten");
        assert_eq!(repeats.admit(&numbered(2), soon), None, "the others are remembered");
        let later = start + LogRepeats::REPEAT_AFTER + Duration::from_secs(3);
        assert_eq!(repeats.admit(&line(4, "CONFWARN", "something newer"), later), Some(0));
        assert_eq!(repeats.seen.len(), 1, "the old lines are forgotten");
    }

    #[test]
    fn only_the_particulars_are_set_aside() {
        assert_eq!(without_particulars(REFUSED), without_particulars(REFUSED_AGAIN));
        assert_eq!(
            without_particulars("Topic orders.v2 partition count changed from 3 to 12"),
            "Topic orders.v2 partition count changed from 3 to 12"
        );
    }

    #[test]
    fn the_same_error_of_another_broker_is_told_at_once() {
        let mut repeats = LogRepeats::default();
        let now = Instant::now();
        assert_eq!(repeats.admit(&line(3, "FAIL", REFUSED), now), Some(0));
        let other_broker = REFUSED.replace("/bootstrap", "/2").replace("10.0.0.7", "10.0.0.8");
        assert_eq!(repeats.admit(&line(3, "FAIL", &other_broker), now), Some(0));
    }

    #[test]
    fn a_full_queue_counts_what_it_dropped_and_taking_empties_it() {
        let queue = LogQueue::new();
        for i in 0..LogQueue::BOUND + 5 {
            queue.push(4, || line(4, "CONFWARN", &i.to_string()));
        }
        let (lines, dropped) = queue.take();
        assert_eq!((lines.len(), dropped), (LogQueue::BOUND, 5));
        assert_eq!(lines[0].message, "0", "in the order written");
        assert_eq!(queue.take(), (Vec::new(), 0));
    }

    #[test]
    fn a_flood_of_debug_lines_leaves_room_for_warnings() {
        let queue = LogQueue::new();
        for _ in 0..LogQueue::BOUND {
            queue.push(7, || line(7, "SEND", "Sent ProduceRequest"));
        }
        queue.push(6, || line(6, "INFO", "an info line is not a warning"));
        queue.push(3, || line(3, "FAIL", REFUSED));
        let (lines, dropped) = queue.take();
        assert_eq!(dropped, LogQueue::KEPT_FOR_WARNINGS as u64 + 1);
        assert_eq!(lines.last().map(|l| l.facility.as_str()), Some("FAIL"));
    }

    #[test]
    fn a_line_without_room_is_not_even_made() {
        let queue = LogQueue::new();
        for _ in 0..LogQueue::BOUND {
            queue.push(4, || line(4, "CONFWARN", "a warning"));
        }
        queue.push(4, || unreachable!("made without room for it"));
        assert_eq!(queue.take().1, 1);
    }

    #[test]
    fn secret_values_are_masked_and_short_ones_left() {
        let secrets = vec!["hunter22".to_string(), "ab".to_string()];
        assert_eq!(
            without_secrets("SASL authentication failed for hunter22 (ab)", &secrets),
            "SASL authentication failed for *** (ab)"
        );
    }
}
