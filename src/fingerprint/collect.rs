//! The one command a capture runs in the guest, and the parser of what it prints.
//!
//! The script is a constant: watched paths reach it as positional arguments (`sh -c SCRIPT sh
//! MODE PATH MODE PATH ...`), never as script text. Its output is untrusted data. It is a sequence
//! of NUL-terminated records:
//!
//! ```text
//! patchlab-fingerprint 1
//! #<section>  <the section tool's whole stdout>        (packages units sockets passwd group modules)
//! !<section>  <exit status>                            (instead, when the tool failed)
//! #files
//!   F\t<type>\t<mode>\t<uid>\t<gid>\t<size>\t<mtime>\t<path>   <symlink target or empty>
//!   <sha256 hex>  <path>                                  (sha256sum -z, for hashed roots)
//! #end
//! ```
//!
//! Paths may contain spaces, tabs and newlines: they are the last field of a NUL-terminated
//! record. A missing `#end` means the output was cut, and is an error like any malformed record.

use std::collections::{BTreeMap, HashMap};

/// Runs as `/bin/sh -c SCRIPT sh MODE PATH [MODE PATH ...]`, MODE `h` (metadata and sha256 of
/// regular files) or `m` (metadata only).
///
/// It first waits for udev's event queue to drain (`udevadm settle`, instant when it is empty): a
/// clone restored from a golden state saved right after boot is still coldplugging, and the
/// modules that loads (ata_piix, kvm_amd, ... seconds after restore on debian-13) are not the
/// patch's doing. A settle that times out is not an error: the modules then show as differences.
pub const SCRIPT: &str = r#"PATH=/usr/sbin:/usr/bin:/sbin:/bin
LC_ALL=C
SYSTEMD_COLORS=0
export PATH LC_ALL SYSTEMD_COLORS
sect() {
  name=$1; shift
  if out=$("$@"); then printf '#%s\0%s\0' "$name" "$out"
  else printf '!%s\0%s\0' "$name" "$?"; fi
}
udevadm settle --timeout=30 >/dev/null 2>&1
printf 'patchlab-fingerprint 1\0'
sect packages dpkg-query -W -f '${binary:Package}\t${Version}\t${db:Status-Abbrev}\n'
sect units systemctl list-units --all --plain --no-legend --no-pager --full
sect sockets ss -Hltun
sect passwd getent passwd
sect group getent group
sect modules cat /proc/modules
printf '#files\0'
while [ $# -ge 2 ]; do
  how=$1
  p=$(readlink -f -- "$2") || p=$2
  shift 2
  [ -n "$p" ] || continue
  if [ -e "$p" ] || [ -L "$p" ]; then
    find "$p" -xdev -printf 'F\t%y\t%m\t%U\t%G\t%s\t%T@\t%p\0%l\0' 2>/dev/null
    if [ "$how" = h ]; then
      find "$p" -xdev -path /var/lib/apt/lists -prune -o -type f -print0 2>/dev/null | xargs -0 -r sha256sum -z -- 2>/dev/null
    fi
  fi
done
printf '#end\0'
"#;

/// The text sections, in the order the script prints them.
/// `modules` comes after `sockets`: the first `ss` of a boot loads the socket diagnostics
/// modules (inet_diag, tcp_diag, udp_diag), and every capture must see them loaded.
const SECTIONS: &[&str] = &["packages", "units", "sockets", "passwd", "group", "modules"];

/// What the script prints on a system with nothing in it: for fake guests in tests of the layers above.
pub fn empty_output() -> Vec<u8> {
    let mut out = b"patchlab-fingerprint 1\0".to_vec();
    for section in SECTIONS {
        out.extend_from_slice(format!("#{section}\0\0").as_bytes());
    }
    out.extend_from_slice(b"#files\0#end\0");
    out
}

/// Turns the script's stdout into fingerprint entries keyed `kind\0item`. Errors say what was wrong.
pub fn parse(output: &str) -> Result<BTreeMap<String, String>, String> {
    let mut records = output.split('\0');
    if output.is_empty() || !output.ends_with('\0') {
        return Err("the output is empty or does not end with a complete record (cut short?)".into());
    }
    match records.next() {
        Some("patchlab-fingerprint 1") => {}
        other => return Err(format!("the output starts with {:?}, not the fingerprint header", other.map(clip))),
    }
    let mut entries = BTreeMap::new();
    // uid and gid → name, from this capture's own passwd and group, for the file owners.
    let mut user_names: HashMap<String, String> = HashMap::new();
    let mut group_names: HashMap<String, String> = HashMap::new();
    for section in SECTIONS {
        let head = records.next().ok_or_else(|| format!("the output ends before section {section}"))?;
        let body = records.next().ok_or_else(|| format!("the output ends inside section {section}"))?;
        if head == format!("!{section}") {
            return Err(format!("collecting {section} failed in the guest (exit status {})", clip(body)));
        }
        if head != format!("#{section}") {
            return Err(format!("expected section {section}, found {:?}", clip(head)));
        }
        for (n, line) in body.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = || format!("{section} line {}: cannot read {:?}", n + 1, clip(line));
            match *section {
                "packages" => {
                    let mut f = line.split('\t');
                    let (Some(name), Some(version), Some(status), None) = (f.next(), f.next(), f.next(), f.next()) else { return Err(bad()) };
                    if name.is_empty() {
                        return Err(bad());
                    }
                    entries.insert(key("package", name), format!("{version} {}", status.trim()));
                }
                "units" => {
                    let mut t = line.split_whitespace().peekable();
                    // Some systemd versions mark failed or not-found units with a bullet even in --plain.
                    if matches!(t.peek(), Some(&"●") | Some(&"*")) {
                        t.next();
                    }
                    let (Some(unit), Some(load), Some(active), Some(sub)) = (t.next(), t.next(), t.next(), t.next()) else { return Err(bad()) };
                    if ![load, active, sub].iter().all(|w| w.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')) {
                        return Err(bad());
                    }
                    entries.insert(key("unit", unit), format!("{load} {active} {sub}"));
                }
                "sockets" => {
                    // Netid State Recv-Q Send-Q Local:Port Peer:Port: the queues move, the rest identifies.
                    let t: Vec<&str> = line.split_whitespace().collect();
                    if t.len() < 6 {
                        return Err(bad());
                    }
                    let item = format!("{} {}", t[0], t[4]);
                    let state = t[1].to_string();
                    let k = key("socket", &item);
                    let merged = match entries.get(&k) {
                        None => state,
                        Some(prev) => count_more(prev),
                    };
                    entries.insert(k, merged);
                }
                "passwd" => {
                    let f: Vec<&str> = line.splitn(7, ':').collect();
                    if f.len() != 7 || f[0].is_empty() {
                        return Err(bad());
                    }
                    entries.insert(key("user", f[0]), format!("uid={} gid={} gecos={} home={} shell={}", f[2], f[3], f[4], f[5], f[6]));
                    user_names.entry(f[2].to_string()).or_insert_with(|| f[0].to_string());
                }
                "group" => {
                    let f: Vec<&str> = line.splitn(4, ':').collect();
                    if f.len() != 4 || f[0].is_empty() {
                        return Err(bad());
                    }
                    entries.insert(key("group", f[0]), format!("gid={} members={}", f[2], f[3]));
                    group_names.entry(f[2].to_string()).or_insert_with(|| f[0].to_string());
                }
                "modules" => {
                    let name = line.split_whitespace().next().ok_or_else(bad)?;
                    entries.insert(key("module", name), "loaded".into());
                }
                _ => unreachable!("every section is handled"),
            }
        }
    }
    match records.next() {
        Some("#files") => {}
        other => return Err(format!("expected the files section, found {:?}", other.map(clip))),
    }
    let mut files: BTreeMap<String, FileMeta> = BTreeMap::new();
    let mut hashes: HashMap<String, String> = HashMap::new();
    let mut ended = false;
    while let Some(record) = records.next() {
        if record == "#end" {
            ended = true;
            break;
        }
        if let Some(rest) = record.strip_prefix("F\t") {
            let target = records.next().ok_or("the output ends after a file record, before its link target")?;
            let meta = FileMeta::parse(rest, target).ok_or_else(|| format!("cannot read file record {:?}", clip(record)))?;
            files.insert(meta.path.clone(), meta);
        } else if let Some((digest, path)) = hash_record(record) {
            hashes.insert(path.to_string(), digest.to_ascii_lowercase());
        } else {
            return Err(format!("cannot read files record {:?}", clip(record)));
        }
    }
    if !ended {
        return Err("the output ends inside the files section (no end marker: cut short?)".into());
    }
    // After `#end` only the empty remainder of the final NUL may follow.
    if records.any(|r| !r.is_empty()) {
        return Err("records follow the end marker".into());
    }
    for (path, meta) in files {
        let kind = file_kind(&path);
        let owner = format!("{}:{}", name_of(&user_names, &meta.uid), name_of(&group_names, &meta.gid));
        let state = meta.state(&owner, hashes.get(&path).map(String::as_str));
        entries.insert(key(kind, &path), state);
    }
    Ok(entries)
}

