//! Scan reports for pulled images: a scanner command's stdout, or the
//! source registry's Quay security API. Either way the bytes are read by the
//! same parser as a drop's `<drop>.scan.json` ([`crate::policy::ScanSummary`]),
//! bounded in size, and the command in time.

use crate::policy::{ReportState, ScanSummary, MAX_SCAN_REPORT_BYTES};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use weir_host::Shutdown;

/// How often the command is checked on (exit, deadline, cancel, output).
const POLL: Duration = Duration::from_millis(50);
/// How much of the end of stderr a message quotes.
const STDERR_TAIL_BYTES: usize = 2048;
/// How long the output readers are waited for once the command's process
/// group is gone. Only a process that left the group (setsid) can hold the
/// pipes open longer; its reader is then left behind rather than waited on.
const READER_GRACE: Duration = Duration::from_secs(2);

/// Runs `argv` with `{ref}` and `{digest}` replaced in every argument;
/// stdout (at most [`crate::policy::MAX_SCAN_REPORT_BYTES`]) is the report.
/// A command that cannot start, exits non-zero, prints too much, prints
/// something no parser reads, or outlives `timeout` (it is killed, with its
/// process group) gives [`ReportState::Unreadable`] with a sentence saying
/// which, including the end of its stderr. `cancel` kills it too.
pub fn run_scan_command(
    argv: &[String],
    reference: &str,
    digest: &str,
    timeout: Duration,
    cancel: &Shutdown,
) -> ReportState {
    let args: Vec<String> = argv
        .iter()
        .map(|a| substitute(a, reference, digest))
        .collect();
    let Some((program, rest)) = args.split_first() else {
        return ReportState::Unreadable("scan_command is empty".to_string());
    };
    if cancel.is_triggered() {
        return ReportState::Unreadable(format!(
            "scan command {program:?} was not started: the gateway is stopping"
        ));
    }
    let child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a scanner's helpers die with it on timeout.
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return ReportState::Unreadable(format!(
                "scan command {program:?} could not start: {e}"
            ))
        }
    };
    let run = supervise(&mut child, timeout, cancel);
    let fail = |what: String| {
        let tail = run.stderr.as_deref().map(stderr_tail).unwrap_or_default();
        ReportState::Unreadable(if tail.is_empty() {
            format!("scan command {program:?} {what}")
        } else {
            format!("scan command {program:?} {what}; stderr ends: {tail}")
        })
    };
    match run.end {
        End::Overflow => fail(format!(
            "printed more than the {MAX_SCAN_REPORT_BYTES} bytes a scan report may have"
        )),
        End::TimedOut => fail(format!(
            "did not finish within {} and was killed",
            seconds(timeout)
        )),
        End::Cancelled => fail("was killed: the gateway is stopping".to_string()),
        End::WaitFailed(e) => fail(format!("could not be waited for: {e}")),
        End::Exited(status) if !status.success() => fail(describe(status)),
        End::Exited(_) => match run.stdout {
            None => fail(
                "exited, but a process it started outside its process group still holds its stdout open"
                    .to_string(),
            ),
            Some(Err(e)) => fail(format!("stdout could not be read: {e}")),
            Some(Ok(bytes)) => match ScanSummary::parse(&bytes) {
                Ok(summary) => ReportState::Read(summary),
                Err(e) => fail(format!("printed no readable report: {e}")),
            },
        },
    }
}

