//! The distribution's nginx, a master and its workers: patched with one `load --children`, every
//! worker serves the patched response, workers the master forks later (a reload) are patched
//! too, and `disable --children` restores the original response everywhere.
//!
//! nginx comes from the distribution (`apt-get install nginx`, which `.ci/run` does).

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use support::{Cc, cli, livepatch, path_str, scratch, status_json, stderr, stdout, wait_for};

const NGINX: &str = "/usr/sbin/nginx";
const WORKERS: usize = 2;

/// nginx under the agent, killed with its workers when dropped.
struct Nginx {
    master: Child,
    dir: PathBuf,
    port: u16,
}

impl Nginx {
    /// nginx started with `livepatch run`, or (`with_agent` false) as the distribution starts
    /// it, without the agent.
    fn start(name: &str, with_agent: bool) -> Nginx {
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} is missing: install the distribution's nginx (apt-get install nginx)"
        );
        let dir = scratch().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        // A port free now; nginx binds it at once.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = path_str(&dir);
        let config = format!(
            "daemon off;\nmaster_process on;\nworker_processes {WORKERS};\npid {d}/nginx.pid;\n\
             error_log {d}/error.log notice;\nevents {{ worker_connections 64; }}\nhttp {{\n\
             log_format workers '$pid $status';\naccess_log {d}/access.log workers;\n\
             client_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n\
             server {{ listen 127.0.0.1:{port} reuseport; \
             location / {{ return 200 \"original\\n\"; }} }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), config).unwrap();
        let mut command = if with_agent {
            let mut run = livepatch();
            run.args(["run", NGINX]);
            run
        } else {
            Command::new(NGINX)
        };
        let master = command
            .args(["-p", d, "-e"])
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .env("LIVEPATCH_SOCKET_DIR", scratch().join("sockets"))
            .stdin(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let nginx = Nginx { master, dir, port };
        nginx.workers(with_agent);
        nginx
    }

    fn pid(&self) -> String {
        self.master.id().to_string()
    }

    /// The master's workers, once there are [`WORKERS`] of them (each with an agent that
    /// answers, if `with_agent`), and no other (a reload's old workers gone).
    fn workers(&self, with_agent: bool) -> BTreeSet<String> {
        wait_for("nginx's workers and their agents", || {
            let workers = children(self.master.id());
            let answering = workers
                .iter()
                .filter(|w| {
                    let out = cli(&["status", w, "--timeout", "1"]);
                    out.status.success() == with_agent
                })
                .count();
            if workers.len() == WORKERS && answering == WORKERS {
                Ok(workers.clone())
            } else {
                Err(format!("workers {workers:?}, {answering} answering"))
            }
        })
    }

    /// The status of a response to `GET /`, and its body.
    fn get(&self) -> (u16, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("nginx accepts");
        stream
            .write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// Requests until every worker in `workers` logged one with `status`, asserting that every
    /// answer has that status.
    fn every_worker_answers(&self, workers: &BTreeSet<String>, status: u16) {
        let log = self.dir.join("access.log");
        let _ = std::fs::write(&log, "");
        wait_for(&format!("every worker to answer {status}"), || {
            let (got, body) = self.get();
            assert_eq!(got, status, "a request was answered {got} {body:?}");
            let logged = std::fs::read_to_string(&log).unwrap_or_default();
            let served: BTreeSet<String> = logged
                .lines()
                .filter(|l| l.ends_with(&format!(" {status}")))
                .filter_map(|l| l.split(' ').next().map(str::to_owned))
                .collect();
            if workers.is_subset(&served) {
                Ok(())
            } else {
                Err(format!("served by {served:?} of {workers:?}"))
            }
        });
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers, then exits.
        if signal(self.master.id(), libc::SIGTERM) {
            let _ = self.master.wait();
        }
    }
}

/// Sends `signal` to `pid`; whether it was sent.
fn signal(pid: u32, signal: i32) -> bool {
    // SAFETY: kill has no memory effects; the pid is a child of this test, not yet waited for.
    unsafe { libc::kill(pid as i32, signal) == 0 }
}

/// The children of `pid`.
fn children(pid: u32) -> BTreeSet<String> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn nginx_master_and_workers_are_patched_with_one_command_and_a_reload_keeps_the_patch() {
    let nginx = Nginx::start("nginx-children", true);
    let master = nginx.pid();
    let workers = nginx.workers(true);
    assert_eq!(nginx.get(), (200, "original\n".to_owned()));
    let patch = Cc::library("nginx/forbidden-patch.c").build("nginx-forbidden");

    let load = cli(&["load", "--children", &master, path_str(&patch)]);
    assert!(load.status.success(), "{}", stderr(&load));
    for pid in std::iter::once(&master).chain(&workers) {
        assert!(
            stdout(&load).contains(&format!(
                "patch 'nginx-forbidden' enabled in process {pid}\n"
            )),
            "{}",
            stdout(&load)
        );
    }
    nginx.every_worker_answers(&workers, 403);

    // A reload: the master forks new workers, which have the master's patch.
    assert!(
        signal(nginx.master.id(), libc::SIGHUP),
        "nginx's master is gone"
    );
    let reloaded = wait_for("the reload's new workers", || {
        let now = nginx.workers(true);
        if now.is_disjoint(&workers) {
            Ok(now)
        } else {
            Err(format!("workers {now:?}"))
        }
    });
    for worker in &reloaded {
        let status = status_json(worker);
        assert_eq!(status["patches"][0]["name"], "nginx-forbidden", "{status}");
    }
    nginx.every_worker_answers(&reloaded, 403);

    let disable = cli(&["disable", "--children", &master, "nginx-forbidden"]);
    assert!(disable.status.success(), "{}", stderr(&disable));
    let unload = cli(&["unload", "--children", &master, "nginx-forbidden"]);
    assert!(unload.status.success(), "{}", stderr(&unload));
    nginx.every_worker_answers(&reloaded, 200);
    assert_eq!(nginx.get(), (200, "original\n".to_owned()));
}

#[test]
fn nginx_started_without_the_agent_is_attached_master_and_workers_with_one_command() {
    // The workers run as nobody and make their socket directory in the base, which must let
    // every user in, as /run/livepatch does (mode 1777).
    let base = scratch().join("sockets");
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let nginx = Nginx::start("nginx-attach", false);
    let master = nginx.pid();
    let workers = nginx.workers(false);
    assert_eq!(nginx.get(), (200, "original\n".to_owned()));
    let patch = Cc::library("nginx/forbidden-patch.c").build("nginx-forbidden");

    let load = cli(&["load", "--children", &master, path_str(&patch)]);
    assert!(load.status.success(), "{}", stderr(&load));
    for pid in std::iter::once(&master).chain(&workers) {
        for line in [
            format!("agent attached to process {pid} "),
            format!("patch 'nginx-forbidden' enabled in process {pid}\n"),
        ] {
            assert!(stdout(&load).contains(&line), "{}", stdout(&load));
        }
    }
    nginx.every_worker_answers(&workers, 403);

    let disable = cli(&["disable", "--children", &master, "nginx-forbidden"]);
    assert!(disable.status.success(), "{}", stderr(&disable));
    nginx.every_worker_answers(&workers, 200);
}
