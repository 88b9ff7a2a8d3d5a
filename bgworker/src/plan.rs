use std::collections::HashSet;

use crate::OutboundMessage;

/// What one worker cycle does with the messages it read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Produce these now, in this order.
    pub send: Vec<OutboundMessage>,
    /// Move these to `outbox.held_messages`, in this order: their topic is paused, or an earlier
    /// message of their key is waiting for a retry and they must not overtake it.
    pub hold: Vec<OutboundMessage>,
}

/// Splits one cycle's messages into what goes out now and what waits.
///
/// `retries` are the held messages that are due (at most the oldest one per key, already
/// filtered by the reader); `fresh` are the messages of the current snapshot window in delivery
/// order. A fresh message whose key has any message held (`blocked_keys`), or whose topic is
/// paused, is held behind it, so per-key order survives retries and pauses.
pub fn plan_batch(
    retries: Vec<OutboundMessage>,
    fresh: Vec<OutboundMessage>,
    blocked_keys: &HashSet<(String, String)>,
    paused_topics: &HashSet<String>,
) -> Plan {
    let mut plan = Plan { send: retries, hold: Vec::new() };
    for m in fresh {
        let blocked = paused_topics.contains(&m.topic)
            || m.key.as_ref().is_some_and(|k| blocked_keys.contains(&(m.topic.clone(), k.clone())));
        if blocked {
            plan.hold.push(m);
        } else {
            plan.send.push(m);
        }
    }
    plan
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
}
