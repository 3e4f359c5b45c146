//! Reloading a running gateway's configuration (SIGHUP), the same way on
//! both sides.
//!
//! - [`ReloadRequests`]: what the signal thread bumps on SIGHUP and the
//!   gateway's reload stage waits on.
//! - [`Reloadable`]: a value the reload stage replaces whole while stages
//!   run; a stage owning a thread holds a [`ReloadReader`] and picks up a
//!   new value at a moment of its choosing (between batches, before a
//!   drop), at the cost of one atomic load when nothing changed.
//! - [`ConfigChanges`]: which fields of the file changed, split into those
//!   the gateway applies while it runs and those that wait for a restart.
//!
//! The file is always validated whole before anything is applied: a file
//! that does not validate changes nothing.

use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::Shutdown;

/// How often the reload stage looks for a new request.
const REQUEST_POLL: Duration = Duration::from_millis(200);

/// Reload requests (SIGHUPs) counted since the process started.
#[derive(Clone, Default)]
pub struct ReloadRequests {
    count: Arc<AtomicU64>,
}

impl ReloadRequests {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for the configuration to be read again.
    pub fn request(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    /// Requests made so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Calls `reload` once for every burst of requests made since the last
    /// call (and once at start for requests made before it: a SIGHUP during
    /// start-up is not lost), until shutdown.
    pub fn serve(&self, shutdown: &Shutdown, mut reload: impl FnMut()) {
        let mut seen = 0;
        loop {
            let now = self.count();
            if now != seen {
                seen = now;
                reload();
            }
            if shutdown.sleep(REQUEST_POLL) {
                return;
            }
        }
    }
}

/// Where a gateway's reloads come from: the configuration file it was
/// started with, and the requests to read it again.
#[derive(Clone)]
pub struct ReloadSource {
    pub file: PathBuf,
    pub requests: ReloadRequests,
}

/// A value the reload stage may replace while stages use it.
pub struct Reloadable<T> {
    generation: AtomicU64,
    value: Mutex<Arc<T>>,
}

impl<T> Reloadable<T> {
    pub fn new(value: T) -> Arc<Self> {
        Arc::new(Reloadable {
            generation: AtomicU64::new(0),
            value: Mutex::new(Arc::new(value)),
        })
    }

