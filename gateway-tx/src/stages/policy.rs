//! The policy gate: which images may cross.
//!
//! Rules are YAML, in the form of the SCIM report:
//!
//! ```yaml
//! namespaces: [team-a, team-b]
//! rules:
//!   - regex: "team-a/app.*:.*"
//!     gate: High              # worst allowed severity: Low < Medium < High < Critical
//!   - regex: "team-b/.*:v.*"
//!     gate: Low
//!     allow_unknown: true     # findings of unknown severity do not refuse
//!     allow_unsupported: true # a scanner that declared the image unsupported does not refuse
//!   - regex: "team-b/base:.*" # no gate: no scan report needed
//!   - regex: "team-c/.*"
//!     require_signature:      # a cosign signature under one of these keys
//!       keys: [/etc/weir/cosign-team-c.pub]
//! ```
//!
//! `require_signature` counts a cosign signature (a `.sig` tag or an OCI
//! 1.1 referrer) whose simple-signing payload names the image's digest and
//! verifies under one of the PEM ECDSA P-256 keys (paths relative to the
//! rules file); none: `signature-missing`, none valid: `signature-invalid`
//! with the key fingerprints tried.
//!
//! An image passes when its namespace is listed and some rule matches
//! `namespace/repo:tag` (the regex must match the whole name) and lets its
//! scan report through. A gate without a report refuses: the gate fails
//! closed. Without a rules file every image passes.
//!
//! Scan reports (`<drop>.scan.json`) are read in the formats scanners emit:
//!
//! | format | severities | "unsupported" means |
//! |---|---|---|
//! | Trivy JSON, `SchemaVersion: 2` | `Results[].Vulnerabilities[].Severity` | no result of class `os-pkgs` or `lang-pkgs`: Trivy found nothing it can scan |
//! | Grype JSON | `matches[].vulnerability.severity` | `distro` missing or with an empty name: Grype did not recognise the OS |
//! | Clair v4 vulnerability report | `vulnerabilities{id}.normalized_severity` of the ids in `package_vulnerabilities` | neither `packages` nor `distributions` found |
//! | Quay security API (what SCIM polled) | `data.Layer.Features[].Vulnerabilities[].Severity` | `status: "unsupported"` |
//!
//! `Negligible` counts below `Low`; a severity none of these name (or
//! `Unknown`) is unknown. When a report names the image it scanned (Trivy
//! `Metadata.ImageID`, Grype `source.target.imageID`), that id must be the
//! config digest of the dropped image, so a report cannot vouch for another.

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use weir_host::signatures::{self, SignatureCheck, SignatureLayer, TrustedKeys};

/// Vulnerability severity, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Negligible,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    /// A scanner's severity word; None for unknown ones.
    pub fn from_scanner(word: &str) -> Option<Severity> {
        match word.trim().to_ascii_lowercase().as_str() {
            "negligible" => Some(Severity::Negligible),
            "low" => Some(Severity::Low),
            "medium" | "moderate" => Some(Severity::Medium),
            "high" | "important" => Some(Severity::High),
            "critical" | "defcon1" => Some(Severity::Critical),
            _ => None,
        }
    }

    /// A gate as written in the rules: Low, Medium, High or Critical.
    pub fn gate(word: &str) -> Option<Severity> {
        match Severity::from_scanner(word) {
            Some(Severity::Negligible) | None => None,
            s => s,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Severity::Negligible => "Negligible",
            Severity::Low => "Low",
            Severity::Medium => "Medium",
            Severity::High => "High",
            Severity::Critical => "Critical",
        }
    }
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a drop was refused (or set aside): the `code` of a reason file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReasonCode {
    NamespaceNotAllowed,
    NoRuleMatch,
    GateExceeded,
    NoScanReport,
    BadScanReport,
    ScanReportMismatch,
    UnknownSeverity,
    UnsupportedImage,
    BadArchive,
    CorruptArchive,
    NoReference,
    AlreadySent,
    /// A pulled blob or manifest whose bytes do not hash to its digest.
    DigestMismatch,
    /// A rule requires a signature and none speaks of the image.
    SignatureMissing,
    /// Signatures speak of the image; none verifies under the rule's keys.
    SignatureInvalid,
    /// `[policy] referrers = "require"` and the image has none.
    ReferrersMissing,
}

