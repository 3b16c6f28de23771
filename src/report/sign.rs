//! Signing and verifying report.json with SSH keys (OpenSSH's SSHSIG format, as
//! `ssh-keygen -Y sign` writes it), and checking a report directory end to end.
//!
//! The signature is detached and armored: `report.json.sig` beside `report.json`, namespace
//! [`NAMESPACE`], sha512. Anyone can check it with stock OpenSSH:
//! `ssh-keygen -Y verify -f allowed_signers -I <identity> -n patchlab-report -s report.json.sig < report.json`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

use super::{Report, SCHEMA_VERSION};

/// The SSHSIG namespace of report signatures: a signature made for anything else never verifies.
pub const NAMESPACE: &str = "patchlab-report";

/// Errors of [`keygen`] and [`sign`]; messages read after "failed to".
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("write key {}: it already exists (patchlab never overwrites a key)", path.display())]
    KeyExists { path: PathBuf },
    #[error("use signing key {}: its mode {mode:04o} lets group or others access it; run `chmod 600 {}`", path.display(), path.display())]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("use signing key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("{action}: {source}")]
    Ssh { action: &'static str, source: ssh_key::Error },
}

/// Errors of [`verify_signature`]; messages read after "failed to".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("parse the signature: {0}")]
    Signature(String),
    #[error("parse allowed signers line {line}: {reason}")]
    AllowedSigners { line: usize, reason: String },
    #[error("accept the signature: its namespace is `{found}`, not `{NAMESPACE}`")]
    Namespace { found: String },
    #[error("verify the signature by {fingerprint}: it does not match the report bytes (the report was changed after signing)")]
    Mismatch { fingerprint: String },
    #[error("trust the signing key {fingerprint}: no allowed signers line{} lists it for namespace `{NAMESPACE}`", identity.as_ref().map(|i| format!(" for identity `{i}`")).unwrap_or_default())]
    UnknownSigner { fingerprint: String, identity: Option<String> },
}

/// Who signed, as allowed_signers names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// The identity asked for, or else the principals of the first matching allowed_signers line.
    pub identity: String,
    /// `SHA256:...` of the signing key.
    pub fingerprint: String,
}

/// Where [`keygen`] put the key pair.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    pub private_key: PathBuf,
    pub public_key: PathBuf,
    pub allowed_signers: PathBuf,
    pub fingerprint: String,
}

/// Generates an ed25519 key pair in `out_dir`: `id_ed25519` (mode 0600), `id_ed25519.pub` and an
/// `allowed_signers` line for `identity` restricted to [`NAMESPACE`]. Refuses to overwrite.
pub fn keygen(out_dir: &Path, identity: &str) -> Result<KeyFiles, SignError> {
    if identity.is_empty() || identity.chars().any(|c| c.is_whitespace() || c == '"') {
        return Err(SignError::Key { path: out_dir.join("id_ed25519"), reason: format!("identity `{identity}` must be non-empty, without spaces or quotes") });
    }
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| SignError::Io { action, path, source }
    };
    fs::create_dir_all(out_dir).map_err(io("create", out_dir))?;
    let private_path = out_dir.join("id_ed25519");
    let public_path = out_dir.join("id_ed25519.pub");
    let signers_path = out_dir.join("allowed_signers");
    for p in [&private_path, &public_path, &signers_path] {
        if p.exists() {
            return Err(SignError::KeyExists { path: p.clone() });
        }
    }
    let mut key = PrivateKey::random(&mut rand_core::OsRng, Algorithm::Ed25519).map_err(|source| SignError::Ssh { action: "generate an ed25519 key", source })?;
    key.set_comment(identity);
    let pem = key.to_openssh(LineEnding::LF).map_err(|source| SignError::Ssh { action: "encode the private key", source })?;
    let public = key.public_key().to_openssh().map_err(|source| SignError::Ssh { action: "encode the public key", source })?;
    let mut public_no_comment = key.public_key().clone();
    public_no_comment.set_comment("");
    let public_bare = public_no_comment.to_openssh().map_err(|source| SignError::Ssh { action: "encode the public key", source })?;

    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&private_path).map_err(io("create", &private_path))?;
    file.write_all(pem.as_bytes()).map_err(io("write", &private_path))?;
    // The umask cannot widen 0600, but an odd one could narrow it to unreadable: set it exactly.
    fs::set_permissions(&private_path, fs::Permissions::from_mode(0o600)).map_err(io("chmod", &private_path))?;
    fs::write(&public_path, format!("{public}\n")).map_err(io("write", &public_path))?;
    fs::write(&signers_path, format!("{identity} namespaces=\"{NAMESPACE}\" {}\n", public_bare.trim())).map_err(io("write", &signers_path))?;
    Ok(KeyFiles { private_key: private_path, public_key: public_path, allowed_signers: signers_path, fingerprint: key.fingerprint(HashAlg::Sha256).to_string() })
}

