//! The text forms of the Postgres values the worker keeps between its transactions: a
//! `pg_snapshot` (`xmin:xmax:xip,...`) and a ctid (`(block,offset)`).

/// The parts of a `pg_snapshot` the worker needs to tell which transactions it has settled:
/// every transaction before `xmax` and not in `xip` is visible in it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SnapshotBounds {
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl SnapshotBounds {
    /// Reads `pg_snapshot_out`'s form: `xmin:xmax:` then the in-progress ids, comma-separated.
    pub fn parse(text: &str) -> Option<SnapshotBounds> {
        let mut parts = text.split(':');
        let (xmin, xmax, xip) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let (_xmin, xmax): (u64, u64) = (xmin.parse().ok()?, xmax.parse().ok()?);
        let xip = xip.split(',').filter(|x| !x.is_empty()).map(str::parse).collect::<Result<Vec<u64>, _>>().ok()?;
        Some(SnapshotBounds { xmax, xip })
    }
}

/// A ctid's block and offset from its text form, `(block,offset)`.
pub fn parse_tid(text: &str) -> Option<(u32, u16)> {
    let (block, offset) = text.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
    Some((block.parse().ok()?, offset.parse().ok()?))
}

/// A ctid's text form, as `ctid::text` gives it.
pub fn tid_text(block: u32, offset: u16) -> String {
    format!("({block},{offset})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_gives_its_xmax_and_its_in_progress_transactions() {
        assert_eq!(SnapshotBounds::parse("740:745:740,742"), Some(SnapshotBounds { xmax: 745, xip: vec![740, 742] }));
        assert_eq!(SnapshotBounds::parse("1:1:"), Some(SnapshotBounds { xmax: 1, xip: vec![] }));
        // Past 2^32: the 64-bit ids pg_snapshot carries, epoch included.
        assert_eq!(
            SnapshotBounds::parse("4294967400:4294967410:4294967401"),
            Some(SnapshotBounds { xmax: 4_294_967_410, xip: vec![4_294_967_401] })
        );
    }

    #[test]
    fn anything_else_is_not_a_snapshot() {
        for text in ["", "1:2", "1:2:3:4", "a:2:", "1:2:x", "1:2:3,,x", "-1:2:"] {
            assert_eq!(SnapshotBounds::parse(text), None, "{text}");
        }
    }

    #[test]
    fn a_ctid_reads_back_as_it_was_written() {
        assert_eq!(parse_tid("(0,1)"), Some((0, 1)));
        assert_eq!(parse_tid(&tid_text(4_000_000_000, 291)), Some((4_000_000_000, 291)));
        for text in ["", "(0,1", "0,1)", "(0;1)", "(a,1)", "(1,70000)", "(-1,1)"] {
            assert_eq!(parse_tid(text), None, "{text}");
        }
    }
}
