//! Message ids that a new timeline does not give again.
//!
//! After a failover to an asynchronous standby, or a recovery to a point in time, the id sequence
//! is where the WAL that reached the new server left it. Ids the old primary gave after that may
//! already be in Kafka, and a consumer that drops redeliveries by `pg_outbox_message_id` would
//! drop the new messages given them again. Postgres starts a new timeline at every promotion and
//! at the end of every archive recovery, numbered above every timeline before it in the archive.
//! So the first id given on timeline N, when ids were last given on timeline R, moves the
//! sequence (N - R) * 2^40 ahead: past every id timeline R can have given since (four months of
//! 100,000 messages a second), and two timelines that leave R (two recoveries, two standbys
//! promoted) land 2^40 apart, less the distance between the points they left it at.

/// How far the sequence moves ahead for each timeline number it passes.
pub const IDS_PER_TIMELINE: i64 = 1 << 40;

/// Where the sequence moves when ids are first given on `timeline`, last given on `recorded`, and
/// it stands at `last_value` (its MAXVALUE and INCREMENT beside it); `None` if it cannot: it
/// counts down, or may not go that far. A timeline below the recorded one (`pg_upgrade` starts
/// timeline 1 again) moves it 2^40.
pub fn id_after_timeline_change(
    last_value: i64,
    recorded: u32,
    timeline: u32,
    max_value: i64,
    increment: i64,
) -> Option<i64> {
    if increment <= 0 {
        return None;
    }
    let steps = i64::from(timeline.saturating_sub(recorded).max(1));
    let target = last_value.checked_add(steps.checked_mul(IDS_PER_TIMELINE)?)?;
    (target <= max_value).then_some(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_timeline_moves_the_sequence_2_40_ahead_for_each_timeline_number_it_passes() {
        assert_eq!(id_after_timeline_change(120, 1, 2, i64::MAX, 1), Some((1 << 40) + 120));
        // Two recoveries from timeline 1 at nearly the same point (timelines 2, then 3): 2^40 apart.
        assert_eq!(id_after_timeline_change(125, 1, 3, i64::MAX, 1), Some((2 << 40) + 125));
        // pg_upgrade starts timeline 1 again.
        assert_eq!(id_after_timeline_change(5 << 40, 4, 1, i64::MAX, 1), Some(6 << 40));
    }

    #[test]
    fn a_sequence_that_cannot_move_that_far_is_left_where_it_is() {
        assert_eq!(id_after_timeline_change(120, 1, 2, 1_000_000, 1), None, "MAXVALUE");
        assert_eq!(id_after_timeline_change(120, 1, 2, i64::MAX, -1), None, "counting down");
        assert_eq!(id_after_timeline_change(i64::MAX - 5, 1, 2, i64::MAX, 1), None, "past a bigint");
        assert_eq!(id_after_timeline_change(0, 1, u32::MAX, i64::MAX, 1), None, "past a bigint");
    }
}
