//! Configuration reload (SIGHUP): the file is read and validated whole
//! again (rules file and sync list included); if it does not validate,
//! nothing changes and the error names the file and the field. Otherwise
//! what can change in a running sender changes:
//!
//! | field | takes effect |
//! |---|---|
//! | `policy.rules_file`, and the rules file's content | for the next drop, and the next pull (a pull refused under other rules is tried again) |
//! | `policy.referrers` | for the next drop and the next pull |
//! | `[[mapping]]` | for the next drop |
//! | `pull.sync_file`, `pull.interval_s` | at the pull stage's next look (the new file is read then; an entry's next poll keeps the time already set) |
//! | `[leds]` names and base | at once (the old LEDs go dark); adding or removing the table needs a restart |
//! | `[metrics]` | at once: the endpoint moves to a new `listen` address (the old one closes), opens when the table is added, closes when it is removed; an address that cannot be bound is logged and the endpoint stays where it was until a reload that can bind |
//!
//! The sync list itself needs no reload: the pull stage reads it again
//! whenever the file changes. Every other field (state_dir, spool_dir,
//! link, fec, carousel, auth, registries, scanner, console, ...)
//! needs a restart: a change is logged with the fields' names, and the
//! running values stay.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use weir_host::config::MetricsConfig;
use weir_host::reload::{ConfigChanges, Reloadable};
use weir_host::Leds;

use crate::config::{Mapping, ReferrersMode, TxConfig};
use crate::policy::{Rules, RulesError};

/// The fields a running sender applies.
pub const RELOADABLE: &[&str] = &[
    "policy.rules_file",
    "policy.referrers",
    "mapping",
    "pull.sync_file",
    "pull.interval_s",
    "leds.base",
    "leds.power",
    "leds.link",
    "leds.activity",
    "leds.fault",
    "metrics",
];

/// What intake (file drops and pulls) decides by; a reload replaces it
/// whole, and each intake stage picks it up before its next image.
#[derive(Debug, Clone)]
pub struct IntakeSettings {
    pub rules: Option<Rules>,
    /// The rules file as read: pulled images' refusals are keyed by its
    /// hash, so a refusal under other rules is tried again.
    pub rules_bytes: Vec<u8>,
    pub mappings: Vec<Mapping>,
    /// `[policy] referrers`.
    pub referrers: ReferrersMode,
    /// `[pull] sync_file`, when pull mode is on.
    pub sync_file: Option<PathBuf>,
    /// `[pull] interval_s`.
    pub pull_interval: Duration,
}

impl IntakeSettings {
    /// Reads the rules file `config` names.
    pub fn from_config(config: &TxConfig) -> Result<IntakeSettings, RulesError> {
        let (rules, rules_bytes) = match &config.policy.rules_file {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|source| RulesError::Read {
                    path: path.clone(),
                    source,
                })?;
                let origin = path.display().to_string();
                let text = std::str::from_utf8(&bytes).map_err(|e| RulesError::Invalid {
                    origin: origin.clone(),
                    message: format!("not UTF-8: {e}"),
                })?;
                (Some(Rules::parse(text, &origin)?), bytes)
            }
            None => (None, Vec::new()),
        };
        Ok(IntakeSettings {
            rules,
            rules_bytes,
            mappings: config.mapping.clone(),
            referrers: config.policy.referrers,
            sync_file: config.pull.as_ref().map(|p| p.sync_file.clone()),
            pull_interval: Duration::from_secs(config.pull.as_ref().map_or(0, |p| p.interval_s)),
        })
    }
}

/// What a reload changes, and the configuration in force.
pub struct TxReloader {
    pub file: PathBuf,
    /// What runs now: the start's configuration with every reload's
    /// applied fields.
    pub running: TxConfig,
    pub intake: Arc<Reloadable<IntakeSettings>>,
    pub leds: Option<Arc<Leds>>,
    /// `[metrics]`, which the metrics stage follows.
    pub metrics_listen: Arc<Reloadable<Option<MetricsConfig>>>,
}

