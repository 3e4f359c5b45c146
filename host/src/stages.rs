//! The stage runner: each stage of a gateway runs on a named thread; the
//! first stage that fails (or panics) triggers the shared shutdown, so the
//! others stop too; stages are joined in the order they were started.
//!
//! A gateway that must stop its stages in steps (the receiver stops its
//! intake, flushes, then stops its reporting) keeps one [`Stages`] per step
//! and joins them in that order.

use crate::Shutdown;
use anyhow::Context;
use std::thread::JoinHandle;

/// A group of running stages sharing one shutdown.
pub struct Stages {
    shutdown: Shutdown,
    running: Vec<(&'static str, JoinHandle<anyhow::Result<()>>)>,
}

/// Triggers the shutdown when a stage thread unwinds from a panic, so the
/// other stages stop now and not at the join.
struct PanicStops(Shutdown);

impl Drop for PanicStops {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.trigger();
        }
    }
}

impl Stages {
    pub fn new(shutdown: &Shutdown) -> Self {
        Stages {
            shutdown: shutdown.clone(),
            running: Vec::new(),
        }
    }

    /// Starts `body` on a thread named `name`. A failure is logged and stops
    /// every stage; it is returned again by [`Stages::join`].
    pub fn spawn(
        &mut self,
        name: &'static str,
        body: impl FnOnce(&Shutdown) -> anyhow::Result<()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let shutdown = self.shutdown.clone();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _stops = PanicStops(shutdown.clone());
                let result = body(&shutdown);
                if let Err(e) = &result {
                    tracing::error!(stage = name, error = %format!("{e:#}"), "stage failed; stopping");
                    shutdown.trigger();
                }
                result
            })
            .with_context(|| format!("starting the {name} thread"))?;
        self.running.push((name, handle));
        Ok(())
    }

    /// Waits for every stage, in the order they were started; returns the
    /// first failure (a panic counts as one).
    pub fn join(self) -> anyhow::Result<()> {
        let mut first_error = None;
        for (name, handle) in self.running {
            let error = match handle.join() {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.context(format!("{name} stage")),
                Err(_) => {
                    tracing::error!(stage = name, "stage thread panicked");
                    anyhow::anyhow!("{name} thread panicked")
                }
            };
            first_error.get_or_insert(error);
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[test]
    fn the_first_failure_stops_every_stage_and_is_returned() {
        let shutdown = Shutdown::new();
        let mut stages = Stages::new(&shutdown);
        stages
            .spawn("waits", |s| {
                while !s.sleep(Duration::from_millis(10)) {}
                Ok(())
            })
            .unwrap();
        stages
            .spawn("fails", |_| anyhow::bail!("disk on fire"))
            .unwrap();
        let err = format!("{:#}", stages.join().unwrap_err());
        assert!(shutdown.is_triggered());
        assert!(
            err.contains("fails stage") && err.contains("disk on fire"),
            "{err}"
        );
    }

    #[test]
    fn a_panic_stops_every_stage() {
        let shutdown = Shutdown::new();
        let mut stages = Stages::new(&shutdown);
        stages
            .spawn("waits", |s| {
                while !s.sleep(Duration::from_millis(10)) {}
                Ok(())
            })
            .unwrap();
        stages.spawn("panics", |_| panic!("bug")).unwrap();
        let err = stages.join().unwrap_err().to_string();
        assert!(err.contains("panics thread panicked"), "{err}");
    }

    #[test]
    fn stages_run_on_named_threads_and_join_in_start_order() {
        let shutdown = Shutdown::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut stages = Stages::new(&shutdown);
        for name in ["first", "second"] {
            let seen = seen.clone();
            stages
                .spawn(name, move |_| {
                    let me = std::thread::current().name().map(str::to_string);
                    seen.lock().unwrap().push(me);
                    Ok(())
                })
                .unwrap();
        }
        stages.join().unwrap();
        assert!(!shutdown.is_triggered());
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(
            seen,
            vec![Some("first".to_string()), Some("second".to_string())]
        );
    }
}
