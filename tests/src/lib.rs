//! The weir end-to-end harness, shared by the tests in `tests/tests/` and
//! the demo:
//!
//! - [`registry`] and [`skopeo`] (from `weir-test-support`): Debian's
//!   `docker-registry` on a free loopback port with temporary storage, and
//!   read-back checks (digests re-hashed); `skopeo copy`/`inspect`, e.g. to
//!   load a generated OCI layout into a registry.
//! - [`appliance_vm`]: the rx appliance image built with image-build and
//!   booted under qemu (TCG), its serial ports, power button and power
//!   cut, and its data partition read back without mounting.
//! - [`campaign`]: the seeded random-fault campaign (gateway kills, crash
//!   points, registry outages, link faults), for the suite and long runs.
//! - [`diode`]: the lossy one-way UDP link (`diode-sim`), in-process or as
//!   a binary.
//! - [`serial_line`]: a damaging, rate-limited one-way byte line between
//!   socat pty pairs (the pairs from `weir-test-support`), for the serial
//!   transport.
//! - test images come from the `weir-imagegen` crate, re-exported as
//!   [`imagegen`].
//!
//! Parts that need a system binary (`docker-registry`, `skopeo`, `socat`)
//! return `None`/`false` with a message saying how to install it, so tests
//! skip on a machine without them; under `CI=true` they fail instead
//! (`weir_test_support::tools`).

pub mod appliance_vm;
pub mod campaign;
pub mod diode;
pub mod pair;
pub mod serial_line;

pub use weir_imagegen as imagegen;
pub use weir_test_support::{registry, skopeo};
