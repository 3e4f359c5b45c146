//! What a Prometheus server scrapes from either gateway: the text format
//! ([`Exposition`]), the latency [`Histogram`] a gateway keeps, and the
//! HTTP endpoint serving `GET /metrics` ([`MetricsEndpoint`]), off unless
//! `[metrics] listen` is configured ([`crate::config::MetricsConfig`]).
//!
//! Each gateway renders its own families from the counters and the status
//! it already keeps; nothing here knows their names.

mod endpoint;
mod exposition;
mod following;

pub use endpoint::{
    MetricsEndpoint, MetricsError, MAX_REQUEST_BYTES, METRICS_PATH, REQUEST_DEADLINE, WRITE_TIMEOUT,
};
pub use exposition::{
    escape_label_value, Exposition, Histogram, HistogramSnapshot, MetricKind, CONTENT_TYPE,
    LATENCY_BUCKETS_SECONDS,
};
pub use following::serve_following;

use crate::config::MetricsConfig;

/// Binds the endpoint `config` asks for; `None` without `[metrics]`.
pub fn bind_configured(
    config: Option<&MetricsConfig>,
) -> Result<Option<MetricsEndpoint>, MetricsError> {
    let Some(config) = config else {
        return Ok(None);
    };
    MetricsEndpoint::bind(config.listen_addr()?).map(Some)
}
