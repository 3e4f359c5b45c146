//! The random-fault campaign for long runs: rounds of images crossing the
//! real pair while gateways, the registry and the link fail at random (see
//! `weir_tests::campaign`). Prints the seed and one table row per round;
//! a failed round's seed replays it with `--rounds 1 --seed SEED`.

use clap::Parser;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use weir_tests::campaign::{self, CampaignOptions};

#[derive(Parser)]
#[command(about = "Run the seeded random-fault campaign against the gateway pair")]
struct Args {
    /// Rounds to run.
    #[arg(long, default_value_t = 50)]
    rounds: u32,
    /// Campaign seed (round 1 runs with it); drawn from the clock when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// A round not delivered within this many seconds fails.
    #[arg(long, default_value_t = 150)]
    round_limit_s: u64,
    /// Print each fault as it is applied.
    #[arg(long)]
    verbose: bool,
}

fn main() {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let options = CampaignOptions {
        round_limit: Duration::from_secs(args.round_limit_s),
        verbose: args.verbose,
        ..CampaignOptions::new(seed, args.rounds)
    };
    match campaign::run(&options) {
        Ok(Some(reports)) if reports.iter().all(|r| r.result.is_ok()) => {}
        Ok(Some(_)) => std::process::exit(1),
        Ok(None) => {
            eprintln!("campaign: docker-registry is needed (apt-get install -y docker-registry)");
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("campaign: {e:#}");
            std::process::exit(2);
        }
    }
}
