//! Status LEDs through the Linux LED class (`<base>/<name>/brightness`,
//! `max_brightness`, `trigger`, `delay_on`, `delay_off`).
//!
//! Four LEDs: power (on while the gateway runs), link (on while frames flow
//! or heartbeats go out), activity (blinks while a transfer moves) and fault
//! (on, with a reason the console's `status` shows). Blinking uses the
//! kernel's `timer` trigger where the LED offers it, so it keeps going
//! without us; otherwise [`Leds::tick`] toggles it. An LED that is missing
//! or refuses writes is logged once and otherwise ignored: an appliance
//! without a fault LED must still move images.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Blink period halves of the activity LED, in milliseconds.
pub const ACTIVITY_DELAY_ON_MS: u32 = 100;
pub const ACTIVITY_DELAY_OFF_MS: u32 = 100;

/// The LED class names of the four status LEDs (directories under the
/// base). An empty name means the appliance has no such LED.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedNames {
    pub power: String,
    pub link: String,
    pub activity: String,
    pub fault: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    On,
    Blink,
}

struct Led {
    role: &'static str,
    dir: PathBuf,
    configured: bool,
    present: bool,
    max_brightness: u32,
    has_timer: bool,
    /// What was last written; `None` until the first write.
    mode: Option<Mode>,
    /// Toggle phase of a blink without the timer trigger.
    lit: bool,
    warned: bool,
}

impl Led {
    fn open(base: &Path, role: &'static str, name: &str) -> Self {
        let dir = base.join(name);
        let present = !name.is_empty() && dir.join("brightness").is_file();
        if name.is_empty() {
            tracing::debug!(led = role, "no status LED configured");
        } else if !present {
            tracing::warn!(led = role, path = %dir.display(), "status LED not found; running without it");
        }
        let max_brightness = std::fs::read_to_string(dir.join("max_brightness"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|&m| m > 0)
            .unwrap_or(1);
        // `trigger` lists the choices with the active one in brackets.
        let has_timer = std::fs::read_to_string(dir.join("trigger"))
            .map(|s| {
                s.split_whitespace()
                    .any(|t| t.trim_matches(['[', ']']) == "timer")
            })
            .unwrap_or(false);
        Led {
            role,
            dir,
            configured: !name.is_empty(),
            present,
            max_brightness,
            has_timer,
            mode: None,
            lit: false,
            warned: false,
        }
    }

    fn write(&mut self, file: &str, value: &str) {
        let path = self.dir.join(file);
        // No create: a sysfs attribute exists or the write is wrong.
        let result = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, value.as_bytes()));
        if let Err(e) = result {
            if !self.warned {
                self.warned = true;
                tracing::warn!(led = self.role, path = %path.display(), error = %e, "cannot drive status LED; ignoring it from now on");
            }
        }
    }

    fn brightness(&mut self, lit: bool) {
        self.lit = lit;
        let value = if lit { self.max_brightness } else { 0 };
        self.write("brightness", &value.to_string());
    }

    fn set(&mut self, mode: Mode) {
        if !self.present || self.mode == Some(mode) {
            return;
        }
        let was_timer = self.mode.is_none() || (self.mode == Some(Mode::Blink) && self.has_timer);
        match mode {
            Mode::Off | Mode::On => {
                // Clear whatever trigger runs (a boot default like
                // `heartbeat`, or our own timer) so the level holds.
                if was_timer && self.dir.join("trigger").is_file() {
                    self.write("trigger", "none");
                }
                self.brightness(mode == Mode::On);
            }
            Mode::Blink if self.has_timer => {
                self.write("trigger", "timer");
                self.write("delay_on", &ACTIVITY_DELAY_ON_MS.to_string());
                self.write("delay_off", &ACTIVITY_DELAY_OFF_MS.to_string());
            }
            Mode::Blink => {
                if was_timer && self.dir.join("trigger").is_file() {
                    self.write("trigger", "none");
                }
                self.brightness(true);
            }
        }
        self.mode = Some(mode);
    }

    fn tick(&mut self) {
        if self.present && self.mode == Some(Mode::Blink) && !self.has_timer {
            self.brightness(!self.lit);
        }
    }
}

