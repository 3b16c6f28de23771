//! The lab file: what to qualify (patches), where (platforms), and how to tell it still works
//! (checks). Loading does no IO beyond reading the file and checking that referenced paths exist.

mod error;
mod schema;

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchKind {
    Deb,
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
        let raw: RawLab = toml::from_str(text).map_err(|e| LabError::from_toml(path, text, &e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let err = |span: std::ops::Range<usize>, message: String| LabError::at(path, text, span, message);
        if raw.platforms.is_empty() {
            return Err(err(0..0, "the lab has no platforms: add at least one [platforms.NAME] table".into()));
        }
        if raw.patches.is_empty() {
            return Err(err(0..0, "the lab has no patches: add at least one [patches.NAME] table".into()));
        }
        let resolve = |p: &toml::Spanned<String>, what: &str| -> Result<PathBuf, LabError> {
            let full = base.join(p.get_ref());
            if !full.exists() {
                return Err(err(p.span(), format!("{what} `{}` does not exist (looked for {})", p.get_ref(), full.display())));
            }
            Ok(full)
        };
        let mut platforms = Vec::new();
        for (name, RawPlatform { image, domain, snapshot }) in &raw.platforms {
            check_name(name).map_err(|m| err(0..0, format!("platform `{name}`: {m}")))?;
            let source = match (image, domain, snapshot) {
                (Some(image), None, None) => PlatformSource::Image(resolve(image, "image recipe")?),
                (None, Some(domain), Some(snapshot)) => PlatformSource::DomainSnapshot { domain: domain.get_ref().clone(), snapshot: snapshot.get_ref().clone() },
                (None, Some(domain), None) => return Err(err(domain.span(), format!("platform `{name}` names a domain but no `snapshot` to clone it from"))),
                (Some(image), Some(_), _) | (Some(image), _, Some(_)) => return Err(err(image.span(), format!("platform `{name}` has both `image` and `domain`/`snapshot`: give one source"))),
                (None, None, _) => return Err(err(0..0, format!("platform `{name}` needs `image = \"path/to/recipe.toml\"` or `domain` and `snapshot`"))),
            };
            platforms.push(Platform { name: name.clone(), source });
        }
        let mut patches = Vec::new();
        for (name, RawPatch { kind, files, package_trees }) in &raw.patches {
            check_name(name).map_err(|m| err(0..0, format!("patch `{name}`: {m}")))?;
            let mut sources = Vec::new();
            for f in files {
                sources.push(PatchSource::File(resolve(f, "patch file")?));
            }
            for t in package_trees {
                let dir = resolve(t, "package tree")?;
                if !dir.join("DEBIAN/control").is_file() {
                    return Err(err(t.span(), format!("package tree `{}` has no DEBIAN/control", t.get_ref())));
                }
                sources.push(PatchSource::Tree(dir));
            }
            if sources.is_empty() {
                return Err(err(kind.span(), format!("patch `{name}` has no `files` and no `package_trees`")));
            }
            patches.push(Patch { name: name.clone(), kind: PatchKind::Deb, sources });
        }
        let mut checks = Vec::new();
        for (name, raw_check) in &raw.checks {
            check_name(name).map_err(|m| err(0..0, format!("check `{name}`: {m}")))?;
            let kind = check_kind(name, raw_check).map_err(|(s, m)| err(s, m))?;
            let timeout = parse_duration(raw_check.timeout.as_ref()).map_err(|(s, m)| err(s, format!("check `{name}`: {m}")))?.unwrap_or(Duration::from_secs(10));
            let retries = raw_check.retries.as_ref().map(|r| *r.get_ref()).unwrap_or(2);
            if retries > 20 {
                return Err(err(raw_check.retries.as_ref().unwrap().span(), format!("check `{name}`: at most 20 retries")));
            }
            checks.push(Check { name: name.clone(), kind, timeout, retries });
        }
        let settings = &raw.settings;
        let settings = Settings {
            install_timeout: parse_duration(settings.install_timeout.as_ref()).map_err(|(s, m)| err(s, m))?.unwrap_or(Duration::from_secs(600)),
            remove_timeout: parse_duration(settings.remove_timeout.as_ref()).map_err(|(s, m)| err(s, m))?.unwrap_or(Duration::from_secs(600)),
        };
        Ok(Lab {
            name: raw.name.clone().unwrap_or_else(|| path.file_stem().unwrap_or_default().to_string_lossy().into_owned()),
            path: path.to_path_buf(),
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
            platforms,
            patches,
            checks,
            settings,
        })
    }
}

type Spanned<T> = std::result::Result<T, (std::ops::Range<usize>, String)>;

/// Builds a check from its flat table, refusing keys that do not apply to its kind.
fn check_kind(name: &str, c: &RawCheck) -> Spanned<CheckKind> {
    use schema::RawCheckKind as K;
    let kind = *c.kind.get_ref();
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
                return Err((span, format!("check `{name}`: `{key}` does not apply to {kind_name} checks, which take {}", applies.join(", "))));
            }
        }
    }
    let port = || c.port.as_ref().map(|p| *p.get_ref()).filter(|p| *p != 0).ok_or((c.kind.span(), format!("check `{name}`: {kind_name} checks need a `port` (1-65535)")));
    Ok(match kind {
        K::Http => CheckKind::Http {
            port: port()?,
            path: c.path.as_ref().map(|p| p.get_ref().clone()).unwrap_or_else(|| "/".into()),
            status: c.status.as_ref().map(|s| *s.get_ref()).unwrap_or(200),
            body_contains: c.body_contains.as_ref().map(|b| b.get_ref().clone()),
        },
        K::Tcp => CheckKind::Tcp { port: port()? },
        K::Command => {
            let argv = c.argv.as_ref().filter(|a| !a.get_ref().is_empty()).ok_or((c.kind.span(), format!("check `{name}`: command checks need a non-empty `argv`")))?;
            if !argv.get_ref()[0].starts_with('/') {
                return Err((argv.span(), format!("check `{name}`: argv[0] must be an absolute path in the guest, like \"/bin/systemctl\"")));
            }
            CheckKind::Command { argv: argv.get_ref().clone(), exit_code: c.exit_code.as_ref().map(|e| *e.get_ref()).unwrap_or(0), stdout_contains: c.stdout_contains.as_ref().map(|s| s.get_ref().clone()) }
        }
    })
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty() && name.len() <= 40 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok { Ok(()) } else { Err("names use letters, digits, `-`, `_` and `.` only, at most 40 of them".into()) }
}

fn parse_duration(value: Option<&toml::Spanned<String>>) -> Spanned<Option<Duration>> {
    let Some(value) = value else { return Ok(None) };
    let parsed: jiff::SignedDuration = value.get_ref().parse().map_err(|e| (value.span(), format!("`{}` is not a duration like \"30s\" or \"5m\": {e}", value.get_ref())))?;
    if parsed.is_negative() || parsed.is_zero() {
        return Err((value.span(), format!("duration `{}` must be positive", value.get_ref())));
    }
    Duration::try_from(parsed).map(Some).map_err(|e| (value.span(), e.to_string()))
}
