//! A run is alive while its process holds an exclusive lock on `runs/<run-id>.lock`. The lock dies
//! with the process, however it ends, so leftovers of dead runs can be told from a live run's.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use super::{Dirs, HypervisorError};

pub struct RunLock {
    pub run_id: String,
    path: PathBuf,
    _file: File,
}

impl RunLock {
    pub fn acquire(dirs: &Dirs, run_id: &str) -> Result<RunLock, HypervisorError> {
        let runs = dirs.runs();
        std::fs::create_dir_all(&runs).map_err(HypervisorError::io(format!("create {}", runs.display())))?;
        let path = runs.join(format!("{run_id}.lock"));
        let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(HypervisorError::io(format!("open {}", path.display())))?;
        file.try_lock().map_err(|e| HypervisorError::Io { action: format!("lock {}", path.display()), source: std::io::Error::other(e.to_string()) })?;
        Ok(RunLock { run_id: run_id.to_string(), path, _file: file })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// True while some process holds the run's lock.
pub fn is_alive(dirs: &Dirs, run_id: &str) -> bool {
    if run_id.is_empty() || run_id.contains('/') {
        return false;
    }
    let path: &Path = &dirs.runs().join(format!("{run_id}.lock"));
    match File::open(path) {
        Err(_) => false,
        Ok(file) => matches!(file.try_lock(), Err(TryLockError::WouldBlock)),
    }
}

/// A fresh run id: time-ordered, unique enough, safe in domain names and paths.
pub fn new_run_id() -> String {
    let now = jiff::Timestamp::now();
    let short = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}", now.strftime("%Y%m%dT%H%M%SZ"), &short[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_alive_exactly_while_its_lock_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let dirs = Dirs::new(dir.path().into());
        let id = new_run_id();
        assert!(!is_alive(&dirs, &id));
        let lock = RunLock::acquire(&dirs, &id).unwrap();
        assert!(is_alive(&dirs, &id));
        drop(lock);
        assert!(!is_alive(&dirs, &id));
        assert!(!is_alive(&dirs, "../etc"));
    }
}
