//! SIGTERM and SIGINT: either one stops a gateway cleanly, through its
//! shared shutdown, so that state is flushed before the process exits.
//! SIGHUP, where the gateway takes reloads, asks it to read its
//! configuration again (see [`crate::reload`]).

use crate::reload::ReloadRequests;
use crate::Shutdown;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};
use std::thread::JoinHandle;

/// Why the signal watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("installing signal handlers")]
    Install(#[source] std::io::Error),
    #[error("starting the signal thread")]
    Thread(#[source] std::io::Error),
}

/// A thread that triggers the shutdown on the first SIGTERM or SIGINT.
/// Dropping it stops the thread.
pub struct SignalWatch {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl SignalWatch {
    /// Starts watching on a thread named `thread_name`. SIGHUP keeps its
    /// default action (the process ends).
    pub fn start(thread_name: &str, shutdown: &Shutdown) -> Result<SignalWatch, SignalError> {
        Self::spawn(thread_name, shutdown, None)
    }

    /// Like [`SignalWatch::start`]; SIGHUP also becomes a reload request.
    pub fn start_with_reloads(
        thread_name: &str,
        shutdown: &Shutdown,
        reloads: &ReloadRequests,
    ) -> Result<SignalWatch, SignalError> {
        Self::spawn(thread_name, shutdown, Some(reloads.clone()))
    }

    fn spawn(
        thread_name: &str,
        shutdown: &Shutdown,
        reloads: Option<ReloadRequests>,
    ) -> Result<SignalWatch, SignalError> {
        let mut wanted = vec![SIGTERM, SIGINT];
        if reloads.is_some() {
            wanted.push(SIGHUP);
        }
        let mut incoming = Signals::new(&wanted).map_err(SignalError::Install)?;
        let handle = incoming.handle();
        let shutdown = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || {
                for sig in incoming.forever() {
                    match (sig, &reloads) {
                        (SIGHUP, Some(r)) => {
                            tracing::info!("SIGHUP: reading the configuration again");
                            r.request();
                        }
                        _ => {
                            tracing::info!(signal = sig, "stopping on signal");
                            shutdown.trigger();
                            return;
                        }
                    }
                }
            })
            .map_err(SignalError::Thread)?;
        Ok(SignalWatch {
            handle,
            thread: Some(thread),
        })
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
