//! Per-topic delivery counters, written to outbox.topics at most once per interval.
//!
//! Each write of a topic's row leaves a dead version behind, and while another session holds
//! back the xmin horizon none can be pruned: a worker that counted every batch (hundreds a
//! second) left tens of thousands of versions in two minutes, and every later upsert walked
//! them. Counting in memory and writing once a second bounds that at one version per topic per
//! second, whatever the batch rate; the price is that `topic_stats` lags by up to the interval.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Deliveries and refusals of one topic since the last write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicCount {
    pub topic: String,
    pub delivered: i64,
    pub refused: i64,
}

#[derive(Debug)]
pub struct TopicCounters {
    interval: Duration,
    pending: BTreeMap<String, (i64, i64)>,
    last_written: Option<Instant>,
}

impl TopicCounters {
    pub fn new(interval: Duration) -> Self {
        TopicCounters { interval, pending: BTreeMap::new(), last_written: None }
    }

    pub fn count(&mut self, topic: &str, delivered: i64, refused: i64) {
        match self.pending.get_mut(topic) {
            Some(c) => {
                c.0 += delivered;
                c.1 += refused;
            }
            None => {
                self.pending.insert(topic.to_owned(), (delivered, refused));
            }
        }
    }

    /// How long until the pending counts are due to be written (zero if they are); None if
    /// nothing is pending.
    pub fn due_in(&self, now: Instant) -> Option<Duration> {
        if self.pending.is_empty() {
            return None;
        }
        Some(self.last_written.map_or(Duration::ZERO, |t| self.interval.saturating_sub(now.duration_since(t))))
    }

    /// The pending counts, if they are due (the first ever are due at once), in topic order.
    /// The caller writes them; taking them starts the next interval.
    pub fn take_due(&mut self, now: Instant) -> Vec<TopicCount> {
        if self.due_in(now) != Some(Duration::ZERO) {
            return Vec::new();
        }
        self.take_all(now)
    }

    /// Every pending count, due or not (the worker is stopping).
    pub fn take_all(&mut self, now: Instant) -> Vec<TopicCount> {
        self.last_written = Some(now);
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(topic, (delivered, refused))| TopicCount { topic, delivered, refused })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn the_first_counts_are_written_at_once_later_ones_once_per_interval() {
        let start = Instant::now();
        let mut c = TopicCounters::new(SECOND);
        assert_eq!(c.due_in(start), None);
        c.count("orders", 3, 0);
        assert_eq!(c.take_due(start), vec![TopicCount { topic: "orders".into(), delivered: 3, refused: 0 }]);
        c.count("orders", 2, 0);
        c.count("orders", 1, 1);
        c.count("audit", 0, 1);
        let later = start + Duration::from_millis(400);
        assert_eq!(c.take_due(later), vec![]);
        assert_eq!(c.due_in(later), Some(Duration::from_millis(600)));
        assert_eq!(
            c.take_due(start + SECOND),
            vec![
                TopicCount { topic: "audit".into(), delivered: 0, refused: 1 },
                TopicCount { topic: "orders".into(), delivered: 3, refused: 1 },
            ]
        );
        assert_eq!(c.due_in(start + SECOND), None);
    }
}
