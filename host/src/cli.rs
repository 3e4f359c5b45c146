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
    };
}

/// The exit status of a gateway binary: success, or failure with
/// `name: error: cause: …` on stderr.
pub fn exit_code(name: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
