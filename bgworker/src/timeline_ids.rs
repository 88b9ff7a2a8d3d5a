//! Message ids that a new timeline does not give again.
//!
//! After a failover to an asynchronous standby, or a recovery to a point in time, the id sequence
//! is where the WAL that reached the new server left it. Ids the old primary gave after that may
//! already be in Kafka, and a consumer that drops redeliveries by `pg_outbox_message_id` would
//! drop the new messages given them again. Postgres starts a new timeline at every promotion and
//! at the end of every archive recovery, so the first id given on a timeline other than the one
//! recorded moves the sequence 2^40 ahead: past every id the old one can have given since (four
//! months of 100,000 messages a second). It moves it at least to (N - 1) * 2^40 on timeline N as
//! well: a new timeline's number is above every one before it in the archive, so a recovery to a
//! point before an earlier failover also lands above what the timeline it abandons gave.

/// How far the sequence moves ahead when the timeline changes.
pub const IDS_PER_TIMELINE: i64 = 1 << 40;

/// The lowest id timeline `timeline` gives, or `None` where every id is one: timeline 1, and
/// timelines so high their first id is past what a bigint holds.
pub fn first_id_of_timeline(timeline: u32) -> Option<i64> {
    match timeline {
        0 | 1 => None,
        n => i64::from(n - 1).checked_mul(IDS_PER_TIMELINE),
    }
}

/// Where the sequence moves when ids are first given on `timeline` and it stands at `last_value`
/// (its MAXVALUE and INCREMENT beside it); `None` if it cannot: it counts down, or may not go
/// that far.
pub fn id_after_timeline_change(last_value: i64, timeline: u32, max_value: i64, increment: i64) -> Option<i64> {
    if increment <= 0 {
        return None;
    }
    let ahead = last_value.checked_add(IDS_PER_TIMELINE)?;
    let target = ahead.max(first_id_of_timeline(timeline).unwrap_or(0));
    (target <= max_value).then_some(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_timeline_has_2_40_ids_of_its_own_up_to_what_a_bigint_holds() {
        assert_eq!(first_id_of_timeline(1), None);
        assert_eq!(first_id_of_timeline(2), Some(1 << 40));
        assert_eq!(first_id_of_timeline(3), Some(2 << 40));
        assert_eq!(first_id_of_timeline(1 << 23), Some((i64::from(1u32 << 23) - 1) << 40));
        assert_eq!(first_id_of_timeline((1 << 23) + 1), None, "past a bigint");
        assert_eq!(first_id_of_timeline(u32::MAX), None);
    }

    #[test]
    fn a_new_timeline_moves_the_sequence_2_40_ahead_and_at_least_to_its_own_ids() {
        assert_eq!(id_after_timeline_change(120, 2, i64::MAX, 1), Some((1 << 40) + 120));
        // After pg_upgrade (which starts timeline 1 again) or anything else that left the
        // sequence beyond the timeline's own ids, it still moves ahead.
        assert_eq!(id_after_timeline_change(5 << 40, 1, i64::MAX, 1), Some(6 << 40));
        assert_eq!(id_after_timeline_change(5 << 40, 3, i64::MAX, 1), Some(6 << 40));
        // A recovery to a point before an earlier failover (timeline 2 moved to 2^40 + 120 and
        // gave ids from there): timeline 3 starts above all of them.
        assert_eq!(id_after_timeline_change(100, 3, i64::MAX, 1), Some(2 << 40));
    }

    #[test]
    fn a_sequence_that_cannot_move_that_far_is_left_where_it_is() {
        assert_eq!(id_after_timeline_change(120, 2, 1_000_000, 1), None, "MAXVALUE");
        assert_eq!(id_after_timeline_change(120, 2, i64::MAX, -1), None, "counting down");
        assert_eq!(id_after_timeline_change(i64::MAX - 5, 2, i64::MAX, 1), None, "past a bigint");
    }
}
