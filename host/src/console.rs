//! The serial console: a line-oriented command prompt on a tty.
//!
//! The gateway supplies the commands through [`CommandHandler`]; the
//! console supplies the line editing (CR or LF ends a line, backspace and
//! DEL erase, Ctrl-C and Ctrl-U drop the line), `help`, the one-line error
//! for unknown commands, the start banner and the prompt. Input is echoed,
//! since serial terminals do not echo locally by default. Output uses CR LF
//! line ends: the tty is raw.

use crate::shutdown::Shutdown;
use serialport::TTYPort;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the console looks at the shutdown flag while idle.
const POLL: Duration = Duration::from_millis(200);
/// Longest line kept; the rest is ignored and the line refused.
pub const MAX_LINE: usize = 256;
/// Wait before reopening a device that failed.
const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// One command a handler offers, for `help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    pub name: &'static str,
    /// Arguments, as shown in help (e.g. `<digest>`); empty for none.
    pub usage: &'static str,
    /// One line saying what it does.
    pub summary: &'static str,
}

/// A handler's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Shown as is (lines separated by `\n`).
    Text(String),
    /// Shown as `error: <message>`.
    Error(String),
}

impl Reply {
    pub fn text(text: impl Into<String>) -> Self {
        Reply::Text(text.into())
    }

    pub fn error(message: impl Into<String>) -> Self {
        Reply::Error(message.into())
    }
}

/// What a gateway answers on its console.
pub trait CommandHandler: Send + Sync {
    /// The commands `handle` accepts; the console refuses every other name.
    fn commands(&self) -> &[Command];

    /// Runs `command` (one of `commands()`) with its whitespace-separated
    /// arguments.
    fn handle(&self, command: &str, args: &[&str]) -> Reply;
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console device {device}: {source}")]
    Open {
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting console thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Collects typed bytes into lines.
#[derive(Debug, Default)]
pub struct LineEditor {
    line: String,
    after_cr: bool,
    too_long: bool,
}

/// A finished line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Complete(String),
    /// Longer than [`MAX_LINE`]; refused whole.
    TooLong,
}

impl LineEditor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one typed byte, appends what to echo to `echo`, and returns a
    /// line when the byte ended one.
    pub fn feed(&mut self, byte: u8, echo: &mut Vec<u8>) -> Option<Line> {
        let after_cr = std::mem::take(&mut self.after_cr);
        match byte {
            // LF right after CR: the second half of one line end.
            b'\n' if after_cr => None,
            b'\r' | b'\n' => {
                self.after_cr = byte == b'\r';
                echo.extend_from_slice(b"\r\n");
                let line = std::mem::take(&mut self.line);
                if std::mem::take(&mut self.too_long) {
                    Some(Line::TooLong)
                } else {
                    Some(Line::Complete(line))
                }
            }
            0x08 | 0x7f => {
                if self.line.pop().is_some() {
                    echo.extend_from_slice(b"\x08 \x08");
                }
                None
            }
            // Ctrl-C, Ctrl-U: drop the line.
            0x03 | 0x15 => {
                self.line.clear();
                self.too_long = false;
                echo.extend_from_slice(b"^C\r\n");
                Some(Line::Complete(String::new()))
            }
            0x20..=0x7e => {
                if self.line.len() < MAX_LINE {
                    self.line.push(byte as char);
                    echo.push(byte);
                } else {
                    self.too_long = true;
                }
                None
            }
            // Other control bytes and non-ASCII: ignored.
            _ => None,
        }
    }
}

/// The console's answer to one line, CR LF terminated (empty for an empty
/// line).
pub fn answer(handler: &dyn CommandHandler, line: &str) -> String {
    let mut words = line.split_whitespace();
    let Some(command) = words.next() else {
        return String::new();
    };
    let args: Vec<&str> = words.collect();
    let reply = if command == "help" {
        Reply::Text(help_text(handler.commands()))
    } else if handler.commands().iter().any(|c| c.name == command) {
        // A bug in one command must not take the console down.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handler.handle(command, &args)
        }))
        .unwrap_or_else(|_| {
            tracing::error!(command, "console command panicked");
            Reply::error(format!("internal error in '{command}'"))
        })
    } else {
        return format!("error: unknown command '{command}' (try help)\r\n");
    };
    let text = match reply {
        Reply::Text(t) => t,
        Reply::Error(e) => format!("error: {e}"),
    };
    let mut out = String::with_capacity(text.len() + 8);
    for l in text.lines() {
        out.push_str(l);
        out.push_str("\r\n");
    }
    out
}

