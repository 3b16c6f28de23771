//! The run journal, `journal.jsonl` in the run directory: what `patchlab run --resume` needs to
//! finish an interrupted run. JSON lines, appended and fsynced one at a time:
//!
//! - `header` (first line): the run id, the lab file (absolute path) and its sha256, the start time;
//! - `prepared` (once per session): the platforms (golden digests), patches (file digests) and host
//!   of that session; a resumed session must prepare exactly the same ones;
//! - `cell`: one finished cell with its full `CellResult`;
//! - `resumed`: a later session began, with its own run id (its clones and lock carry that id).
//!
//! A cell cancelled by Ctrl-C is not journaled: it did not finish and runs again on resume. A last
//! line cut short by a crash (no newline, not JSON) is ignored.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::report::{CellResult, HostRef, PatchRef, PlatformRef};

pub const FILE: &str = "journal.jsonl";
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: u32,
    pub run_id: String,
    pub lab_file: PathBuf,
    pub lab_sha256: String,
    pub started_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prepared {
    pub platforms: Vec<PlatformRef>,
    pub patches: Vec<PatchRef>,
    pub hosts: Vec<HostRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    Header(Header),
    Prepared(Prepared),
    Cell { result: Box<CellResult> },
    Resumed { run_id: String, at: String },
}

/// What a journal says about a run so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub header: Header,
    /// The first session's preparation, if it got that far.
    pub prepared: Option<Prepared>,
    pub cells: Vec<CellResult>,
    /// Run ids of every session, the first included.
    pub sessions: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {reason}")]
    Invalid { path: PathBuf, line: usize, reason: String },
}

pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Starts the journal of a new run; refuses to overwrite one already in `dir`.
    pub fn create(dir: &Path, header: &Header) -> Result<Journal, JournalError> {
        let path = dir.join(FILE);
        let file = OpenOptions::new().create_new(true).append(true).open(&path).map_err(|source| JournalError::Io { action: "create", path: path.clone(), source })?;
        let mut journal = Journal { path, file };
        journal.append(&Entry::Header(header.clone()))?;
        // The new directory entry must survive a crash too.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(journal)
    }

    /// Opens an existing journal to append to it.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        let path = dir.join(FILE);
        let file = OpenOptions::new().append(true).open(&path).map_err(|source| JournalError::Io { action: "open", path: path.clone(), source })?;
        Ok(Journal { path, file })
    }

    /// Appends one line and fsyncs it.
    pub fn append(&mut self, entry: &Entry) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(entry).expect("journal entries serialize");
        line.push(b'\n');
        let io = |source| JournalError::Io { action: "append to", path: self.path.clone(), source };
        self.file.write_all(&line).map_err(io)?;
        self.file.sync_data().map_err(|source| JournalError::Io { action: "fsync", path: self.path.clone(), source })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads the journal in `dir`.
pub fn load(dir: &Path) -> Result<State, JournalError> {
    let path = dir.join(FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| JournalError::Io { action: "read", path: path.clone(), source })?;
    parse(&path, &text)
}

pub fn parse(path: &Path, text: &str) -> Result<State, JournalError> {
    let invalid = |line: usize, reason: String| JournalError::Invalid { path: path.to_path_buf(), line, reason };
    let complete_lines = if text.ends_with('\n') { text.lines().count() } else { text.lines().count().saturating_sub(1) };
    let mut header = None;
    let mut prepared = None;
    let mut cells: Vec<CellResult> = Vec::new();
    let mut sessions = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let entry: Entry = match serde_json::from_str(line) {
            Ok(e) => e,
            // A crash while appending leaves a partial last line: that cell did not finish.
            Err(_) if i >= complete_lines => break,
            Err(e) => return Err(invalid(n, format!("not a journal entry: {e}"))),
        };
        match (entry, header.is_some()) {
            (Entry::Header(h), false) => {
                if h.format != FORMAT {
                    return Err(invalid(n, format!("journal format {} is not {FORMAT}", h.format)));
                }
                sessions.push(h.run_id.clone());
                header = Some(h);
            }
            (_, false) => return Err(invalid(n, "the first line must be the header".into())),
            (Entry::Header(_), true) => return Err(invalid(n, "a second header".into())),
            (Entry::Prepared(p), true) => {
                prepared.get_or_insert(p);
            }
            (Entry::Resumed { run_id, .. }, true) => sessions.push(run_id),
            (Entry::Cell { result }, true) => {
                // A cell journaled twice (it should not be): the later result wins.
                cells.retain(|c| !(c.platform == result.platform && c.patch == result.patch));
                cells.push(*result);
            }
        }
    }
    let header = header.ok_or_else(|| invalid(1, "empty journal: no header".into()))?;
    Ok(State { header, prepared, cells, sessions })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Conditions, Verdict};

    fn cell(platform: &str, patch: &str, verdict: Verdict) -> CellResult {
        CellResult { platform: platform.into(), patch: patch.into(), verdict, host: "qemu:///system".into(), clone: "patchlab-x-1".into(), error: None, conditions: Conditions::default(), phases: vec![], duration_ms: 1, evidence: vec![] }
    }

    fn header() -> Header {
        Header { format: FORMAT, run_id: "r1".into(), lab_file: "/lab.toml".into(), lab_sha256: "ab".into(), started_at: "2025-01-01T00:00:00Z".into() }
    }

    #[test]
    fn a_journal_round_trips_and_survives_a_cut_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path(), &header()).unwrap();
        j.append(&Entry::Cell { result: Box::new(cell("p", "a", Verdict::Pass)) }).unwrap();
        drop(j);
        assert!(Journal::create(dir.path(), &header()).is_err(), "never overwrites a journal");
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(&Entry::Resumed { run_id: "r2".into(), at: "now".into() }).unwrap();
        j.append(&Entry::Cell { result: Box::new(cell("p", "b", Verdict::Fail)) }).unwrap();
        drop(j);
        // A crash in the middle of the next append.
        let mut text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        text.push_str("{\"kind\":\"cell\",\"result\":{\"platf");
        std::fs::write(dir.path().join(FILE), &text).unwrap();
        let state = load(dir.path()).unwrap();
        assert_eq!(state.header, header());
        assert_eq!(state.sessions, ["r1", "r2"]);
        assert_eq!(state.cells, [cell("p", "a", Verdict::Pass), cell("p", "b", Verdict::Fail)]);
    }

    #[test]
    fn a_damaged_journal_is_refused() {
        let p = Path::new("journal.jsonl");
        assert!(parse(p, "").is_err());
        assert!(parse(p, "{\"kind\":\"resumed\",\"run_id\":\"x\",\"at\":\"y\"}\n").is_err(), "header first");
        let h = serde_json::to_string(&Entry::Header(header())).unwrap();
        assert!(parse(p, &format!("{h}\ngarbage\n{h}\n")).is_err(), "a bad line in the middle");
        assert!(parse(p, &format!("{h}\n")).is_ok());
    }
}
