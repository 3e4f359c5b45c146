//! kill -9 of the gateway-rx binary while receiving and while delivering:
//! after a restart every image is still delivered, each tag put once.

// libc::kill sends SIGTERM to the gateway under test; std can only SIGKILL.
#![allow(unsafe_code)]

#[path = "../src/testing.rs"]
mod testing;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testing::{registry_or_skip, sample_image, SampleImage, TestRegistry, TestSender};
use weir_proto::Key;

const SECRET: [u8; 32] = [3; 32];

fn key() -> Key {
    Key::from_bytes(1, &SECRET).unwrap()
}

struct Setup {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    config: PathBuf,
}

fn setup(registry: &TestRegistry) -> Setup {
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
             [[auth.keys]]\nid = 1\nfile = \"{}\"\n[delivery]\nregistry_url = \"http://{}\"\n\
             retry_max_seconds = 2\n",
            dir.path().display(),
            key_path.display(),
            registry.addr()
        ),
    )
    .unwrap();
    Setup { dir, addr, config }
}

struct Gateway {
    child: Child,
    state_dir: PathBuf,
}

impl Gateway {
    fn start(s: &Setup) -> Gateway {
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
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let g = Gateway {
            child,
            state_dir: s.dir.path().join("state"),
        };
        g.wait_for(
            "startup",
            Duration::from_secs(30),
            |r| r["running"] == true,
            &mut || {},
        );
        g
    }

    fn status(&self) -> Option<serde_json::Value> {
        let bytes = std::fs::read(self.state_dir.join("status.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn wait_for(
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
    fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, and the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
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

fn counter(s: &serde_json::Value, name: &str) -> u64 {
    s["counters"][name].as_u64().unwrap_or(0)
}

fn assert_delivered_once(reg: &TestRegistry, img: &SampleImage) {
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
fn served_digest(reg: &TestRegistry, repo: &str, tag: &str) -> String {
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

#[test]
fn kill_9_while_receiving_then_restart_delivers_once() {
    let Some(reg) = registry_or_skip(&TestRegistry::default_options()) else {
        return;
    };
    let s = setup(&reg);
    let img = sample_image("team/app", &["1.0", "stable"], 4, 400_000);
    let mut tx = TestSender::new(key(), 10, s.addr, 1400, 16, 4);
    let frames = tx.seal(&img.objects(), &mut |_, _| true, &mut |_, _, _, _| {});

    let gw = Gateway::start(&s);
    // Send most of a pass from another thread and kill the gateway while
    // frames are still coming in.
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    let sender = std::thread::spawn({
        let frames = frames[..frames.len() * 3 / 4].to_vec();
        let mut tx = TestSender::new(key(), 10, s.addr, 1400, 16, 4);
        move || {
            for (i, chunk) in frames.chunks(256).enumerate() {
                tx.send(chunk);
                if i == 4 {
                    let _ = sent_tx.send(());
                }
            }
        }
    });
    sent_rx.recv().unwrap();
    gw.wait_for(
        "shards stored",
        Duration::from_secs(30),
        |st| counter(st, "shards_stored") > 0,
        &mut || {},
    );
    gw.kill_9();
    sender.join().unwrap();

    let gw = Gateway::start(&s);
    let st = gw.wait_for(
        "delivery after the kill",
        Duration::from_secs(120),
        |st| counter(st, "pushes_done") == 1,
        &mut || {
            tx.pass(&img.objects());
        },
    );
    assert_eq!(counter(&st, "blobs_failed"), 0, "{st:#}");
    assert_delivered_once(&reg, &img);
    assert!(gw.terminate().success());
}

#[test]
fn kill_9_with_a_push_waiting_then_restart_delivers_each_tag_once() {
    let Some(mut reg) = registry_or_skip(&TestRegistry::default_options()) else {
        return;
    };
    reg.stop();
    let s = setup(&reg);
    let img = sample_image("team/db", &["15", "latest"], 2, 100_000);
    let mut tx = TestSender::new(key(), 20, s.addr, 1400, 16, 4);

    let gw = Gateway::start(&s);
    gw.wait_for(
        "the image complete and its push failing",
        Duration::from_secs(60),
        |st| counter(st, "images_complete") == 1 && st["pushes_failing"] == 1,
        &mut || {
            tx.pass(&img.objects());
        },
    );
    gw.kill_9();
    reg.start();
    let gw = Gateway::start(&s);
    gw.wait_for(
        "delivery after the kill",
        Duration::from_secs(60),
        |st| counter(st, "pushes_done") == 1,
        &mut || {},
    );
    assert_delivered_once(&reg, &img);
    assert!(gw.terminate().success());
    // Stopped: the status command reads the database.
    let out = Command::new(env!("CARGO_BIN_EXE_gateway-rx"))
        .args(["status", "--config"])
        .arg(&s.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("team/db:15 complete: 3/3 blobs, 100.0%"),
        "{text}"
    );
    assert!(text.contains("delivered: 1"), "{text}");
}

#[test]
fn kill_9_right_after_completion_still_delivers_each_tag_once() {
    let Some(reg) = registry_or_skip(&TestRegistry::default_options()) else {
        return;
    };
    let s = setup(&reg);
    // A large layer, so the kill likely lands while it is being pushed.
    let img = sample_image("team/big", &["1", "2"], 1, 24 << 20);
    let mut tx = TestSender::new(key(), 30, s.addr, 1400, 32, 8);
    let gw = Gateway::start(&s);
    gw.wait_for(
        "the image complete",
        Duration::from_secs(120),
        |st| counter(st, "images_complete") == 1,
        &mut || {
            if gw_status_done(&s.dir.path().join("state")) {
                return;
            }
            tx.pass(&img.objects());
        },
    );
    gw.kill_9();
    let gw = Gateway::start(&s);
    gw.wait_for(
        "delivery after the kill",
        Duration::from_secs(60),
        |st| counter(st, "pushes_done") >= 1 || st["deliveries"][0]["state"] == "done",
        &mut || {},
    );
    assert_delivered_once(&reg, &img);
    assert!(gw.terminate().success());
}

fn gw_status_done(state_dir: &Path) -> bool {
    std::fs::read(state_dir.join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|s| counter(&s, "images_complete") == 1)
}
