use std::collections::HashSet;

use crate::OutboundMessage;

/// What one worker cycle does with the messages it read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Produce these now, in this order.
    pub send: Vec<OutboundMessage>,
    /// Move these to `outbox.held_messages`, in this order: their topic is paused, an earlier
    /// message of their key is waiting for a retry and they must not overtake it, or they are not
    /// due yet.
    pub hold: Vec<OutboundMessage>,
}

/// Splits one cycle's messages into what goes out now and what waits.
///
/// `retries` are the held messages that are due (at most the oldest one per key, already
/// filtered by the reader); `fresh` are the messages of the current snapshot window in delivery
/// order. A fresh message whose key has any message held (`blocked_keys`), or whose topic is
/// paused, is held behind it, so per-key order survives retries and pauses. A fresh message not
/// due yet (`scheduled`) is held too, taking its place in its key's line now, in commit order,
/// but it holds nothing back: its key's later messages go on.
pub fn plan_batch(
    retries: Vec<OutboundMessage>,
    fresh: Vec<OutboundMessage>,
    blocked_keys: &HashSet<(String, String)>,
    paused_topics: &HashSet<String>,
) -> Plan {
    let mut plan = Plan { send: retries, hold: Vec::new() };
    for m in fresh {
        let blocked = m.scheduled
            || paused_topics.contains(&m.topic)
            || m.key.as_ref().is_some_and(|k| blocked_keys.contains(&(m.topic.clone(), k.clone())));
        if blocked {
            plan.hold.push(m);
        } else {
            plan.send.push(m);
        }
    }
    plan
}

/// The line of one key in `outbox.held_messages`, by its first message in line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldLine {
    pub head_seq: i64,
    /// Failed attempts of the head: a retry goes out alone.
    pub head_attempts: i32,
    /// Seconds until the head falls due (at most 0 when it is due).
    pub due_in: f64,
    pub paused: bool,
}

/// Which keys' lines of held messages to read this cycle, as (head seq, how many from the head).
///
/// A line whose head never failed (held behind a paused topic, or behind a retry that has
/// since gone out) is read as a run, up to an even share of the batch: one message per key and
/// cycle would drain a resumed topic of four keys at about a hundred messages a second, while
/// its keys' new messages keep joining the line. A head that failed before goes out alone, so
/// that nothing of its key overtakes it should it fail again. The lines whose heads came first
/// go first; at most a batch of lines is read, and at most a batch of messages in all, so that
/// no line's head is left out of the batch by the runs of others.
pub fn held_lines_to_read(mut lines: Vec<HeldLine>, batch_size: usize) -> Vec<(i64, i32)> {
    let batch_size = batch_size.max(1);
    lines.retain(|l| l.due_in <= 0.0 && !l.paused);
    lines.sort_unstable_by_key(|l| l.head_seq);
    lines.truncate(batch_size);
    let alone = lines.iter().filter(|l| l.head_attempts > 0).count();
    let runs = lines.len() - alone;
    let share = i32::try_from((batch_size - alone) / runs.max(1)).unwrap_or(i32::MAX).max(1);
    lines.iter().map(|l| (l.head_seq, if l.head_attempts > 0 { 1 } else { share })).collect()
}

