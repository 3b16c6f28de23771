use super::*;

fn fp(entries: &[(&str, &str, &str)]) -> Fingerprint {
    Fingerprint { entries: entries.iter().map(|(k, i, s)| (collect::key(k, i), s.to_string())).collect(), capture_ms: 0 }
}

fn spec(allow: &[&str]) -> FingerprintSpec {
    FingerprintSpec { watch: vec![], allow: allow.iter().map(|s| s.to_string()).collect() }
}

fn d(kind: &str, item: &str, before: Option<&str>, after: Option<&str>) -> Difference {
    Difference { kind: kind.into(), item: item.into(), before: before.map(Into::into), after: after.map(Into::into) }
}

#[test]
fn diff_table() {
    struct Case {
        name: &'static str,
        before: Vec<(&'static str, &'static str, &'static str)>,
        after: Vec<(&'static str, &'static str, &'static str)>,
        allow: Vec<&'static str>,
        want: Vec<Difference>,
        allowed: u64,
    }
    let base = vec![("package", "nginx", "1.0 ii"), ("file", "/etc/nginx/nginx.conf", "file sha256=aa"), ("user", "root", "uid=0")];
    let cases = vec![
        Case { name: "identical", before: base.clone(), after: base.clone(), allow: vec![], want: vec![], allowed: 0 },
        Case { name: "both empty", before: vec![], after: vec![], allow: vec![], want: vec![], allowed: 0 },
        Case {
            name: "added, removed, changed",
            before: vec![("package", "a", "1 ii"), ("file", "/etc/x", "old"), ("user", "gone", "uid=5")],
            after: vec![("package", "a", "1 ii"), ("file", "/etc/x", "new"), ("group", "new", "gid=9")],
            allow: vec![],
            want: vec![d("file", "/etc/x", Some("old"), Some("new")), d("group", "new", None, Some("gid=9")), d("user", "gone", Some("uid=5"), None)],
            allowed: 0,
        },
        Case {
            name: "sorted by kind then item, not by insertion or state",
            before: vec![],
            after: vec![("unit", "b.service", "x"), ("file", "/z", "x"), ("file", "/a b", "x"), ("file", "/a/b", "x"), ("cron", "/etc/cron.d/j", "x"), ("file", "/a", "x")],
            allow: vec![],
            want: vec![
                d("cron", "/etc/cron.d/j", None, Some("x")),
                d("file", "/a", None, Some("x")),
                d("file", "/a b", None, Some("x")),
                d("file", "/a/b", None, Some("x")),
                d("file", "/z", None, Some("x")),
                d("unit", "b.service", None, Some("x")),
            ],
            allowed: 0,
        },
        Case {
            name: "ties: same item under two kinds are two differences",
            before: vec![],
            after: vec![("user", "www", "uid=1"), ("group", "www", "gid=1")],
            allow: vec![],
            want: vec![d("group", "www", None, Some("gid=1")), d("user", "www", None, Some("uid=1"))],
            allowed: 0,
        },
        Case {
            name: "kind-prefixed globs filter only their kind",
            before: vec![("file", "/var/log/syslog", "a"), ("unit", "apt.timer", "waiting")],
            after: vec![("file", "/var/log/syslog", "b"), ("file", "/var/log/nginx/access.log", "c"), ("unit", "apt.timer", "running"), ("package", "apt.timer", "1 ii")],
            allow: vec!["file:/var/log/**", "unit:*.timer"],
            want: vec![d("package", "apt.timer", None, Some("1 ii"))],
            allowed: 3,
        },
        Case {
            name: "a path glob without a prefix covers file and cron, not other kinds",
            before: vec![],
            after: vec![("file", "/etc/a.conf", "x"), ("cron", "/etc/cron.d/a.conf", "x"), ("user", "/etc/b.conf", "x"), ("file", "/etc/sub/c.conf", "x")],
            allow: vec!["/etc/*.conf", "/etc/cron.d/*"],
            want: vec![d("file", "/etc/sub/c.conf", None, Some("x")), d("user", "/etc/b.conf", None, Some("x"))],
            allowed: 2,
        },
        Case {
            name: "** crosses directories, * does not",
            before: vec![],
            after: vec![("file", "/var/lib/dpkg/status-old", "x"), ("file", "/var/lib/dpkg/sub/status-old", "x"), ("file", "/var/lib/dpkg/triggers/a/b", "x"), ("file", "/var/lib/dpkg/triggers", "dir")],
            allow: vec!["file:/var/lib/dpkg/*-old", "file:/var/lib/dpkg/triggers/**"],
            want: vec![d("file", "/var/lib/dpkg/sub/status-old", None, Some("x")), d("file", "/var/lib/dpkg/triggers", None, Some("dir"))],
            allowed: 2,
        },
        Case {
            name: "the defaults absorb known noise and nothing else",
            before: vec![("file", "/var/lib/systemd/random-seed", "a"), ("file", "/etc/passwd-", "a"), ("file", "/etc/passwd", "a")],
            after: vec![("file", "/var/lib/systemd/random-seed", "b"), ("file", "/etc/passwd-", "b"), ("file", "/etc/passwd", "b")],
            allow: DEFAULT_ALLOW.to_vec(),
            want: vec![d("file", "/etc/passwd", Some("a"), Some("b"))],
            allowed: 2,
        },
        Case {
            name: "an invalid glob in a hand-built spec matches nothing",
            before: vec![],
            after: vec![("file", "/etc/x", "x")],
            allow: vec!["file:/etc/[x"],
            want: vec![d("file", "/etc/x", None, Some("x"))],
            allowed: 0,
        },
    ];
    for c in cases {
        let out = diff(&fp(&c.before), &fp(&c.after), &spec(&c.allow));
        assert_eq!(out.differences, c.want, "{}", c.name);
        assert_eq!(out.allowed, c.allowed, "{}", c.name);
        // Pure and deterministic: the same inputs give the same outcome.
        assert_eq!(out, diff(&fp(&c.before), &fp(&c.after), &spec(&c.allow)), "{}", c.name);
    }
}

#[test]
fn with_defaults_adds_to_the_defaults_and_names_bad_entries() {
    let s = FingerprintSpec::with_defaults(&["/var/www".into(), "/etc".into()], &["file:/var/www/cache/**".into(), "/srv/*.tmp".into()]).unwrap();
    assert!(s.watch.iter().any(|w| w == "/var/www"));
    assert_eq!(s.watch.iter().filter(|w| *w == "/etc").count(), 1, "deduplicated");
    for w in DEFAULT_WATCH {
        assert!(s.watch.iter().any(|x| x == w), "{w}");
    }
    assert!(s.allow.iter().any(|a| a == "/srv/*.tmp"));
    assert_eq!(s.allow.len(), DEFAULT_ALLOW.len() + 2);

    for (watch, allow, needle) in [
        (vec!["etc"], vec![], "\"etc\""),
        (vec![], vec!["file:/etc/[x"], "file:/etc/[x"),
        (vec![], vec!["pkg:nginx"], "unknown kind \"pkg\""),
        (vec![], vec!["var/log/*"], "var/log/*"),
        (vec![], vec!["unit:"], "empty glob"),
    ] {
        let watch: Vec<String> = watch.into_iter().map(String::from).collect();
        let allow: Vec<String> = allow.into_iter().map(String::from).collect();
        let err = FingerprintSpec::with_defaults(&watch, &allow).unwrap_err();
        assert!(err.contains(needle), "{err:?} should contain {needle:?}");
    }
}

#[test]
fn every_default_allow_entry_compiles() {
    for a in DEFAULT_ALLOW {
        Allow::compile(a).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn the_request_passes_paths_as_arguments_with_their_mode() {
    let s = FingerprintSpec::with_defaults(&["/srv/it's $(here)".into()], &[]).unwrap();
    let r = request(&s);
    assert_eq!(r.program, "/bin/sh");
    assert_eq!(&r.args[..3], &["-c".to_string(), collect::SCRIPT.to_string(), "sh".to_string()]);
    let pairs: Vec<(&str, &str)> = r.args[3..].chunks(2).map(|c| (c[0].as_str(), c[1].as_str())).collect();
    assert!(pairs.contains(&("m", "/usr")));
    assert!(pairs.contains(&("h", "/usr/local")));
    assert!(pairs.contains(&("h", "/etc")));
    assert!(pairs.contains(&("h", "/srv/it's $(here)")));
    assert!(r.output_limit >= 32 * 1024 * 1024);
}

#[test]
fn capture_runs_one_command_and_parses_its_output() {
    use crate::guest::fake::FakeGuest;
    let out = "patchlab-fingerprint 1\0#packages\0nginx\t1.0\tii \0#units\0\0#sockets\0\0#passwd\0root:x:0:0:root:/root:/bin/bash\0#group\0root:x:0:\0#modules\0\0#files\0F\td\t755\t0\t0\t4096\t1.5\t/etc\0\0#end\0";
    let guest = FakeGuest::new(move |program, args| (program == "/bin/sh" && args[0] == "-c").then(|| (0, out.as_bytes().to_vec(), vec![])));
    let agent = Agent::new(&guest, Default::default());
    let spec = FingerprintSpec::with_defaults(&[], &[]).unwrap();
    let f = capture(&agent, &spec).unwrap();
    assert_eq!(guest.commands().len(), 1, "one command per capture");
    assert_eq!(f.entries.len(), 4);
    assert_eq!(f.entries[&collect::key("file", "/etc")], "dir mode=0755 owner=root:root");

    let cut = FakeGuest::new(move |_, _| Some((0, out.as_bytes()[..out.len() - 5].to_vec(), vec![])));
    let err = capture(&Agent::new(&cut, Default::default()), &spec).unwrap_err();
    assert!(matches!(err, AgentError::Malformed { .. }), "{err}");

    let failing = FakeGuest::new(|_, _| Some((2, vec![], b"sh: boom".to_vec())));
    let err = capture(&Agent::new(&failing, Default::default()), &spec).unwrap_err();
    assert!(err.to_string().contains("boom"), "{err}");
}
