//! A test certificate authority and a server certificate for `127.0.0.1`,
//! made with the `openssl` CLI, for registries served over TLS.
//!
//! The CA is a real CA (`basicConstraints CA:TRUE`, `keyCertSign`) and the
//! server certificate a leaf it signed (`CA:FALSE`, `serverAuth`,
//! `subjectAltName IP:127.0.0.1`): rustls (webpki) refuses a self-signed
//! certificate used both as trust anchor and as the server's own, so the
//! one-certificate shortcut does not work for clients built on it.
//!
//! `openssl` is a tool like the others ([`crate::tools`]): missing, a test
//! skips, except under `CI=true`, where it fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::tools;

/// Files of a test CA and the server certificate it signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestCerts {
    /// The CA certificate (PEM): what clients trust (`ca_file`).
    pub ca_cert: PathBuf,
    /// The server's certificate (PEM), for `127.0.0.1`.
    pub cert: PathBuf,
    /// The server's private key (PEM, mode 0600).
    pub key: PathBuf,
    /// A directory holding only the CA as `ca.crt`: the form skopeo's
    /// `--src-cert-dir`/`--dest-cert-dir` (and containers' `certs.d`) read.
    pub cert_dir: PathBuf,
}

const CA_CONFIG: &str = "[req]
distinguished_name = dn
prompt = no
[dn]
CN = weir test CA
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
";

const LEAF_EXTENSIONS: &str = "basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
";

/// Makes a CA and a server certificate for `127.0.0.1` in `dir` (created
/// if missing), valid from now for two days. Needs `openssl` on `PATH`.
pub fn make_certs(dir: &Path) -> Result<TestCerts> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_config = dir.join("ca.cnf");
    let leaf_ext = dir.join("leaf.ext");
    fs::write(&ca_config, CA_CONFIG).with_context(|| format!("writing {}", ca_config.display()))?;
    fs::write(&leaf_ext, LEAF_EXTENSIONS)
        .with_context(|| format!("writing {}", leaf_ext.display()))?;
    let ca_key = dir.join("ca.key");
    let ca_cert = dir.join("ca.pem");
    let key = dir.join("server.key");
    let csr = dir.join("server.csr");
    let cert = dir.join("server.pem");
    // P-256 keys: generated in milliseconds, and every client here speaks ECDSA.
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    openssl(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-nodes",
                "-days",
                "2",
                "-extensions",
                "v3_ca",
            ])
            .args(ec)
            .arg("-config")
            .arg(&ca_config)
            .arg("-keyout")
            .arg(&ca_key)
            .arg("-out")
            .arg(&ca_cert),
    )?;
    openssl(
        Command::new("openssl")
            .args(["req", "-new", "-nodes", "-subj", "/CN=127.0.0.1"])
            .args(ec)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr),
    )?;
    openssl(
        Command::new("openssl")
            .args(["x509", "-req", "-set_serial", "2", "-days", "2"])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&ca_cert)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&leaf_ext)
            .arg("-out")
            .arg(&cert),
    )?;
    let cert_dir = dir.join("certs.d");
    fs::create_dir_all(&cert_dir).with_context(|| format!("creating {}", cert_dir.display()))?;
    fs::copy(&ca_cert, cert_dir.join("ca.crt"))
        .with_context(|| format!("copying the CA into {}", cert_dir.display()))?;
    Ok(TestCerts {
        ca_cert,
        cert,
        key,
        cert_dir,
    })
}

/// [`make_certs`], or None (after saying how to install `openssl`) when
/// `openssl` is missing; under `CI=true` a missing `openssl` fails the test.
pub fn certs_or_skip(dir: &Path) -> Result<Option<TestCerts>> {
    if tools::or_skip(tools::OPENSSL).is_none() {
        return Ok(None);
    }
    make_certs(dir).map(Some)
}

/// Runs one `openssl` command; its stderr is the error when it fails.
fn openssl(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .with_context(|| format!("running {shown}"))?;
    if !output.status.success() {
        bail!(
            "{shown} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> std::process::Output {
        Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl")
    }

    #[test]
    fn the_leaf_verifies_against_the_ca_and_names_127_0_0_1_for_server_auth() {
        let dir = tempfile::tempdir().unwrap();
        let Some(certs) = certs_or_skip(dir.path()).unwrap() else {
            return;
        };
        let ca = certs.ca_cert.to_str().unwrap();
        let leaf = certs.cert.to_str().unwrap();
        let verify = run(&["verify", "-purpose", "sslserver", "-CAfile", ca, leaf]);
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stderr)
        );
        let text = run(&["x509", "-noout", "-text", "-in", leaf]);
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains("IP Address:127.0.0.1"), "{text}");
        assert!(text.contains("CA:FALSE"), "{text}");
        let ca_text = run(&["x509", "-noout", "-text", "-in", ca]);
        assert!(String::from_utf8_lossy(&ca_text.stdout).contains("CA:TRUE"));
        // The CA itself is not a certificate for 127.0.0.1: a client that
        // trusted only the leaf's own issuer by accident would show here.
        let self_check = run(&["verify", "-CAfile", leaf, leaf]);
        assert!(!self_check.status.success());
        assert_eq!(
            fs::read(certs.cert_dir.join("ca.crt")).unwrap(),
            fs::read(&certs.ca_cert).unwrap()
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&certs.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "server key readable by others: {mode:o}");
    }

    #[test]
    fn the_pems_load_as_a_certificate_and_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let Some(certs) = certs_or_skip(dir.path()).unwrap() else {
            return;
        };
        let ca = fs::read(&certs.ca_cert).unwrap();
        ureq::tls::Certificate::from_pem(&ca).expect("CA certificate parses");
        let leaf = fs::read(&certs.cert).unwrap();
        ureq::tls::Certificate::from_pem(&leaf).expect("server certificate parses");
        let key = fs::read(&certs.key).unwrap();
        ureq::tls::PrivateKey::from_pem(&key).expect("server key parses");
    }
}