/// Reads an unencrypted OpenSSH private key, refusing one that group or others can access.
pub fn load_signing_key(key_path: &Path) -> Result<PrivateKey, SignError> {
    let meta = fs::metadata(key_path).map_err(|source| SignError::Io { action: "read signing key", path: key_path.into(), source })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SignError::KeyPermissions { path: key_path.into(), mode });
    }
    let text = fs::read_to_string(key_path).map_err(|source| SignError::Io { action: "read signing key", path: key_path.into(), source })?;
    let key = PrivateKey::from_openssh(text.as_bytes()).map_err(|e| SignError::Key { path: key_path.into(), reason: format!("not an OpenSSH private key ({e})") })?;
    if key.is_encrypted() {
        return Err(SignError::Key { path: key_path.into(), reason: "it is passphrase-protected; patchlab signs unattended and needs an unencrypted key".into() });
    }
    Ok(key)
}

/// What a report says about the key that will sign it.
pub fn signer_ref(key_path: &Path, development: bool) -> Result<super::SignerRef, SignError> {
    let key = load_signing_key(key_path)?;
    Ok(super::SignerRef { key_comment: key.comment().to_string(), key_fingerprint: key.public_key().fingerprint(ssh_key::HashAlg::Sha256).to_string(), development })
}

/// The path of the detached signature of `report_path`: `<report_path>.sig`.
pub fn signature_path(report_path: &Path) -> PathBuf {
    let mut name = report_path.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// Signs the file at `report_json_path` with the key at `key_path`, writing `<report>.sig`.
pub fn sign(report_json_path: &Path, key_path: &Path) -> Result<PathBuf, SignError> {
    let key = load_signing_key(key_path)?;
    let bytes = fs::read(report_json_path).map_err(|source| SignError::Io { action: "read", path: report_json_path.into(), source })?;
    let sig = key.sign(NAMESPACE, HashAlg::Sha512, &bytes).map_err(|source| SignError::Ssh { action: "sign the report", source })?;
    let pem = sig.to_pem(LineEnding::LF).map_err(|source| SignError::Ssh { action: "encode the signature", source })?;
    let sig_path = signature_path(report_json_path);
    let mut tmp_name = sig_path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    fs::write(&tmp, pem.as_bytes()).map_err(|source| SignError::Io { action: "write", path: tmp.clone(), source })?;
    fs::rename(&tmp, &sig_path).map_err(|source| SignError::Io { action: "write", path: sig_path.clone(), source })?;
    Ok(sig_path)
}

/// One usable line of an allowed_signers file (see ssh-keygen(1), ALLOWED SIGNERS).
#[derive(Debug, Clone)]
struct AllowedSigner {
    principals: String,
    /// A pattern list, as OpenSSH matches it.
    namespaces: Option<String>,
    valid_after: Option<jiff::Timestamp>,
    valid_before: Option<jiff::Timestamp>,
    cert_authority: bool,
    key: PublicKey,
}

/// Splits `s` where `is_sep` holds outside double quotes (quotes are kept). `keep_empty` keeps the
/// empty pieces between adjacent separators; without it runs of separators count as one.
fn split_outside_quotes(s: &str, is_sep: impl Fn(char) -> bool, keep_empty: bool) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        if c == '"' {
            quoted = !quoted;
            cur.push(c);
        } else if is_sep(c) && !quoted {
            if keep_empty || !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if keep_empty || !cur.is_empty() {
        out.push(cur);
    }
    (out, quoted)
}

/// Splits on whitespace, keeping double-quoted stretches (which may hold spaces) together.
fn tokens(line: &str) -> Result<Vec<String>, String> {
    match split_outside_quotes(line, char::is_whitespace, false) {
        (_, true) => Err("unterminated quote".into()),
        (out, false) => Ok(out),
    }
}

/// Splits `a,b="x,y",c` on commas outside quotes.
fn split_options(s: &str) -> Vec<String> {
    split_outside_quotes(s, |c| c == ',', true).0
}

fn unquote(s: &str) -> &str {
    s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(s)
}

fn looks_like_key_type(s: &str) -> bool {
    s.starts_with("ssh-") || s.starts_with("ecdsa-") || s.starts_with("sk-") || s.starts_with("rsa-")
}

/// `YYYYMMDD[HHMM[SS]][Z]`, local time unless it ends in `Z`, as ssh-keygen reads it.
fn parse_ssh_time(s: &str) -> Result<jiff::Timestamp, String> {
    let (digits, utc) = match s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        Some(d) => (d, true),
        None => (s, false),
    };
    if !digits.chars().all(|c| c.is_ascii_digit()) || ![8, 12, 14].contains(&digits.len()) {
        return Err(format!("time `{s}` is not YYYYMMDD[HHMM[SS]][Z]"));
    }
    let n = |a: usize, b: usize| digits.get(a..b).map(|x| x.parse::<i32>().unwrap_or(0)).unwrap_or(0);
    let dt = jiff::civil::DateTime::new(n(0, 4) as i16, n(4, 6) as i8, n(6, 8) as i8, n(8, 10) as i8, n(10, 12) as i8, n(12, 14) as i8, 0).map_err(|e| format!("time `{s}`: {e}"))?;
    let tz = if utc { jiff::tz::TimeZone::UTC } else { jiff::tz::TimeZone::system() };
    dt.to_zoned(tz).map(|z| z.timestamp()).map_err(|e| format!("time `{s}`: {e}"))
}

