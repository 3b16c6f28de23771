//! The lab file: what to qualify (patches), where (platforms), and how to tell it still works
//! (checks). Loading does no IO beyond reading the file and checking that referenced paths exist.

mod error;
mod schema;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::LabError;
pub use schema::{CheckKind, RawLab};

use schema::{RawCheck, RawPatch, RawPlatform};

#[derive(Debug, Clone)]
pub struct Lab {
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    pub platforms: Vec<Platform>,
    pub patches: Vec<Patch>,
    pub checks: Vec<Check>,
    pub settings: Settings,
    pub inventory: Option<PathBuf>,
    /// Coverage must exceed this share of the inventory's hosts, in percent.
    pub coverage_threshold_percent: u32,
    pub removal: Removal,
    /// libvirt URIs to spread cells over, round-robin; empty: the run's `--connect` URI.
    pub hosts: Vec<String>,
}

/// What the clean-removal proof watches beyond the defaults, and which differences are expected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Removal {
    pub watch: Vec<String>,
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlatformSource {
    /// A patchlab image recipe, built and booted once into a golden state.
    Image(PathBuf),
    /// A libvirt domain of the user's, and the snapshot of it to start every clone from.
    DomainSnapshot { domain: String, snapshot: String },
}

#[derive(Debug, Clone)]
pub struct Platform {
    pub name: String,
    pub source: PlatformSource,
    /// What it simulates (os, version, arch), when the lab says; image platforms also take it from their recipe.
    pub identity: Option<(String, String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchSource {
    /// A .deb file as given.
    File(PathBuf),
    /// A package tree (DEBIAN/control and files) that `dpkg-deb --build` turns into a .deb.
    Tree(PathBuf),
}

#[derive(Debug, Clone)]
pub struct Patch {
    pub name: String,
    pub kind: PatchKind,
    pub sources: Vec<PatchSource>,
    /// Pinned digests by file name; delivery fails when a file does not have its pin.
    pub pins: std::collections::BTreeMap<String, String>,
    pub rollback: Vec<PatchSource>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum PatchKind {
    /// New packages: `dpkg --install`, removed with `dpkg --purge`.
    Deb,
    /// Newer versions of installed packages: the previous versions are kept and reinstalled on removal.
    Upgrade,
    /// Anything else: files delivered, then an install and a remove command.
    Script { install: Vec<String>, remove: Vec<String> },
}

impl PatchKind {
    /// The kind as the lab file and the report write it.
    pub fn name(&self) -> &'static str {
        match self {
            PatchKind::Deb => "deb",
            PatchKind::Upgrade => "upgrade",
            PatchKind::Script { .. } => "script",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub kind: CheckKind,
    pub timeout: Duration,
    pub retries: u32,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub install_timeout: Duration,
    pub remove_timeout: Duration,
    pub require_baseline: bool,
    pub burn_in: Option<Duration>,
    pub burn_in_interval: Duration,
}

impl Lab {
    /// Guest ports the checks reach from the host; each clone forwards these.
    pub fn guest_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.checks.iter().filter_map(|c| c.kind.guest_port()).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    pub fn load(path: &Path) -> Result<Lab, LabError> {
        let text = std::fs::read_to_string(path).map_err(|e| LabError::unreadable(path, &e))?;
        Lab::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Lab, LabError> {
        use sha2::{Digest, Sha256};
        let err = |span: Range<usize>, message: String| LabError::at(path, text, span, message);
        let whole = |message: String| LabError::whole_file(path, message);
        if text.trim().is_empty() {
            return Err(whole("the lab file is empty: a lab needs at least one [platforms.NAME] table and one [patches.NAME] table (see docs/lab-format.md)".into()));
        }
        let raw: RawLab = toml::from_str(text).map_err(|e| LabError::from_toml(path, text, &e))?;
        let base = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if let Some(name) = &raw.name {
            check_name(name.get_ref()).map_err(|m| err(name.span(), format!("lab `name`: {m}")))?;
        }
        if raw.platforms.is_empty() {
            return Err(whole("the lab has no platforms: add at least one [platforms.NAME] table with `image` or `domain` + `snapshot`".into()));
        }
        if raw.patches.is_empty() {
            return Err(whole("the lab has no patches: add at least one [patches.NAME] table with `kind = \"deb\"` and `files` or `package_trees`".into()));
        }
        let existing = |p: &toml::Spanned<String>, what: &str| -> Result<PathBuf, LabError> {
            if p.get_ref().trim().is_empty() {
                return Err(err(p.span(), format!("the {what} path is empty")));
            }
            let full = base.join(p.get_ref());
            if !full.exists() {
                return Err(err(p.span(), format!("{what} `{}` does not exist (looked for {}; paths are relative to the lab file's directory)", p.get_ref(), full.display())));
            }
            Ok(full)
        };
        let root = LabRoot::of(base);
        // Patch paths must exist; a relative one must also stay, symlinks followed, inside the lab root.
        // An absolute path is an explicit reference to a file on this host and is taken as written.
        // See "Paths" in docs/lab-format.md.
        let patch_path = |p: &toml::Spanned<String>, what: &str| -> Result<PathBuf, LabError> {
            let full = existing(p, what)?;
            if Path::new(p.get_ref()).is_absolute() {
                return Ok(full);
            }
            let root = root.as_ref().map_err(|e| whole(format!("cannot resolve the lab file's directory {}: {e}", base.display())))?;
            let canonical = full.canonicalize().map_err(|e| err(p.span(), format!("cannot resolve {what} `{}`: {e}", p.get_ref())))?;
            if !canonical.starts_with(&root.dir) {
                return Err(err(
                    p.span(),
                    format!("{what} `{}` is outside the lab root, {}: relative patch paths must stay inside it; write an absolute path to use a file elsewhere on this host", p.get_ref(), root.describe()),
                ));
            }
            Ok(full)
        };

        let mut platforms = Vec::new();
        for (key, RawPlatform { image, domain, snapshot, os, version, arch }) in &raw.platforms {
            let name = key.get_ref();
            check_name(name).map_err(|m| err(key.span(), format!("platform name: {m}")))?;
            let source = match (image, domain, snapshot) {
                (Some(image), None, None) => {
                    let recipe = existing(image, "image recipe")?;
                    if !recipe.is_file() {
                        return Err(err(image.span(), format!("platform `{name}`: image recipe `{}` is a directory, not a recipe file like \"../images/debian-12.toml\"", image.get_ref())));
                    }
                    PlatformSource::Image(recipe)
                }
                (None, Some(domain), Some(snapshot)) => {
                    for (key, value) in [("domain", domain), ("snapshot", snapshot)] {
                        if value.get_ref().trim().is_empty() {
                            return Err(err(value.span(), format!("platform `{name}`: `{key}` is empty")));
                        }
                    }
                    PlatformSource::DomainSnapshot { domain: domain.get_ref().clone(), snapshot: snapshot.get_ref().clone() }
                }
                (None, Some(domain), None) => {
                    return Err(err(domain.span(), format!("platform `{name}` names domain `{}` but no `snapshot`: add `snapshot = \"NAME\"`, the snapshot of that domain every clone starts from", domain.get_ref())))
                }
                (None, None, Some(snapshot)) => {
                    return Err(err(snapshot.span(), format!("platform `{name}` names snapshot `{}` but no `domain`: add `domain = \"NAME\"`, the libvirt domain the snapshot belongs to", snapshot.get_ref())))
                }
                (Some(image), Some(_), _) | (Some(image), _, Some(_)) => {
                    return Err(err(image.span(), format!("platform `{name}` has both `image` and `domain`/`snapshot`: give either an image recipe or a libvirt domain and snapshot, not both")))
                }
                (None, None, None) => {
                    return Err(err(key.span(), format!("platform `{name}` has no source: give `image = \"path/to/recipe.toml\"`, or `domain` and `snapshot` of a libvirt domain")))
                }
            };
            let identity = match (os, version, arch) {
                (None, None, None) => None,
                (Some(os), Some(version), Some(arch)) => Some((os.get_ref().clone(), version.get_ref().clone(), arch.get_ref().clone())),
                _ => return Err(err(key.span(), format!("platform `{name}`: give all of `os`, `version` and `arch` (like \"debian\", \"12\", \"x86_64\"), or none"))),
            };
            platforms.push(Platform { name: name.clone(), source, identity });
        }

        let mut patches = Vec::new();
        for (key, RawPatch { kind, files, package_trees, sha256, rollback_files, install, remove }) in &raw.patches {
            let name = key.get_ref();
            check_name(name).map_err(|m| err(key.span(), format!("patch name: {m}")))?;
            let Some(kind) = kind else {
                return Err(err(key.span(), format!("patch `{name}` has no `kind`: add `kind = \"deb\"`, `\"upgrade\"` or `\"script\"`")));
            };
            let mut sources = Vec::new();
            for f in files {
                let file = patch_path(f, "patch file")?;
                if !file.is_file() {
                    return Err(err(f.span(), format!("patch `{name}`: patch file `{}` is a directory: list .deb files under `files` and package trees under `package_trees`", f.get_ref())));
                }
                sources.push(PatchSource::File(file));
            }
            for t in package_trees {
                let dir = patch_path(t, "package tree")?;
                if !dir.is_dir() {
                    return Err(err(t.span(), format!("patch `{name}`: package tree `{}` is a file, not a directory: list .deb files under `files`", t.get_ref())));
                }
                if !dir.join("DEBIAN/control").is_file() {
                    return Err(err(t.span(), format!("patch `{name}`: package tree `{}` has no DEBIAN/control: a package tree is the directory `dpkg-deb --build` takes, with DEBIAN/control at its top", t.get_ref())));
                }
                sources.push(PatchSource::Tree(dir));
            }
            let script = *kind.get_ref() == schema::RawPatchKind::Script;
            if sources.is_empty() && !script {
                return Err(err(key.span(), format!("patch `{name}` has no `files` and no `package_trees`: give at least one .deb file or package tree")));
            }
            let mut rollback = Vec::new();
            for f in rollback_files {
                if *kind.get_ref() != schema::RawPatchKind::Upgrade {
                    return Err(err(f.span(), format!("patch `{name}`: `rollback_files` apply to `upgrade` patches only")));
                }
                rollback.push(PatchSource::File(patch_path(f, "rollback file")?));
            }
            for (key_name, value) in [("install", install), ("remove", remove)] {
                if let Some(v) = value {
                    if !script {
                        return Err(err(v.span(), format!("patch `{name}`: `{key_name}` applies to `script` patches only; deb and upgrade patches use dpkg")));
                    }
                    match v.get_ref().first() {
                        None => return Err(err(v.span(), format!("patch `{name}`: `{key_name}` is empty: give the command and its arguments"))),
                        Some(p) if !p.starts_with('/') => return Err(err(v.span(), format!("patch `{name}`: the command `{p}` must be an absolute path in the guest (commands run without a shell or PATH)"))),
                        _ => {}
                    }
                }
            }
            let kind = match kind.get_ref() {
                schema::RawPatchKind::Deb => PatchKind::Deb,
                schema::RawPatchKind::Upgrade => PatchKind::Upgrade,
                schema::RawPatchKind::Script => match (install, remove) {
                    (Some(i), Some(r)) => PatchKind::Script { install: i.get_ref().clone(), remove: r.get_ref().clone() },
                    _ => return Err(err(kind.span(), format!("patch `{name}`: script patches need `install` and `remove` commands, like [\"/bin/sh\", \"/var/tmp/patchlab/install.sh\"]"))),
                },
            };
            let mut pins = std::collections::BTreeMap::new();
            for (file, digest) in sha256 {
                let hex = digest.get_ref().to_ascii_lowercase();
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(err(digest.span(), format!("patch `{name}`: the sha256 of `{file}` must be 64 hexadecimal digits")));
                }
                pins.insert(file.clone(), hex);
            }
            patches.push(Patch { name: name.clone(), kind, sources, pins, rollback });
        }

        let mut checks = Vec::new();
        for (key, raw_check) in &raw.checks {
            let name = key.get_ref();
            check_name(name).map_err(|m| err(key.span(), format!("check name: {m}")))?;
            let kind = check_kind(name, key.span(), raw_check).map_err(|(s, m)| err(s, m))?;
            let timeout = parse_duration("timeout", raw_check.timeout.as_ref()).map_err(|(s, m)| err(s, format!("check `{name}`: {m}")))?.unwrap_or(DEFAULT_CHECK_TIMEOUT);
            let retries = match &raw_check.retries {
                None => DEFAULT_RETRIES,
                Some(r) => u32::try_from(*r.get_ref()).ok().filter(|r| *r <= MAX_RETRIES).ok_or_else(|| err(r.span(), format!("check `{name}`: `retries = {}` is out of range: use 0 to {MAX_RETRIES} (retries after the first try)", r.get_ref())))?,
            };
            checks.push(Check { name: name.clone(), kind, timeout, retries });
        }
        let settings = &raw.settings;
        let setting = |key: &str, value| parse_duration(key, value).map_err(|(s, m)| err(s, format!("settings: {m}")));
        let settings = Settings {
            install_timeout: setting("install_timeout", settings.install_timeout.as_ref())?.unwrap_or(DEFAULT_SETTINGS_TIMEOUT),
            remove_timeout: setting("remove_timeout", settings.remove_timeout.as_ref())?.unwrap_or(DEFAULT_SETTINGS_TIMEOUT),
            require_baseline: settings.require_baseline.unwrap_or(false),
            burn_in: setting("burn_in", settings.burn_in.as_ref())?,
            burn_in_interval: setting("burn_in_interval", settings.burn_in_interval.as_ref())?.unwrap_or(DEFAULT_BURN_IN_INTERVAL),
        };
        let inventory = raw.inventory.as_ref().map(|i| existing(i, "inventory")).transpose()?;
        let coverage_threshold_percent = match &raw.coverage.threshold_percent {
            None => DEFAULT_COVERAGE_THRESHOLD,
            Some(t) if (DEFAULT_COVERAGE_THRESHOLD as i64..100).contains(t.get_ref()) => *t.get_ref() as u32,
            Some(t) => return Err(err(t.span(), format!("coverage: `threshold_percent = {}` must be 50 to 99: coverage must exceed it, and a majority (more than 50) is the least the lab may ask", t.get_ref()))),
        };
        let mut removal = Removal::default();
        for w in &raw.removal.watch {
            if !w.get_ref().starts_with('/') || w.get_ref().contains("..") {
                return Err(err(w.span(), format!("removal: watched path `{}` must be an absolute guest path without `..`", w.get_ref())));
            }
            removal.watch.push(w.get_ref().clone());
        }
        for a in &raw.removal.allow {
            if a.get_ref().trim().is_empty() {
                return Err(err(a.span(), "removal: an `allow` pattern is empty".into()));
            }
            removal.allow.push(a.get_ref().clone());
        }
        let mut hosts: Vec<String> = Vec::new();
        for h in &raw.hosts {
            let uri = h.get_ref().trim();
            if uri.is_empty() || !uri.contains(':') {
                return Err(err(h.span(), format!("hosts: `{}` is not a libvirt URI (like `qemu:///system` or `qemu+ssh://host/system`)", h.get_ref())));
            }
            if hosts.iter().any(|x| x == uri) {
                return Err(err(h.span(), format!("hosts: `{uri}` is listed twice")));
            }
            hosts.push(uri.to_string());
        }
        Ok(Lab {
            hosts,
            name: raw.name.as_ref().map(|n| n.get_ref().clone()).unwrap_or_else(|| path.file_stem().unwrap_or_default().to_string_lossy().into_owned()),
            path: path.to_path_buf(),
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
            platforms,
            patches,
            checks,
            settings,
            inventory,
            coverage_threshold_percent,
            removal,
        })
    }
}

/// Defaults and limits of the lab format (documented in docs/lab-format.md).
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRIES: u32 = 2;
pub const MAX_RETRIES: u32 = 20;
pub const DEFAULT_SETTINGS_TIMEOUT: Duration = Duration::from_secs(600);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_BURN_IN_INTERVAL: Duration = Duration::from_secs(10);
/// Coverage must be strictly above this: a majority of the inventory's hosts.
pub const DEFAULT_COVERAGE_THRESHOLD: u32 = 50;

/// The directory every patch path must stay inside: the nearest enclosing git checkout of the lab
/// file's directory (the directory holding `.git`), or, outside any checkout, the parent of the lab
/// file's directory (labs live in `labs/` beside what they test).
struct LabRoot {
    dir: PathBuf,
    /// How many `..` lead from the lab file's directory to `dir`.
    up: usize,
    in_checkout: bool,
}

impl LabRoot {
    fn of(lab_dir: &Path) -> std::io::Result<LabRoot> {
        let lab_dir = lab_dir.canonicalize()?;
        if let Some((up, dir)) = lab_dir.ancestors().enumerate().find(|(_, dir)| dir.join(".git").exists()) {
            return Ok(LabRoot { dir: dir.to_path_buf(), up, in_checkout: true });
        }
        let (up, dir) = match lab_dir.parent() {
            Some(parent) => (1, parent.to_path_buf()),
            None => (0, lab_dir),
        };
        Ok(LabRoot { dir, up, in_checkout: false })
    }

    /// Where the root is, relative to the lab file, so that messages read the same on every machine.
    fn describe(&self) -> String {
        let relative = if self.up == 0 { ".".to_string() } else { vec![".."; self.up].join("/") };
        if self.in_checkout {
            format!("the git checkout that holds the lab file (`{relative}` from its directory)")
        } else {
            format!("the parent of the lab file's directory (`{relative}`)")
        }
    }
}

type Spanned<T> = std::result::Result<T, (Range<usize>, String)>;

/// Builds a check from its flat table, refusing keys that do not apply to its kind.
fn check_kind(name: &str, name_span: Range<usize>, c: &RawCheck) -> Spanned<CheckKind> {
    use schema::RawCheckKind as K;
    let Some(kind) = &c.kind else {
        return Err((name_span, format!("check `{name}` has no `kind`: add `kind = \"http\"`, `\"tcp\"` or `\"command\"`")));
    };
    let kind_span = kind.span();
    let kind = *kind.get_ref();
    let applies: &[&str] = match kind {
        K::Http => &["port", "path", "status", "body_contains"],
        K::Tcp => &["port"],
        K::Command => &["argv", "exit_code", "stdout_contains"],
    };
    let given = [
        ("port", c.port.as_ref().map(|v| v.span())),
        ("path", c.path.as_ref().map(|v| v.span())),
        ("status", c.status.as_ref().map(|v| v.span())),
        ("body_contains", c.body_contains.as_ref().map(|v| v.span())),
        ("argv", c.argv.as_ref().map(|v| v.span())),
        ("exit_code", c.exit_code.as_ref().map(|v| v.span())),
        ("stdout_contains", c.stdout_contains.as_ref().map(|v| v.span())),
    ];
    let kind_name = format!("{kind:?}").to_lowercase();
    for (key, span) in given {
        if let Some(span) = span {
            if !applies.contains(&key) {
                let valid: Vec<String> = applies.iter().map(|k| format!("`{k}`")).collect();
                return Err((span, format!("check `{name}`: `{key}` does not apply to {kind_name} checks, which take {} (and `timeout`, `retries`)", valid.join(", "))));
            }
        }
    }
    let port = || -> Spanned<u16> {
        let Some(port) = &c.port else {
            return Err((kind_span.clone(), format!("check `{name}`: {kind_name} checks need a `port`, the guest port to reach (1-65535)")));
        };
        u16::try_from(*port.get_ref()).ok().filter(|p| *p != 0).ok_or((port.span(), format!("check `{name}`: `port = {}` is not a TCP port: use 1-65535", port.get_ref())))
    };
    Ok(match kind {
        K::Http => CheckKind::Http {
            port: port()?,
            path: match &c.path {
                None => "/".into(),
                Some(p) if p.get_ref().starts_with('/') => p.get_ref().clone(),
                Some(p) => return Err((p.span(), format!("check `{name}`: `path` must start with `/`, like \"/\" or \"/health\", not \"{}\"", p.get_ref()))),
            },
            status: match &c.status {
                None => 200,
                Some(s) => u16::try_from(*s.get_ref()).ok().filter(|s| (100..=599).contains(s)).ok_or((s.span(), format!("check `{name}`: `status = {}` is not an HTTP status: use 100-599", s.get_ref())))?,
            },
            body_contains: c.body_contains.as_ref().map(|b| b.get_ref().clone()),
        },
        K::Tcp => CheckKind::Tcp { port: port()? },
        K::Command => {
            let argv = c.argv.as_ref().ok_or((kind_span.clone(), format!("check `{name}`: command checks need `argv`, the command and its arguments, like [\"/bin/systemctl\", \"is-active\", \"nginx\"]")))?;
            let Some(program) = argv.get_ref().first() else {
                return Err((argv.span(), format!("check `{name}`: `argv` is empty: give the command and its arguments, like [\"/bin/systemctl\", \"is-active\", \"nginx\"]")));
            };
            if !program.starts_with('/') {
                return Err((argv.span(), format!("check `{name}`: the command `{program}` must be an absolute path in the guest, like \"/bin/systemctl\" (commands run without a shell or PATH)")));
            }
            let exit_code = match &c.exit_code {
                None => 0,
                Some(e) if (0..=255).contains(e.get_ref()) => *e.get_ref(),
                Some(e) => return Err((e.span(), format!("check `{name}`: `exit_code = {}` is not an exit status: use 0-255", e.get_ref()))),
            };
            CheckKind::Command { argv: argv.get_ref().clone(), exit_code, stdout_contains: c.stdout_contains.as_ref().map(|s| s.get_ref().clone()) }
        }
    })
}

fn check_name(name: &str) -> Result<(), String> {
    plain_name(name, 40, "names use letters, digits, `-`, `_` and `.`, at most 40 characters")
}

/// The one rule for names patchlab puts in paths and reports (labs, platforms, patches, checks,
/// inventory hosts): letters, digits, `-`, `_` and `.`, at most `max` characters. `rule` says it
/// the way the caller's users know it.
pub(crate) fn plain_name(name: &str, max: usize, rule: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("the name is empty: {rule}"));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("`{name}` contains {bad:?}: {rule}"));
    }
    if name.len() > max {
        return Err(format!("`{name}` is {} characters long: {rule}", name.len()));
    }
    Ok(())
}

/// A duration setting: a string with units, like "30s", "5m" or "1h30m"; more than zero and at most 24h.
fn parse_duration(key: &str, value: Option<&toml::Spanned<toml::Value>>) -> Spanned<Option<Duration>> {
    let Some(value) = value else { return Ok(None) };
    let span = value.span();
    let text = match value.get_ref() {
        toml::Value::String(text) => text,
        toml::Value::Integer(n) => return Err((span, format!("`{key} = {n}` has no unit: write durations as strings with a unit, like \"{n}s\" or \"{n}m\""))),
        other => return Err((span, format!("`{key}` must be a duration string like \"30s\" or \"5m\", not a {}", other.type_str()))),
    };
    let invalid = || (span.clone(), format!("`{key} = \"{text}\"` is not a duration: write a number and a unit, like \"30s\", \"5m\" or \"1h\""));
    let parsed: jiff::SignedDuration = text.parse().map_err(|_| invalid())?;
    if parsed.is_negative() || parsed.is_zero() {
        return Err((span, format!("`{key} = \"{text}\"` must be longer than zero")));
    }
    let duration = Duration::try_from(parsed).map_err(|_| invalid())?;
    if duration > MAX_TIMEOUT {
        return Err((span, format!("`{key} = \"{text}\"` is longer than the maximum of 24h")));
    }
    Ok(Some(duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lab root outside any git checkout: `<tmp>/labs/` for labs, a recipe and a package tree beside.
    fn project() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        assert!(!dir.path().ancestors().any(|a| a.join(".git").exists()), "the temp dir is not in a checkout");
        std::fs::create_dir_all(dir.path().join("labs")).unwrap();
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        std::fs::write(dir.path().join("images/debian-12.toml"), "").unwrap();
        std::fs::create_dir_all(dir.path().join("patches/good/DEBIAN")).unwrap();
        std::fs::write(dir.path().join("patches/good/DEBIAN/control"), "Package: good\n").unwrap();
        std::fs::write(dir.path().join("patches/fix.deb"), "!<arch>\n").unwrap();
        dir
    }

    fn lab_with(dir: &Path, lab: &str, patch: &str) -> Result<Lab, LabError> {
        let path = dir.join(lab);
        let up = "../".repeat(Path::new(lab).components().count() - 1);
        let text = format!("[platforms.p]\nimage = \"{up}images/debian-12.toml\"\n\n[patches.x]\nkind = \"deb\"\n{patch}\n");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
        Lab::load(&path)
    }

    #[test]
    fn lab_patch_paths_stay_inside_the_parent_of_the_lab_directory_outside_a_checkout() {
        let dir = project();
        let lab = lab_with(dir.path(), "labs/a.toml", "package_trees = [\"../patches/good\"]\nfiles = [\"../patches/fix.deb\"]").unwrap();
        assert_eq!(lab.patches[0].sources.len(), 2);
        let e = lab_with(dir.path(), "labs/a.toml", "package_trees = [\"../..\"]").unwrap_err();
        assert!(e.message.contains("is outside the lab root") && e.message.contains("(`..`)"), "{e}");
        assert_eq!((e.line, e.column), (6, 18), "{e}");
        // An absolute path says where it reads and is taken as written, inside the root or not.
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("fix.deb"), "!<arch>\n").unwrap();
        let lab = lab_with(dir.path(), "labs/a.toml", &format!("files = [\"{}\"]", elsewhere.path().join("fix.deb").display())).unwrap();
        assert_eq!(lab.patches[0].sources, [PatchSource::File(elsewhere.path().join("fix.deb"))]);
        // A lab one level deeper has a narrower root: its own directory's parent.
        let e = lab_with(dir.path(), "labs/team/a.toml", "package_trees = [\"../../patches/good\"]").unwrap_err();
        assert!(e.message.contains("is outside the lab root"), "{e}");
    }

    #[test]
    fn lab_patch_paths_may_use_the_whole_git_checkout() {
        let dir = project();
        std::fs::create_dir(dir.path().join(".git")).unwrap();
        lab_with(dir.path(), "labs/team/a.toml", "package_trees = [\"../../patches/good\"]").unwrap();
        let e = lab_with(dir.path(), "labs/team/a.toml", "package_trees = [\"../../..\"]").unwrap_err();
        assert!(e.message.contains("the git checkout that holds the lab file (`../..` from its directory)"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn lab_patch_paths_are_checked_after_following_symlinks() {
        let dir = project();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(outside.path().join("DEBIAN")).unwrap();
        std::fs::write(outside.path().join("DEBIAN/control"), "Package: evil\n").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("patches/link")).unwrap();
        let e = lab_with(dir.path(), "labs/a.toml", "package_trees = [\"../patches/link\"]").unwrap_err();
        assert!(e.message.contains("is outside the lab root"), "{e}");
    }

    fn duration(text: &str) -> Spanned<Option<Duration>> {
        let value: toml::Spanned<toml::Value> = toml::from_str::<std::collections::BTreeMap<String, toml::Spanned<toml::Value>>>(&format!("t = {text}")).unwrap().remove("t").unwrap();
        parse_duration("timeout", Some(&value))
    }

    #[test]
    fn lab_durations_are_positive_strings_with_units_up_to_a_day() {
        assert_eq!(duration("\"30s\"").unwrap(), Some(Duration::from_secs(30)));
        assert_eq!(duration("\"5m\"").unwrap(), Some(Duration::from_secs(300)));
        assert_eq!(duration("\"1h30m\"").unwrap(), Some(Duration::from_secs(5400)));
        assert_eq!(duration("\"24h\"").unwrap(), Some(MAX_TIMEOUT));
        assert_eq!(duration("\"2 minutes\"").unwrap(), Some(Duration::from_secs(120)));
        assert_eq!(duration("\"PT5M\"").unwrap(), Some(Duration::from_secs(300)));
        assert_eq!(duration("\"1.5s\"").unwrap(), Some(Duration::from_millis(1500)));
        for (bad, says) in [("\"0s\"", "longer than zero"), ("\"-5s\"", "longer than zero"), ("\"soon\"", "is not a duration"), ("\"30\"", "is not a duration"), ("30", "has no unit"), ("\"25h\"", "maximum of 24h"), ("1.5", "not a float")] {
            let (_, message) = duration(bad).unwrap_err();
            assert!(message.contains(says), "{bad}: {message}");
        }
    }

    #[test]
    fn lab_names_are_short_and_plain() {
        for good in ["debian-12", "web_1", "v1.2", &"x".repeat(40)] {
            check_name(good).unwrap();
        }
        for bad in ["", "debian 12", "a/b", "é", &"x".repeat(41)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    /// The complete example in docs/lab-format.md uses the schema as it is (its patch files are
    /// illustrations, so only the schema and the per-table rules are checked).
    #[test]
    fn lab_format_doc_example_matches_the_schema() {
        let doc = include_str!("../../docs/lab-format.md");
        let example = doc.split("```toml\n").nth(1).unwrap().split("```").next().unwrap();
        let raw: RawLab = toml::from_str(example).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(raw.platforms.len(), 3);
        assert_eq!(raw.patches.len(), 2);
        assert_eq!(raw.checks.len(), 3);
        for (key, check) in &raw.checks {
            check_kind(key.get_ref(), key.span(), check).unwrap_or_else(|(_, m)| panic!("{m}"));
            parse_duration("timeout", check.timeout.as_ref()).unwrap();
        }
        parse_duration("install_timeout", raw.settings.install_timeout.as_ref()).unwrap();
    }
}