/// Replaces `{ref}` and `{digest}` in one pass, so a value that itself
/// contains a placeholder is not substituted again.
fn substitute(arg: &str, reference: &str, digest: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{ref}") {
            out.push_str(reference);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{digest}") {
            out.push_str(digest);
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// How the command's run ended.
enum End {
    Exited(ExitStatus),
    Overflow,
    TimedOut,
    Cancelled,
    WaitFailed(std::io::Error),
}

/// What a run left: how it ended and its output. None for an output whose
/// reader did not finish within [`READER_GRACE`].
struct Run {
    end: End,
    stdout: Option<std::io::Result<Vec<u8>>>,
    stderr: Option<Vec<u8>>,
}

/// Waits for the child while its output is read on two threads, killing its
/// process group on overflow, timeout or cancel. Returns with the child
/// reaped and every member of its group killed.
fn supervise(child: &mut Child, timeout: Duration, cancel: &Shutdown) -> Run {
    // Linux pids fit an i32 (pid_max is at most 2^22).
    let pid = child.id() as libc::pid_t;
    let overflow = Arc::new(AtomicBool::new(false));
    let (out_tx, out_rx) = mpsc::channel();
    let (err_tx, err_rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        let overflow = Arc::clone(&overflow);
        std::thread::spawn(move || {
            let _ = out_tx.send(read_stdout(stdout, &overflow));
        });
    }
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            let _ = err_tx.send(read_stderr_tail(stderr));
        });
    }
    let deadline = Instant::now().checked_add(timeout);
    // None: the child exited.
    let stopped = loop {
        if overflow.load(Ordering::Acquire) {
            break Some(End::Overflow);
        }
        match exited_unreaped(pid) {
            Ok(true) => break None,
            Ok(false) => {}
            Err(e) => break Some(End::WaitFailed(e)),
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break Some(End::TimedOut);
        }
        let nap = deadline.map_or(POLL, |d| POLL.min(d - now));
        if cancel.sleep(nap) {
            break Some(End::Cancelled);
        }
    };
    // Unless waiting failed (the child is gone, reaped elsewhere), the
    // leader is alive or a zombie not yet reaped, so the group id is still
    // ours: killing it cannot reach an unrelated process. This also ends
    // helpers a finished scanner left behind, which would hold the pipes
    // open.
    if !matches!(stopped, Some(End::WaitFailed(_))) {
        kill_group(pid);
    }
    let status = child.wait();
    // The group is dead, so the pipes are closed and the readers finish
    // unless a process escaped the group.
    let grace = Instant::now() + READER_GRACE;
    let stdout = out_rx
        .recv_timeout(grace.saturating_duration_since(Instant::now()))
        .ok();
    let stderr = err_rx
        .recv_timeout(grace.saturating_duration_since(Instant::now()))
        .ok();
    if stdout.is_none() || stderr.is_none() {
        tracing::warn!(
            pid,
            "scan command: a process that left its process group still holds its output open"
        );
    }
    // Checked again: the command may have exited right after printing too
    // much, before the loop saw the flag.
    let end = if overflow.load(Ordering::Acquire) {
        End::Overflow
    } else {
        match (stopped, status) {
            (Some(end), _) => end,
            (None, Ok(status)) => End::Exited(status),
            (None, Err(e)) => End::WaitFailed(e),
        }
    };
    Run {
        end,
        stdout,
        stderr,
    }
}

/// Reads stdout up to the report bound; past it, raises `overflow` and
/// stops (the command is then killed).
fn read_stdout(stdout: impl Read, overflow: &AtomicBool) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let read = stdout
        .take(MAX_SCAN_REPORT_BYTES + 1)
        .read_to_end(&mut bytes);
    if bytes.len() as u64 > MAX_SCAN_REPORT_BYTES {
        overflow.store(true, Ordering::Release);
        bytes = Vec::new();
    }
    read.map(|_| bytes)
}

/// Reads stderr to its end, keeping only the last [`STDERR_TAIL_BYTES`]:
/// it must be drained or a chatty scanner blocks, but only its end is quoted.
fn read_stderr_tail(mut stderr: impl Read) -> Vec<u8> {
    let mut tail = Vec::with_capacity(2 * STDERR_TAIL_BYTES);
    let mut buf = [0u8; 8192];
    loop {
        match stderr.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * STDERR_TAIL_BYTES {
                    tail.drain(..tail.len() - STDERR_TAIL_BYTES);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    tail
}

/// The end of stderr as one line of text.
fn stderr_tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(STDERR_TAIL_BYTES);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if start > 0 && !line.is_empty() {
        format!("…{line}")
    } else {
        line
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("failed with exit status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => format!("failed ({status})"),
    }
}

/// `1 s`, `2.5 s`.
fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// SIGKILL to every process of the group `pgid`. std kills only the child
/// itself; there is no safe wrapper for kill(2) on a group.
#[allow(unsafe_code)]
fn kill_group(pgid: libc::pid_t) {
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    // ESRCH (the group is already gone) is the only expected failure.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Whether the child `pid` has exited, without reaping it: while it is a
/// zombie its pid, and so its process group id, cannot be reused, so the
/// group can still be killed safely. std's try_wait would reap it.
#[allow(unsafe_code)]
fn exited_unreaped(pid: libc::pid_t) -> std::io::Result<bool> {
    // SAFETY: siginfo_t is plain data, valid all zeroes; waitid writes into
    // it only, and is given a pointer to it that lives across the call.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        if r != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => Ok(false),
                _ => Err(e),
            };
        }
        // With WNOHANG, a child that has not changed state leaves si_pid 0.
        Ok(info.si_pid() != 0)
    }
}

