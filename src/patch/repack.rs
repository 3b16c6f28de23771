//! Rebuilding an installed package into a .deb inside the guest, the way `dpkg-repack` does, so an
//! upgrade can be undone without network: the files as installed (modes, owners, mtimes kept by
//! tar), the control data from dpkg's database, the maintainer scripts, conffiles and md5sums.

use std::time::Duration;

use crate::guest::{Agent, AgentError, ExecRequest};

/// Runs as `sh -c SCRIPT sh PACKAGE OUTPUT`: arguments are positional, never spliced into the text.
const SCRIPT: &str = r#"set -eu
pkg="$1"; out="$2"
arch=$(dpkg --print-architecture)
info=/var/lib/dpkg/info
base="$pkg"; [ -e "$info/$pkg.list" ] || base="$pkg:$arch"
[ -e "$info/$base.list" ] || { echo "no file list for $pkg" >&2; exit 3; }
work=$(mktemp -d /var/tmp/patchlab-repack.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/DEBIAN"
# Control: the status entry without the fields that only describe this installation.
dpkg-query --status "$pkg" | awk '
  /^[A-Za-z-]+:/ { skip = ($1 == "Status:" || $1 == "Config-Version:" || $1 == "Conffiles:") }
  !skip { print }' > "$work/root/DEBIAN/control"
for f in preinst postinst prerm postrm config templates triggers shlibs symbols md5sums; do
  [ -e "$info/$base.$f" ] && cp -p "$info/$base.$f" "$work/root/DEBIAN/$f"
done
dpkg-query --showformat='${Conffiles}\n' --show "$pkg" | awk 'NF >= 2 && $3 != "obsolete" { print $1 }' > "$work/root/DEBIAN/conffiles"
[ -s "$work/root/DEBIAN/conffiles" ] || rm -f "$work/root/DEBIAN/conffiles"
# The package's files as they are on disk; tar keeps modes, owners and mtimes.
grep -v '^/\.$' "$info/$base.list" | sed 's|^/||' | while IFS= read -r f; do
  if [ -e "/$f" ] || [ -L "/$f" ]; then printf '%s\n' "$f"; fi
done > "$work/files"
tar -C / --no-recursion -cf - -T "$work/files" | tar -C "$work/root" -xpf -
dpkg-deb --build "$work/root" "$out" >/dev/null
"#;

pub fn repack(agent: &Agent<'_>, package: &str, output: &str) -> Result<(), AgentError> {
    let req = ExecRequest::new("/bin/sh", &["-c", SCRIPT, "sh", package, output], Duration::from_secs(300));
    let result = agent.exec(&req)?;
    if !result.success() {
        return Err(AgentError::Refused { command: "guest-exec", message: format!("repacking {package} failed ({:?}): {}", result.exit_code, result.stderr.text.trim()) });
    }
    Ok(())
}
