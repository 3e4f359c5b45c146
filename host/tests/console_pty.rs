//! The serial console over a real pty pair: the test types commands at one
//! end and reads the console's answers at the other.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::PtyPair;
use weir_host::console::{Command, CommandHandler, Console, Reply};
use weir_host::Shutdown;

struct Gateway;

const COMMANDS: &[Command] = &[
    Command {
        name: "status",
        usage: "",
        summary: "link state, rates, queue, per image progress",
    },
    Command {
        name: "resend",
        usage: "<digest>",
        summary: "queue an image for new passes",
    },
];

impl CommandHandler for Gateway {
    fn commands(&self) -> &[Command] {
        COMMANDS
    }

    fn handle(&self, command: &str, args: &[&str]) -> Reply {
        match (command, args) {
            ("status", []) => Reply::text("link: up (heartbeats 1/s)\nqueue: 3 objects"),
            ("resend", [digest]) => Reply::text(format!("queued {digest} for new passes")),
            _ => Reply::error("usage: resend <digest>"),
        }
    }
}

const PROMPT: &str = "weir-tx> ";

/// Reads until the prompt ends the output; panics after a few seconds.
fn read_until_prompt(tty: &mut serialport::TTYPort) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&got).ends_with(PROMPT) {
        assert!(
            Instant::now() < deadline,
            "no prompt; got {:?}",
            String::from_utf8_lossy(&got)
        );
        match tty.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::TimedOut => {}
            Err(e) => panic!("reading console: {e}"),
        }
    }
    String::from_utf8(got).expect("console output is ASCII")
}

fn ask(tty: &mut serialport::TTYPort, typed: &[u8]) -> String {
    tty.write_all(typed).unwrap();
    read_until_prompt(tty)
}

#[test]
fn console_answers_typed_commands_over_a_pty() {
    if !support::have_socat("console_answers_typed_commands_over_a_pty") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = PtyPair::new(dir.path(), "console");
    let mut terminal = support::open_raw(&pair.b, Duration::from_millis(100));
    let shutdown = Shutdown::new();
    let console = Console::spawn(
        &pair.a,
        115_200,
        "tx",
        "0.1.0",
        Arc::new(Gateway),
        shutdown.clone(),
    )
    .unwrap();

    let banner = read_until_prompt(&mut terminal);
    assert_eq!(banner, format!("weir tx 0.1.0 console ready\r\n{PROMPT}"));

    let help = ask(&mut terminal, b"help\r");
    assert!(help.starts_with("help\r\ncommands:\r\n"), "{help:?}");
    assert!(
        help.contains("  help             this list\r\n"),
        "{help:?}"
    );
    assert!(
        help.contains("  status           link state, rates, queue, per image progress\r\n"),
        "{help:?}"
    );
    assert!(
        help.contains("  resend <digest>  queue an image for new passes\r\n"),
        "{help:?}"
    );

    let status = ask(&mut terminal, b"status\n");
    assert_eq!(
        status,
        format!("status\r\nlink: up (heartbeats 1/s)\r\nqueue: 3 objects\r\n{PROMPT}")
    );

    let bogus = ask(&mut terminal, b"bogus\r\n");
    assert_eq!(
        bogus,
        format!("bogus\r\nerror: unknown command 'bogus' (try help)\r\n{PROMPT}")
    );

    // A typo fixed with backspace, and arguments.
    let resend = ask(&mut terminal, b"resemd\x7f\x7fnd sha256:abc\r");
    assert!(
        resend.ends_with(&format!("\r\nqueued sha256:abc for new passes\r\n{PROMPT}")),
        "{resend:?}"
    );

    let usage = ask(&mut terminal, b"resend\r");
    assert!(
        usage.ends_with(&format!("error: usage: resend <digest>\r\n{PROMPT}")),
        "{usage:?}"
    );

    shutdown.trigger();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !console.is_finished() {
        assert!(
            Instant::now() < deadline,
            "console did not stop on shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    console.join();
}

#[test]
fn a_missing_console_device_is_an_error_naming_it() {
    let err = Console::spawn(
        std::path::Path::new("/nonexistent/ttyS9"),
        115_200,
        "rx",
        "0.1.0",
        Arc::new(Gateway),
        Shutdown::new(),
    )
    .err()
    .expect("no such device");
    assert!(err.to_string().contains("/nonexistent/ttyS9"), "{err}");
}

#[test]
fn console_reopens_its_device_after_it_went_away() {
    if !support::have_socat("console_reopens_its_device_after_it_went_away") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pair = PtyPair::new(dir.path(), "flaky");
    let mut terminal = support::open_raw(&pair.b, Duration::from_millis(100));
    let shutdown = Shutdown::new();
    let console = Console::spawn(
        &pair.a,
        115_200,
        "tx",
        "0.1.0",
        Arc::new(Gateway),
        shutdown.clone(),
    )
    .unwrap();
    assert!(read_until_prompt(&mut terminal).starts_with("weir tx 0.1.0 console ready"));
    // The device goes away (a USB adapter pulled) and comes back.
    drop(terminal);
    drop(pair);
    let pair = PtyPair::new(dir.path(), "flaky");
    let mut terminal = support::open_raw(&pair.b, Duration::from_millis(100));
    assert!(read_until_prompt(&mut terminal).starts_with("weir tx 0.1.0 console ready"));
    let status = ask(&mut terminal, b"status\r");
    assert!(status.contains("queue: 3 objects"), "{status:?}");
    shutdown.trigger();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !console.is_finished() {
        assert!(
            Instant::now() < deadline,
            "console did not stop on shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    console.join();
}