    /// Replaces the value; readers see it at their next look.
    pub fn set(&self, value: T) {
        *self.value.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn current(&self) -> Arc<T> {
        self.value.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A reader that has seen the current value.
    pub fn reader(self: &Arc<Self>) -> ReloadReader<T> {
        let generation = self.generation.load(Ordering::Acquire);
        ReloadReader {
            source: self.clone(),
            seen: generation,
            value: self.current(),
        }
    }
}

/// One stage's view of a [`Reloadable`].
pub struct ReloadReader<T> {
    source: Arc<Reloadable<T>>,
    seen: u64,
    value: Arc<T>,
}

impl<T> ReloadReader<T> {
    /// The value set since this reader last looked, if any.
    pub fn changed(&mut self) -> Option<Arc<T>> {
        let generation = self.source.generation.load(Ordering::Acquire);
        if generation == self.seen {
            return None;
        }
        self.seen = generation;
        self.value = self.source.current();
        Some(self.value.clone())
    }

    /// The newest value.
    pub fn get(&mut self) -> &Arc<T> {
        self.changed();
        &self.value
    }
}

/// What a reload found changed in the file, by field (`delivery.mapping`,
/// `leds.power`; a table added or removed whole is named as the table).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigChanges {
    /// Fields the running gateway applies.
    pub applied: Vec<String>,
    /// Fields that only a restart applies; the running values stay.
    pub need_restart: Vec<String>,
}

impl ConfigChanges {
    /// Compares the running and the new configuration. A field is applied
    /// when it is one of `reloadable` or lies inside one (`notify` covers
    /// `notify.webhook_url`); any other change, including sections this
    /// list does not know yet, needs a restart.
    pub fn between<C: Serialize>(running: &C, new: &C, reloadable: &[&str]) -> ConfigChanges {
        let mut changed = Vec::new();
        match (serde_json::to_value(running), serde_json::to_value(new)) {
            (Ok(a), Ok(b)) => diff("", &a, &b, &mut changed),
            // Not expected for plain config types; be safe and apply nothing.
            _ => changed.push("(configuration)".to_string()),
        }
        let mut out = ConfigChanges::default();
        for field in changed {
            let reloads = reloadable.iter().any(|r| {
                field == *r
                    || field
                        .strip_prefix(r)
                        .is_some_and(|rest| rest.starts_with('.'))
            });
            if reloads {
                out.applied.push(field);
            } else {
                out.need_restart.push(field);
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.need_restart.is_empty()
    }

    /// Whether `field`, or a field inside it, was applied.
    pub fn applies(&self, field: &str) -> bool {
        self.applied.iter().any(|f| {
            f == field
                || f.strip_prefix(field)
                    .is_some_and(|rest| rest.starts_with('.'))
        })
    }

    /// Logs the fields that wait for a restart, if any.
    pub fn warn_restart_needed(&self, file: &std::path::Path) {
        if !self.need_restart.is_empty() {
            let fields = self.need_restart.join(", ");
            tracing::warn!(file = %file.display(), fields = %fields,
                "configuration changed where only a restart applies it ({fields}: restart to apply); running with the old values");
        }
    }
}

/// Leaf paths where `a` and `b` differ. Lists are compared whole.
fn diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                diff(
                    &child,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if a != b => out.push(path.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    #[derive(Serialize, Clone)]
    struct Leds {
        power: String,
        fault: String,
    }

    #[derive(Serialize, Clone)]
    struct Sample {
        state_dir: String,
        mapping: Vec<(String, String)>,
        leds: Option<Leds>,
        notify: Option<String>,
    }

    fn sample() -> Sample {
        Sample {
            state_dir: "/s".into(),
            mapping: vec![],
            leds: Some(Leds {
                power: "p".into(),
                fault: "f".into(),
            }),
            notify: None,
        }
    }

    #[test]
    fn changes_are_split_into_applied_and_restart_needed() {
        let running = sample();
        let mut new = sample();
        new.state_dir = "/t".into();
        new.mapping.push(("a/".into(), "b/".into()));
        new.leds.as_mut().unwrap().power = "q".into();
        new.notify = Some("http://hook".into());
        let c = ConfigChanges::between(&running, &new, &["mapping", "leds.power", "notify"]);
        assert_eq!(c.applied, vec!["leds.power", "mapping", "notify"]);
        assert_eq!(c.need_restart, vec!["state_dir"]);
        assert!(c.applies("leds") && c.applies("leds.power") && !c.applies("led"));
        assert!(ConfigChanges::between(&running, &sample(), &[]).is_empty());
    }

    #[test]
    fn a_table_added_or_removed_is_named_whole_and_a_prefix_is_not_a_field() {
        let running = sample();
        let mut new = sample();
        new.leds = None;
        let c = ConfigChanges::between(&running, &new, &["leds.power", "led"]);
        assert_eq!(c.need_restart, vec!["leds"]);
        assert!(c.applied.is_empty());
    }

    #[test]
    fn readers_see_a_new_value_once() {
        let value = Reloadable::new(1);
        let mut reader = value.reader();
        assert!(reader.changed().is_none());
        assert_eq!(**reader.get(), 1);
        value.set(2);
        assert_eq!(reader.changed().as_deref(), Some(&2));
        assert!(reader.changed().is_none());
        assert_eq!(**reader.get(), 2);
        assert_eq!(*value.current(), 2);
    }

    #[test]
    fn requests_made_before_the_stage_serves_are_not_lost() {
        let requests = ReloadRequests::new();
        requests.request();
        requests.request();
        let shutdown = Shutdown::new();
        let served = std::sync::Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (requests, shutdown, served) = (requests.clone(), shutdown.clone(), served.clone());
            move || {
                requests.serve(&shutdown, || {
                    served.fetch_add(1, Ordering::SeqCst);
                })
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while served.load(Ordering::SeqCst) < 1 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        requests.request();
        while served.load(Ordering::SeqCst) < 2 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
        shutdown.trigger();
        thread.join().unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 2);
    }
}
