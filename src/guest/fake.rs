//! An in-memory guest that speaks the agent protocol, for tests of the layers above the agent.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{AgentChannel, AgentError};

/// What a fake command returns: exit code, stdout, stderr.
pub type Reply = (i64, Vec<u8>, Vec<u8>);
type Handler = Box<dyn Fn(&str, &[String]) -> Option<Reply> + Send + Sync>;

#[derive(Default)]
struct State {
    files: HashMap<String, Vec<u8>>,
    handles: HashMap<i64, (String, usize)>,
    finished: HashMap<i64, Reply>,
    /// Output of commands run by `Agent::exec_bounded`, by capture directory: stdout, stderr, limit.
    captured: HashMap<String, (Vec<u8>, Vec<u8>, usize)>,
    next: i64,
    log: Vec<String>,
}

pub struct FakeGuest {
    state: Mutex<State>,
    handler: Handler,
    /// Bytes the fake flips in every written file, to simulate corruption in transit.
    pub corrupt_writes: bool,
}

impl FakeGuest {
    /// `handler` answers commands; unknown commands exit 127. `sha256sum` is built in.
    pub fn new(handler: impl Fn(&str, &[String]) -> Option<Reply> + Send + Sync + 'static) -> Self {
        FakeGuest { state: Mutex::default(), handler: Box::new(handler), corrupt_writes: false }
    }

    pub fn file(&self, path: &str) -> Option<Vec<u8>> {
        self.state.lock().unwrap().files.get(path).cloned()
    }

    pub fn put_file(&self, path: &str, data: &[u8]) {
        self.state.lock().unwrap().files.insert(path.into(), data.to_vec());
    }

    /// Every command line the guest ran, in order.
    pub fn commands(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    fn run(&self, state: &mut State, program: &str, args: &[String]) -> Reply {
        // `Agent::exec_bounded`: run the command itself, keep its output for the collect step.
        if program == "/bin/sh" && args.len() >= 6 && args[0] == "-c" && args[1] == super::CAPTURE {
            let (code, out, err) = self.run(state, &args[5], &args[6..]);
            let limit = args[4].parse().expect("the capture limit is a number");
            state.captured.insert(args[3].clone(), (out, err, limit));
            return (code, vec![], vec![]);
        }
        if program == "/bin/sh" && args.len() >= 4 && args[0] == "-c" && args[1] == super::COLLECT {
            return match state.captured.remove(&args[3]) {
                Some((out, err, limit)) => (0, super::collected_for(&out, &err, limit), vec![]),
                None => (3, vec![], b"no capture directory\n".to_vec()),
            };
        }
        state.log.push(std::iter::once(program.to_string()).chain(args.iter().cloned()).collect::<Vec<_>>().join(" "));
        if program.ends_with("sha256sum") {
            let path = args.last().cloned().unwrap_or_default();
            return match state.files.get(&path) {
                Some(data) => (0, format!("{}  {path}\n", hex::encode(Sha256::digest(data))).into_bytes(), vec![]),
                None => (1, vec![], format!("sha256sum: {path}: No such file or directory\n").into_bytes()),
            };
        }
        (self.handler)(program, args).unwrap_or((127, vec![], format!("{program}: not found\n").into_bytes()))
    }
}

impl AgentChannel for FakeGuest {
    fn call(&self, request: &str, _timeout: Duration) -> Result<String, AgentError> {
        let req: Value = serde_json::from_str(request).expect("the agent layer sends JSON");
        let args = &req["arguments"];
        let mut st = self.state.lock().unwrap();
        let ret = match req["execute"].as_str().unwrap_or_default() {
            "guest-ping" | "guest-set-time" => json!({}),
            "guest-exec" => {
                let program = args["path"].as_str().unwrap_or_default().to_string();
                let argv: Vec<String> = args["arg"].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect()).unwrap_or_default();
                let reply = self.run(&mut st, &program, &argv);
                st.next += 1;
                let pid = st.next;
                st.finished.insert(pid, reply);
                json!({ "pid": pid })
            }
            "guest-exec-status" => {
                let (code, out, err) = st.finished.remove(&args["pid"].as_i64().unwrap_or_default()).expect("known pid");
                json!({ "exited": true, "exitcode": code, "out-data": B64.encode(out), "err-data": B64.encode(err) })
            }
            "guest-file-open" => {
                let path = args["path"].as_str().unwrap_or_default().to_string();
                if args["mode"] == "w" {
                    st.files.insert(path.clone(), Vec::new());
                } else if !st.files.contains_key(&path) {
                    return Ok(json!({ "error": { "class": "GenericError", "desc": format!("failed to open file '{path}'") } }).to_string());
                }
                st.next += 1;
                let handle = st.next;
                st.handles.insert(handle, (path, 0));
                json!(handle)
            }
            "guest-file-write" => {
                let (path, _) = st.handles[&args["handle"].as_i64().unwrap_or_default()].clone();
                let mut data = B64.decode(args["buf-b64"].as_str().unwrap_or_default()).unwrap();
                if self.corrupt_writes {
                    data.iter_mut().for_each(|b| *b ^= 0xff);
                }
                let n = data.len();
                st.files.get_mut(&path).unwrap().extend(data);
                json!({ "count": n, "eof": false })
            }
            "guest-file-read" => {
                let handle = args["handle"].as_i64().unwrap_or_default();
                let (path, pos) = st.handles[&handle].clone();
                let data = &st.files[&path];
                let end = (pos + args["count"].as_u64().unwrap_or(4096) as usize).min(data.len());
                let chunk = B64.encode(&data[pos..end]);
                let eof = end == data.len();
                st.handles.insert(handle, (path, end));
                json!({ "count": end - pos, "buf-b64": chunk, "eof": eof })
            }
            "guest-file-close" => {
                st.handles.remove(&args["handle"].as_i64().unwrap_or_default());
                json!({})
            }
            other => return Ok(json!({ "error": { "class": "CommandNotFound", "desc": format!("command {other} not found") } }).to_string()),
        };
        Ok(json!({ "return": ret }).to_string())
    }
}