struct Panel {
    power: Led,
    link: Led,
    activity: Led,
    fault: Led,
    fault_reason: Option<String>,
}

impl Panel {
    fn each(&mut self) -> [&mut Led; 4] {
        [
            &mut self.power,
            &mut self.link,
            &mut self.activity,
            &mut self.fault,
        ]
    }
}

/// The gateway's status LEDs; shareable between threads.
pub struct Leds {
    panel: Mutex<Panel>,
}

impl Leds {
    /// Finds the LEDs under `base` (normally `/sys/class/leds`). Never fails:
    /// missing LEDs are logged once and skipped.
    pub fn new(base: &Path, names: LedNames) -> Self {
        Leds {
            panel: Mutex::new(Panel {
                power: Led::open(base, "power", &names.power),
                link: Led::open(base, "link", &names.link),
                activity: Led::open(base, "activity", &names.activity),
                fault: Led::open(base, "fault", &names.fault),
                fault_reason: None,
            }),
        }
    }

    fn panel(&self) -> MutexGuard<'_, Panel> {
        // A panic elsewhere must not take the LEDs down with it.
        self.panel.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn level(on: bool) -> Mode {
        if on {
            Mode::On
        } else {
            Mode::Off
        }
    }

    pub fn set_power(&self, on: bool) {
        self.panel().power.set(Self::level(on));
    }

    pub fn set_link(&self, up: bool) {
        self.panel().link.set(Self::level(up));
    }

    /// Blinks the activity LED while `moving`; off otherwise.
    pub fn set_activity(&self, moving: bool) {
        self.panel()
            .activity
            .set(if moving { Mode::Blink } else { Mode::Off });
    }

    /// Lights the fault LED and keeps `reason` for `status`; `None` clears it.
    pub fn set_fault(&self, reason: Option<String>) {
        let mut panel = self.panel();
        let on = reason.is_some();
        if panel.fault_reason != reason {
            match &reason {
                Some(r) => tracing::warn!(reason = %r, "fault raised"),
                None => tracing::info!("fault cleared"),
            }
        }
        panel.fault_reason = reason;
        panel.fault.set(Self::level(on));
    }

    pub fn fault_reason(&self) -> Option<String> {
        self.panel().fault_reason.clone()
    }

    /// Advances blinking on LEDs without the timer trigger; call a few
    /// times a second.
    pub fn tick(&self) {
        for led in self.panel().each() {
            led.tick();
        }
    }

    /// Every LED off, triggers cleared: for shutdown.
    pub fn all_off(&self) {
        for led in self.panel().each() {
            led.set(Mode::Off);
        }
    }

    /// Drives other LEDs from now on (a configuration reload renamed them):
    /// the old ones go dark, power lights on the new one, and the others
    /// follow at the panel's next turn. The fault reason stays.
    pub fn reconfigure(&self, base: &Path, names: LedNames) {
        let mut panel = self.panel();
        let power_on = panel.power.mode == Some(Mode::On);
        for led in panel.each() {
            led.set(Mode::Off);
        }
        let fault_reason = panel.fault_reason.take();
        *panel = Panel {
            power: Led::open(base, "power", &names.power),
            link: Led::open(base, "link", &names.link),
            activity: Led::open(base, "activity", &names.activity),
            fault: Led::open(base, "fault", &names.fault),
            fault_reason: None,
        };
        if power_on {
            panel.power.set(Mode::On);
        }
        let fault_on = fault_reason.is_some();
        panel.fault_reason = fault_reason;
        panel.fault.set(Self::level(fault_on));
    }

