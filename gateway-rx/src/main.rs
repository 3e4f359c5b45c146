//! gateway-rx: the high-side receiver of a weir pair.

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use weir_host::reload::{ReloadRequests, ReloadSource};
use weir_host::signals::SignalWatch;
use weir_host::Shutdown;

use gateway_rx::RxConfig;

weir_host::gateway_cli! {
    /// Receives images across a one-way diode: verifies every frame, stores
    /// shards on disk, rebuilds blocks, checks every blob, and pushes complete
    /// images to a registry or exports them as an OCI image layout.
    ///
    /// Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=gateway_rx=debug) to
    /// change the level. SIGTERM and SIGINT stop it cleanly, state flushed;
    /// SIGHUP reads the configuration again.
    name = "gateway-rx";
    /// Configuration file (TOML; see examples/rx.toml). Runs the receiver.
    config;
    subcommand = Command;
}

#[derive(Subcommand)]
enum Command {
    /// Checks a configuration file (keys load, URLs parse) and exits.
    CheckConfig {
        /// Configuration file to check.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Shows what is arriving (per image: blobs done, percent, passes seen)
    /// and what waits to be delivered. Works while the gateway runs.
    Status {
        #[command(flatten)]
        config: ConfigFile,
        /// Print the report as JSON (the status.json format).
        #[arg(long)]
        json: bool,
    },
    /// Forgets the newest sender session remembered per key id, so that a
    /// sender whose frames are all counted as replays (its session looks
    /// older than one remembered) is accepted again. Run with the gateway
    /// stopped.
    ForgetSession {
        #[command(flatten)]
        config: ConfigFile,
        /// Only this key id's session (default: every key id's).
        #[arg(long, value_name = "ID")]
        key_id: Option<u16>,
    },
    /// Gives up on an image still receiving whose blobs never all come (a
    /// sender that stopped sending it, or a compromised one naming blobs it
    /// never sends): its record goes and its image object is pruned, so the
    /// blobs it holds go to retention (those no other image names, once
    /// kept `keep_delivered_hours` from when they were verified). Complete
    /// images are left alone; sent again after a day, the image arrives
    /// anew. Logged; run with the gateway stopped.
    ForgetImage {
        #[command(flatten)]
        config: ConfigFile,
        /// The image's manifest digest (sha256:…), as `status` shows it.
        #[arg(value_name = "DIGEST")]
        digest: String,
    },
    /// Writes what this side holds of the sender's image ledger (each
    /// record's sequence number, manifest digest, destination, when its
    /// image completed, where and when it was delivered; the records
    /// refused; the announced records missing) as JSON with an HMAC under
    /// [ledger] report_key_file, to carry to the low side by hand for
    /// `gateway-tx reconcile`. Works while the gateway runs.
    Report {
        #[command(flatten)]
        config: ConfigFile,
        /// Where to write the report.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// The image ledger.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Re-checks every chain held record by record (each record's hash,
    /// its link to the record held before it) and names the first bad
    /// record; exit status 1 when there is one. While the gateway runs it
    /// checks the copy the gateway keeps (state_dir/ledger.json).
    Verify {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Accepts a sender's chain from a given record on, without its first
    /// record: for a receiver whose state was lost after that record left
    /// the sender's retention, so that the chain's later images stop
    /// waiting. Records from SEQ on are admitted (the images waiting now
    /// when the gateway starts again), the ones below it never. `status`
    /// lists the chains waiting, with their lowest seq. Logged and audited;
    /// run with the gateway stopped.
    Accept {
        #[command(flatten)]
        config: ConfigFile,
        /// The chain id, 16 hex digits as `status` shows it.
        #[arg(long, value_name = "ID")]
        chain: String,
        /// The first sequence number admitted.
        #[arg(long = "from", value_name = "SEQ")]
        from: u64,
    },
}

fn main() -> std::process::ExitCode {
    weir_host::logging::init();
    let cli = Cli::parse();
    let result = match (cli.command, cli.config) {
        (Some(Command::CheckConfig { file }), _) => check_config(&file),
        (Some(Command::Status { config, json }), _) => status(&config.config, json),
        (Some(Command::ForgetSession { config, key_id }), _) => {
            forget_session(&config.config, key_id)
        }
        (Some(Command::Report { config, out }), _) => report(&config.config, &out),
        (Some(Command::ForgetImage { config, digest }), _) => forget_image(&config.config, &digest),
        (
            Some(Command::Ledger {
                command: LedgerCommand::Verify { config },
            }),
            _,
        ) => verify_ledger(&config.config),
        (
            Some(Command::Ledger {
                command:
                    LedgerCommand::Accept {
                        config,
                        chain,
                        from,
                    },
            }),
            _,
        ) => accept_chain(&config.config, &chain, from),
        (None, Some(config)) => run(&config),
        (None, None) => {
            eprintln!("gateway-rx: --config FILE is required (see --help)");
            return std::process::ExitCode::from(2);
        }
    };
    weir_host::cli::exit_code("gateway-rx", result)
}

fn check_config(file: &Path) -> anyhow::Result<()> {
    let config = RxConfig::load(file)?;
    println!(
        "{}: ok (state_dir {}, {} key(s), targets: {}{})",
        file.display(),
        config.state_dir.display(),
        config.auth.keys.len(),
        gateway_rx::delivery::targets(&config)
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", "),
        config
            .metrics
            .as_ref()
            .map(|m| format!("; metrics at http://{}/metrics", m.listen.trim()))
            .unwrap_or_default()
    );
    Ok(())
}

fn status(file: &Path, json: bool) -> anyhow::Result<()> {
    let config = RxConfig::load(file)?;
    weir_host::cli::existing_state_dir("gateway-rx", &config.state_dir)?;
    let report = gateway_rx::status(&config)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}

fn forget_session(file: &Path, key_id: Option<u16>) -> anyhow::Result<()> {
    let config = RxConfig::load(file)?;
    weir_host::cli::existing_state_dir("gateway-rx", &config.state_dir)?;
    let gone = gateway_rx::forget_session(&config, key_id)?;
    if gone.is_empty() {
        println!(
            "no sender session remembered{}",
            match key_id {
                Some(id) => format!(" for key id {id}"),
                None => String::new(),
            }
        );
    }
    for (key_id, session) in gone {
        println!(
            "forgot session {session} of key id {key_id}: the next session it starts is accepted"
        );
    }
    Ok(())
}

fn forget_image(file: &Path, digest: &str) -> anyhow::Result<()> {
    let config = RxConfig::load(file)?;
    weir_host::cli::existing_state_dir("gateway-rx", &config.state_dir)?;
    let valid = digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if !valid {
        anyhow::bail!("{digest:?} is not a manifest digest (sha256: and 64 lowercase hex digits)");
    }
    let gone = gateway_rx::forget_image(&config, digest)?;
    if gone.is_empty() {
        anyhow::bail!(
            "no image still receiving has manifest digest {digest} (`gateway-rx status` lists \
             them; complete images are never forgotten)"
        );
    }
    for reference in gone {
        println!("forgot {reference} ({digest}): its image object is pruned, its blobs left to retention");
    }
    Ok(())
}

fn report(file: &Path, out: &Path) -> anyhow::Result<()> {
    let config = RxConfig::load(file)?;
    weir_host::cli::existing_state_dir("gateway-rx", &config.state_dir)?;
    let w = gateway_rx::ledger::report::write_report(&config, out)?;
    println!(
        "wrote {}: {} records of {} chain(s), {} announced images not complete, {} records \
         refused (read from {})",
        out.display(),
        w.records,
        w.chains,
        w.missing,
        w.refused,
        w.from
    );
    Ok(())
}

fn verify_ledger(file: &Path) -> anyhow::Result<()> {
    let config = RxConfig::load(file)?;
    weir_host::cli::existing_state_dir("gateway-rx", &config.state_dir)?;
    let v = gateway_rx::ledger::report::verify(&config)?;
    println!(
        "image ledger of {} (read from {})",
        config.state_dir.display(),
        v.from
    );
    for (chain, count) in &v.chains {
        println!("chain {chain}: {count} records checked");
    }
    if let Some((chain, bad)) = v.bad {
        anyhow::bail!("chain {chain}: the first bad record is {bad}");
    }
    if v.chains.is_empty() {
        println!("no record held yet");
    } else {
        println!("every record held is intact and links to the records held beside it");
    }
    Ok(())
}

fn accept_chain(file: &Path, chain: &str, from: u64) -> anyhow::Result<()> {
    let config = RxConfig::load(file)?;
    // A mistyped state_dir would otherwise get a fresh database holding
    // only this acceptance, and the real one would still refuse the chain.
    weir_host::cli::existing_state_dir("gateway-rx", &config.state_dir)?;
    let id: weir_proto::ChainId = chain
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("--chain: {e} (as `gateway-rx status` shows it)"))?;
    let waiting = gateway_rx::accept_chain(&config, id, from)?;
    println!(
        "chain {id} accepted from seq {from}: {waiting} image(s) of it waiting are admitted \
         when gateway-rx starts; records below seq {from} are never admitted"
    );
    Ok(())
}

fn run(file: &Path) -> anyhow::Result<()> {
    let config = RxConfig::load(file)?;
    let shutdown = Shutdown::new();
    let reloads = ReloadSource {
        file: file.to_path_buf(),
        requests: ReloadRequests::new(),
    };
    let _watch = SignalWatch::start_with_reloads("rx-signals", &shutdown, &reloads.requests)?;
    gateway_rx::gateway::run_with_reloads(config, shutdown, Some(reloads))
}