fn parse_allowed_signers(text: &str) -> Result<Vec<AllowedSigner>, VerifyError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason: String| VerifyError::AllowedSigners { line: i + 1, reason };
        let toks = tokens(line).map_err(err)?;
        if toks.len() < 3 {
            return Err(err("expected `principals [options] keytype base64-key`".into()));
        }
        let principals = unquote(&toks[0]).to_string();
        let (options, key_at) = if looks_like_key_type(&toks[1]) { (None, 1) } else { (Some(toks[1].as_str()), 2) };
        let (Some(kind), Some(b64)) = (toks.get(key_at), toks.get(key_at + 1)) else {
            return Err(err("expected a key type and base64 key after the options".into()));
        };
        let key = PublicKey::from_openssh(&format!("{kind} {b64}")).map_err(|e| err(format!("bad public key ({e})")))?;
        let mut entry = AllowedSigner { principals, namespaces: None, valid_after: None, valid_before: None, cert_authority: false, key };
        for opt in options.map(split_options).unwrap_or_default() {
            let (name, value) = match opt.split_once('=') {
                Some((n, v)) => (n.to_ascii_lowercase(), Some(unquote(v).to_string())),
                None => (opt.to_ascii_lowercase(), None),
            };
            match (name.as_str(), value) {
                ("cert-authority", None) => entry.cert_authority = true,
                ("namespaces", Some(v)) => entry.namespaces = Some(v),
                ("valid-after", Some(v)) => entry.valid_after = Some(parse_ssh_time(&v).map_err(err)?),
                ("valid-before", Some(v)) => entry.valid_before = Some(parse_ssh_time(&v).map_err(err)?),
                (other, _) => return Err(err(format!("unknown option `{other}`"))),
            }
        }
        out.push(entry);
    }
    Ok(out)
}