impl ReasonCode {
    pub fn as_str(&self) -> &'static str {
        match self {
            ReasonCode::NamespaceNotAllowed => "namespace-not-allowed",
            ReasonCode::NoRuleMatch => "no-rule-match",
            ReasonCode::GateExceeded => "gate-exceeded",
            ReasonCode::NoScanReport => "no-scan-report",
            ReasonCode::BadScanReport => "bad-scan-report",
            ReasonCode::ScanReportMismatch => "scan-report-mismatch",
            ReasonCode::UnknownSeverity => "unknown-severity",
            ReasonCode::UnsupportedImage => "unsupported-image",
            ReasonCode::BadArchive => "bad-archive",
            ReasonCode::CorruptArchive => "corrupt-archive",
            ReasonCode::NoReference => "no-reference",
            ReasonCode::AlreadySent => "already-sent",
            ReasonCode::DigestMismatch => "digest-mismatch",
            ReasonCode::SignatureMissing => "signature-missing",
            ReasonCode::SignatureInvalid => "signature-invalid",
            ReasonCode::ReferrersMissing => "referrers-missing",
        }
    }

    /// Every code, for reading one back.
    const ALL: [ReasonCode; 16] = [
        ReasonCode::NamespaceNotAllowed,
        ReasonCode::NoRuleMatch,
        ReasonCode::GateExceeded,
        ReasonCode::NoScanReport,
        ReasonCode::BadScanReport,
        ReasonCode::ScanReportMismatch,
        ReasonCode::UnknownSeverity,
        ReasonCode::UnsupportedImage,
        ReasonCode::BadArchive,
        ReasonCode::CorruptArchive,
        ReasonCode::NoReference,
        ReasonCode::AlreadySent,
        ReasonCode::DigestMismatch,
        ReasonCode::SignatureMissing,
        ReasonCode::SignatureInvalid,
        ReasonCode::ReferrersMissing,
    ];

    /// The code `as_str` gave.
    pub fn parse(code: &str) -> Option<ReasonCode> {
        Self::ALL.into_iter().find(|c| c.as_str() == code)
    }
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: a machine-readable code and a sentence for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refusal {
    pub code: ReasonCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ReasonCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("rules file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("rules file {origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// One rule: which names it covers and what it demands of their scan.
#[derive(Debug, Clone)]
pub struct Rule {
    /// As written; anchored to the whole name when compiled.
    pub regex: String,
    matcher: Regex,
    /// Worst allowed severity; None: no scan report required.
    pub gate: Option<Severity>,
    pub allow_unknown: bool,
    pub allow_unsupported: bool,
    /// Keys one of which must have signed the image; None: no signature
    /// needed.
    pub require_signature: Option<TrustedKeys>,
}

/// The loaded rules file.
#[derive(Debug, Clone)]
pub struct Rules {
    pub namespaces: Vec<String>,
    pub rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    namespaces: Vec<String>,
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    regex: String,
    #[serde(default)]
    gate: Option<String>,
    #[serde(default)]
    allow_unknown: bool,
    #[serde(default)]
    allow_unsupported: bool,
    #[serde(default)]
    require_signature: Option<RequireSignatureFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequireSignatureFile {
    keys: Vec<PathBuf>,
}

impl Rules {
    pub fn load(path: &Path) -> Result<Rules, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Rules::parse(&text, &path.display().to_string())
    }

    /// Parses rules YAML; `origin` names the source in errors, and key
    /// paths that are relative are taken from its directory.
    pub fn parse(text: &str, origin: &str) -> Result<Rules, RulesError> {
        let bad = |message: String| RulesError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let file: RulesFile = serde_yaml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut rules = Vec::with_capacity(file.rules.len());
        for (i, r) in file.rules.into_iter().enumerate() {
            let matcher = Regex::new(&format!("^(?:{})$", r.regex))
                .map_err(|e| bad(format!("rules[{i}].regex {:?}: {e}", r.regex)))?;
            let gate = match &r.gate {
                None => None,
                Some(word) => Some(Severity::gate(word).ok_or_else(|| {
                    bad(format!(
                        "rules[{i}].gate {word:?}: expected Low, Medium, High or Critical"
                    ))
                })?),
            };
            let require_signature = match r.require_signature {
                None => None,
                Some(req) => {
                    if req.keys.is_empty() {
                        return Err(bad(format!(
                            "rules[{i}].require_signature.keys: at least one key file is needed"
                        )));
                    }
                    let base = Path::new(origin).parent().unwrap_or(Path::new(""));
                    let paths: Vec<PathBuf> = req.keys.iter().map(|k| base.join(k)).collect();
                    Some(
                        TrustedKeys::load(&paths)
                            .map_err(|e| bad(format!("rules[{i}].require_signature.keys: {e}")))?,
                    )
                }
            };
            rules.push(Rule {
                regex: r.regex,
                matcher,
                gate,
                allow_unknown: r.allow_unknown,
                allow_unsupported: r.allow_unsupported,
                require_signature,
            });
        }
        Ok(Rules {
            namespaces: file.namespaces,
            rules,
        })
    }
}

/// The image a decision is about.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    /// `namespace/repo:tag` as the source names it (host dropped).
    pub name: &'a str,
    /// The first path component; empty for a one-component repository.
    pub namespace: &'a str,
    /// Config digests of the image (several for a multi-arch index).
    pub config_digests: &'a [String],
    /// The signatures found on the image, for rules that require one.
    pub signatures: &'a SignatureEvidence,
}

/// The signatures that speak of an image, with their payloads as read
/// from wherever the image came from.
#[derive(Debug, Clone, Default)]
pub struct SignatureEvidence {
    pub image_digest: String,
    pub layers: Vec<SignatureLayer>,
    /// One per layer: its payload bytes or why they could not be read.
    pub payloads: Vec<Result<Vec<u8>, String>>,
}

impl SignatureEvidence {
    pub fn check(&self, keys: &TrustedKeys) -> SignatureCheck {
        signatures::check(&self.image_digest, &self.layers, &self.payloads, keys)
    }
}

/// What is known of the drop's scan report.
#[derive(Debug, Clone)]
pub enum ReportState {
    Missing,
    Unreadable(String),
    Read(ScanSummary),
}

impl ReportState {
    /// Reads `<drop>.scan.json` if it exists. Whoever writes the spool may
    /// leave anything under that name, so only a regular file of at most
    /// [`MAX_SCAN_REPORT_BYTES`] is read: a symlink (to `/dev/zero`, say) or
    /// a FIFO is refused without blocking, a larger file without reading it.
    pub fn for_drop(report_path: &Path) -> ReportState {
        match read_report(report_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ReportState::Missing,
            Err(e) => ReportState::Unreadable(format!("{}: {e}", report_path.display())),
            Ok(bytes) => match ScanSummary::parse(&bytes) {
                Ok(s) => ReportState::Read(s),
                Err(e) => ReportState::Unreadable(format!("{}: {e}", report_path.display())),
            },
        }
    }
}

/// Largest scan report read; real Trivy, Grype and Clair reports of large
/// images are a few MiB.
pub const MAX_SCAN_REPORT_BYTES: u64 = 8 << 20;

fn read_report(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    // O_NOFOLLOW refuses a symlink; O_NONBLOCK keeps a FIFO from blocking
    // the open (the file type check below then refuses it).
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => invalid("is a symlink; scan reports must be regular files".into()),
            _ => e,
        })?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(invalid("is not a regular file".into()));
    }
    if meta.len() > MAX_SCAN_REPORT_BYTES {
        return Err(invalid(format!(
            "is {} bytes, more than the {MAX_SCAN_REPORT_BYTES} a scan report may have",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow after the size check: read no more than the bound.
    file.take(MAX_SCAN_REPORT_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_SCAN_REPORT_BYTES {
        return Err(invalid(format!(
            "grew past the {MAX_SCAN_REPORT_BYTES} bytes a scan report may have"
        )));
    }
    Ok(bytes)
}

/// The decision for one image reference; the verdict travels with the image.
pub fn decide(
    rules: Option<&Rules>,
    subject: &Subject<'_>,
    report: &ReportState,
) -> Result<weir_proto::Verdict, Refusal> {
    let worst = match report {
        ReportState::Read(s) => s.worst.map(|w| w.to_string()),
        _ => None,
    };
    let Some(rules) = rules else {
        return Ok(weir_proto::Verdict {
            rule: None,
            gate: None,
            worst_severity: worst,
            signature: None,
            summary: "no rules configured: every image passes".into(),
        });
    };
    if !rules.namespaces.iter().any(|n| n == subject.namespace) {
        return Err(Refusal::new(
            ReasonCode::NamespaceNotAllowed,
            format!(
                "{}: namespace {:?} is not in the rules' namespaces list",
                subject.name, subject.namespace
            ),
        ));
    }
    let mut first_refusal = None;
    for rule in rules
        .rules
        .iter()
        .filter(|r| r.matcher.is_match(subject.name))
    {
        match check_rule(rule, subject, report) {
            Ok((summary, signature)) => {
                return Ok(weir_proto::Verdict {
                    rule: Some(rule.regex.clone()),
                    gate: rule.gate.map(|g| g.to_string()),
                    worst_severity: worst,
                    signature,
                    summary,
                })
            }
            Err(r) => {
                first_refusal.get_or_insert(r);
            }
        }
    }
    Err(first_refusal.unwrap_or_else(|| {
        Refusal::new(
            ReasonCode::NoRuleMatch,
            format!("{}: no rule's regex matches this name", subject.name),
        )
    }))
}

/// A rule's verdict: its summary and, when it asked for one, the
/// signature check's result.
fn check_rule(
    rule: &Rule,
    subject: &Subject<'_>,
    report: &ReportState,
) -> Result<(String, Option<String>), Refusal> {
    let signature = match &rule.require_signature {
        None => None,
        Some(keys) => {
            let found = subject.signatures.check(keys);
            let text = found.describe(&subject.signatures.image_digest);
            let code = match found {
                SignatureCheck::Verified { .. } => None,
                SignatureCheck::Missing => Some(ReasonCode::SignatureMissing),
                SignatureCheck::Invalid { .. } => Some(ReasonCode::SignatureInvalid),
            };
            if let Some(code) = code {
                return Err(Refusal::new(
                    code,
                    format!(
                        "{}: rule {:?} requires a signature: {text}",
                        subject.name, rule.regex
                    ),
                ));
            }
            Some(text)
        }
    };
    check_gate(rule, subject, report).map(|summary| (summary, signature))
}

fn check_gate(rule: &Rule, subject: &Subject<'_>, report: &ReportState) -> Result<String, Refusal> {
    let Some(gate) = rule.gate else {
        return Ok(format!("rule {:?} has no gate", rule.regex));
    };
    let r = |code, why: String| {
        Err(Refusal::new(
            code,
            format!(
                "{}: rule {:?} (gate {gate}): {why}",
                subject.name, rule.regex
            ),
        ))
    };
    let scan = match report {
        ReportState::Missing => {
            return r(
                ReasonCode::NoScanReport,
                "no scan report beside the drop, and a gate fails closed".into(),
            )
        }
        ReportState::Unreadable(e) => {
            return r(
                ReasonCode::BadScanReport,
                format!("scan report unusable: {e}"),
            )
        }
        ReportState::Read(s) => s,
    };
    if !scan.image_ids.is_empty()
        && !scan
            .image_ids
            .iter()
            .any(|id| subject.config_digests.contains(id))
    {
        return r(
            ReasonCode::ScanReportMismatch,
            format!(
                "the {} report scanned image {} but this image's config is {}",
                scan.format,
                scan.image_ids.join(", "),
                subject.config_digests.join(", ")
            ),
        );
    }
    if scan.unsupported && !rule.allow_unsupported {
        return r(
            ReasonCode::UnsupportedImage,
            format!(
                "{} declared the image unsupported and allow_unsupported is false",
                scan.format
            ),
        );
    }
    if scan.unknown > 0 && !rule.allow_unknown {
        return r(
            ReasonCode::UnknownSeverity,
            format!(
                "{} finding(s) of unknown severity and allow_unknown is false",
                scan.unknown
            ),
        );
    }
    if let Some(worst) = scan.worst {
        if worst > gate {
            return r(
                ReasonCode::GateExceeded,
                format!(
                    "worst severity {worst} exceeds the gate ({} finding(s) above it)",
                    scan.above(gate)
                ),
            );
        }
    }
    Ok(format!(
        "rule {:?}: worst {} within gate {gate} ({} report{}{})",
        rule.regex,
        scan.worst.map(|w| w.as_str()).unwrap_or("none"),
        scan.format,
        if scan.unknown > 0 {
            ", unknown allowed"
        } else {
            ""
        },
        if scan.unsupported {
            ", unsupported allowed"
        } else {
            ""
        },
    ))
}

/// Which scanner wrote a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanFormat {
    Trivy,
    Grype,
    ClairV4,
    Quay,
}

impl std::fmt::Display for ScanFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScanFormat::Trivy => "Trivy",
            ScanFormat::Grype => "Grype",
            ScanFormat::ClairV4 => "Clair v4",
            ScanFormat::Quay => "Quay",
        })
    }
}

