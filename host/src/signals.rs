//! SIGTERM and SIGINT: either one stops a gateway cleanly, through its
//! shared shutdown, so that state is flushed before the process exits.

use crate::Shutdown;
use signal_hook::consts::{SIGINT, SIGTERM};
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
    /// Starts watching on a thread named `thread_name`.
    pub fn start(thread_name: &str, shutdown: &Shutdown) -> Result<SignalWatch, SignalError> {
        let mut incoming = Signals::new([SIGTERM, SIGINT]).map_err(SignalError::Install)?;
        let handle = incoming.handle();
        let shutdown = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || {
                if let Some(sig) = incoming.forever().next() {
                    tracing::info!(signal = sig, "stopping on signal");
                    shutdown.trigger();
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