pub fn key(kind: &str, item: &str) -> String {
    format!("{kind}\0{item}")
}

/// Cron entries are files, reported under their own kind so the report names them as cron.
pub fn file_kind(path: &str) -> &'static str {
    let cron = path == "/etc/crontab"
        || path == "/etc/anacrontab"
        || path.starts_with("/etc/cron.")
        || path == "/var/spool/cron"
        || path.starts_with("/var/spool/cron/");
    if cron { "cron" } else { "file" }
}

/// A uid or gid as its name when this capture has one for it (as `ls -l` shows it), else the number.
fn name_of<'a>(names: &'a HashMap<String, String>, id: &'a str) -> &'a str {
    names.get(id).map(String::as_str).unwrap_or(id)
}

fn count_more(prev: &str) -> String {
    // "LISTEN" -> "LISTEN x2" -> "LISTEN x3": several sockets on one address (SO_REUSEPORT).
    match prev.rsplit_once(" x").and_then(|(s, n)| n.parse::<u32>().ok().map(|n| (s, n))) {
        Some((s, n)) => format!("{s} x{}", n + 1),
        None => format!("{prev} x2"),
    }
}

fn hash_record(record: &str) -> Option<(&str, &str)> {
    // "<64 hex>  <path>" (text mode) or "<64 hex> *<path>" (binary mode).
    let digest = record.get(..64)?;
    let sep = record.get(64..66)?;
    if !digest.bytes().all(|b| b.is_ascii_hexdigit()) || !(sep == "  " || sep == " *") {
        return None;
    }
    let path = &record[66..];
    path.starts_with('/').then_some((digest, path))
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(120) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FileMeta {
    kind: char,
    mode: String,
    uid: String,
    gid: String,
    size: u64,
    mtime: i64,
    path: String,
    target: String,
}

impl FileMeta {
    fn parse(rest: &str, target: &str) -> Option<FileMeta> {
        let mut f = rest.splitn(7, '\t');
        let kind = f.next()?;
        let mode = f.next()?;
        let uid = f.next()?;
        let gid = f.next()?;
        let size = f.next()?.parse().ok()?;
        let mtime = f.next()?;
        let path = f.next()?;
        let mut kc = kind.chars();
        let (Some(kind), None) = (kc.next(), kc.next()) else { return None };
        if !"fdlbcpsD".contains(kind) || mode.is_empty() || mode.len() > 5 || !mode.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return None;
        }
        let numeric = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
        if !numeric(uid) || !numeric(gid) || !path.starts_with('/') {
            return None;
        }
        // find prints seconds with a fraction; whole seconds are what dpkg restores.
        let whole = mtime.split('.').next()?;
        let mtime = whole.parse().ok()?;
        Some(FileMeta { kind, mode: format!("{:0>4}", mode), uid: uid.into(), gid: gid.into(), size, mtime, path: path.into(), target: target.into() })
    }

    /// The state compared between captures. Directories: type, mode, owner only (their mtime
    /// changes whenever an entry is added and removed again). Regular files: the sha256 when the
    /// file is under a hashed root, else size and mtime (under /usr, which dpkg writes with the
    /// package archive's mtimes, so a reinstalled or restored file has the same metadata and a
    /// changed one almost never does; hashing all of /usr under TCG emulation takes too long).
    /// Symlinks: owner and target.
    fn state(&self, who: &str, sha256: Option<&str>) -> String {
        match self.kind {
            'd' => format!("dir mode={} owner={who}", self.mode),
            'l' => format!("symlink owner={who} target={}", self.target),
            'f' => match sha256 {
                Some(digest) => format!("file mode={} owner={who} size={} sha256={digest}", self.mode, self.size),
                None => format!("file mode={} owner={who} size={} mtime={}", self.mode, self.size, self.mtime),
            },
            other => {
                let name = match other {
                    'b' => "block-device",
                    'c' => "char-device",
                    'p' => "fifo",
                    's' => "socket",
                    _ => "door",
                };
                format!("{name} mode={} owner={who}", self.mode)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sections(packages: &str, units: &str, sockets: &str, passwd: &str, group: &str, modules: &str) -> String {
        let mut s = String::from("patchlab-fingerprint 1\0");
        for (name, body) in [("packages", packages), ("units", units), ("sockets", sockets), ("passwd", passwd), ("group", group), ("modules", modules)] {
            s.push_str(&format!("#{name}\0{body}\0"));
        }
        s.push_str("#files\0");
        s
    }

    fn sample() -> String {
        let mut s = sections(
            "nginx\t1.22.1-9\tii \nlibc6:amd64\t2.36-9+deb12u4\tii \nold\t1.0\trc \n",
            "nginx.service loaded active running A high performance web server\n● broken.service not-found inactive dead broken.service\n",
            "tcp   LISTEN 0      511          0.0.0.0:80        0.0.0.0:*\ntcp LISTEN 0 511 [::]:80 [::]:*\ntcp LISTEN 0 511 [::]:80 [::]:*\n",
            "root:x:0:0:root:/root:/bin/bash\nweird:x:1001:1001:A B,,,:/home/w x:/bin/sh\n",
            "root:x:0:\nadm:x:4:syslog,alice\n",
            "ext4 1040384 1 - Live 0x0000000000000000\nvirtio_net 61440 0 - Live 0x0000000000000000\n",
        );
        s.push_str("F\td\t755\t0\t0\t4096\t1700000000.1234567890\t/etc\0\0");
        s.push_str("F\tf\t644\t0\t0\t12\t1700000001.5000000000\t/etc/a file\nwith newline\0\0");
        s.push_str("F\tl\t777\t0\t4\t11\t1700000002.0000000000\t/etc/link\0/target with space\0");
        s.push_str("F\tf\t4755\t1001\t77\t99\t1600000000.0000000000\t/usr/bin/su\0\0");
        s.push_str("F\tf\t644\t0\t0\t10\t1600000000.0000000000\t/etc/cron.d/job\0\0");
        s.push_str(&format!("{}  /etc/a file\nwith newline\0", "AB".repeat(32)));
        s.push_str(&format!("{}  /etc/cron.d/job\0", "cd".repeat(32)));
        s.push_str("#end\0");
        s
    }

    #[test]
    fn parses_every_section() {
        let e = parse(&sample()).expect("parses");
        let get = |kind: &str, item: &str| e.get(&key(kind, item)).cloned();
        assert_eq!(get("package", "nginx").unwrap(), "1.22.1-9 ii");
        assert_eq!(get("package", "old").unwrap(), "1.0 rc");
        assert_eq!(get("package", "libc6:amd64").unwrap(), "2.36-9+deb12u4 ii");
        assert_eq!(get("unit", "nginx.service").unwrap(), "loaded active running");
        assert_eq!(get("unit", "broken.service").unwrap(), "not-found inactive dead");
        assert_eq!(get("socket", "tcp 0.0.0.0:80").unwrap(), "LISTEN");
        assert_eq!(get("socket", "tcp [::]:80").unwrap(), "LISTEN x2");
        assert_eq!(get("user", "weird").unwrap(), "uid=1001 gid=1001 gecos=A B,,, home=/home/w x shell=/bin/sh");
        assert_eq!(get("group", "adm").unwrap(), "gid=4 members=syslog,alice");
        assert_eq!(get("module", "virtio_net").unwrap(), "loaded");
        assert_eq!(get("file", "/etc").unwrap(), "dir mode=0755 owner=root:root");
        assert_eq!(get("file", "/etc/a file\nwith newline").unwrap(), format!("file mode=0644 owner=root:root size=12 sha256={}", "ab".repeat(32)));
        assert_eq!(get("file", "/etc/link").unwrap(), "symlink owner=root:adm target=/target with space");
        assert_eq!(get("file", "/usr/bin/su").unwrap(), "file mode=4755 owner=weird:77 size=99 mtime=1600000000");
        assert_eq!(get("cron", "/etc/cron.d/job").unwrap(), format!("file mode=0644 owner=root:root size=10 sha256={}", "cd".repeat(32)));
        assert_eq!(get("file", "/etc/cron.d/job"), None);
        assert_eq!(e.len(), 18);
    }

    #[test]
    fn malformed_output_is_an_error_not_a_panic() {
        let good = sample();
        let cases: Vec<(&str, String)> = vec![
            ("empty", String::new()),
            ("no trailing NUL", good.trim_end_matches('\0').to_string()),
            ("wrong header", good.replacen("patchlab-fingerprint 1", "hello", 1)),
            ("cut before #end", good.replace("#end\0", "")),
            ("cut mid files", good[..good.find("/usr/bin/su").unwrap()].to_string() + "\0"),
            ("cut in sections", good[..good.find("#sockets").unwrap()].to_string()),
            ("section failed", good.replacen("#sockets\0", "!sockets\u{0}127\0#x\0", 1)),
            ("package line without tabs", good.replacen("nginx\t1.22.1-9\tii ", "nginx 1.22.1-9", 1)),
            ("unit line too short", good.replacen("nginx.service loaded active running", "nginx.service loaded", 1)),
            ("passwd short", good.replacen("root:x:0:0:root:/root:/bin/bash", "root:x:0", 1)),
            ("owner name instead of uid", good.replacen("\t1001\t77\t", "\troot\t77\t", 1)),
            ("bad mode", good.replacen("F\tf\t4755", "F\tf\t9999", 1)),
            ("bad size", good.replacen("\t99\t", "\tbig\t", 1)),
            ("bad type", good.replacen("F\td\t", "F\tdd\t", 1)),
            ("relative path", good.replacen("\t/usr/bin/su", "\tusr/bin/su", 1)),
            ("garbage record", good.replacen("#end\0", "garbage\0#end\0", 1)),
            ("short hash", good.replacen(&"cd".repeat(32), "cdcd", 1)),
            ("trailing records", good.clone() + "more\0"),
            ("file record last", good.replacen("#end\0", "F\tf\t644\t0\t0\t1\t1\t/x", 1) + "\0"),
        ];
        for (name, text) in cases {
            assert!(parse(&text).is_err(), "{name}: accepted {:?}", parse(&text));
        }
        // Non-ASCII junk in any position never panics.
        for cut in 0..good.len() {
            if good.is_char_boundary(cut) {
                let _ = parse(&good[..cut]);
            }
        }
        let _ = parse("patchlab-fingerprint 1\0#packages\0é\u{0}\u{0}");
    }

    #[test]
    fn empty_sections_are_fine() {
        let mut s = sections("", "", "", "", "", "");
        s.push_str("#end\0");
        assert!(parse(&s).unwrap().is_empty());
    }

    #[test]
    fn cron_paths_are_their_own_kind() {
        for (path, kind) in [("/etc/crontab", "cron"), ("/etc/cron.d", "cron"), ("/etc/cron.daily/x", "cron"), ("/var/spool/cron/crontabs/root", "cron"), ("/etc/cronx", "file"), ("/var/spool/cronx", "file"), ("/etc/passwd", "file")] {
            assert_eq!(file_kind(path), kind, "{path}");
        }
    }
}
