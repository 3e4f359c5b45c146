//! Operator commands of the gateway-rx binary, run as an operator would.

mod common;

use common::{key, setup_with, Gateway};
use std::process::Command;
use std::time::Duration;
use weir_test_support::{sample_image, TestSender};

/// `gateway-rx COMMAND --config CONFIG ARGS…`, run to its end.
fn operator(command: &str, config: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gateway-rx"))
        .args([command, "--config"])
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// A receiver's setup delivering into an OCI layout in a directory of its
/// own (kept while the returned guard lives).
fn delivering_into_a_layout() -> (common::Setup, tempfile::TempDir) {
    let out_dir = tempfile::tempdir().unwrap();
    let s = setup_with(&format!(
        "[delivery]\noci_layout = \"{}\"\n",
        out_dir.path().display()
    ));
    (s, out_dir)
}

fn forget_session(config: &std::path::Path) -> std::process::Output {
    operator("forget-session", config, &[])
}

#[test]
fn forget_session_clears_the_remembered_session_only_while_stopped() {
    let (s, _out_dir) = delivering_into_a_layout();
    let gw = Gateway::start(&s);
    let img = sample_image("team/op", &["1"], 1, 1000);
    let mut tx = TestSender::new(key(), 4242, s.addr, 1400, 8, 2);
    gw.wait_for(
        "the sender's session",
        Duration::from_secs(30),
        |st| common::counter(st, "frames_accepted") > 0,
        &mut || {
            tx.pass(&img.objects());
        },
    );
    // While the gateway holds its state, the command refuses and says why.
    let busy = forget_session(&s.config);
    assert!(!busy.status.success());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(err.contains("stop gateway-rx first"), "{err}");
    assert!(gw.terminate().success());

    let done = forget_session(&s.config);
    let out = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{out}");
    assert!(out.contains("forgot session 4242 of key id 1"), "{out}");
    // Nothing is left to forget.
    let again = forget_session(&s.config);
    assert!(String::from_utf8_lossy(&again.stdout).contains("no sender session remembered"));
}

/// An operator's command pointed at a state_dir that is not there (a
/// gateway never started, a mistyped path) says so and leaves no empty
/// state behind that would pass for a healthy gateway (nor, for `ledger
/// accept`, one that holds the acceptance the real state lacks).
#[test]
fn operator_commands_refuse_a_state_dir_that_is_not_there() {
    let (s, _out_dir) = delivering_into_a_layout();
    let state = s.dir.path().join("state");
    let _ = std::fs::remove_dir_all(&state);
    for args in [
        vec!["status"],
        vec!["forget-session"],
        vec!["ledger", "verify"],
        vec![
            "ledger",
            "accept",
            "--chain",
            "00000000000000aa",
            "--from",
            "1",
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_gateway-rx"))
            .args(&args)
            .arg("--config")
            .arg(&s.config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains(&format!("state_dir {} is not there", state.display())),
            "{args:?}: {err}"
        );
        assert!(!state.exists(), "{args:?} created {}", state.display());
    }
}

/// `check-config` reads the signature keys a relative `verify_signatures`
/// names from the configuration file's directory, wherever the command is
/// started (`/` under systemd), and refuses a missing one by file and field
/// before the gateway would meet it at its first delivery.
#[test]
fn check_config_reads_relative_signature_keys_from_the_config_files_directory() {
    let s =
        setup_with("[delivery]\noci_layout = \"out\"\nverify_signatures = [\"keys/cosign.pub\"]\n");
    let keys = s.dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_gateway-rx"))
            .arg("check-config")
            .arg(&s.config)
            .current_dir("/")
            .output()
            .unwrap()
    };
    let missing = check();
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success(), "{err}");
    assert!(
        err.contains("delivery.verify_signatures")
            && err.contains(&keys.join("cosign.pub").display().to_string()),
        "{err}"
    );
    std::fs::write(
        keys.join("cosign.pub"),
        "-----BEGIN PUBLIC KEY-----\n\
         MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEvXgDDih1Jgpottp54XwdUdIZ+iA\n\
         0u1J5weQA4aAxKKym4QrKJ98oO2SXolrIXKtFKy2ELvaWtoJ26tUdxGsuw==\n\
         -----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let found = check();
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
}

fn forget_image(config: &std::path::Path, digest: &str) -> std::process::Output {
    operator("forget-image", config, &[digest])
}

/// An image whose blobs never all come (here: the sender sends its image
/// object and its config, never its layer) holds what it has for good;
/// the operator forgets it with the gateway stopped, and it is gone from
/// the status after a restart. A complete image, a wrong digest and a
/// running gateway are refused with a message.
#[test]
fn forget_image_gives_up_on_an_image_still_receiving_only_while_stopped() {
    let (s, _out_dir) = delivering_into_a_layout();
    let gw = Gateway::start(&s);
    let img = sample_image("team/stuck", &["1"], 1, 1000);
    let digest = img.tm.manifest.digest.clone();
    let objects = img.objects();
    // The config blob and the image object; the layer never comes.
    let partial: Vec<_> = [objects[0].clone(), objects[objects.len() - 1].clone()].to_vec();
    let mut tx = TestSender::new(key(), 4343, s.addr, 1400, 8, 2);
    let listed = |st: &serde_json::Value| {
        st["images"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["manifest_digest"] == digest.as_str()))
    };
    gw.wait_for(
        "the image receiving, its layer missing",
        Duration::from_secs(30),
        |st| listed(st) && common::counter(st, "blobs_verified") >= 1,
        &mut || {
            tx.pass(&partial);
        },
    );
    let busy = forget_image(&s.config, &digest);
    assert!(!busy.status.success());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(err.contains("stop it first"), "{err}");
    assert!(gw.terminate().success());

    let bad = forget_image(&s.config, "sha256:xyz");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a manifest digest"));
    let done = forget_image(&s.config, &digest);
    let out = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(out.contains("forgot team/stuck:1"), "{out}");
    let again = forget_image(&s.config, &digest);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no image still receiving"));

    let gw = Gateway::start(&s);
    gw.wait_for(
        "a status after the restart",
        Duration::from_secs(30),
        |st| st["images"].is_array(),
        &mut || {},
    );
    let st = gw.status().unwrap();
    assert!(!listed(&st), "{st:#}");
    assert!(gw.terminate().success());
}
