//! Configuration reload (SIGHUP): the file is read and validated whole
//! again; if it does not validate, nothing changes and the error names the
//! file and the field. Otherwise what can change in a running receiver
//! changes:
//!
//! | field | takes effect |
//! |---|---|
//! | `[[auth.keys]]` and the key files | at the link's next batch: a key id added is accepted, one removed is not; the files are read again even when the table did not change |
//! | `[[delivery.mapping]]` | for images whose image object arrives from then on |
//! | `delivery.verify_signatures` and the key files | at the next delivery attempt (an image kept for its signature is checked again then) |
//! | `[notify]` | for the next notice |
//! | `[leds]` names and base | at once (the old LEDs go dark); adding or removing the table needs a restart |
//! | `[retention]` | at the next retention pass |
//! | `[metrics]` | at once: the endpoint moves to a new `listen` address (the old one closes), opens when the table is added, closes when it is removed; an address that cannot be bound is logged and the endpoint stays where it was until a reload that can bind |
//!
//! Every other field (state_dir, link, limits, delivery targets, console,
//! ...) needs a restart: a change is logged with the fields'
//! names, and the running values stay.

use std::path::PathBuf;
use std::sync::Arc;
use weir_host::config::MetricsConfig;
use weir_host::reload::{ConfigChanges, Reloadable};
use weir_host::Leds;
use weir_proto::KeyRing;

use crate::config::{ConfigError, RetentionConfig, RxConfig};
use crate::images::ImageLedger;
use crate::stages::deliver::WebhookSwitch;

/// The fields a running receiver applies.
pub const RELOADABLE: &[&str] = &[
    "auth.keys",
    "delivery.mapping",
    "delivery.verify_signatures",
    "notify",
    "leds.base",
    "leds.power",
    "leds.link",
    "leds.activity",
    "leds.fault",
    "retention",
    "metrics",
];

/// What a reload changes, and the configuration in force.
pub struct RxReloader {
    pub file: PathBuf,
    /// What runs now: the start's configuration with every reload's
    /// applied fields.
    pub running: RxConfig,
    pub keys: Arc<Reloadable<KeyRing>>,
    pub ledger: Arc<ImageLedger>,
    pub webhook: WebhookSwitch,
    pub leds: Option<Arc<Leds>>,
    pub retention: Arc<Reloadable<RetentionConfig>>,
    /// `[metrics]`, which the metrics stage follows.
    pub metrics_listen: Arc<Reloadable<Option<MetricsConfig>>>,
}

impl RxReloader {
    /// Reads the file again and applies it, logging the outcome either way.
    pub fn reload(&mut self) -> Result<ConfigChanges, ConfigError> {
        let new = match RxConfig::load(&self.file) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(file = %self.file.display(), error = %e,
                    "configuration not reloaded: {e}; the running configuration stays");
                return Err(e);
            }
        };
        // Loaded and checked by the validation above; read again all the
        // same, so a key file rewritten under the same id takes effect.
        let keys = new.key_ring()?;
        let mut changes = ConfigChanges::between(&self.running, &new, RELOADABLE);
        let key_ids = keys.ids();
        self.keys.set(keys);
        self.running.auth.keys.clone_from(&new.auth.keys);
        // Read again even when the list did not change: a key file may
        // have been replaced under the same name.
        self.webhook.apply_signature_keys(&new)?;
        self.running
            .delivery
            .verify_signatures
            .clone_from(&new.delivery.verify_signatures);
        if changes.applies("delivery.mapping") {
            self.ledger.set_mapping(&new);
            self.running
                .delivery
                .mapping
                .clone_from(&new.delivery.mapping);
        }
        if changes.applies("notify") {
            match self.webhook.apply(&new) {
                Ok(()) => self.running.notify = new.notify.clone(),
                Err(e) => {
                    tracing::error!(file = %self.file.display(), error = %e,
                        "notify: the new webhook could not start; the old one stays");
                    changes.applied.retain(|f| !f.starts_with("notify"));
                }
            }
        }
        if let (Some(leds), Some(running), Some(new_leds)) =
            (&self.leds, self.running.leds.as_mut(), new.leds.as_ref())
        {
            if changes.applies("leds") {
                leds.reconfigure(&new_leds.base, new_leds.names());
                // The threshold is not reloaded: it stays as it runs.
                let threshold = running.hmac_fault_threshold;
                *running = new_leds.clone();
                running.hmac_fault_threshold = threshold;
            }
        }
        // Set at every reload, changed or not: an address that could not be
        // bound last time is tried again.
        self.metrics_listen.set(new.metrics.clone());
        self.running.metrics.clone_from(&new.metrics);
        if changes.applies("retention") {
            self.retention.set(new.retention);
            self.running.retention = new.retention;
        }
        let applied = &changes.applied;
        let fields = if applied.is_empty() {
            "nothing changed".to_string()
        } else {
            applied.join(", ")
        };
        tracing::info!(file = %self.file.display(), applied = %fields, key_ids = ?key_ids,
            "configuration reloaded: {fields} (keys re-read: ids {key_ids:?})");
        changes.warn_restart_needed(&self.file);
        Ok(changes)
    }
}
