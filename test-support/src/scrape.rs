//! Reading a gateway's metrics endpoint the way a Prometheus server does,
//! and checking what it says: `promtool check metrics` (format and naming
//! lint) and the values of single samples.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `GET path` on `addr`; the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)
        .with_context(|| format!("reading the answer of {addr}"))?;
    let answer = String::from_utf8(answer).context("the answer is not UTF-8")?;
    let Some((head, body)) = answer.split_once("\r\n\r\n") else {
        bail!("no end of headers in {answer:?}");
    };
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status code in {head:?}"))?;
    Ok((code, body.to_string()))
}

/// The text of `GET /metrics`, which must answer 200.
pub fn metrics(addr: SocketAddr) -> Result<String> {
    match http_get(addr, "/metrics")? {
        (200, body) => Ok(body),
        (code, body) => bail!("GET /metrics on {addr}: {code}: {body}"),
    }
}

/// Runs `promtool check metrics` on `text`; the error carries its report.
pub fn promtool_check(promtool: &Path, text: &str) -> Result<()> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", promtool.display()))?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The value of the sample written exactly as `series` (the metric name,
/// then its labels as the endpoint orders them), e.g.
/// `weir_rx_frames_total{result="accepted"}`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| match v.trim() {
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            v => v.parse().ok(),
        })
}

/// The sum of every sample of metric `name`, whatever its labels.
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => labelled.rsplit_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP a_total A.\n# TYPE a_total counter\n\
                        a_total{result=\"x\"} 3\na_total{result=\"y\"} 4\n\
                        a_total_more 9\nb 1.5\nc +Inf\n";

    #[test]
    fn samples_are_found_by_their_exact_series() {
        assert_eq!(sample(TEXT, "a_total{result=\"y\"}"), Some(4.0));
        assert_eq!(sample(TEXT, "b"), Some(1.5));
        assert_eq!(sample(TEXT, "c"), Some(f64::INFINITY));
        assert_eq!(sample(TEXT, "a_total"), None);
        assert_eq!(sum(TEXT, "a_total"), 7.0);
        assert_eq!(sum(TEXT, "d"), 0.0);
    }
}
