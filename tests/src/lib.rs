//! The weir end-to-end harness, shared by the tests in `tests/tests/` and
//! the demo:
//!
//! - [`registry`]: Debian's `docker-registry` on a free loopback port with
//!   temporary storage, and read-back checks (digests re-hashed).
//! - [`skopeo`]: `skopeo copy`/`inspect` wrappers, e.g. to load a generated
//!   OCI layout into a registry.
//! - [`diode`]: the lossy one-way UDP link (`diode-sim`), in-process or as
//!   a binary.
//! - [`serial_line`]: socat pty pairs and a damaging, rate-limited one-way
//!   byte line between them, for the serial transport.
//! - test images come from the `weir-imagegen` crate, re-exported as
//!   [`imagegen`].
//!
//! Parts that need a system binary (`docker-registry`, `skopeo`) return
//! `None`/`false` with a message saying how to install it, so tests skip
//! instead of failing on a machine without them.

pub mod diode;
pub mod pair;
pub mod registry;
pub mod serial_line;
pub mod skopeo;

pub use weir_imagegen as imagegen;