fn help_text(commands: &[Command]) -> String {
    let help = Command {
        name: "help",
        usage: "",
        summary: "this list",
    };
    let all: Vec<&Command> = std::iter::once(&help)
        .chain(commands.iter().filter(|c| c.name != "help"))
        .collect();
    let left = |c: &Command| {
        if c.usage.is_empty() {
            c.name.to_string()
        } else {
            format!("{} {}", c.name, c.usage)
        }
    };
    let width = all.iter().map(|c| left(c).len()).max().unwrap_or(0);
    let mut out = String::from("commands:\n");
    for c in all {
        out.push_str(&format!("  {:width$}  {}\n", left(c), c.summary));
    }
    out
}

/// The console thread; stops when the shutdown is triggered.
pub struct Console {
    thread: JoinHandle<()>,
}

impl Console {
    /// Opens `device` at `baud` (8N1, raw), prints
    /// `weir <role> <version> console ready` and a prompt, and answers lines
    /// on a thread until `shutdown` is triggered. A device that fails later
    /// is reopened every second.
    pub fn spawn(
        device: &Path,
        baud: u32,
        role: &str,
        version: &str,
        handler: Arc<dyn CommandHandler>,
        shutdown: Shutdown,
    ) -> Result<Console, ConsoleError> {
        let port = open(device, baud)?;
        let session = Session {
            device: device.to_path_buf(),
            baud,
            banner: format!("weir {role} {version} console ready\r\n"),
            prompt: format!("weir-{role}> "),
            handler,
            shutdown,
        };
        let thread = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || session.run(port))
            .map_err(ConsoleError::Thread)?;
        tracing::info!(device = %device.display(), baud, "serial console ready");
        Ok(Console { thread })
    }

    /// True once the thread ended (after shutdown).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the thread to end; trigger the shutdown first.
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("console thread panicked");
        }
    }
}

fn open(device: &Path, baud: u32) -> Result<TTYPort, ConsoleError> {
    let err = |source| ConsoleError::Open {
        device: device.to_path_buf(),
        source,
    };
    let name = device.to_str().ok_or_else(|| {
        err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "path is not UTF-8",
        ))
    })?;
    serialport::new(name, baud.max(1))
        .timeout(POLL)
        .open_native()
        .map_err(|e| err(e.into()))
}

struct Session {
    device: PathBuf,
    baud: u32,
    banner: String,
    prompt: String,
    handler: Arc<dyn CommandHandler>,
    shutdown: Shutdown,
}

impl Session {
    fn run(self, port: TTYPort) {
        let mut port = Some(port);
        let mut greet = true;
        while !self.shutdown.is_triggered() {
            let Some(p) = port.as_mut() else {
                if self.shutdown.sleep(REOPEN_AFTER) {
                    break;
                }
                match open(&self.device, self.baud) {
                    Ok(p) => {
                        tracing::info!(device = %self.device.display(), "serial console reopened");
                        port = Some(p);
                        greet = true;
                    }
                    Err(e) => tracing::debug!(error = %e, "serial console still unavailable"),
                }
                continue;
            };
            if std::mem::take(&mut greet) {
                let hello = format!("{}{}", self.banner, self.prompt);
                write_out(p, hello.as_bytes());
            }
            if let Err(e) = self.serve(p) {
                tracing::warn!(device = %self.device.display(), error = %e, "serial console failed; reopening");
                port = None;
            }
        }
    }

    /// Answers lines until shutdown or a device error.
    fn serve(&self, port: &mut TTYPort) -> std::io::Result<()> {
        let mut editor = LineEditor::new();
        let mut buf = [0u8; 256];
        let mut out = Vec::new();
        while !self.shutdown.is_triggered() {
            let n = match port.read(&mut buf) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "device closed",
                    ))
                }
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                    continue
                }
                Err(e) => return Err(e),
            };
            out.clear();
            for &b in &buf[..n] {
                match editor.feed(b, &mut out) {
                    None => {}
                    Some(Line::TooLong) => {
                        out.extend_from_slice(
                            format!("error: line longer than {MAX_LINE} characters\r\n").as_bytes(),
                        );
                        out.extend_from_slice(self.prompt.as_bytes());
                    }
                    Some(Line::Complete(line)) => {
                        if !line.trim().is_empty() {
                            tracing::info!(command = %line, "console command");
                        }
                        out.extend_from_slice(answer(self.handler.as_ref(), &line).as_bytes());
                        out.extend_from_slice(self.prompt.as_bytes());
                    }
                }
            }
            write_out(port, &out);
        }
        Ok(())
    }
}