/// Ends each key's run before the first message behind its head that failed before: that one
/// leads its line next cycle, alone. `held` are in line order (held_messages' seq).
pub fn cut_held_runs(held: &mut Vec<OutboundMessage>) {
    let keep: Vec<bool> = {
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        let mut cut: HashSet<(&str, &str)> = HashSet::new();
        held.iter()
            .map(|m| {
                let Some(key) = m.key.as_deref() else { return true };
                let line = (m.topic.as_str(), key);
                if !seen.insert(line) && m.attempts > 0 {
                    cut.insert(line);
                }
                !cut.contains(&line)
            })
            .collect()
    };
    let mut keep = keep.into_iter();
    held.retain(|_| keep.next().unwrap_or(false));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: i64, topic: &str, key: Option<&str>) -> OutboundMessage {
        OutboundMessage {
            id,
            topic: topic.into(),
            key: key.map(Into::into),
            payload: Some(b"{}".to_vec()),
            headers: vec![],
            attempts: 0,
            held: false,
            scheduled: false,
        }
    }

    #[test]
    fn messages_of_a_key_with_a_held_message_wait_behind_it() {
        let blocked: HashSet<_> = [("t".to_string(), "k1".to_string())].into();
        let plan = plan_batch(
            vec![],
            vec![msg(1, "t", Some("k1")), msg(2, "t", Some("k2")), msg(3, "t", Some("k1")), msg(4, "t", None)],
            &blocked,
            &HashSet::new(),
        );
        assert_eq!(plan.send.iter().map(|m| m.id).collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(plan.hold.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn a_message_not_due_yet_is_held_and_holds_nothing_back() {
        let scheduled = |mut m: OutboundMessage| {
            m.scheduled = true;
            m
        };
        let plan = plan_batch(
            vec![],
            vec![msg(1, "t", Some("k")), scheduled(msg(2, "t", Some("k"))), msg(3, "t", Some("k"))],
            &HashSet::new(),
            &HashSet::new(),
        );
        assert_eq!(plan.send.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(plan.hold.iter().map(|m| m.id).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn the_same_key_on_another_topic_is_not_blocked() {
        let blocked: HashSet<_> = [("a".to_string(), "k".to_string())].into();
        let plan = plan_batch(vec![], vec![msg(1, "b", Some("k"))], &blocked, &HashSet::new());
        assert_eq!(plan.send.len(), 1);
    }

    #[test]
    fn paused_topics_are_held_and_retries_go_first() {
        let paused: HashSet<_> = ["p".to_string()].into();
        let plan = plan_batch(
            vec![msg(9, "t", Some("r"))],
            vec![msg(10, "p", None), msg(11, "t", Some("x"))],
            &HashSet::new(),
            &paused,
        );
        assert_eq!(plan.send.iter().map(|m| m.id).collect::<Vec<_>>(), vec![9, 11]);
        assert_eq!(plan.hold.iter().map(|m| m.id).collect::<Vec<_>>(), vec![10]);
    }

    fn line(head_seq: i64, head_attempts: i32, due: bool, paused: bool) -> HeldLine {
        HeldLine { head_seq, head_attempts, due_in: if due { -0.5 } else { 2.0 }, paused }
    }

    #[test]
    fn held_lines_are_read_as_runs_sharing_the_batch_and_a_failed_head_goes_alone() {
        let lines = vec![line(30, 0, true, false), line(10, 0, true, false), line(20, 2, true, false)];
        assert_eq!(held_lines_to_read(lines, 500), vec![(10, 249), (20, 1), (30, 249)]);
    }

    #[test]
    fn held_lines_not_due_or_paused_are_not_read_and_at_most_a_batch_of_lines_is() {
        let lines =
            vec![line(1, 0, false, false), line(2, 0, true, true), line(3, 0, true, false), line(4, 1, true, false)];
        assert_eq!(held_lines_to_read(lines.clone(), 500), vec![(3, 499), (4, 1)]);
        assert_eq!(held_lines_to_read(lines, 1), vec![(3, 1)]);
    }

    #[test]
    fn the_runs_and_the_lone_retries_together_fit_in_a_batch() {
        let lines: Vec<HeldLine> = (0..7).map(|i| line(i, if i % 3 == 0 { 1 } else { 0 }, true, false)).collect();
        for batch in [5, 7, 8, 100, 500] {
            let read = held_lines_to_read(lines.clone(), batch);
            let total: i32 = read.iter().map(|r| r.1).sum();
            assert!(total as usize <= batch, "batch {batch}: {read:?}");
            assert!(read.iter().filter(|r| [0, 3].contains(&r.0)).all(|r| r.1 == 1), "{read:?}");
        }
    }

    #[test]
    fn a_run_ends_before_a_message_that_failed_before_and_other_keys_go_on() {
        let failed = |mut m: OutboundMessage| {
            m.attempts = 1;
            m
        };
        let mut held = vec![
            msg(1, "t", Some("a")),
            msg(2, "t", Some("b")),
            failed(msg(3, "t", Some("a"))),
            msg(4, "t", Some("a")),
            msg(5, "t", Some("b")),
            failed(msg(6, "t", None)),
            failed(msg(7, "u", Some("a"))),
        ];
        cut_held_runs(&mut held);
        assert_eq!(held.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1, 2, 5, 6, 7]);
    }
}
