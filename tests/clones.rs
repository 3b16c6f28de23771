//! Real guests: two clones of one golden state run at the same time, each with its own identity.

mod common;

use std::time::Duration;

use patchlab::guest::Agent;
use patchlab::hypervisor::Machine;
use patchlab::hypervisor::runlock::{RunLock, new_run_id};

#[test]
fn two_clones_of_one_golden_state_run_side_by_side_and_leave_nothing_behind() {
    let Some(host) = common::host() else { return };
    let run_id = new_run_id();
    let _lock = RunLock::acquire(&host.dirs, &run_id).unwrap();
    let golden = common::golden(&host, "debian-12", "images/debian-12.toml", &run_id);
    let leaks = common::LeakCheck::new(&host, &run_id, &[&golden]);

    let names = [format!("patchlab-{run_id}-a"), format!("patchlab-{run_id}-b")];
    let clones: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = names.iter().map(|n| s.spawn(|| host.restore_clone(&golden, &run_id, n, &[80]).expect("restore clone"))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_ne!(clones[0].forwarded(80), clones[1].forwarded(80), "each clone forwards its own host port");

    let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::thread::scope(|s| {
        for clone in &clones {
            let payload = &payload;
            s.spawn(move || {
                let agent = Agent::new(clone.agent_channel(), Default::default());
                agent.wait_ready(Duration::from_secs(60)).expect("agent answers after restore");
                agent.set_time_now().expect("clock set");
                let date = agent.run_ok("/bin/date", &["+%s"], Duration::from_secs(30)).unwrap();
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
                assert!((date.trim().parse::<i64>().unwrap() - now).abs() < 30, "guest clock set to the host's: {date}");
                let digest = agent.push_file(payload, "/var/tmp/payload.bin").expect("push with digest check");
                assert_eq!(digest, patchlab::guest::Output::capture(payload, 0).sha256);
                assert_eq!(agent.read_file("/var/tmp/payload.bin", 1 << 20).unwrap(), *payload);
                let port = clone.forwarded(80).unwrap();
                assert_eq!(common::http_status(port), 200, "nginx answers through the clone's forwarded port");
            });
        }
    });
    // The clones are distinct machines: a file written in one is not in the other.
    let a = Agent::new(clones[0].agent_channel(), Default::default());
    a.run_ok("/bin/touch", &["/var/tmp/only-in-a"], Duration::from_secs(30)).unwrap();
    let b = Agent::new(clones[1].agent_channel(), Default::default());
    assert!(!b.exec(&patchlab::guest::ExecRequest::new("/usr/bin/test", &["-e", "/var/tmp/only-in-a"], Duration::from_secs(30))).unwrap().success());

    for mut clone in clones {
        clone.teardown().expect("teardown");
    }
    leaks.assert_clean();
}