/// The source registry's Quay security API report of one manifest, read
/// by the same parser as a drop's report. A report Quay has not finished
/// (`status` other than `scanned`), an error answer or an unreadable body
/// are [`ReportState::Unreadable`], with what went wrong.
pub fn quay_report(
    registry: &super::source::SourceRegistry,
    repository: &str,
    digest: &str,
    cancel: &Shutdown,
) -> ReportState {
    let path =
        format!("api/v1/repository/{repository}/manifest/{digest}/security?vulnerabilities=true");
    match registry.get_document(&path, cancel) {
        Ok(bytes) => match crate::policy::ScanSummary::parse(&bytes) {
            Ok(s) => ReportState::Read(s),
            Err(e) => ReportState::Unreadable(format!("Quay security API: {e}")),
        },
        Err(e) => ReportState::Unreadable(format!("Quay security API: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Severity;

    const TRIVY: &str = r#"{"SchemaVersion":2,"ArtifactName":"x","Results":[{"Target":"app","Class":"os-pkgs","Type":"debian","Vulnerabilities":[{"VulnerabilityID":"CVE-1","Severity":"HIGH"}]}]}"#;
    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn run(argv: &[&str], timeout: Duration) -> ReportState {
        let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
        run_scan_command(
            &argv,
            "reg.example/team/app:1",
            DIGEST,
            timeout,
            &Shutdown::new(),
        )
    }

    fn unreadable(state: ReportState) -> String {
        match state {
            ReportState::Unreadable(why) => why,
            other => panic!("expected Unreadable, got {other:?}"),
        }
    }

    /// Whether `pid` is gone or a zombie waiting for init to reap it.
    fn dead(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    #[test]
    fn a_report_on_stdout_is_read() {
        let script = format!("cat <<'EOF'\n{TRIVY}\nEOF");
        match run(&["sh", "-c", &script], Duration::from_secs(20)) {
            ReportState::Read(s) => {
                assert_eq!(s.worst, Some(Severity::High));
                assert_eq!(s.counts[Severity::High as usize], 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ref_and_digest_are_substituted() {
        let why = unreadable(run(
            &[
                "sh",
                "-c",
                "echo \"$1 $2\" >&2; exit 3",
                "sh",
                "{ref}",
                "{digest}",
            ],
            Duration::from_secs(20),
        ));
        assert!(why.contains("reg.example/team/app:1"), "{why}");
        assert!(why.contains(DIGEST), "{why}");
        assert!(why.contains("exit status 3"), "{why}");
        assert_eq!(
            substitute("--image={ref}@{digest}{x}{", "r{digest}", "d"),
            "--image=r{digest}@d{x}{"
        );
    }

    #[test]
    fn a_command_past_its_timeout_is_killed_with_its_group() {
        let start = Instant::now();
        let why = unreadable(run(&["sleep", "30"], Duration::from_secs(1)));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(why.contains("within 1 s"), "{why}");

        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; sleep 30", pid_file.display());
        let start = Instant::now();
        // Room for sh to start and write the pid on a loaded machine.
        let why = unreadable(run(&["sh", "-c", &script], Duration::from_secs(3)));
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        assert!(why.contains("killed"), "{why}");
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone_by = Instant::now() + Duration::from_secs(3);
        while !dead(pid) {
            assert!(Instant::now() < gone_by, "background sleep {pid} survived");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn helpers_left_behind_by_a_finished_scanner_are_killed() {
        // The background sleep holds stdout open; without the group kill
        // the reader would wait 30 s for it.
        let script = format!("sleep 30 & cat <<'EOF'\n{TRIVY}\nEOF");
        let start = Instant::now();
        let state = run(&["sh", "-c", &script], Duration::from_secs(20));
        assert!(matches!(state, ReportState::Read(_)), "{state:?}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn cancel_kills_the_command() {
        let cancel = Shutdown::new();
        let trigger = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            trigger.trigger();
        });
        let start = Instant::now();
        let state = run_scan_command(
            &["sleep".to_string(), "30".to_string()],
            "r",
            "d",
            Duration::from_secs(60),
            &cancel,
        );
        t.join().unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(unreadable(state).contains("stopping"));
    }

    #[test]
    fn too_much_output_is_refused() {
        let why = unreadable(run(
            &["sh", "-c", "head -c 9437184 /dev/zero"],
            Duration::from_secs(30),
        ));
        assert!(why.contains("printed more than"), "{why}");
        // A command that never stops printing is killed, not waited for.
        let start = Instant::now();
        let why = unreadable(run(&["yes"], Duration::from_secs(30)));
        assert!(why.contains("printed more than"), "{why}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn unusable_commands_and_output_are_unreadable() {
        let why = unreadable(run(
            &["/nonexistent/weir-scanner", "{ref}"],
            Duration::from_secs(5),
        ));
        assert!(why.contains("/nonexistent/weir-scanner"), "{why}");
        assert!(why.contains("could not start"), "{why}");

        assert_eq!(
            unreadable(run(&[], Duration::from_secs(5))),
            "scan_command is empty"
        );

        let why = unreadable(run(&["sh", "-c", "echo not json"], Duration::from_secs(20)));
        assert!(why.contains("no readable report"), "{why}");

        let why = unreadable(run(&["sh", "-c", "kill -9 $$"], Duration::from_secs(20)));
        assert!(why.contains("signal 9"), "{why}");
    }

    #[test]
    fn only_the_end_of_stderr_is_quoted() {
        let why = unreadable(run(
            &["sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo line $i >&2; i=$((i+1)); done; echo LAST >&2; exit 1"],
            Duration::from_secs(30),
        ));
        assert!(why.ends_with("LAST"), "{why}");
        assert!(!why.contains("line 0 "), "{why}");
        assert!(why.len() < STDERR_TAIL_BYTES + 200, "{}", why.len());
    }
}
