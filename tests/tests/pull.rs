//! End to end, pull mode: gateway-tx polls a real source registry (Debian's
//! `docker-registry` behind htpasswd basic auth on loopback, loaded with
//! skopeo) by its sync list, and gateway-rx pushes what crosses into a
//! destination registry. Each test says what it proves, is bounded in time
//! and stops by itself; on failure it prints both gateways' logs, the pull
//! section of the sender's status and the source registry's log.
//!
//! What these tests take from the gateway beyond the configuration keys
//! (`[pull]`, `[[registry]]`, sync.yaml) is kept in few places so it is easy
//! to match: `pull_field` (status.json's `pull` section), the `LOG_*` and
//! `REGISTRY_401_MESSAGE` needles and `log_line` (the tx log), and
//! `tx_status_command` / `tx_check_config` (the CLI).

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};
use weir_test_support::proxy::TcpProxy;
use weir_test_support::skopeo::{self, Access};
use weir_test_support::tls;
use weir_tests::imagegen::{self, GeneratedImage, LayerSpec};
use weir_tests::pair::{wait_until, Gateway, PullRegistry, PullSetup, Site, SiteOptions, Target};
use weir_tests::registry::{Registry, RegistryOptions};

/// The poll period of every test's `[pull]`.
const INTERVAL_S: u64 = 2;
const INTERVAL: Duration = Duration::from_secs(INTERVAL_S);
/// First crossing: a poll, the fetch, a carousel pass, the push.
const FIRST_CROSSING: Duration = Duration::from_secs(60);
/// A change at the source seen by the next poll and carried across: one
/// interval plus the transfer, with room for a loaded CI machine.
const NEXT_CROSSING: Duration = Duration::from_secs(30);
/// Credentials of every source registry.
const USER: &str = "mirror";
const PASSWORD: &str = "right-password";

/// What distribution answers a wrong password with: the registry's own
/// message, which the sender must pass on to the operator.
const REGISTRY_401_MESSAGE: &str = "authentication required";

// ---------------------------------------------------------------------------
// What the tests assume of the gateway's status and log. One place each.

/// A field of the sync entry `source` (its source reference exactly as the
/// sync file writes it) in the `pull` section of gateway-tx's status.json.
fn pull_field(site: &Site, source: &str, field: &str) -> Option<Value> {
    pull_field_in(&site.tx_status()?, source, field)
}

/// [`pull_field`] in a parsed status.json: the entry of
/// `pull.entries[]` whose `source` is `source` (README, status.json).
fn pull_field_in(status: &Value, source: &str, field: &str) -> Option<Value> {
    status["pull"]["entries"]
        .as_array()?
        .iter()
        .find(|e| e["source"] == source)
        .and_then(|e| e.get(field).cloned())
}

/// A count in the pull status: a number, or the length of a list.
fn pull_count(site: &Site, source: &str, field: &str) -> u64 {
    count_of(pull_field(site, source, field))
}

fn count_of(value: Option<Value>) -> u64 {
    match value {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        Some(Value::Array(items)) => items.len() as u64,
        _ => 0,
    }
}

/// Refusal codes the tx log names (those of a drop's reason file).
const LOG_GATE_EXCEEDED: &str = "gate-exceeded";
const LOG_BAD_SCAN_REPORT: &str = "bad-scan-report";

/// `gateway-tx status --config tx.toml`: exit status and stdout + stderr.
fn tx_status_command(site: &Site) -> Result<(bool, String)> {
    let out = site.run_tx_command(&[
        OsStr::new("status"),
        OsStr::new("--config"),
        site.tx_config.as_os_str(),
    ])?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}

/// `gateway-tx check-config tx.toml`: exit status and stdout + stderr.
fn tx_check_config(site: &Site) -> Result<(bool, String)> {
    let out = site.run_tx_command(&[OsStr::new("check-config"), site.tx_config.as_os_str()])?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}

/// The first line of `log` holding every needle.
fn log_line<'a>(log: &'a str, needles: &[&str]) -> Option<&'a str> {
    log.lines()
        .find(|line| needles.iter().all(|n| line.contains(n)))
}

// ---------------------------------------------------------------------------
// The pair, its registries and images.

