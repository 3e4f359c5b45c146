//! The report stage: status.json every second, the LED panel's inputs and
//! the fault it judges (link failing), and the serial console.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir_host::{Console, Shutdown};

use crate::appliance::{Fault, Faults, Lights, Movement};
use crate::status::StatusBoard;

/// The link LED stays on while frames went out this recently.
const LINK_WINDOW: Duration = Duration::from_secs(3);
/// The activity LED blinks while shard frames went out this recently.
const ACTIVITY_WINDOW: Duration = Duration::from_secs(2);
/// How often status.json is written.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Writes status.json every second until shutdown, and once more then.
pub fn write_status(board: &StatusBoard, path: &Path, shutdown: &Shutdown) {
    loop {
        if let Err(e) = board.write(path) {
            tracing::warn!(path = %path.display(), error = %e, "writing status.json failed");
        }
        if shutdown.sleep(STATUS_EVERY) {
            let _ = board.write(path);
            return;
        }
    }
}

/// What the panel reads every turn: the link and activity LEDs from the
/// wire counters, and the fault "link failing" when sends fail.
pub fn panel_inputs(board: StatusBoard, faults: Arc<Faults>) -> impl FnMut() -> Lights {
    let mut frames = Movement::default();
    let mut shards = Movement::default();
    let mut errors = Movement::default();
    move || {
        let now = Instant::now();
        let s = board.snapshot();
        frames.observe(s.wire.frames, now);
        shards.observe(s.wire.shard_frames, now);
        errors.observe(s.wire.link_errors, now);
        let up = frames.moved_within(LINK_WINDOW, now);
        if !up && errors.moved_within(LINK_WINDOW, now) {
            let why = s.wire.last_link_error.as_deref().unwrap_or("sends fail");
            faults.raise(Fault::LinkFailing, format!("link failing: {why}"));
        } else {
            faults.clear(Fault::LinkFailing);
        }
        let fault = faults.reason();
        board.update(|st| {
            st.link.up = up;
            st.fault.clone_from(&fault);
        });
        Lights {
            link: up,
            activity: !s.paused && shards.moved_within(ACTIVITY_WINDOW, now),
            fault,
        }
    }
}

/// Starts the serial console, if one is configured.
pub fn start_console(
    config: &crate::TxConfig,
    commands: crate::console::TxCommands,
    shutdown: &Shutdown,
) -> Option<Console> {
    weir_host::appliance::start_console(config.console.as_ref(), "tx", Arc::new(commands), shutdown)
}