/// What a gate needs from a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanSummary {
    pub format: ScanFormat,
    /// Worst known severity; None when there are no findings of known severity.
    pub worst: Option<Severity>,
    /// Findings per known severity, Negligible..Critical.
    pub counts: [usize; 5],
    /// Findings whose severity is unknown.
    pub unknown: usize,
    /// The scanner said it could not scan this image.
    pub unsupported: bool,
    /// Config digests the report says it scanned (may be empty).
    pub image_ids: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("Trivy report with SchemaVersion {0}; only schema 2 is read")]
    TrivySchema(String),
    #[error("Quay scan status {0:?}: the scan has not finished")]
    QuayNotScanned(String),
    #[error("field {0} has an unexpected type")]
    Shape(&'static str),
    #[error("neither a Trivy (schema 2), Grype, Clair v4 nor Quay report")]
    UnknownFormat,
}

impl ScanSummary {
    fn new(format: ScanFormat) -> Self {
        ScanSummary {
            format,
            worst: None,
            counts: [0; 5],
            unknown: 0,
            unsupported: false,
            image_ids: Vec::new(),
        }
    }

    fn add(&mut self, severity_word: Option<&str>) {
        match severity_word.and_then(Severity::from_scanner) {
            Some(s) => {
                self.counts[s as usize] += 1;
                self.worst = self.worst.max(Some(s));
            }
            None => self.unknown += 1,
        }
    }

