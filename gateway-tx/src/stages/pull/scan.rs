//! Scan reports for pulled images: a scanner command's stdout, or the
//! source registry's Quay security API. Either way the bytes are read by the
//! same parser as a drop's `<drop>.scan.json` ([`crate::policy::ScanSummary`]),
//! bounded in size, and the command in time.

use crate::policy::ReportState;
use std::time::Duration;
use weir_host::Shutdown;

/// Runs `argv` with `{ref}` and `{digest}` replaced in every argument;
/// stdout (at most [`crate::policy::MAX_SCAN_REPORT_BYTES`]) is the report.
/// A command that cannot start, exits non-zero, prints too much, prints
/// something no parser reads, or outlives `timeout` (it is killed, with its
/// process group) gives [`ReportState::Unreadable`] with a sentence saying
/// which, including the end of its stderr. `cancel` kills it too.
pub fn run_scan_command(
    argv: &[String],
    reference: &str,
    digest: &str,
    timeout: Duration,
    cancel: &Shutdown,
) -> ReportState {
    todo!(
        "{argv:?}{reference}{digest}{timeout:?}{}",
        cancel.is_triggered()
    )
}
