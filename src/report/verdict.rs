//! Verdict rules: plain functions over statuses, tested table by table.

use serde::{Deserialize, Serialize};

/// The status of one condition of one cell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Fail,
    /// Not evaluated because an earlier condition did not pass.
    #[default]
    Skipped,
    /// The lab (clone, agent, host) broke: says nothing about the patch.
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
    Error,
}

impl Verdict {
    /// The documented exit codes of `patchlab run`: 0 pass, 1 a patch failed, 3 the lab broke.
    pub fn exit_code(self) -> i32 {
        match self {
            Verdict::Pass => 0,
            Verdict::Fail => 1,
            Verdict::Error => 3,
        }
    }
}

/// A cell passes when every condition passed; any error makes it `error` (the lab is at fault),
/// else any failure makes it `fail`. A skipped condition never passes a cell.
pub fn cell_verdict(statuses: &[Status]) -> Verdict {
    if statuses.contains(&Status::Error) {
        Verdict::Error
    } else if statuses.contains(&Status::Fail) {
        Verdict::Fail
    } else if !statuses.is_empty() && statuses.iter().all(|s| *s == Status::Pass) {
        Verdict::Pass
    } else {
        Verdict::Error
    }
}

/// The run passes only when it is complete, coverage did not fail and every cell passed. A failed
/// cell or failed coverage is a verdict on the patch and outranks errors elsewhere; otherwise any
/// error, or an incomplete run, is `error`. Coverage `skipped` (no inventory) does not fail a run:
/// `patchlab gate` is where condition 1 is required.
pub fn run_verdict(complete: bool, cells: &[Verdict], coverage: Status) -> Verdict {
    if cells.contains(&Verdict::Fail) || (complete && coverage == Status::Fail) {
        Verdict::Fail
    } else if !complete || cells.is_empty() || cells.contains(&Verdict::Error) {
        Verdict::Error
    } else {
        Verdict::Pass
    }
}

#[cfg(test)]
mod tests {
    use super::Status::*;
    use super::*;

    #[test]
    fn cell_verdicts() {
        let table: &[(&[Status], Verdict)] = &[
            (&[Pass, Pass, Pass, Pass, Pass], Verdict::Pass),
            (&[Pass, Fail, Skipped, Skipped, Skipped], Verdict::Fail),
            (&[Pass, Pass, Pass, Fail, Pass], Verdict::Fail),
            (&[Pass, Pass, Error, Skipped, Skipped], Verdict::Error),
            (&[Pass, Fail, Error, Skipped, Skipped], Verdict::Error),
            (&[Pass, Pass, Pass, Pass, Skipped], Verdict::Error),
            (&[], Verdict::Error),
        ];
        for (statuses, want) in table {
            assert_eq!(cell_verdict(statuses), *want, "{statuses:?}");
        }
    }

    #[test]
    fn run_verdicts() {
        use Verdict::{Error as E, Fail as F, Pass as P};
        let table: &[(bool, &[Verdict], Status, Verdict)] = &[
            (true, &[P, P], Pass, P),
            (true, &[P, P], Skipped, P),
            (true, &[P, P], Fail, F),
            (true, &[P, F], Pass, F),
            (true, &[E, F], Pass, F),
            (true, &[P, E], Pass, E),
            (true, &[P, E], Fail, F),
            (false, &[P, P], Pass, E),
            (false, &[P, P], Fail, E),
            (false, &[P, F], Skipped, F),
            (true, &[], Pass, E),
        ];
        for (complete, cells, coverage, want) in table {
            assert_eq!(run_verdict(*complete, cells, *coverage), *want, "complete={complete} {cells:?} coverage={coverage:?}");
        }
    }
}
