//! Domain XML for golden boots, and the rewrite that turns the golden's saved XML into a clone's.

use std::path::PathBuf;

use super::Accel;

pub const METADATA_URI: &str = "https://patchlab.dev/xmlns/clone/1";
pub const METADATA_KEY: &str = "patchlab";

/// Everything that makes one running machine distinct from another restored from the same state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub uuid: String,
    pub disk: PathBuf,
    pub console: PathBuf,
    /// (host port, guest port), in the same order for golden and clone.
    pub ports: Vec<(u16, u16)>,
}

#[derive(Debug, Clone)]
pub struct BootSpec {
    pub identity: Identity,
    pub accel: Accel,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// Direct kernel boot (kernel, initrd, command line); `None` boots the disk's own bootloader.
    pub kernel: Option<(PathBuf, PathBuf, String)>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

fn path(p: &std::path::Path) -> String {
    esc(&p.display().to_string())
}

/// The metadata element that marks a domain as patchlab's and names the run that owns it.
pub fn metadata_element(run_id: &str, role: &str) -> String {
    format!("<patchlab:instance xmlns:patchlab='{METADATA_URI}'><patchlab:run>{}</patchlab:run><patchlab:role>{}</patchlab:role></patchlab:instance>", esc(run_id), esc(role))
}

/// The clone's network: QEMU user-mode networking with `restrict=on`. The guest gets an address by
/// DHCP and can answer connections the host makes through the forwarded ports, but cannot open
/// any connection of its own: not to the host (passt, tried first, relays the guest's gateway to
/// the host's loopback), not to other clones, not outside. libvirt's `<interface type='user'>` has
/// no such switch, hence a netdev and device given on QEMU's command line, at a fixed PCI slot so
/// the saved device state always matches.
const NETDEV: &str = "user,id=plnet0,restrict=on";
const NET_DEVICE: &str = "virtio-net-pci,netdev=plnet0,bus=pci.0,addr=0x10";

fn netdev_arg(bind: std::net::IpAddr, ports: &[(u16, u16)]) -> String {
    let forwards: String = ports.iter().map(|(host, guest)| format!(",hostfwd=tcp:{bind}:{host}-:{guest}")).collect();
    format!("{NETDEV}{forwards}")
}

pub fn boot_xml(spec: &BootSpec, run_id: &str, role: &str) -> String {
    let id = &spec.identity;
    format!(
        "<domain type='{accel}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>{metadata}</metadata>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
{boot}  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='{netdev}'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='{NET_DEVICE}'/>
  </qemu:commandline>
</domain>
",
        netdev = netdev_arg(LOOPBACK, &id.ports),
        accel = spec.accel.domain_type(),
        name = esc(&id.name),
        uuid = esc(&id.uuid),
        metadata = metadata_element(run_id, role),
        memory = spec.memory_mib,
        vcpus = spec.vcpus,
        boot = match &spec.kernel {
            Some((kernel, initrd, cmdline)) => format!("    <kernel>{}</kernel>\n    <initrd>{}</initrd>\n    <cmdline>{}</cmdline>\n", path(kernel), path(initrd), esc(cmdline)),
            None => "    <boot dev='hd'/>\n".to_string(),
        },
        disk = path(&id.disk),
        console = path(&id.console),
    )
}

#[derive(Debug, thiserror::Error)]
#[error("saved domain XML does not contain {what} `{needle}` (found {found} times, expected {expected}); the golden state does not match its record")]
pub struct RewriteError {
    what: &'static str,
    needle: String,
    found: usize,
    expected: &'static str,
}

fn replace_checked(xml: &str, what: &'static str, from: &str, to: &str, exactly_once: bool) -> Result<String, RewriteError> {
    let found = xml.matches(from).count();
    if found == 0 || (exactly_once && found != 1) {
        let expected = if exactly_once { "exactly 1" } else { "at least 1" };
        return Err(RewriteError { what, needle: from.to_string(), found, expected });
    }
    Ok(xml.replace(from, to))
}

/// Turns the XML libvirt stored in the golden state into the XML of one clone.
///
/// Only values patchlab chose itself are replaced, each by exact match, so device addresses and
/// everything else QEMU's migration stream depends on stay as libvirt wrote them.
pub fn clone_xml(saved: &str, golden: &Identity, clone: &Identity, run_id: &str) -> Result<String, RewriteError> {
    clone_xml_bound(saved, golden, clone, run_id, LOOPBACK)
}

const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// [`clone_xml`] with the clone's forwarded ports bound to `bind` on the host running it: a
/// remote host's loopback address is out of the checks' reach, so they connect to the address
/// the host's URI names (see `remote`).
pub fn clone_xml_bound(saved: &str, golden: &Identity, clone: &Identity, run_id: &str, bind: std::net::IpAddr) -> Result<String, RewriteError> {
    let mut xml = replace_checked(saved, "the golden uuid", &format!("<uuid>{}</uuid>", golden.uuid), &format!("<uuid>{}</uuid>", clone.uuid), true)?;
    xml = replace_checked(&xml, "the golden disk", &format!("<source file='{}'", path(&golden.disk)), &format!("<source file='{}'", path(&clone.disk)), true)?;
    xml = replace_checked(&xml, "the golden console", &format!("'{}'", path(&golden.console)), &format!("'{}'", path(&clone.console)), false)?;
    // Forwarded ports are the netdev's configuration, not device state: the golden has none and
    // each clone gets its own, so one golden state serves labs that check different ports.
    if !golden.ports.is_empty() {
        return Err(RewriteError { what: "no forwarded ports in", needle: "the golden".into(), found: golden.ports.len(), expected: "0" });
    }
    let golden_netdev = format!("<qemu:arg value='{NETDEV}'/>");
    xml = replace_checked(&xml, "the user-mode netdev", &golden_netdev, &format!("<qemu:arg value='{}'/>", netdev_arg(bind, &clone.ports)), true)?;
    // The name also appears in paths libvirt derived from it (channel sockets): replace them all,
    // last, so the exact replacements above see the paths patchlab recorded.
    xml = replace_checked(&xml, "the golden name", &format!("<name>{}</name>", esc(&golden.name)), &format!("<name>{}</name>", esc(&clone.name)), true)?;
    xml = xml.replace(&golden.name, &clone.name);
    let start = xml.find("<patchlab:run>").map(|i| i + "<patchlab:run>".len());
    let end = xml.find("</patchlab:run>");
    match (start, end) {
        (Some(s), Some(e)) if s <= e => xml.replace_range(s..e, &esc(run_id)),
        _ => return Err(RewriteError { what: "the run metadata", needle: "<patchlab:run>".into(), found: 0, expected: "exactly 1" }),
    }
    Ok(xml.replace("<patchlab:role>golden</patchlab:role>", "<patchlab:role>clone</patchlab:role>"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(name: &str, ports: &[(u16, u16)]) -> Identity {
        Identity {
            name: name.into(),
            uuid: format!("{:08x}-0000-4000-8000-000000000000", name.len()),
            disk: format!("/var/lib/patchlab/{name}/disk.qcow2").into(),
            console: format!("/var/lib/patchlab/{name}/console.log").into(),
            ports: ports.to_vec(),
        }
    }

    fn spec(id: Identity) -> BootSpec {
        BootSpec { identity: id, accel: Accel::Tcg, memory_mib: 512, vcpus: 1, kernel: Some(("/k".into(), "/i".into(), "root=/dev/vda".into())) }
    }

    #[test]
    fn clone_xml_replaces_every_identity_field_and_nothing_else() {
        let golden = identity("patchlab-golden-abc", &[]);
        let saved = boot_xml(&spec(golden.clone()), "golden-run", "golden")
            .replace("</channel>", "<source path='/run/libvirt/qemu/channel/1-patchlab-golden-abc/org.qemu.guest_agent.0'/></channel>");
        let clone = identity("patchlab-r1-0", &[(41000, 80), (41001, 22)]);
        let xml = clone_xml(&saved, &golden, &clone, "run-42").unwrap();
        for needle in ["patchlab-golden-abc", "golden-run", "<patchlab:role>golden"] {
            assert!(!xml.contains(needle), "{needle} left in {xml}");
        }
        for needle in ["<name>patchlab-r1-0</name>", "<uuid>0000000d-0000-4000-8000-000000000000</uuid>", "patchlab-r1-0/disk.qcow2", "patchlab-r1-0/console.log", "hostfwd=tcp:127.0.0.1:41000-:80,hostfwd=tcp:127.0.0.1:41001-:22", "<patchlab:run>run-42</patchlab:run>", "1-patchlab-r1-0/org.qemu"] {
            assert!(xml.contains(needle), "{needle} missing from {xml}");
        }
        assert_eq!(xml.lines().count(), saved.lines().count());
    }

    #[test]
    fn clone_xml_refuses_a_state_that_does_not_match_its_record() {
        let golden = identity("patchlab-golden-abc", &[]);
        let saved = boot_xml(&spec(golden.clone()), "r", "golden");
        let mut wrong = golden.clone();
        wrong.disk = "/elsewhere/disk.qcow2".into();
        let err = clone_xml(&saved, &wrong, &identity("c", &[]), "r").unwrap_err();
        assert!(err.to_string().contains("the golden disk"), "{err}");
    }
}
