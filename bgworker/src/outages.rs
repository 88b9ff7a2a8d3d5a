use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::Backoff;

/// The clusters of `outbox.destinations` found unreachable, each with when to try it again.
///
/// With messages routed to several clusters, one that is down must not stop the others: its
/// messages wait in `outbox.held_messages` until it is tried again (then they go first in their
/// keys' lines), while the rest of each batch goes out. A cluster is tried again after the
/// reconnect backoff, doubling with each failed try; in between, its messages are not sent at all,
/// so a batch does not wait out a dead cluster's timeouts.
#[derive(Debug)]
pub struct ClusterOutages<K> {
    down: HashMap<K, ClusterOutage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOutage {
    pub since: Instant,
    pub failures: u32,
    pub retry_at: Instant,
    pub error: String,
}

/// A cluster whose retry falls due this close is tried now: its held messages fall due by the
/// database's clock, read a little earlier than the worker's, and would otherwise be read and put
/// back once more for the last few milliseconds.
const EARLY: Duration = Duration::from_millis(100);

impl<K: Eq + Hash + Clone> Default for ClusterOutages<K> {
    fn default() -> Self {
        ClusterOutages { down: HashMap::new() }
    }
}

impl<K: Eq + Hash + Clone> ClusterOutages<K> {
    /// If `cluster` is down and not to be tried yet: its outage, and how long until its next try.
    pub fn waiting(&self, cluster: &K, now: Instant) -> Option<(&ClusterOutage, Duration)> {
        let outage = self.down.get(cluster)?;
        let wait = outage.retry_at.saturating_duration_since(now);
        (wait > EARLY).then_some((outage, wait))
    }

    /// Whether no cluster is down.
    pub fn is_empty(&self) -> bool {
        self.down.is_empty()
    }

    /// How many clusters are down.
    pub fn len(&self) -> usize {
        self.down.len()
    }

    /// Forgets the clusters no longer routed to: a route changed or removed while its cluster was
    /// down must not leave it down for ever.
    pub fn retain(&mut self, mut routed: impl FnMut(&K) -> bool) {
        self.down.retain(|k, _| routed(k));
    }

    /// Whether `cluster` is down (its next try is then a probe first).
    pub fn is_down(&self, cluster: &K) -> bool {
        self.down.contains_key(cluster)
    }

    /// A try failed. Returns how long the cluster's messages wait now.
    pub fn failed(&mut self, cluster: &K, error: &str, now: Instant, backoff: &Backoff) -> Duration {
        let outage = self.down.entry(cluster.clone()).or_insert_with(|| ClusterOutage {
            since: now,
            failures: 0,
            retry_at: now,
            error: String::new(),
        });
        outage.failures += 1;
        let wait = backoff.after_failures(outage.failures);
        outage.retry_at = now + wait;
        outage.error = error.to_string();
        wait
    }

    /// A try went through: the outage is over. Returns how long it lasted, if there was one.
    pub fn recovered(&mut self, cluster: &K, now: Instant) -> Option<Duration> {
        self.down.remove(cluster).map(|o| now.saturating_duration_since(o.since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: Backoff = Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(8) };

    #[test]
    fn a_cluster_that_failed_waits_out_a_backoff_that_doubles_with_each_failed_try() {
        let mut outages = ClusterOutages::default();
        let t0 = Instant::now();
        assert!(outages.waiting(&"b", t0).is_none());
        assert_eq!(outages.failed(&"b", "refused", t0, &BACKOFF), Duration::from_secs(1));
        let (outage, wait) = outages.waiting(&"b", t0).expect("down");
        assert_eq!((outage.error.as_str(), wait), ("refused", Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        assert!(outages.waiting(&"b", t1).is_none(), "tried again once its wait is over");
        assert!(outages.is_down(&"b"), "but still down until a try goes through");
        assert_eq!(outages.failed(&"b", "still refused", t1, &BACKOFF), Duration::from_secs(2));
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(outages.failed(&"b", "still refused", t2, &BACKOFF), Duration::from_secs(4));
        assert_eq!(outages.failed(&"b", "still refused", t2, &BACKOFF), Duration::from_secs(8));
        assert_eq!(outages.failed(&"b", "still refused", t2, &BACKOFF), Duration::from_secs(8), "capped");
        assert!(outages.waiting(&"a", t2).is_none(), "other clusters are not affected");
    }

    #[test]
    fn a_try_due_within_a_few_milliseconds_is_made_now() {
        let mut outages = ClusterOutages::default();
        let t0 = Instant::now();
        outages.failed(&"b", "refused", t0, &BACKOFF);
        assert!(outages.waiting(&"b", t0 + Duration::from_millis(850)).is_some());
        assert!(outages.waiting(&"b", t0 + Duration::from_millis(950)).is_none());
    }

    #[test]
    fn recovery_ends_the_outage_once_and_says_how_long_it_lasted() {
        let mut outages = ClusterOutages::default();
        let t0 = Instant::now();
        outages.failed(&"b", "refused", t0, &BACKOFF);
        outages.failed(&"b", "refused", t0 + Duration::from_secs(1), &BACKOFF);
        assert_eq!(outages.recovered(&"b", t0 + Duration::from_secs(5)), Some(Duration::from_secs(5)));
        assert_eq!(outages.recovered(&"b", t0 + Duration::from_secs(6)), None);
        assert!(!outages.is_down(&"b"));
        let again = outages.failed(&"b", "refused", t0 + Duration::from_secs(7), &BACKOFF);
        assert_eq!(again, Duration::from_secs(1), "a new outage starts its backoff over");
    }

    #[test]
    fn clusters_no_longer_routed_to_are_forgotten() {
        let mut outages = ClusterOutages::default();
        let t0 = Instant::now();
        outages.failed(&"a", "refused", t0, &BACKOFF);
        outages.failed(&"b", "refused", t0, &BACKOFF);
        outages.retain(|k| *k == "b");
        assert_eq!(outages.len(), 1);
        assert!(!outages.is_down(&"a"));
        assert!(outages.is_down(&"b"));
    }
}
