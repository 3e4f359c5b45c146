//! The gateway-tx binary: parses the command line, sets up logging and
//! signals, and hands over to the library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use weir_host::reload::{ReloadRequests, ReloadSource};
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
    /// Shows what the running sender is doing: link, queue, images and,
    /// in pull mode, each sync list entry's last poll (read from
    /// state_dir/status.json, rewritten every second while it runs).
    Status {
        #[command(flatten)]
        config: ConfigFile,
        /// Print status.json as it is.
        #[arg(long)]
        json: bool,
    },
    /// Checks a ledger report written by `gateway-rx report` (its HMAC,
    /// under [ledger] report_key_file) and names, against this sender's
    /// image ledger, the images that never arrived, arrived only in part,
    /// were refused, or failed delivery.
    ///
    /// Exit status: 0 when every image numbered before the report was
    /// written arrived and none failed delivery (deliveries still pending
    /// are listed, not counted); 3 when some image never arrived, arrived
    /// in part, was refused or failed delivery; 1 when the report cannot
    /// be used (its tag does not verify, it is not a report, no key).
    /// Works while the gateway runs.
    Reconcile {
        #[command(flatten)]
        config: ConfigFile,
        /// The report file, as `gateway-rx report --out` wrote it.
        #[arg(value_name = "REPORT")]
        report: PathBuf,
    },
    /// The image ledger.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Re-checks the stored chain record by record (each record's hash,
    /// its link to the one before, no hole) and names the first bad record;
    /// exit status 1 when there is one. While the gateway runs it checks the
    /// copy the gateway keeps (state_dir/ledger.json).
    Verify {
        #[command(flatten)]
        config: ConfigFile,
    },
}

weir_host::gateway_cli! {
    /// weir sender: watches the spool directory for image archives, gates them
    /// on the rules and scan reports, and sends them across the diode as paced,
    /// FEC-protected, HMAC-signed frames in repeated carousel passes.
    ///
    /// Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=gateway_tx=debug) to
    /// change the level. SIGTERM and SIGINT stop it cleanly, state flushed;
    /// SIGHUP reads the configuration again.
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
        (Some(Command::Status { config, json }), _) => status(&config.config, json),
        (Some(Command::Reconcile { config, report }), _) => {
            return reconcile(&config.config, &report)
        }
        (
            Some(Command::Ledger {
                command: LedgerCommand::Verify { config },
            }),
            _,
        ) => verify_ledger(&config.config),
        (None, Some(file)) => run(file),
        (None, None) => {
            eprintln!(
                "gateway-tx: nothing to do: run with --config FILE, or check-config FILE (see --help)"
            );
            return std::process::ExitCode::from(2);
        }
    };
    weir_host::cli::exit_code("gateway-tx", result)
}

fn check_config(file: PathBuf) -> anyhow::Result<()> {
    let config = gateway_tx::TxConfig::load(&file)?;
    println!("{}: valid", file.display());
    print!("{}", config.summary());
    Ok(())
}

fn status(file: &std::path::Path, json: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    let config = gateway_tx::TxConfig::load(file)?;
    let path = config.status_path();
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "reading {} (written every second while gateway-tx runs)",
            path.display()
        )
    })?;
    let status: gateway_tx::status::Status = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a sender status file", path.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        let age = gateway_tx::objects::unix_now().saturating_sub(status.updated_at);
        if age > 5 {
            println!("(status.json is {age}s old: gateway-tx is not running, or stuck)");
        }
        print!(
            "{}",
            gateway_tx::console::status_text(&status, status.fault.as_deref())
        );
    }
    Ok(())
}

/// Exit status when some image is unaccounted for (see `reconcile --help`).
const SOMETHING_MISSING: u8 = 3;

fn reconcile(file: &std::path::Path, report: &std::path::Path) -> std::process::ExitCode {
    let outcome = gateway_tx::TxConfig::load(file).and_then(|config| {
        weir_host::cli::existing_state_dir("gateway-tx", &config.state_dir)?;
        gateway_tx::reconcile::reconcile(&config, report)
    });
    match outcome {
        Ok(r) => {
            print!("{}", r.render());
            if r.all_accounted() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::from(SOMETHING_MISSING)
            }
        }
        Err(e) => weir_host::cli::exit_code("gateway-tx", Err(e)),
    }
}

fn verify_ledger(file: &std::path::Path) -> anyhow::Result<()> {
    let config = gateway_tx::TxConfig::load(file)?;
    weir_host::cli::existing_state_dir("gateway-tx", &config.state_dir)?;
    let v = gateway_tx::ledger::verify(&config.state_dir)?;
    let chain = v
        .chain
        .map_or_else(|| "(none yet)".to_string(), |c| c.to_string());
    println!(
        "image ledger of {} (read from {})",
        config.state_dir.display(),
        v.from
    );
    if let Some(bad) = v.bad {
        anyhow::bail!(
            "chain {chain}: {} records good, then the first bad one: {bad}",
            v.count
        );
    }
    match (v.head, v.checkpoint) {
        (Some(head), Some(c)) => println!(
            "chain {chain}: records 1..{} pruned (checkpoint {}), {} records kept, {}..{} \
             intact from it; head {}",
            c.seq,
            c.hash.short(),
            v.count,
            c.seq + 1,
            head.seq,
            head.hash
        ),
        (Some(head), None) if head.seq > 0 => println!(
            "chain {chain}: {} records, 1..{} intact; head {}",
            v.count, head.seq, head.hash
        ),
        _ => println!("chain {chain}: no record yet"),
    }
    Ok(())
}

fn run(file: PathBuf) -> anyhow::Result<()> {
    let config = gateway_tx::TxConfig::load(&file)?;
    let shutdown = Shutdown::new();
    let reloads = ReloadSource {
        file,
        requests: ReloadRequests::new(),
    };
    let _watch = SignalWatch::start_with_reloads("signals", &shutdown, &reloads.requests)?;
    gateway_tx::run_with_reloads(config, shutdown, Some(reloads))
}