    /// Findings of known severity above `gate`.
    pub fn above(&self, gate: Severity) -> usize {
        self.counts[gate as usize + 1..].iter().sum()
    }

    /// Recognises the format by its fields and reads it.
    pub fn parse(bytes: &[u8]) -> Result<ScanSummary, ReportError> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| ReportError::NotJson(e.to_string()))?;
        if v.get("SchemaVersion").is_some() {
            Self::trivy(&v)
        } else if v.get("matches").is_some() {
            Self::grype(&v)
        } else if v.get("manifest_hash").is_some() || v.get("package_vulnerabilities").is_some() {
            Self::clair(&v)
        } else if v.get("status").is_some()
            && (v.get("data").is_some() || v["status"] == "unsupported")
        {
            Self::quay(&v)
        } else {
            Err(ReportError::UnknownFormat)
        }
    }

    fn trivy(v: &Value) -> Result<ScanSummary, ReportError> {
        let schema = &v["SchemaVersion"];
        if schema.as_u64() != Some(2) {
            return Err(ReportError::TrivySchema(schema.to_string()));
        }
        let mut s = ScanSummary::new(ScanFormat::Trivy);
        let results = array_or_empty(&v["Results"], "Results")?;
        let mut scanned_anything = false;
        for r in results {
            if matches!(r["Class"].as_str(), Some("os-pkgs") | Some("lang-pkgs")) {
                scanned_anything = true;
            }
            for vuln in array_or_empty(&r["Vulnerabilities"], "Results[].Vulnerabilities")? {
                s.add(vuln["Severity"].as_str());
            }
        }
        s.unsupported = !scanned_anything;
        if let Some(id) = v["Metadata"]["ImageID"].as_str() {
            s.image_ids.push(id.to_string());
        }
        Ok(s)
    }

    fn grype(v: &Value) -> Result<ScanSummary, ReportError> {
        let mut s = ScanSummary::new(ScanFormat::Grype);
        for m in array_or_empty(&v["matches"], "matches")? {
            s.add(m["vulnerability"]["severity"].as_str());
        }
        s.unsupported = v["distro"]["name"].as_str().is_none_or(str::is_empty);
        if let Some(id) = v["source"]["target"]["imageID"].as_str() {
            s.image_ids.push(id.to_string());
        }
        Ok(s)
    }

    fn clair(v: &Value) -> Result<ScanSummary, ReportError> {
        let mut s = ScanSummary::new(ScanFormat::ClairV4);
        let vulns = object_or_empty(&v["vulnerabilities"], "vulnerabilities")?;
        // Only vulnerabilities that affect a package of this image count.
        let mut affecting = std::collections::BTreeSet::new();
        for ids in
            object_or_empty(&v["package_vulnerabilities"], "package_vulnerabilities")?.values()
        {
            for id in array_or_empty(ids, "package_vulnerabilities{}")? {
                if let Some(id) = id.as_str() {
                    affecting.insert(id.to_string());
                }
            }
        }
        for id in &affecting {
            s.add(
                vulns
                    .get(id)
                    .and_then(|x| x["normalized_severity"].as_str()),
            );
        }
        let empty = |key: &str| match &v[key] {
            Value::Object(m) => m.is_empty(),
            Value::Array(a) => a.is_empty(),
            _ => true,
        };
        s.unsupported = empty("packages") && empty("distributions");
        Ok(s)
    }

    fn quay(v: &Value) -> Result<ScanSummary, ReportError> {
        let mut s = ScanSummary::new(ScanFormat::Quay);
        match v["status"].as_str() {
            Some("unsupported") => {
                s.unsupported = true;
                return Ok(s);
            }
            Some("scanned") => {}
            other => return Err(ReportError::QuayNotScanned(other.unwrap_or("").to_string())),
        }
        for f in array_or_empty(&v["data"]["Layer"]["Features"], "data.Layer.Features")? {
            for vuln in array_or_empty(&f["Vulnerabilities"], "Features[].Vulnerabilities")? {
                s.add(vuln["Severity"].as_str());
            }
        }
        Ok(s)
    }
}