    /// Roles (`power`, `link`, `activity`, `fault`) of configured LEDs that
    /// were not found, for `status`.
    pub fn missing(&self) -> Vec<&'static str> {
        self.panel()
            .each()
            .into_iter()
            .filter(|l| l.configured && !l.present)
            .map(|l| l.role)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lays out one LED as the LED class does.
    fn fake_led(base: &Path, name: &str, max: u32, triggers: &str) {
        let dir = base.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("brightness"), "0\n").unwrap();
        std::fs::write(dir.join("max_brightness"), format!("{max}\n")).unwrap();
        std::fs::write(dir.join("trigger"), format!("{triggers}\n")).unwrap();
        if triggers.contains("timer") {
            std::fs::write(dir.join("delay_on"), "500\n").unwrap();
            std::fs::write(dir.join("delay_off"), "500\n").unwrap();
        }
    }

    fn read(base: &Path, name: &str, file: &str) -> String {
        std::fs::read_to_string(base.join(name).join(file))
            .unwrap()
            .trim()
            .to_string()
    }

    fn names() -> LedNames {
        LedNames {
            power: "weir:green:power".into(),
            link: "weir:green:link".into(),
            activity: "weir:yellow:activity".into(),
            fault: "weir:red:fault".into(),
        }
    }

    /// All four LEDs; activity has the timer trigger unless `no_timer`.
    fn panel(no_timer: bool) -> (tempfile::TempDir, Leds) {
        let base = tempfile::tempdir().unwrap();
        let n = names();
        fake_led(base.path(), &n.power, 255, "[none] timer heartbeat");
        fake_led(base.path(), &n.link, 1, "[none] timer");
        let activity_triggers = if no_timer {
            "[none] mmc0"
        } else {
            "[none] timer mmc0"
        };
        fake_led(base.path(), &n.activity, 255, activity_triggers);
        fake_led(base.path(), &n.fault, 100, "none [heartbeat]");
        let leds = Leds::new(base.path(), n);
        (base, leds)
    }

    #[test]
    fn steady_leds_light_at_max_brightness_and_clear_triggers() {
        let (base, leds) = panel(false);
        let n = names();
        leds.set_power(true);
        assert_eq!(read(base.path(), &n.power, "brightness"), "255");
        assert_eq!(read(base.path(), &n.power, "trigger"), "none");
        leds.set_link(true);
        assert_eq!(read(base.path(), &n.link, "brightness"), "1");
        leds.set_link(false);
        assert_eq!(read(base.path(), &n.link, "brightness"), "0");
    }

    #[test]
    fn fault_lights_and_keeps_its_reason() {
        let (base, leds) = panel(false);
        let n = names();
        assert_eq!(leds.fault_reason(), None);
        leds.set_fault(Some("HMAC failures above threshold".into()));
        assert_eq!(read(base.path(), &n.fault, "brightness"), "100");
        // The boot-time heartbeat trigger must not keep blinking it.
        assert_eq!(read(base.path(), &n.fault, "trigger"), "none");
        assert_eq!(
            leds.fault_reason().as_deref(),
            Some("HMAC failures above threshold")
        );
        leds.set_fault(None);
        assert_eq!(read(base.path(), &n.fault, "brightness"), "0");
        assert_eq!(leds.fault_reason(), None);
    }

    #[test]
    fn activity_blinks_with_the_timer_trigger_where_offered() {
        let (base, leds) = panel(false);
        let n = names();
        leds.set_activity(true);
        assert_eq!(read(base.path(), &n.activity, "trigger"), "timer");
        assert_eq!(
            read(base.path(), &n.activity, "delay_on"),
            ACTIVITY_DELAY_ON_MS.to_string()
        );
        assert_eq!(
            read(base.path(), &n.activity, "delay_off"),
            ACTIVITY_DELAY_OFF_MS.to_string()
        );
        // The kernel blinks it; ticks leave it alone.
        std::fs::write(base.path().join(&n.activity).join("brightness"), "255").unwrap();
        leds.tick();
        assert_eq!(read(base.path(), &n.activity, "brightness"), "255");
        leds.set_activity(false);
        assert_eq!(read(base.path(), &n.activity, "trigger"), "none");
        assert_eq!(read(base.path(), &n.activity, "brightness"), "0");
    }

    #[test]
    fn activity_toggles_on_tick_without_the_timer_trigger() {
        let (base, leds) = panel(true);
        let n = names();
        leds.set_activity(true);
        assert_eq!(read(base.path(), &n.activity, "trigger"), "none");
        assert_eq!(read(base.path(), &n.activity, "brightness"), "255");
        leds.tick();
        assert_eq!(read(base.path(), &n.activity, "brightness"), "0");
        leds.tick();
        assert_eq!(read(base.path(), &n.activity, "brightness"), "255");
        leds.set_activity(false);
        assert_eq!(read(base.path(), &n.activity, "brightness"), "0");
        leds.tick();
        assert_eq!(read(base.path(), &n.activity, "brightness"), "0");
    }

    #[test]
    fn renamed_leds_take_over_power_and_fault_and_the_old_ones_go_dark() {
        let (base, leds) = panel(false);
        let n = names();
        leds.set_power(true);
        leds.set_fault(Some("state disk full".into()));
        let renamed = LedNames {
            power: "box:power".into(),
            link: "box:link".into(),
            activity: String::new(),
            fault: "box:fault".into(),
        };
        for name in [&renamed.power, &renamed.link, &renamed.fault] {
            fake_led(base.path(), name, 1, "[none]");
        }
        leds.reconfigure(base.path(), renamed.clone());
        assert_eq!(read(base.path(), &n.power, "brightness"), "0");
        assert_eq!(read(base.path(), &n.fault, "brightness"), "0");
        assert_eq!(read(base.path(), &renamed.power, "brightness"), "1");
        assert_eq!(read(base.path(), &renamed.fault, "brightness"), "1");
        assert_eq!(leds.fault_reason().as_deref(), Some("state disk full"));
        leds.set_link(true);
        assert_eq!(read(base.path(), &renamed.link, "brightness"), "1");
        assert_eq!(read(base.path(), &n.link, "brightness"), "0");
    }

    #[test]
    fn repeated_settings_do_not_rewrite_sysfs() {
        let (base, leds) = panel(false);
        let n = names();
        leds.set_link(true);
        // Something else wrote the LED; the same setting again is a no-op.
        std::fs::write(base.path().join(&n.link).join("brightness"), "7").unwrap();
        leds.set_link(true);
        assert_eq!(read(base.path(), &n.link, "brightness"), "7");
    }

    #[test]
    fn missing_leds_are_not_fatal() {
        let base = tempfile::tempdir().unwrap();
        let n = names();
        fake_led(base.path(), &n.power, 1, "[none]");
        let leds = Leds::new(
            base.path(),
            LedNames {
                activity: String::new(),
                ..n.clone()
            },
        );
        leds.set_power(true);
        leds.set_link(true);
        leds.set_activity(true);
        leds.tick();
        leds.set_fault(Some("state disk full".into()));
        assert_eq!(read(base.path(), &n.power, "brightness"), "1");
        assert_eq!(leds.fault_reason().as_deref(), Some("state disk full"));
        // The unconfigured activity LED is not reported missing.
        assert_eq!(leds.missing(), vec!["link", "fault"]);
        // Nothing was created where the LEDs are missing.
        assert!(!base.path().join(&n.link).exists());
    }

    #[test]
    fn all_off_darkens_every_led() {
        let (base, leds) = panel(false);
        let n = names();
        leds.set_power(true);
        leds.set_link(true);
        leds.set_activity(true);
        leds.set_fault(Some("registry failing".into()));
        leds.all_off();
        for name in [&n.power, &n.link, &n.activity, &n.fault] {
            assert_eq!(read(base.path(), name, "brightness"), "0", "{name}");
            assert_eq!(read(base.path(), name, "trigger"), "none", "{name}");
        }
    }
}