/// Both gateways of one site, and what to print when a test fails.
struct Run {
    site: Site,
    tx: Gateway,
    rx: Gateway,
    /// Logs of the registries involved, for failure messages.
    registry_logs: Vec<(&'static str, std::path::PathBuf)>,
    started: Instant,
}

impl Run {
    /// Lays out a site delivering into `dest`, with `[pull]` from `setup`
    /// and the sync list `sync_yaml`, and starts gateway-rx then gateway-tx
    /// (sending straight to the receiver's port: loss is not what these
    /// tests are about).
    fn start(
        dest: &Registry,
        setup: &PullSetup,
        sync_yaml: &str,
        mut opts: SiteOptions,
    ) -> Result<Run> {
        let site = Site::new(Target::Registry(dest.url()), &opts)?;
        opts.tx_extra.push_str(&site.pull_toml(setup, sync_yaml)?);
        site.write_tx_config(site.rx_addr, &opts)?;
        let rx = site.start_rx()?;
        let tx = site.start_tx()?;
        Ok(Run {
            site,
            tx,
            rx,
            registry_logs: vec![("destination registry", dest.log_path())],
            started: Instant::now(),
        })
    }

    fn with_source(mut self, source: &Registry) -> Run {
        self.registry_logs
            .push(("source registry", source.log_path()));
        self
    }

    /// Panics with `what` and everything that helps see why.
    fn fail(&mut self, what: &str) -> ! {
        let mut report = String::new();
        for g in [&mut self.tx, &mut self.rx] {
            let running = g.is_running();
            report.push_str(&format!(
                "--- {} (running: {running})\n{}\n",
                g.name,
                g.log_tail(60)
            ));
        }
        let pull = self
            .site
            .tx_status()
            .map(|s| format!("{:#}", s["pull"]))
            .unwrap_or_else(|| "no status.json".into());
        report.push_str(&format!("--- tx status.json \"pull\"\n{pull}\n"));
        for (name, path) in &self.registry_logs {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("127.0.0.1 - "))
                .collect();
            report.push_str(&format!(
                "--- {name} (access log, last 25)\n{}\n",
                lines[lines.len().saturating_sub(25)..].join("\n")
            ));
        }
        panic!("{what} (after {:.1?})\n{report}", self.started.elapsed());
    }

