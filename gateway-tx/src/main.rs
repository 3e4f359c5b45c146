//! The gateway-tx binary: parses the command line, sets up logging and
//! signals, and hands over to the library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use weir_host::signals::SignalWatch;
use weir_host::Shutdown;

#[derive(Subcommand)]
enum Command {
    /// Validates a configuration file (key file, rules file, ranges), prints
    /// a summary and exits; non-zero with the reason if it is invalid.
    CheckConfig {
        /// Configuration file to check.
        file: PathBuf,
    },
}

weir_host::gateway_cli! {
    /// weir sender: watches the spool directory for image archives, gates them
    /// on the rules and scan reports, and sends them across the diode as paced,
    /// FEC-protected, HMAC-signed frames in repeated carousel passes.
    ///
    /// Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=gateway_tx=debug) to
    /// change the level. SIGTERM and SIGINT stop it cleanly, state flushed.
    name = "gateway-tx";
    /// Configuration file (TOML; see examples/tx.toml).
    config;
    subcommand = Command;
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    weir_host::logging::init();
    let result = match (cli.command, cli.config) {
        (Some(Command::CheckConfig { file }), _) => check_config(file),
        (None, Some(file)) => run(file),
        (None, None) => Err(anyhow::anyhow!(
            "nothing to do: run with --config FILE, or check-config FILE (see --help)"
        )),
    };
    weir_host::cli::exit_code("gateway-tx", result)
}

fn check_config(file: PathBuf) -> anyhow::Result<()> {
    let config = gateway_tx::TxConfig::load(&file)?;
    println!("{}: valid", file.display());
    print!("{}", config.summary());
    Ok(())
}

fn run(file: PathBuf) -> anyhow::Result<()> {
    let config = gateway_tx::TxConfig::load(&file)?;
    let shutdown = Shutdown::new();
    let _watch = SignalWatch::start("signals", &shutdown)?;
    gateway_tx::run(config, shutdown)
}
