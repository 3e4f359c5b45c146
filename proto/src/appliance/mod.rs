//! The appliance surface both gateways share: status LEDs and the serial
//! console. The gateways supply what to show; these modules drive the
//! hardware (LED class files, a tty).

pub mod console;
pub mod leds;

pub use console::{Command, CommandHandler, Console, ConsoleError, Reply};
pub use leds::{LedNames, Leds};