    /// Waits until `cond` holds; fails with the logs after `timeout`.
    fn expect_within(
        &mut self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Site) -> bool,
    ) {
        let site = &self.site;
        if !wait_until(timeout, || cond(site)) {
            self.fail(&format!("{what}: not within {timeout:?}"));
        }
    }

    /// Fails with the logs unless `cond`.
    fn check(&mut self, cond: bool, what: impl FnOnce() -> String) {
        if !cond {
            let what = what();
            self.fail(&what);
        }
    }

    /// Watches for `duration` that `cond` keeps holding; fails at once if
    /// it does not.
    fn holds_for(&mut self, what: &str, duration: Duration, mut cond: impl FnMut(&Site) -> bool) {
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            if !cond(&self.site) {
                self.fail(&format!("{what}: broken"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn both_running(&mut self) {
        let running = self.tx.is_running() && self.rx.is_running();
        self.check(running, || "a gateway exited".into());
    }
}

/// The site's defaults at a quarter of the usual rate: the carousel keeps
/// cycling retained images at full rate, and two tests share two cores.
fn site_options() -> SiteOptions {
    SiteOptions {
        rate_bps: 10_000_000,
        ..Default::default()
    }
}

fn layers(sizes: &[u64]) -> Vec<LayerSpec> {
    sizes.iter().map(|&size| LayerSpec { size }).collect()
}

/// A source registry behind basic auth (USER / PASSWORD), or None to skip.
fn source_registry(tls: Option<weir_test_support::TestCerts>) -> Result<Option<Registry>> {
    let options = RegistryOptions {
        tls,
        ..RegistryOptions::with_basic_auth(USER, PASSWORD)
    };
    Registry::start_with(options)
}

/// A small single-platform OCI archive from `seed`, written under `dir`.
fn image(dir: &Path, seed: u64, sizes: &[u64], reference: &str) -> Result<GeneratedImage> {
    let file = format!("img-{seed}.tar");
    Ok(imagegen::oci_archive(
        dir,
        &file,
        seed,
        &layers(sizes),
        reference,
    )?)
}

/// Pushes `img` to `repo_tag` in the source; returns the digest it serves,
/// checked to be the archive's own.
fn push(img: &GeneratedImage, to: &Access, repo_tag: &str) -> Result<String> {
    let digest = skopeo::push_archive(&img.path, to, repo_tag)?;
    if img.manifest_digest.as_deref() != Some(digest.as_str()) {
        bail!(
            "{repo_tag}: skopeo pushed {digest}, the archive holds {:?}",
            img.manifest_digest
        );
    }
    Ok(digest)
}

/// The digest `repo:tag` has in `registry` now (None: absent or unreachable).
fn digest_in(registry: &Registry, repo: &str, tag: &str) -> Option<String> {
    registry.manifest_digest(repo, tag).ok().flatten()
}

/// Manifest digests of the images in gateway-tx's carousel (status.json
/// `images`), one per queued (digest, destination), duplicates kept.
fn tx_images(site: &Site) -> Vec<String> {
    site.tx_status()
        .map(|s| {
            s["images"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["manifest_digest"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Successful GETs of `path` (status 200) in a registry's access log.
fn gets_200(registry: &Registry, path: &str) -> Result<usize> {
    Ok(registry
        .access_log()?
        .iter()
        .filter(|e| e.method == "GET" && e.path == path && e.status == 200)
        .count())
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// The scenarios.

/// A mapping list with an exact reference (to another repository and tag)
/// and a followed repository filtered by allow, deny and a semver range:
/// the selected tags arrive with the source's digests and the others never
/// (their blobs are not even fetched); a tag pushed after start crosses at
/// the next poll; a moved tag crosses again; unchanged ones are neither
/// fetched nor queued nor pushed again.
#[test]
fn mapped_and_followed_tags_cross_with_source_digests_and_only_moved_tags_cross_again() -> Result<()>
{
    if !skopeo::available() {
        return Ok(());
    }
    let Some(source) = source_registry(None)? else {
        return Ok(());
    };
    let Some(dest) = Registry::start()? else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let w = work.path();
    let src = source.access();
    let h = source.host();

    let app = image(w, 101, &[60_000], "team-a/app:1.4")?;
    let app_digest = push(&app, &src, "team-a/app:1.4")?;
    // team-b/svc: one tag the filter selects, one per reason to leave a tag.
    let v2_0 = image(w, 111, &[50_000], "team-b/svc:v2.0.0")?;
    let v2_0_digest = push(&v2_0, &src, "team-b/svc:v2.0.0")?;
    let mut left_out = Vec::new();
    for (seed, tag) in [
        (112, "v1.9.0"),     // below the semver range
        (113, "v2.2.0"),     // denied
        (114, "v2.3.0-rc1"), // not allowed
        (115, "latest"),     // not allowed
    ] {
        let img = image(w, seed, &[40_000], &format!("team-b/svc:{tag}"))?;
        push(&img, &src, &format!("team-b/svc:{tag}"))?;
        left_out.push((tag, img));
    }
    let v2_4 = image(w, 116, &[45_000], "team-b/svc:v2.4.0")?;
    let v2_0_moved = image(w, 117, &[55_000], "team-b/svc:v2.0.0")?;

    let setup = PullSetup {
        registries: vec![PullRegistry {
            host: h.clone(),
            username: Some(USER.into()),
            password: Some(PASSWORD.into()),
            plain_http: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let followed = format!("{h}/team-b/svc");
    let sync = format!(
        r"images:
  - source: {h}/team-a/app:1.4
    destination: mirror/app:stable
repositories:
  - source: {followed}
    destination: mirror/team-b/svc
    tags:
      allow: ['^v\d+\.\d+\.\d+$']
      deny: ['^v2\.2\.']
      semver: '>=2.0.0'
"
    );
    let mut run = Run::start(&dest, &setup, &sync, site_options())?.with_source(&source);

    run.expect_within(
        "the exact image and the one selected tag in the destination",
        FIRST_CROSSING,
        |_| {
            digest_in(&dest, "mirror/app", "stable").as_deref() == Some(app_digest.as_str())
                && digest_in(&dest, "mirror/team-b/svc", "v2.0.0").as_deref()
                    == Some(v2_0_digest.as_str())
        },
    );

    // A tag pushed while the gateway runs crosses at the next poll.
    let v2_4_digest = push(&v2_4, &src, "team-b/svc:v2.4.0")?;
    let pushed = Instant::now();
    run.expect_within(
        "v2.4.0, pushed after start, in the destination",
        NEXT_CROSSING,
        |_| {
            digest_in(&dest, "mirror/team-b/svc", "v2.4.0").as_deref() == Some(v2_4_digest.as_str())
        },
    );
    eprintln!("v2.4.0 crossed {:.1?} after its push", pushed.elapsed());

    // A moved tag crosses again.
    let moved_digest = skopeo::move_tag(&v2_0_moved.path, &src, "team-b/svc:v2.0.0", &v2_0_digest)?;
    run.expect_within("the moved v2.0.0 in the destination", NEXT_CROSSING, |_| {
        digest_in(&dest, "mirror/team-b/svc", "v2.0.0").as_deref() == Some(moved_digest.as_str())
    });

    // Several more polls with nothing changed at the source.
    std::thread::sleep(3 * INTERVAL);
    run.both_running();

    let tags = sorted(dest.tags("mirror/team-b/svc")?);
    run.check(tags == ["v2.0.0", "v2.4.0"], || {
        format!("destination tags of mirror/team-b/svc: {tags:?}")
    });
    let catalog = sorted(dest.catalog()?);
    run.check(catalog == ["mirror/app", "mirror/team-b/svc"], || {
        format!("destination repositories: {catalog:?}")
    });
    for (repo, tag, digest) in [
        ("mirror/app", "stable", &app_digest),
        ("mirror/team-b/svc", "v2.4.0", &v2_4_digest),
        ("mirror/team-b/svc", "v2.0.0", &moved_digest),
    ] {
        let got = dest.verify_image(repo, tag)?;
        run.check(&got.manifest_digest == digest, || {
            format!(
                "{repo}:{tag} is {}, the source's is {digest}",
                got.manifest_digest
            )
        });
    }
    let puts = [
        dest.manifest_puts("mirror/app", "stable")?,
        dest.manifest_puts("mirror/team-b/svc", "v2.4.0")?,
        dest.manifest_puts("mirror/team-b/svc", "v2.0.0")?,
    ];
    run.check(puts == [1, 1, 2], || {
        format!("manifest PUTs (stable, v2.4.0, v2.0.0) = {puts:?}: unchanged tags once, the moved one twice")
    });

    // The sender queued each (digest, destination) once: the polls that
    // found nothing new added nothing to the carousel.
    let queued = tx_images(&run.site);
    let expected = [&app_digest, &v2_0_digest, &v2_4_digest, &moved_digest];
    let unique = sorted(queued.clone());
    let mut deduped = unique.clone();
    deduped.dedup();
    run.check(
        deduped.len() == unique.len() && queued.iter().all(|d| expected.contains(&d)),
        || format!("tx carousel images {queued:?}; expected each of {expected:?} at most once"),
    );

    // The source was spared: a blob of a selected image fetched once
    // however many polls found it unchanged, one of a tag the filter
    // leaves never.
    let selected = [
        ("team-a/app", &app),
        ("team-b/svc", &v2_0),
        ("team-b/svc", &v2_4),
        ("team-b/svc", &v2_0_moved),
    ];
    for (repo, img) in selected {
        for blob in &img.blob_digests {
            let path = format!("/v2/{repo}/blobs/{blob}");
            let n = gets_200(&source, &path)?;
            run.check(n <= 1, || {
                format!("GET {path} served {n} times: an unchanged image fetched again")
            });
        }
    }
    for (tag, img) in &left_out {
        for blob in &img.blob_digests {
            let path = format!("/v2/team-b/svc/blobs/{blob}");
            let n = gets_200(&source, &path)?;
            run.check(n == 0, || {
                format!("{tag} is not selected, yet GET {path} was served {n} times")
            });
        }
    }
    let already = pull_count(&run.site, &followed, "already_sent");
    run.check(already >= 2, || {
        format!("pull status of {followed}: already_sent = {already}, expected at least the 2 sent tags")
    });
    Ok(())
}

/// A wrong password: the entry is delayed (not hammered), nothing of it
/// crosses, the registry's own message is in the tx log, in status.json
/// and in `gateway-tx status`; a file drop crosses meanwhile.
#[test]
fn a_wrong_password_delays_the_entry_with_the_registrys_message_while_drops_still_cross(
) -> Result<()> {
    if !skopeo::available() {
        return Ok(());
    }
    let Some(source) = source_registry(None)? else {
        return Ok(());
    };
    let Some(dest) = Registry::start()? else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let app = image(work.path(), 201, &[40_000], "team-a/app:1")?;
    push(&app, &source.access(), "team-a/app:1")?;
    let dropped = image(work.path(), 202, &[40_000], "team-d/drop:1")?;
    let dropped_digest = dropped.manifest_digest.clone().context("drop digest")?;

    let h = source.host();
    let setup = PullSetup {
        registries: vec![PullRegistry {
            host: h.clone(),
            username: Some(USER.into()),
            password: Some("wrong-password".into()),
            plain_http: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let entry = format!("{h}/team-a/app:1");
    let sync = format!("images:\n  - source: {entry}\n    destination: team-a/app:1\n");
    // What the source saw before the gateway started (skopeo's push).
    let pushes = source.access_log()?.len();
    let mut run = Run::start(&dest, &setup, &sync, site_options())?.with_source(&source);
    run.site.drop_image(&dropped.path, "drop.tar")?;

    run.expect_within("the file drop in the destination", FIRST_CROSSING, |_| {
        digest_in(&dest, "team-d/drop", "1").as_deref() == Some(dropped_digest.as_str())
    });
    run.expect_within(
        "the registry's message in the tx log",
        NEXT_CROSSING,
        |site| site.tx_log().contains(REGISTRY_401_MESSAGE),
    );
    run.expect_within(
        "the registry's message as the entry's last error in status.json",
        Duration::from_secs(10),
        |site| {
            pull_field(site, &entry, "last_error")
                .and_then(|e| e.as_str().map(|e| e.contains(REGISTRY_401_MESSAGE)))
                .unwrap_or(false)
        },
    );
    // A few more intervals: still nothing of the entry crosses.
    std::thread::sleep(2 * INTERVAL);
    run.both_running();
    let elapsed = run.started.elapsed();

    let catalog = dest.catalog()?;
    run.check(catalog == ["team-d/drop"], || {
        format!("destination repositories: {catalog:?}; only the drop may be there")
    });
    let queued = tx_images(&run.site);
    run.check(queued == [dropped_digest.clone()], || {
        format!("tx carousel: {queued:?}; only the drop may be there")
    });
    let log = source.access_log()?.split_off(pushes);
    let refused = log.iter().filter(|e| e.status == 401).count();
    run.check(refused >= 1, || {
        "the source never saw the wrong password".into()
    });
    let served = log
        .iter()
        .filter(|e| e.method == "GET" && e.status == 200 && e.path.starts_with("/v2/team-a/app/"))
        .count();
    run.check(served == 0, || {
        format!("{served} requests for team-a/app were served")
    });
    // Delayed: a few requests per poll at most, not a retry loop.
    let polls = elapsed.as_secs() / INTERVAL_S + 2;
    run.check(log.len() as u64 <= 10 * polls, || {
        format!(
            "{} requests reached the source in {elapsed:.1?}: a refused entry is not delayed",
            log.len()
        )
    });

    let (ok, text) = tx_status_command(&run.site)?;
    run.check(ok, || format!("gateway-tx status failed:\n{text}"));
    run.check(
        text.contains(&entry) && text.contains(REGISTRY_401_MESSAGE),
        || format!("gateway-tx status names neither the entry nor the registry's message:\n{text}"),
    );
    Ok(())
}

/// The source goes away in the middle of a multi-MiB blob (a proxy cuts
/// every connection after 1 MiB of responses and refuses new ones): nothing
/// is queued while it is away; once it is back, the image crosses whole.
#[test]
fn a_source_lost_mid_blob_queues_nothing_and_the_image_crosses_once_it_is_back() -> Result<()> {
    if !skopeo::available() {
        return Ok(());
    }
    let Some(source) = source_registry(None)? else {
        return Ok(());
    };
    let Some(dest) = Registry::start()? else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let big = image(work.path(), 301, &[4_000_000, 200_000], "team-a/big:1")?;
    let digest = push(&big, &source.access(), "team-a/big:1")?;
    // Tag list, manifest, config and 401 challenges are a few kB: the first
    // MiB of responses ends inside the 4 MB layer.
    const CUT_AT: u64 = 1 << 20;
    let proxy = TcpProxy::start(source.addr())?;
    proxy.cut_after(CUT_AT);

    let h = proxy.host();
    let setup = PullSetup {
        registries: vec![PullRegistry {
            host: h.clone(),
            username: Some(USER.into()),
            password: Some(PASSWORD.into()),
            plain_http: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let sync = format!("images:\n  - source: {h}/team-a/big:1\n    destination: team-a/big:1\n");
    let mut run = Run::start(&dest, &setup, &sync, site_options())?.with_source(&source);

    run.expect_within("the fetch cut mid-blob", FIRST_CROSSING, |_| {
        proxy.cuts() >= 1
    });
    let down = proxy.bytes_down();
    run.check(down == CUT_AT, || {
        format!("{down} bytes went through before the cut")
    });
    run.holds_for(
        "nothing queued or delivered while the source is away",
        3 * INTERVAL,
        |site| {
            tx_images(site).is_empty()
                && site
                    .tx_status()
                    .is_none_or(|s| s["queue"]["images"].as_u64().unwrap_or(0) == 0)
                && digest_in(&dest, "team-a/big", "1").is_none()
        },
    );
    eprintln!("while away: {} connection(s) refused", proxy.refused());

    proxy.restore();
    run.expect_within(
        "the image in the destination once the source is back",
        FIRST_CROSSING,
        |_| digest_in(&dest, "team-a/big", "1").as_deref() == Some(digest.as_str()),
    );
    let got = dest.verify_image("team-a/big", "1")?;
    run.check(
        sorted(got.blob_digests.clone()) == sorted(big.blob_digests.clone()),
        || {
            format!(
                "blobs {:?}, source {:?}",
                got.blob_digests, big.blob_digests
            )
        },
    );
    let queued = tx_images(&run.site);
    run.check(queued == [digest.clone()], || {
        format!("tx carousel {queued:?}: the image once, no leftover of the cut fetch")
    });
    run.check(dest.manifest_puts("team-a/big", "1")? == 1, || {
        "pushed more than once".into()
    });
    Ok(())
}

/// A sync-file edit that does not validate is refused whole: the log and
/// `check-config` name the file, the entry and the field; the old list
/// stays in force (its entry is still polled: a moved tag crosses) and the
/// edit's new entries wait; once the file is fixed they cross.
#[test]
fn a_bad_sync_edit_keeps_the_old_list_and_names_file_entry_and_field() -> Result<()> {
    if !skopeo::available() {
        return Ok(());
    }
    let Some(source) = source_registry(None)? else {
        return Ok(());
    };
    let Some(dest) = Registry::start()? else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let w = work.path();
    let src = source.access();
    let first = image(w, 401, &[40_000], "team-a/app:1")?;
    let first_digest = push(&first, &src, "team-a/app:1")?;
    let second = image(w, 402, &[40_000], "team-a/app:1")?;
    let new = image(w, 403, &[40_000], "team-c/new:1")?;
    let new_digest = push(&new, &src, "team-c/new:1")?;

    let h = source.host();
    let setup = PullSetup {
        registries: vec![PullRegistry {
            host: h.clone(),
            username: Some(USER.into()),
            password: Some(PASSWORD.into()),
            plain_http: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let old_list =
        format!("images:\n  - source: {h}/team-a/app:1\n    destination: team-a/app:1\n");
    let fixed_list =
        format!("{old_list}  - source: {h}/team-c/new:1\n    destination: team-c/new:1\n");
    let bad_list = format!(
        "{fixed_list}repositories:\n  - source: {h}/team-b/svc\n    destination: mirror/team-b/svc\n    tags:\n      semver: 'not a version range'\n"
    );
    let mut run = Run::start(&dest, &setup, &old_list, site_options())?.with_source(&source);
    run.expect_within(
        "the old list's image in the destination",
        FIRST_CROSSING,
        |_| digest_in(&dest, "team-a/app", "1").as_deref() == Some(first_digest.as_str()),
    );

    run.site.write_sync_file(&bad_list)?;
    let needles = ["sync.yaml", "repositories[0]", "semver"];
    run.expect_within(
        "a tx log line naming the sync file, the entry and the field",
        NEXT_CROSSING,
        |site| log_line(&site.tx_log(), &needles).is_some(),
    );
    let (ok, text) = tx_check_config(&run.site)?;
    run.check(!ok, || {
        format!("check-config passed a bad sync file:\n{text}")
    });
    run.check(log_line(&text, &needles).is_some(), || {
        format!("check-config does not name file, entry and field on one line:\n{text}")
    });

    // The old list is still in force: its entry is polled, a moved tag crosses.
    let second_digest = skopeo::move_tag(&second.path, &src, "team-a/app:1", &first_digest)?;
    run.expect_within(
        "the old entry's moved tag in the destination",
        NEXT_CROSSING,
        |_| digest_in(&dest, "team-a/app", "1").as_deref() == Some(second_digest.as_str()),
    );
    std::thread::sleep(INTERVAL);
    let early = digest_in(&dest, "team-c/new", "1");
    run.check(early.is_none(), || {
        format!("team-c/new:1 crossed ({early:?}) though only the refused file lists it")
    });

    // Fixed, the file is read again and its new entry crosses.
    run.site.write_sync_file(&fixed_list)?;
    run.expect_within(
        "the fixed list's new entry in the destination",
        NEXT_CROSSING,
        |_| digest_in(&dest, "team-c/new", "1").as_deref() == Some(new_digest.as_str()),
    );
    let (ok, text) = tx_check_config(&run.site)?;
    run.check(ok, || {
        format!("check-config refuses the fixed sync file:\n{text}")
    });
    run.both_running();
    Ok(())
}

/// A scan command that fails, one that hangs past `scan_timeout_s`, and one
/// reporting HIGH under a Medium gate: each image is refused with its
/// reason, recorded, and never crosses; the image refused on its findings
/// is not scanned again. A clean image under the same rule crosses, with
/// `{ref}` and `{digest}` filled in for its scan.
#[test]
fn images_whose_scan_fails_hangs_or_exceeds_the_gate_are_refused_and_never_cross() -> Result<()> {
    if !skopeo::available() {
        return Ok(());
    }
    let Some(source) = source_registry(None)? else {
        return Ok(());
    };
    let Some(dest) = Registry::start()? else {
        return Ok(());
    };
    let work = tempfile::tempdir()?;
    let src = source.access();
    let mut digests = std::collections::HashMap::new();
    for (seed, name) in [
        (501, "clean"),
        (502, "high"),
        (503, "failing"),
        (504, "hanging"),
    ] {
        let img = image(work.path(), seed, &[30_000], &format!("team-s/{name}:1"))?;
        digests.insert(name, push(&img, &src, &format!("team-s/{name}:1"))?);
    }

    let h = source.host();
    let calls = work.path().join("scan-calls.log");
    let script = work.path().join("scan.sh");
    let report = |severity: &str| {
        format!(
            r#"{{"SchemaVersion":2,"ArtifactName":"x","Results":[{{"Target":"x","Class":"os-pkgs","Type":"debian","Vulnerabilities":[{{"VulnerabilityID":"CVE-2024-0001","PkgName":"libx","Severity":"{severity}"}}]}}]}}"#
        )
    };
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             # A scanner by the image's name: $1 is {{ref}}, $2 {{digest}}.\n\
             echo \"$1 $2\" >> '{calls}'\n\
             case \"$1\" in\n\
             *team-s/failing*) echo 'scanner database unavailable' >&2; exit 3 ;;\n\
             *team-s/hanging*) sleep 20; exit 0 ;;\n\
             *team-s/high*) echo '{high}' ;;\n\
             *) echo '{low}' ;;\n\
             esac\n",
            calls = calls.display(),
            high = report("HIGH"),
            low = report("LOW"),
        ),
    )?;
    let setup = PullSetup {
        scan_command: Some(vec![
            "/bin/sh".into(),
            script.display().to_string(),
            "{ref}".into(),
            "{digest}".into(),
        ]),
        // Far above what the quick scans take on a loaded machine, far
        // below the hanging one's 20 s.
        scan_timeout_s: Some(6),
        registries: vec![PullRegistry {
            host: h.clone(),
            username: Some(USER.into()),
            password: Some(PASSWORD.into()),
            plain_http: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut sync = String::from("images:\n");
    for name in ["clean", "high", "failing", "hanging"] {
        sync.push_str(&format!(
            "  - source: {h}/team-s/{name}:1\n    destination: team-s/{name}:1\n"
        ));
    }
    let opts = SiteOptions {
        rules_yaml: Some(
            "namespaces: [team-s]\nrules:\n  - regex: 'team-s/.*:.*'\n    gate: Medium\n".into(),
        ),
        ..site_options()
    };
    let mut run = Run::start(&dest, &setup, &sync, opts)?.with_source(&source);

    run.expect_within("the clean image in the destination", FIRST_CROSSING, |_| {
        digest_in(&dest, "team-s/clean", "1").as_deref() == Some(digests["clean"].as_str())
    });
    let reasons: [(&str, &[&str]); 3] = [
        ("high", &[LOG_GATE_EXCEEDED, "team-s/high"]),
        (
            "failing",
            &[
                LOG_BAD_SCAN_REPORT,
                "team-s/failing",
                "scanner database unavailable",
            ],
        ),
        ("hanging", &[LOG_BAD_SCAN_REPORT, "team-s/hanging"]),
    ];
    for (name, needles) in reasons {
        run.expect_within(
            &format!("the {name} image's refusal in the tx log ({needles:?} on one line)"),
            NEXT_CROSSING,
            |site| log_line(&site.tx_log(), needles).is_some(),
        );
    }
    // Two more polls: the refusals stand.
    std::thread::sleep(2 * INTERVAL + Duration::from_secs(2));
    run.both_running();

    let catalog = dest.catalog()?;
    run.check(catalog == ["team-s/clean"], || {
        format!("destination repositories {catalog:?}: only the clean image may cross")
    });
    let queued = tx_images(&run.site);
    run.check(queued == [digests["clean"].clone()], || {
        format!("tx carousel {queued:?}: only the clean image may be queued")
    });
    for name in ["high", "failing", "hanging"] {
        let entry = format!("{h}/team-s/{name}:1");
        let refused = pull_count(&run.site, &entry, "refused");
        run.check(refused >= 1, || {
            format!("pull status of {entry}: refused = {refused}, expected the refusal recorded")
        });
    }
    let calls = std::fs::read_to_string(&calls).unwrap_or_default();
    let clean_call = format!("{h}/team-s/clean:1 {}", digests["clean"]);
    run.check(calls.lines().any(|l| l == clean_call), || {
        format!("no scan call `{clean_call}`; calls:\n{calls}")
    });
    let high_calls = calls.lines().filter(|l| l.contains("team-s/high")).count();
    run.check(high_calls == 1, || {
        format!(
            "the HIGH image was scanned {high_calls} times; a refusal stands until the digest or \
             the rules change. Calls:\n{calls}"
        )
    });
    Ok(())
}

/// A source registry over TLS whose certificate chains to the CA in
/// `ca_file`: the image crosses with its digest.
#[test]
fn a_tls_source_with_a_private_ca_is_pulled() -> Result<()> {
    if !skopeo::available() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let Some(certs) = tls::certs_or_skip(&work.path().join("tls"))? else {
        return Ok(());
    };
    let Some(source) = source_registry(Some(certs.clone()))? else {
        return Ok(());
    };
    let Some(dest) = Registry::start()? else {
        return Ok(());
    };
    let img = image(work.path(), 601, &[50_000, 20_000], "team-a/secure:1")?;
    let digest = push(&img, &source.access(), "team-a/secure:1")?;

    let h = source.host();
    let setup = PullSetup {
        registries: vec![PullRegistry {
            host: h.clone(),
            username: Some(USER.into()),
            password: Some(PASSWORD.into()),
            ca_file: Some(certs.ca_cert.clone()),
            plain_http: false,
            ..Default::default()
        }],
        ..Default::default()
    };
    let sync =
        format!("images:\n  - source: {h}/team-a/secure:1\n    destination: team-a/secure:1\n");
    let mut run = Run::start(&dest, &setup, &sync, site_options())?.with_source(&source);
    run.expect_within("the image in the destination", FIRST_CROSSING, |_| {
        digest_in(&dest, "team-a/secure", "1").as_deref() == Some(digest.as_str())
    });
    let got = dest.verify_image("team-a/secure", "1")?;
    run.check(
        sorted(got.blob_digests.clone()) == sorted(img.blob_digests.clone()),
        || {
            format!(
                "blobs {:?}, source {:?}",
                got.blob_digests, img.blob_digests
            )
        },
    );
    Ok(())
}

/// The configuration these tests write (`[pull]` with a scan command,
/// `[[registry]]` with a password file and a CA file, both relative, and a
/// sync list with an exact image and a filtered repository) is valid: the
/// positive control of the check-config refusal above. No registry needed.
#[test]
fn the_pull_configuration_the_tests_write_passes_check_config() -> Result<()> {
    let work = tempfile::tempdir()?;
    // A real CA: check-config may well parse it.
    let Some(certs) = tls::certs_or_skip(work.path())? else {
        return Ok(());
    };
    let setup = PullSetup {
        scan_command: Some(vec!["/bin/true".into(), "{ref}".into(), "{digest}".into()]),
        scan_timeout_s: Some(2),
        registries: vec![
            PullRegistry {
                host: "127.0.0.1:5001".into(),
                username: Some(USER.into()),
                password: Some(PASSWORD.into()),
                plain_http: true,
                extra: "max_concurrent = 2\nrequests_per_second = 5\n".into(),
                ..Default::default()
            },
            PullRegistry {
                host: "127.0.0.1:5002".into(),
                username: Some(USER.into()),
                password: Some(PASSWORD.into()),
                ca_file: Some(certs.ca_cert),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let sync = r"images:
  - source: 127.0.0.1:5001/team-a/app:1.4
    destination: team-a/app:1.4
repositories:
  - source: 127.0.0.1:5002/team-b/svc
    destination: mirror/team-b/svc
    tags:
      allow: ['^v\d+\.\d+\.\d+$']
      deny: ['-rc']
      semver: '>=2.0.0'
    platforms: [linux/amd64]
    interval_s: 60
";
    let mut opts = site_options();
    let site = Site::new(Target::Registry("http://127.0.0.1:9".into()), &opts)?;
    opts.tx_extra.push_str(&site.pull_toml(&setup, sync)?);
    site.write_tx_config(site.rx_addr, &opts)?;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(site.password_file(0))?
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        mode, 0o600,
        "password files are written as an operator provisions them"
    );
    let (ok, text) = tx_check_config(&site)?;
    let toml = std::fs::read_to_string(&site.tx_config)?;
    assert!(
        ok,
        "check-config refuses the tests' configuration:\n{text}\n--- tx.toml\n{toml}"
    );
    Ok(())
}

/// The status helper finds an entry in each shape the pull section may
/// take, and nothing for another entry.
#[test]
fn pull_field_reads_the_documented_status_shape() {
    let src = "127.0.0.1:5001/team-a/app:1.4";
    let status = serde_json::json!({"pull": {"sync_file": "sync.yaml", "entries": [
        {"name": "images[0]", "source": src, "destination": "team-a/app:1.4",
         "last_error": "authentication required", "refused": 1, "already_sent": 2}]}});
    assert_eq!(
        pull_field_in(&status, src, "last_error"),
        Some(Value::from("authentication required"))
    );
    assert_eq!(count_of(pull_field_in(&status, src, "refused")), 1);
    assert_eq!(count_of(pull_field_in(&status, src, "already_sent")), 2);
    assert_eq!(
        pull_field_in(&status, "127.0.0.1:5001/other:1", "last_error"),
        None
    );
    assert_eq!(
        pull_field_in(&serde_json::json!({"images": []}), src, "refused"),
        None
    );
}
