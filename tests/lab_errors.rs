//! Every invalid lab in fixtures/labs/invalid/ is refused with a message that says where and what,
//! snapshotted so that a change of wording is reviewed; every lab in labs/ loads.
//!
//! Paths are given relative to the crate root (the working directory of integration tests), so the
//! messages, which name the file, read the same on every machine.

use std::path::{Path, PathBuf};

use patchlab::lab::Lab;

/// Errors about the file as a whole, which have no line to point at.
const WHOLE_FILE_ERRORS: &[&str] = &["empty-file", "no-platforms", "no-patches"];

fn tomls_in(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| Path::new(dir).join(p.file_name().unwrap()))
        .collect();
    files.sort();
    files
}

#[test]
fn every_invalid_lab_is_refused_with_where_and_what() {
    assert_eq!(std::env::current_dir().unwrap(), Path::new(env!("CARGO_MANIFEST_DIR")), "integration tests run in the crate root");
    let files = tomls_in("fixtures/labs/invalid");
    assert!(files.len() >= 25, "the corpus has {} files", files.len());
    for &name in WHOLE_FILE_ERRORS {
        assert!(files.iter().any(|f| f.file_stem().unwrap() == name), "{name}.toml is in the corpus");
    }
    for path in &files {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let error = match Lab::load(path) {
            Ok(_) => panic!("{} loaded, but it is in the invalid corpus", path.display()),
            Err(e) => e,
        };
        assert_eq!(error.file, path.display().to_string());
        if WHOLE_FILE_ERRORS.contains(&name.as_str()) {
            assert_eq!(error.line, 0, "{name} is a whole-file error:\n{error}");
        } else {
            assert!(error.line > 0 && error.column > 0, "{name} says where:\n{error}");
            assert!(error.source_line.is_some(), "{name} shows the line:\n{error}");
        }
        let rendered = error.to_string();
        assert!(rendered.starts_with(&format!("{}:", path.display())), "{name}: {rendered}");
        insta::assert_snapshot!(name, rendered);
    }
}

#[test]
fn every_lab_in_labs_loads() {
    let files = tomls_in("labs");
    assert!(!files.is_empty());
    for path in files {
        let lab = Lab::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert!(!lab.platforms.is_empty() && !lab.patches.is_empty(), "{}", path.display());
    }
}

#[test]
fn the_default_lab_reads_as_documented() {
    use patchlab::lab::{CheckKind, PatchSource, PlatformSource};
    use std::time::Duration;
    let lab = Lab::load(Path::new("labs/default.toml")).unwrap();
    assert_eq!(lab.name, "default");
    let platforms: Vec<_> = lab.platforms.iter().map(|p| (p.name.as_str(), &p.source)).collect();
    assert_eq!(platforms, [("debian-12", &PlatformSource::Image("labs/../images/debian-12.toml".into())), ("debian-13", &PlatformSource::Image("labs/../images/debian-13.toml".into()))]);
    assert_eq!(lab.patches[0].sources, [PatchSource::Tree("labs/../fixtures/patches/good".into())]);
    let web = lab.checks.iter().find(|c| c.name == "web").unwrap();
    assert_eq!(web.kind, CheckKind::Http { port: 80, path: "/".into(), status: 200, body_contains: None });
    // Defaults: checks 10s and 2 retries, settings 10m.
    assert_eq!((web.timeout, web.retries), (Duration::from_secs(10), 2));
    assert_eq!((lab.settings.install_timeout, lab.settings.remove_timeout), (Duration::from_secs(600), Duration::from_secs(600)));
    assert_eq!(lab.guest_ports(), [80]);
}
