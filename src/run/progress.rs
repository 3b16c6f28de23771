//! What a run tells whoever watches it (the CLI's progress lines): cells starting, their phases,
//! cells finishing. The library only calls these; rendering them is the CLI's job.

use crate::report::CellResult;

/// One cell of the lab: its position in the lab's platform × patch grid (from 1), and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellId {
    pub index: usize,
    pub platform: String,
    pub patch: String,
    pub host: String,
}

/// Notified from the cells' threads; implementations must be cheap and must not block.
pub trait Observer: Send + Sync {
    /// The run knows how many cells it will run now, and how many finished in earlier sessions.
    fn planned(&self, _to_run: usize, _already_done: usize) {}
    fn cell_started(&self, _cell: &CellId) {}
    /// The cell entered a phase: clone, baseline, deliver, install, checks, burn-in, remove,
    /// fingerprint, teardown.
    fn cell_phase(&self, _cell: &CellId, _phase: &str) {}
    fn cell_finished(&self, _cell: &CellId, _result: &CellResult) {}
}

/// Watches nothing.
pub struct Quiet;

impl Observer for Quiet {}