/// `*` and `?` wildcards, as OpenSSH's match_pattern.
fn wildcard(pattern: &[u8], s: &[u8]) -> bool {
    match (pattern.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => wildcard(&pattern[1..], s) || (!s.is_empty() && wildcard(pattern, &s[1..])),
        (Some(b'?'), Some(_)) => wildcard(&pattern[1..], &s[1..]),
        (Some(p), Some(c)) if p == c => wildcard(&pattern[1..], &s[1..]),
        _ => false,
    }
}

/// A comma list of patterns, any of which may be negated with `!` (a negated match rejects).
fn matches_pattern_list(list: &str, identity: &str) -> bool {
    let mut matched = false;
    for pat in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(neg) = pat.strip_prefix('!') {
            if wildcard(neg.as_bytes(), identity.as_bytes()) {
                return false;
            }
        } else if wildcard(pat.as_bytes(), identity.as_bytes()) {
            matched = true;
        }
    }
    matched
}

/// Checks a detached SSHSIG over `report_bytes` against an allowed_signers file: the namespace is
/// [`NAMESPACE`], the signature verifies, and a line valid now lists the key (for `identity` when given).
pub fn verify_signature(report_bytes: &[u8], sig_text: &str, allowed_signers_text: &str, identity: Option<&str>) -> Result<Signer, VerifyError> {
    let signers = parse_allowed_signers(allowed_signers_text)?;
    let sig = SshSig::from_pem(sig_text.trim().as_bytes()).map_err(|e| VerifyError::Signature(e.to_string()))?;
    if sig.namespace() != NAMESPACE {
        return Err(VerifyError::Namespace { found: sig.namespace().to_string() });
    }
    let fingerprint = sig.public_key().fingerprint(HashAlg::Sha256).to_string();
    let signing_key = PublicKey::new(sig.public_key().clone(), "");
    signing_key.verify(NAMESPACE, report_bytes, &sig).map_err(|_| VerifyError::Mismatch { fingerprint: fingerprint.clone() })?;
    let now = jiff::Timestamp::now();
    let found = signers.iter().find(|s| {
        !s.cert_authority
            && s.key.key_data() == sig.public_key()
            && s.namespaces.as_ref().is_none_or(|ns| matches_pattern_list(ns, NAMESPACE))
            && s.valid_after.is_none_or(|t| now >= t)
            && s.valid_before.is_none_or(|t| now <= t)
            && identity.is_none_or(|id| matches_pattern_list(&s.principals, id))
    });
    match found {
        Some(s) => Ok(Signer { identity: identity.map(str::to_string).unwrap_or_else(|| s.principals.clone()), fingerprint }),
        None => Err(VerifyError::UnknownSigner { fingerprint, identity: identity.map(str::to_string) }),
    }
}

/// What [`verify_report`] found: the parsed report when it parsed, the signer when the signature
/// verified, and every reason the directory is not valid (empty when it is).
#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub report: Option<Report>,
    pub signer: Option<Signer>,
    pub problems: Vec<String>,
}

impl Verification {
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty() && self.report.is_some() && self.signer.is_some()
    }
}

/// The sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// A report-relative path that stays inside the report's directory, or why not.
fn inside(dir: &Path, rel: &str) -> Result<PathBuf, String> {
    let p = Path::new(rel);
    if rel.is_empty() || p.is_absolute() || p.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(format!("path `{rel}` is not a plain relative path inside the report directory"));
    }
    Ok(dir.join(p))
}