impl TxReloader {
    /// Reads the file again and applies it, logging the outcome either way.
    pub fn reload(&mut self) -> anyhow::Result<ConfigChanges> {
        let loaded =
            TxConfig::load(&self.file).and_then(|c| Ok((IntakeSettings::from_config(&c)?, c)));
        let (settings, new) = match loaded {
            Ok(both) => both,
            Err(e) => {
                tracing::error!(file = %self.file.display(), error = %format!("{e:#}"),
                    "configuration not reloaded: {e:#}; the running configuration stays");
                return Err(e);
            }
        };
        let mut changes = ConfigChanges::between(&self.running, &new, RELOADABLE);
        // The same path may hold other rules now.
        if settings.rules_bytes != self.intake.current().rules_bytes
            && !changes.applies("policy.rules_file")
        {
            changes.applied.push("policy.rules_file".into());
        }
        let intake_changed = [
            "policy.rules_file",
            "policy.referrers",
            "mapping",
            "pull.sync_file",
            "pull.interval_s",
        ]
        .iter()
        .any(|f| changes.applies(f));
        if intake_changed {
            self.intake.set(settings);
            self.running.policy = new.policy.clone();
            self.running.mapping.clone_from(&new.mapping);
            if let (Some(running), Some(pull)) = (self.running.pull.as_mut(), new.pull.as_ref()) {
                running.sync_file.clone_from(&pull.sync_file);
                running.interval_s = pull.interval_s;
            }
        }
        if let (Some(leds), Some(running), Some(new_leds)) =
            (&self.leds, self.running.leds.as_mut(), new.leds.as_ref())
        {
            if changes.applies("leds") {
                leds.reconfigure(&new_leds.base, new_leds.names());
                *running = new_leds.clone();
            }
        }
        // Set at every reload, changed or not: an address that could not be
        // bound last time is tried again.
        self.metrics_listen.set(new.metrics.clone());
        self.running.metrics.clone_from(&new.metrics);
        let fields = if changes.applied.is_empty() {
            "nothing changed".to_string()
        } else {
            changes.applied.join(", ")
        };
        tracing::info!(file = %self.file.display(), applied = %fields,
            "configuration reloaded: {fields}");
        changes.warn_restart_needed(&self.file);
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    struct Site {
        dir: tempfile::TempDir,
        file: PathBuf,
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    /// A valid tx.toml with a rules file allowing `team-a` only, and
    /// `extra` appended.
    fn site(extra: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("1.key");
        write(&key, &"ab".repeat(32));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        write(&dir.path().join("rules.yaml"), "namespaces: [team-a]\n");
        let file = dir.path().join("tx.toml");
        let s = Site { dir, file };
        s.config(extra);
        s
    }

    impl Site {
        fn config(&self, extra: &str) {
            write(
                &self.file,
                &format!(
                    "state_dir = \"state\"\nspool_dir = \"spool\"\n[link]\ntransport = \"udp\"\n\
                     udp_peer = \"127.0.0.1:7700\"\nrate_bps = 1000000\n[auth]\nkey_id = 1\n\
                     key_file = \"1.key\"\n[policy]\nrules_file = \"rules.yaml\"\n{extra}"
                ),
            );
        }

        fn reloader(&self) -> TxReloader {
            let running = TxConfig::load(&self.file).unwrap();
            TxReloader {
                file: self.file.clone(),
                intake: Reloadable::new(IntakeSettings::from_config(&running).unwrap()),
                metrics_listen: Reloadable::new(running.metrics.clone()),
                running,
                leds: None,
            }
        }
    }

    #[test]
    fn new_rules_and_mappings_reach_intake_and_other_fields_wait_for_a_restart() {
        let s = site("");
        let mut r = s.reloader();
        let mut intake = r.intake.reader();
        let c = r.reload().unwrap();
        assert!(c.is_empty(), "{c:?}");
        assert!(intake.changed().is_none());

        write(
            &s.dir.path().join("rules.yaml"),
            "namespaces: [team-a, team-b]\n",
        );
        s.config(
            "[[mapping]]\nfrom = \"team-b/\"\nto = \"mirror/b/\"\n[fec]\nparity_shards = 30\n",
        );
        let c = r.reload().unwrap();
        assert_eq!(c.applied, vec!["mapping", "policy.rules_file"]);
        assert_eq!(c.need_restart, vec!["fec.parity_shards"]);
        let now = intake.changed().expect("intake told");
        assert_eq!(
            now.rules.as_ref().unwrap().namespaces,
            vec!["team-a", "team-b"]
        );
        assert_eq!(now.mappings[0].to, "mirror/b/");
        // The field waiting for a restart is still named at the next reload.
        let c = r.reload().unwrap();
        assert!(c.applied.is_empty());
        assert_eq!(c.need_restart, vec!["fec.parity_shards"]);
    }

    #[test]
    fn a_file_that_does_not_validate_changes_nothing_and_names_file_and_field() {
        let s = site("");
        let mut r = s.reloader();
        let mut intake = r.intake.reader();
        s.config("[carousel]\npasses = 0\n");
        let err = format!("{:#}", r.reload().unwrap_err());
        assert!(
            err.contains("tx.toml") && err.contains("carousel.passes"),
            "{err}"
        );
        write(&s.dir.path().join("rules.yaml"), "namespaces: [team-a\n");
        s.config("");
        let err = format!("{:#}", r.reload().unwrap_err());
        assert!(
            err.contains("policy.rules_file") && err.contains("rules.yaml"),
            "{err}"
        );
        assert!(intake.changed().is_none(), "nothing applied");
        assert_eq!(
            r.intake.current().rules.as_ref().unwrap().namespaces,
            vec!["team-a"]
        );
    }
}
