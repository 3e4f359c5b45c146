//! The command line both gateway binaries share: `--config FILE` runs the
//! gateway, a subcommand does one task and exits, and a failure ends the
//! process with the binary's name and the whole error chain on stderr.

use std::process::ExitCode;

/// Declares `Cli`, a gateway binary's command line: `--config FILE`, or
/// one subcommand of the given enum (the two do not mix). The doc comments
/// given pass through to `--help`, so each binary keeps its own words
/// there; the declaration expands in the binary, so `--version` is the
/// binary's.
#[macro_export]
macro_rules! gateway_cli {
    (
        $(#[$about:meta])*
        name = $name:literal;
        $(#[$config_doc:meta])*
        config;
        subcommand = $command:ident;
    ) => {
        $(#[$about])*
        #[derive(::clap::Parser)]
        #[command(name = $name, version, args_conflicts_with_subcommands = true)]
        struct Cli {
            $(#[$config_doc])*
            #[arg(long, value_name = "FILE")]
            config: Option<::std::path::PathBuf>,
            #[command(subcommand)]
            command: Option<$command>,
        }

        // `--config FILE` of each subcommand that works on the gateway's
        // state: `#[command(flatten)] config: ConfigFile`.
        #[derive(::clap::Args)]
        struct ConfigFile {
            /// The gateway's configuration file (TOML).
            #[arg(long, value_name = "FILE")]
            config: ::std::path::PathBuf,
        }
    };
}

/// The exit status of a gateway binary: success, or failure with
/// `name: error: cause: …` on stderr.
pub fn exit_code(name: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {}", chain_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// Refuses a task that only reads a gateway's state when `state_dir` is
/// not there: opening it would create an empty state, which a mistyped
/// path would then show as a healthy gateway with nothing to report.
pub fn existing_state_dir(name: &str, state_dir: &std::path::Path) -> anyhow::Result<()> {
    if !state_dir.is_dir() {
        anyhow::bail!(
            "state_dir {} is not there: {name} has not run with this configuration (is state_dir right?)",
            state_dir.display()
        );
    }
    Ok(())
}

/// The error and its causes, `error: cause: …`, each cause once: a cause
/// whose text is already in what was written (as `what: {source}`
/// messages write their cause's) is not written again.
pub fn chain_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("binding UDP 127.0.0.1:9: {source}")]
    struct Bind {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn a_missing_state_dir_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        assert!(existing_state_dir("gateway-rx", dir.path()).is_ok());
        let gone = dir.path().join("nope");
        let e = existing_state_dir("gateway-rx", &gone)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&gone.display().to_string()), "{e}");
        assert!(!gone.exists());
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::from_raw_os_error(libc::EADDRINUSE);
        let said = io.to_string();
        let e = anyhow::Error::new(Bind { source: io }).context("link.udp_listen 127.0.0.1:9");
        assert_eq!(
            chain_text(&e),
            format!("link.udp_listen 127.0.0.1:9: binding UDP 127.0.0.1:9: {said}")
        );
        // Causes a message does not repeat are all there, in order.
        let e = anyhow::anyhow!("disk full")
            .context("writing x")
            .context("saving");
        assert_eq!(chain_text(&e), "saving: writing x: disk full");
    }
}