/// Writes console output; if nobody reads the tty and it fills up, the
/// output is dropped rather than blocking the console.
fn write_out(port: &mut TTYPort, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    if let Err(e) = port.write_all(bytes).and_then(|()| port.flush()) {
        tracing::debug!(error = %e, "console output dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Gateway;

    const COMMANDS: &[Command] = &[
        Command {
            name: "status",
            usage: "",
            summary: "link state, rates, queue",
        },
        Command {
            name: "resend",
            usage: "<digest>",
            summary: "queue an image for new passes",
        },
        Command {
            name: "crash",
            usage: "",
            summary: "a buggy command",
        },
    ];

    impl CommandHandler for Gateway {
        fn commands(&self) -> &[Command] {
            COMMANDS
        }

        fn handle(&self, command: &str, args: &[&str]) -> Reply {
            match (command, args) {
                ("status", _) => Reply::text("link up\nqueue 3"),
                ("resend", [digest]) => Reply::text(format!("queued {digest}")),
                ("resend", _) => Reply::error("usage: resend <digest>"),
                _ => panic!("bug"),
            }
        }
    }

    fn typed(bytes: &[u8]) -> (Vec<Line>, Vec<u8>) {
        let mut ed = LineEditor::new();
        let mut echo = Vec::new();
        let lines = bytes
            .iter()
            .filter_map(|&b| ed.feed(b, &mut echo))
            .collect();
        (lines, echo)
    }

    fn complete(s: &str) -> Line {
        Line::Complete(s.into())
    }

    #[test]
    fn cr_lf_and_crlf_each_end_one_line() {
        let (lines, _) = typed(b"a\rb\nc\r\nd\n\re");
        assert_eq!(
            lines,
            vec![
                complete("a"),
                complete("b"),
                complete("c"),
                complete("d"),
                complete("")
            ]
        );
    }

    #[test]
    fn backspace_and_del_erase_and_echo_the_erasure() {
        let (lines, echo) = typed(b"statux\x7fs\x08\x08us\r\x08\r");
        assert_eq!(lines, vec![complete("status"), complete("")]);
        assert_eq!(echo, b"statux\x08 \x08s\x08 \x08\x08 \x08us\r\n\r\n");
    }

    #[test]
    fn control_and_non_ascii_bytes_are_ignored_and_ctrl_c_drops_the_line() {
        let (lines, _) = typed(b"st\x1b\xc3\xa9at\x03help\r");
        assert_eq!(lines, vec![complete(""), complete("help")]);
    }

    #[test]
    fn an_overlong_line_is_refused_whole() {
        let mut input = vec![b'x'; MAX_LINE + 10];
        input.extend_from_slice(b"\rstatus\r");
        let (lines, _) = typed(&input);
        assert_eq!(lines, vec![Line::TooLong, complete("status")]);
    }

    #[test]
    fn help_lists_every_command_with_its_summary() {
        let text = answer(&Gateway, "help");
        assert!(text.starts_with("commands:\r\n"));
        assert!(text.contains("  help             this list\r\n"), "{text}");
        assert!(
            text.contains("  resend <digest>  queue an image for new passes\r\n"),
            "{text}"
        );
        assert!(
            text.contains("  status           link state, rates, queue\r\n"),
            "{text}"
        );
    }

    #[test]
    fn commands_get_the_handlers_answer_with_crlf() {
        assert_eq!(answer(&Gateway, "  status  "), "link up\r\nqueue 3\r\n");
        assert_eq!(answer(&Gateway, "resend sha256:ab"), "queued sha256:ab\r\n");
        assert_eq!(
            answer(&Gateway, "resend"),
            "error: usage: resend <digest>\r\n"
        );
        assert_eq!(answer(&Gateway, ""), "");
    }

    #[test]
    fn unknown_commands_get_one_error_line() {
        assert_eq!(
            answer(&Gateway, "bogus x"),
            "error: unknown command 'bogus' (try help)\r\n"
        );
    }

    #[test]
    fn a_panicking_command_answers_an_error() {
        assert_eq!(
            answer(&Gateway, "crash"),
            "error: internal error in 'crash'\r\n"
        );
    }
}