/// Checks a report file and its directory: the detached signature (`<report>.sig`) against the
/// allowed signers, the schema and its version, and the sha256 of every evidence and patch file it
/// names. Collects every problem rather than stopping at the first.
pub fn verify_report(report_path: &Path, allowed_signers_text: &str, identity: Option<&str>) -> Verification {
    let mut v = Verification::default();
    let bytes = match fs::read(report_path) {
        Ok(b) => b,
        Err(e) => {
            v.problems.push(format!("cannot read {}: {e}", report_path.display()));
            return v;
        }
    };
    let sig_path = signature_path(report_path);
    match fs::read_to_string(&sig_path) {
        Ok(sig) => match verify_signature(&bytes, &sig, allowed_signers_text, identity) {
            Ok(signer) => v.signer = Some(signer),
            Err(e) => v.problems.push(format!("signature {}: failed to {e}", sig_path.display())),
        },
        Err(e) => v.problems.push(format!("signature {}: cannot read it: {e}", sig_path.display())),
    }
    let version = serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|j| j.get("schema_version").and_then(|s| s.as_u64()));
    match (version, serde_json::from_slice::<Report>(&bytes)) {
        (Some(ver), _) if ver != SCHEMA_VERSION as u64 => v.problems.push(format!("{}: unknown schema_version {ver} (this patchlab reads {SCHEMA_VERSION})", report_path.display())),
        (_, Err(e)) => v.problems.push(format!("{}: not a patchlab report: {e}", report_path.display())),
        (_, Ok(report)) => v.report = Some(report),
    }
    if let Some(report) = &v.report {
        let dir = report_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let mut files: Vec<(&str, &str, String)> = Vec::new();
        for cell in &report.results {
            for e in &cell.evidence {
                files.push((&e.path, &e.sha256, format!("evidence of {} × {}", cell.platform, cell.patch)));
            }
        }
        for patch in &report.patches {
            for f in &patch.files {
                files.push((&f.path, &f.sha256, format!("file of patch {}", patch.name)));
            }
        }
        for (rel, want, what) in files {
            match inside(dir, rel) {
                Err(reason) => v.problems.push(format!("{what}: {reason}")),
                Ok(path) => match sha256_file(&path) {
                    Err(e) => v.problems.push(format!("{what} {rel}: cannot read {}: {e}", path.display())),
                    Ok(got) if !got.eq_ignore_ascii_case(want) => v.problems.push(format!("{what} {rel}: sha256 is {got}, the report says {want} (the file was changed)")),
                    Ok(_) => {}
                },
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let table = [
            ("alice@example.org", "alice@example.org", true),
            ("*@example.org", "bob@example.org", true),
            ("*@example.org,!mallory@example.org", "mallory@example.org", false),
            ("a?c", "abc", true),
            ("a?c", "abbc", false),
            ("x,y", "y", true),
            ("x,y", "z", false),
        ];
        for (list, id, want) in table {
            assert_eq!(matches_pattern_list(list, id), want, "{list} {id}");
        }
    }

    #[test]
    fn allowed_signers_lines() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
        let text = format!("# comment\n\nalice,bob {key} trailing comment\n\"carol\" namespaces=\"git,patchlab-*\",valid-after=20200101Z {key}\n");
        let s = parse_allowed_signers(&text).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].principals, "alice,bob");
        assert!(s[0].namespaces.is_none());
        assert_eq!(s[1].principals, "carol");
        assert_eq!(s[1].namespaces.as_deref(), Some("git,patchlab-*"));
        assert!(s[1].valid_after.is_some());
        assert!(matches!(parse_allowed_signers("alice ssh-ed25519"), Err(VerifyError::AllowedSigners { line: 1, .. })));
        assert!(matches!(parse_allowed_signers(&format!("alice bogus=1 {key}")), Err(VerifyError::AllowedSigners { line: 1, .. })));
    }

    #[test]
    fn paths_stay_inside() {
        let d = Path::new("/r");
        assert!(inside(d, "evidence/a.log").is_ok());
        assert!(inside(d, "/etc/passwd").is_err());
        assert!(inside(d, "../x").is_err());
        assert!(inside(d, "patches/../../x").is_err());
        assert!(inside(d, "").is_err());
    }
}
