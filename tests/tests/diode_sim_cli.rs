//! The `diode-sim` binary as the demo and scripts run it: flags parsed,
//! datagrams forwarded one way with the configured loss, counters printed,
//! stopped by `--duration` or by SIGTERM.

// libc::kill sends SIGTERM to diode-sim; std can only SIGKILL.
#![allow(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

fn free_udp_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn counter(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        .parse()
        .unwrap()
}

/// Sends `n` datagrams slowly enough that no socket buffer overflows.
fn send(to: SocketAddr, n: usize) {
    let from = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..n {
        from.send_to(&[i as u8; 200], to).unwrap();
        if i % 50 == 49 {
            thread::sleep(Duration::from_millis(2));
        }
    }
}

fn stdout_lines(child: &mut Child) -> Vec<String> {
    let out = child.stdout.take().unwrap();
    BufReader::new(out).lines().map(Result::unwrap).collect()
}

/// Polls `done` every 10 ms; fails the test with `what` after 10 s.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for the sim's listening socket to exist.
fn wait_listening(listen: SocketAddr) {
    wait_until(&format!("diode-sim never bound {listen}"), || {
        weir_tests::diode::kernel_udp_drops(listen).is_some()
    });
}

#[test]
fn forwards_with_loss_prints_counters_and_stops_after_its_duration() {
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let listen = free_udp_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_diode-sim"))
        .args(["--listen", &listen.to_string()])
        .args(["--forward", &sink.local_addr().unwrap().to_string()])
        .args([
            "--seed",
            "5",
            "--loss",
            "0.1",
            // Far longer than the 1000 datagrams take to send (tens of
            // milliseconds), so that a machine loaded by other tests still
            // sends them all before the sim stops.
            "--duration",
            "10",
            "--stats-interval",
            "0.5",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(listen);
    // The sink drains until the sim has exited, not until a quiet spell, so a
    // sim that a loaded machine slows down still has everything counted.
    let sim_exited = Arc::new(AtomicBool::new(false));
    let receiver = thread::spawn({
        let sim_exited = Arc::clone(&sim_exited);
        move || {
            let mut got = 0u64;
            let mut buf = [0u8; 2048];
            loop {
                match sink.recv(&mut buf) {
                    Ok(_) => got += 1,
                    Err(_) if sim_exited.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            // Read while the socket is still open: its row leaves the table on close.
            let sink_drops = sink
                .local_addr()
                .ok()
                .and_then(weir_tests::diode::kernel_udp_drops)
                .unwrap_or(0);
            (got, sink_drops)
        }
    });
    let sending = Instant::now();
    send(listen, 1000);
    let sent_in = sending.elapsed();
    let lines = stdout_lines(&mut child);
    let status = child.wait().unwrap();
    sim_exited.store(true, Ordering::Relaxed);
    assert!(status.success());
    let (got, sink_drops) = receiver.join().unwrap();
    assert!(
        lines.iter().any(|l| l.starts_with("diode-sim stats ")),
        "{lines:?}"
    );
    let last = lines.last().expect("a final line");
    assert!(last.starts_with("diode-sim final "), "{last}");
    // On a loaded machine without CAP_NET_ADMIN the sim's socket buffer is
    // only what net.core.rmem_max grants, and the kernel may drop some of the
    // 1000 before the sim reads them; the sim reports those, so count them.
    assert!(
        sent_in < Duration::from_secs(9),
        "sending 1000 datagrams took {sent_in:?}, about the sim's whole run: too loaded a machine to judge"
    );
    let received = counter(last, "received");
    let kernel_dropped = counter(last, "kernel_dropped");
    assert_eq!(received + kernel_dropped, 1000, "{last}");
    assert!(
        received >= 500,
        "the sim read too few to judge its loss: {last}"
    );
    let (forwarded, lost) = (counter(last, "forwarded"), counter(last, "dropped_loss"));
    assert_eq!(forwarded + lost, received, "{last}");
    assert!(
        (received / 20..received * 16 / 100).contains(&lost),
        "10 % of {received} lost: {lost}"
    );
    assert_eq!(
        got + sink_drops,
        forwarded,
        "the sink got what the sim forwarded (the kernel dropped {sink_drops} at the sink)"
    );
}

#[test]
fn sigterm_stops_it_with_a_final_line() {
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let listen = free_udp_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_diode-sim"))
        .args(["--listen", &listen.to_string()])
        .args(["--forward", &sink.local_addr().unwrap().to_string()])
        .args(["--stats-interval", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(listen);
    send(listen, 10);
    // SIGTERM only once the sim has read all ten, however loaded the machine.
    wait_until("diode-sim never read its queue", || {
        weir_tests::diode::kernel_udp_queued(listen) == Some(0)
    });
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let lines = stdout_lines(&mut child);
    assert!(child.wait().unwrap().success());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(counter(&lines[0], "received"), 10);
    assert_eq!(counter(&lines[0], "forwarded"), 10);
}

#[test]
fn refuses_bad_flags() {
    let out = Command::new(env!("CARGO_BIN_EXE_diode-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--forward",
            "127.0.0.1:9",
            "--loss",
            "1.5",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loss = 1.5"));
}
