//! What the receiver's process tests share: a site (key, config, state
//! directory), the gateway-rx binary as a child process, and what a user
//! checks afterwards (tags put once, the digest served).
#![allow(dead_code, unsafe_code)] // each test binary uses its own part; unsafe: kill(2) on our child

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use weir_proto::Key;
use weir_test_support::{SampleImage, TestRegistry};

pub const SECRET: [u8; 32] = [3; 32];

pub fn key() -> Key {
    Key::from_bytes(1, &SECRET).unwrap()
}

pub struct Setup {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub config: PathBuf,
}

pub fn setup(registry: &TestRegistry) -> Setup {
    setup_with(&format!(
        "[delivery]\nregistry_url = \"http://{}\"\nretry_max_seconds = 2\n",
        registry.addr()
    ))
}

/// A site whose config ends with `delivery` (a `[delivery]` table).
pub fn setup_with(delivery: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let key_path = dir.path().join("1.key");
    std::fs::write(&key_path, hex::encode(SECRET)).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.path().join("rx.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}/state\"\n[link]\ntransport = \"udp\"\nudp_listen = \"{addr}\"\n\
             [[auth.keys]]\nid = 1\nfile = \"{}\"\n{delivery}",
            dir.path().display(),
            key_path.display(),
        ),
    )
    .unwrap();
    Setup { dir, addr, config }
}

pub struct Gateway {
    child: Child,
    state_dir: PathBuf,
}

impl Gateway {
    /// Starts the gateway and waits until it runs.
    pub fn start(s: &Setup) -> Gateway {
        let g = Gateway::spawn(s, &[]);
        g.wait_for(
            "startup",
            Duration::from_secs(30),
            |r| r["running"] == true,
            &mut || {},
        );
        g
    }

    /// Starts the gateway with `env` added, without waiting for it.
    pub fn spawn(s: &Setup, env: &[(&str, &str)]) -> Gateway {
        let _ = std::fs::remove_file(s.dir.path().join("state/status.json"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.dir.path().join("gateway.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gateway-rx"))
            .arg("--config")
            .arg(&s.config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        Gateway {
            child,
            state_dir: s.dir.path().join("state"),
        }
    }

    /// The exit status, if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    pub fn status(&self) -> Option<serde_json::Value> {
        let bytes = std::fs::read(self.state_dir.join("status.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&serde_json::Value) -> bool,
        meanwhile: &mut dyn FnMut(),
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.status() {
                if cond(&s) {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:#?}",
                self.status()
            );
            meanwhile();
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&self) {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        self.sigterm();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "gateway did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn counter(s: &serde_json::Value, name: &str) -> u64 {
    s["counters"][name].as_u64().unwrap_or(0)
}

pub fn assert_delivered_once(reg: &TestRegistry, img: &SampleImage) {
    for tag in &img.tm.destination.tags {
        assert_eq!(
            reg.manifest_puts(&img.tm.destination.repository, tag),
            1,
            "tag {tag}"
        );
    }
    let digest = served_digest(
        reg,
        &img.tm.destination.repository,
        &img.tm.destination.tags[0],
    );
    assert_eq!(digest, img.tm.manifest.digest);
}

/// The digest the registry serves for repo:tag (a plain HTTP HEAD).
pub fn served_digest(reg: &TestRegistry, repo: &str, tag: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(reg.addr()).unwrap();
    write!(
        s,
        "HEAD /v2/{repo}/manifests/{tag} HTTP/1.0\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n\r\n"
    )
    .unwrap();
    let mut head = String::new();
    s.read_to_string(&mut head).unwrap();
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("docker-content-digest")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no digest header: {head}"))
}