/// Scanners write `null` or leave out empty lists.
fn array_or_empty<'a>(v: &'a Value, what: &'static str) -> Result<&'a [Value], ReportError> {
    match v {
        Value::Null => Ok(&[]),
        Value::Array(a) => Ok(a),
        _ => Err(ReportError::Shape(what)),
    }
}

fn object_or_empty<'a>(
    v: &'a Value,
    what: &'static str,
) -> Result<std::borrow::Cow<'a, serde_json::Map<String, Value>>, ReportError> {
    match v {
        Value::Null => Ok(std::borrow::Cow::Owned(serde_json::Map::new())),
        Value::Object(m) => Ok(std::borrow::Cow::Borrowed(m)),
        _ => Err(ReportError::Shape(what)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const CONFIG: &str =
        "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    const RULES: &str = r#"
namespaces: [team-a, team-b, team-c]
rules:
  - regex: "team-a/app.*:.*"
    gate: High
  - regex: "team-b/.*:v.*"
    gate: Low
    allow_unknown: true
    allow_unsupported: true
  - regex: "team-c/tool:.*"
"#;

    fn rules() -> Rules {
        Rules::parse(RULES, "test").unwrap()
    }

    fn unreadable(state: ReportState) -> String {
        match state {
            ReportState::Unreadable(why) => why,
            other => panic!("read a hostile sidecar: {other:?}"),
        }
    }

    #[test]
    fn hostile_sidecars_are_refused_without_reading_them() {
        let dir = tempfile::tempdir().unwrap();
        // A symlink to /dev/zero would be read forever.
        let link = dir.path().join("a.tar.scan.json");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(unreadable(ReportState::for_drop(&link)).contains("symlink"));
        // A FIFO with no writer would block ingest for good.
        let fifo = dir.path().join("b.tar.scan.json");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        assert!(unreadable(ReportState::for_drop(&fifo)).contains("not a regular file"));
        // Larger than any real report: refused before a byte is read.
        let big = dir.path().join("c.tar.scan.json");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_SCAN_REPORT_BYTES + 1).unwrap();
        assert!(unreadable(ReportState::for_drop(&big)).contains("more than"));
        // Absent is still "missing" (the gate then fails closed).
        assert!(matches!(
            ReportState::for_drop(&dir.path().join("none.scan.json")),
            ReportState::Missing
        ));
    }

    fn subject(name: &str) -> (String, String) {
        (
            name.to_string(),
            name.split('/').next().unwrap().to_string(),
        )
    }

    fn decide_for(name: &str, report: &ReportState) -> Result<weir_proto::Verdict, Refusal> {
        let (n, ns) = subject(name);
        let cfg = [CONFIG.to_string()];
        decide(
            Some(&rules()),
            &Subject {
                name: &n,
                namespace: &ns,
                config_digests: &cfg,
                signatures: &SignatureEvidence::default(),
            },
            report,
        )
    }

    const PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEvXgDDih1Jgpottp54XwdUdIZ+iA
0u1J5weQA4aAxKKym4QrKJ98oO2SXolrIXKtFKy2ELvaWtoJ26tUdxGsuw==
-----END PUBLIC KEY-----
";

    #[test]
    fn a_rule_requiring_a_signature_refuses_missing_and_invalid_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("team-c.pub"), PUBLIC_KEY).unwrap();
        let rules_path = dir.path().join("rules.yaml");
        // The key path is relative: taken from the rules file's directory.
        let rules = Rules::parse(
            "namespaces: [team-c]\nrules:\n  - regex: 'team-c/.*'\n    require_signature:\n      keys: [team-c.pub]\n",
            &rules_path.display().to_string(),
        )
        .unwrap();
        let cfg = [CONFIG.to_string()];
        let judge = |evidence: &SignatureEvidence| {
            decide(
                Some(&rules),
                &Subject {
                    name: "team-c/tool:1",
                    namespace: "team-c",
                    config_digests: &cfg,
                    signatures: evidence,
                },
                &ReportState::Missing,
            )
        };
        let none = SignatureEvidence {
            image_digest: CONFIG.into(),
            ..Default::default()
        };
        assert_eq!(code(judge(&none)), "signature-missing");
        let forged = SignatureEvidence {
            image_digest: CONFIG.into(),
            layers: vec![SignatureLayer {
                referrer: CONFIG.into(),
                payload_digest: CONFIG.into(),
                payload_size: 2,
                signature: "AAAA".into(),
            }],
            payloads: vec![Ok(b"{}".to_vec())],
        };
        let refusal = judge(&forged).unwrap_err();
        assert_eq!(refusal.code.as_str(), "signature-invalid");
        assert!(
            refusal.message.contains("keys tried: sha256:")
                && refusal.message.contains("team-c.pub"),
            "{}",
            refusal.message
        );
    }

    #[test]
    fn a_signature_key_that_is_not_a_p256_public_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad.pub"), "not a key").unwrap();
        let e = Rules::parse(
            "namespaces: [a]\nrules:\n  - regex: 'a/.*'\n    require_signature:\n      keys: [bad.pub]\n",
            &dir.path().join("r.yaml").display().to_string(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("rules[0].require_signature.keys") && e.contains("bad.pub"),
            "{e}"
        );
    }

    fn code(r: Result<weir_proto::Verdict, Refusal>) -> &'static str {
        match r {
            Ok(_) => "pass",
            Err(e) => e.code.as_str(),
        }
    }

    // Fixtures in the shapes the scanners emit (trimmed to the fields read).
    pub(crate) fn trivy(severities: &[&str], os: bool) -> String {
        let vulns: Vec<String> = severities
            .iter()
            .enumerate()
            .map(|(i, s)| {
                format!(r#"{{"VulnerabilityID":"CVE-2024-{i:04}","PkgName":"openssl","Severity":"{s}"}}"#)
            })
            .collect();
        let results = if os {
            format!(
                r#"[{{"Target":"img (alpine 3.19.1)","Class":"os-pkgs","Type":"alpine","Vulnerabilities":[{}]}}]"#,
                vulns.join(",")
            )
        } else {
            "null".to_string()
        };
        format!(
            r#"{{"SchemaVersion":2,"CreatedAt":"2024-05-01T10:00:00Z","ArtifactName":"app.tar","ArtifactType":"container_image",
               "Metadata":{{"ImageID":"{CONFIG}","DiffIDs":[]}},"Results":{results}}}"#
        )
    }

    pub(crate) fn grype(severities: &[&str], distro: bool) -> String {
        let matches: Vec<String> = severities
            .iter()
            .enumerate()
            .map(|(i, s)| {
                format!(
                    r#"{{"vulnerability":{{"id":"CVE-2024-{i:04}","severity":"{s}","namespace":"debian:distro:debian:12"}},
                       "artifact":{{"name":"libc6","version":"2.36"}}}}"#
                )
            })
            .collect();
        let distro = if distro {
            r#"{"name":"debian","version":"12","idLike":[]}"#
        } else {
            r#"{"name":"","version":"","idLike":null}"#
        };
        format!(
            r#"{{"matches":[{}],"source":{{"type":"image","target":{{"imageID":"{CONFIG}","userInput":"app.tar"}}}},
               "distro":{distro},"descriptor":{{"name":"grype","version":"0.74.0"}}}}"#,
            matches.join(",")
        )
    }

    pub(crate) fn clair(severities: &[&str], packages: bool) -> String {
        let vulns: Vec<String> = severities
            .iter()
            .enumerate()
            .map(|(i, s)| {
                format!(
                    r#""{i}":{{"id":"{i}","name":"CVE-2024-{i:04}","severity":"{s}","normalized_severity":"{s}"}}"#
                )
            })
            .collect();
        let ids: Vec<String> = (0..severities.len()).map(|i| format!("\"{i}\"")).collect();
        let (pkgs, pkg_vulns) = if packages {
            (
                r#"{"10":{"id":"10","name":"openssl","version":"3.0.2"}}"#.to_string(),
                format!(r#"{{"10":[{}]}}"#, ids.join(",")),
            )
        } else {
            ("{}".to_string(), "{}".to_string())
        };
        format!(
            r#"{{"manifest_hash":"sha256:2222222222222222222222222222222222222222222222222222222222222222",
               "packages":{pkgs},"distributions":{{}},"repository":{{}},"environments":{{}},
               "vulnerabilities":{{{}}},"package_vulnerabilities":{pkg_vulns},"enrichments":{{}}}}"#,
            vulns.join(",")
        )
    }

    fn read(json: &str) -> ReportState {
        ReportState::Read(ScanSummary::parse(json.as_bytes()).unwrap())
    }

    #[test]
    fn namespace_not_listed_is_refused() {
        assert_eq!(
            code(decide_for("team-x/app:1", &read(&trivy(&[], true)))),
            "namespace-not-allowed"
        );
    }

    #[test]
    fn listed_namespace_without_matching_rule_is_refused() {
        assert_eq!(
            code(decide_for("team-a/other:1", &read(&trivy(&[], true)))),
            "no-rule-match"
        );
        // The regex must match the whole name, not a part of it.
        assert_eq!(
            code(decide_for("team-b/x:1v", &read(&trivy(&[], true)))),
            "no-rule-match"
        );
    }

    #[test]
    fn gate_exceeded_is_refused_and_within_gate_passes() {
        for make in [trivy, grype, clair] {
            let over = read(&make(&["LOW", "CRITICAL"], true));
            assert_eq!(code(decide_for("team-a/app:1", &over)), "gate-exceeded");
            let within = read(&make(&["Low", "HIGH", "Negligible"], true));
            let v = decide_for("team-a/app:1", &within).unwrap();
            assert_eq!(v.worst_severity.as_deref(), Some("High"));
            assert_eq!(v.rule.as_deref(), Some("team-a/app.*:.*"));
        }
        // Medium against gate Low.
        assert_eq!(
            code(decide_for("team-b/x:v1", &read(&grype(&["Medium"], true)))),
            "gate-exceeded"
        );
    }

    #[test]
    fn gate_without_report_fails_closed() {
        assert_eq!(
            code(decide_for("team-a/app:1", &ReportState::Missing)),
            "no-scan-report"
        );
        let garbage = ReportState::Unreadable("not JSON".into());
        assert_eq!(
            code(decide_for("team-a/app:1", &garbage)),
            "bad-scan-report"
        );
        // A rule without a gate needs no report.
        assert_eq!(
            code(decide_for("team-c/tool:1", &ReportState::Missing)),
            "pass"
        );
    }

    #[test]
    fn unknown_severity_needs_allow_unknown() {
        for make in [trivy, grype, clair] {
            let report = read(&make(&["UNKNOWN", "Low"], true));
            assert_eq!(
                code(decide_for("team-a/app:1", &report)),
                "unknown-severity"
            );
            assert_eq!(code(decide_for("team-b/lib:v2", &report)), "pass");
        }
    }

    #[test]
    fn unsupported_needs_allow_unsupported() {
        for make in [trivy, grype, clair] {
            let report = read(&make(&[], false));
            let ReportState::Read(s) = &report else {
                unreachable!()
            };
            assert!(s.unsupported, "{:?}", s.format);
            assert_eq!(
                code(decide_for("team-a/app:1", &report)),
                "unsupported-image"
            );
            assert_eq!(code(decide_for("team-b/lib:v2", &report)), "pass");
        }
        let quay = read(r#"{"status":"unsupported","data":null}"#);
        assert_eq!(code(decide_for("team-a/app:1", &quay)), "unsupported-image");
        assert_eq!(code(decide_for("team-b/lib:v2", &quay)), "pass");
    }

    #[test]
    fn no_rules_file_passes_everything() {
        let cfg = [CONFIG.to_string()];
        let v = decide(
            None,
            &Subject {
                name: "anyone/anything:1",
                namespace: "anyone",
                config_digests: &cfg,
                signatures: &SignatureEvidence::default(),
            },
            &ReportState::Missing,
        )
        .unwrap();
        assert!(v.rule.is_none());
    }

    #[test]
    fn report_about_another_image_is_refused() {
        let other = trivy(&[], true).replace(&CONFIG[7..], &"3".repeat(64));
        assert_eq!(
            code(decide_for("team-a/app:1", &read(&other))),
            "scan-report-mismatch"
        );
    }

    #[test]
    fn clair_counts_only_vulnerabilities_that_affect_a_package() {
        let mut json = clair(&["High"], true);
        // A Critical vulnerability that no package references.
        json = json.replace(
            r#""vulnerabilities":{"#,
            r#""vulnerabilities":{"99":{"id":"99","normalized_severity":"Critical"},"#,
        );
        let s = ScanSummary::parse(json.as_bytes()).unwrap();
        assert_eq!(s.worst, Some(Severity::High));
    }

    #[test]
    fn quay_and_unreadable_reports() {
        let q = r#"{"status":"scanned","data":{"Layer":{"Features":[{"Name":"zlib","Vulnerabilities":[{"Severity":"Medium"},{"Severity":"Unknown"}]}]}}}"#;
        let s = ScanSummary::parse(q.as_bytes()).unwrap();
        assert_eq!((s.worst, s.unknown), (Some(Severity::Medium), 1));
        assert_eq!(
            ScanSummary::parse(br#"{"SchemaVersion":1,"Results":[]}"#),
            Err(ReportError::TrivySchema("1".into()))
        );
        assert_eq!(
            ScanSummary::parse(br#"{"hello":1}"#),
            Err(ReportError::UnknownFormat)
        );
        assert!(matches!(
            ScanSummary::parse(b"{"),
            Err(ReportError::NotJson(_))
        ));
    }

    #[test]
    fn bad_rules_are_refused_naming_the_rule() {
        let e = Rules::parse("namespaces: [a]\nrules:\n  - regex: 'a/('\n", "r.yaml").unwrap_err();
        assert!(e.to_string().contains("rules[0].regex"), "{e}");
        let e = Rules::parse(
            "namespaces: [a]\nrules:\n  - regex: a\n    gate: Severe\n",
            "r.yaml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("rules[0].gate"), "{e}");
        let e = Rules::parse("namespaces: [a]\nrulez: []\n", "r.yaml").unwrap_err();
        assert!(e.to_string().contains("rulez"), "{e}");
    }
}
