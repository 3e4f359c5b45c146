//! The random-fault campaign (see `weir_tests::campaign`), a few rounds:
//! images cross while either gateway is killed or stopped at random
//! moments or aborted at an armed crash point, the registry goes down (also
//! mid-push), and the link blacks out and loses bursts. Each round must
//! deliver every tag at the source's digest, PUT once, with nothing left
//! in the spool. Prints its seed and a table; `WEIR_CAMPAIGN_SEED` and
//! `WEIR_CAMPAIGN_ROUNDS` replay or lengthen it. Longer runs:
//! `cargo run --release -p weir-tests --bin campaign -- --rounds 50`.

use weir_tests::campaign::{self, CampaignOptions, DEFAULT_SEED, TABLE_HEADER};

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(v) => Some(v),
        Err(_) => panic!("{name}={value:?} is not a number"),
    }
}

#[test]
fn a_seeded_random_fault_campaign_delivers_every_image_once() {
    let seed = env_number("WEIR_CAMPAIGN_SEED").unwrap_or(DEFAULT_SEED);
    let rounds = env_number("WEIR_CAMPAIGN_ROUNDS").unwrap_or(3);
    let options = CampaignOptions::new(seed, rounds);
    // None: no docker-registry here, and not CI (the launcher said so).
    let Some(reports) = campaign::run(&options).expect("running the campaign") else {
        return;
    };
    let failed: Vec<_> = reports.iter().filter(|r| r.result.is_err()).collect();
    if !failed.is_empty() {
        let rows: Vec<String> = reports.iter().map(|r| r.row()).collect();
        let replays: Vec<String> = failed
            .iter()
            .map(|r| {
                format!(
                    "round {} (seed {}):\n{}\n{}",
                    r.round,
                    r.seed,
                    r.events.join("\n"),
                    campaign::replay_commands(r.seed)
                )
            })
            .collect();
        panic!(
            "campaign seed {seed}: {} of {} rounds failed\n{TABLE_HEADER}\n{}\n\n{}",
            failed.len(),
            reports.len(),
            rows.join("\n"),
            replays.join("\n\n")
        );
    }
}
