//! What the tests of every weir crate share, in one place. It depends on
//! `weir-proto`, `weir-host` (and `weir-imagegen`) but on neither gateway,
//! so both gateways take it as a dev-dependency and the end-to-end harness
//! (`weir-tests`) builds on it:
//!
//! ```text
//!   weir-proto ───┐
//!   weir-host ────┼▶ weir-test-support ──▶ gateway-tx, gateway-rx (dev)
//!   weir-imagegen ┘                   └─▶ weir-tests (harness, e2e)
//! ```
//!
//! - [`tools`]: system programs tests need, found on `PATH`, and the rule
//!   for a missing one: skip with the Debian package to install, except
//!   under `CI=true`, where the test fails.
//! - [`registry`]: Debian's `docker-registry` on a free loopback port with
//!   temporary storage (optionally read-only, behind htpasswd basic auth,
//!   served over TLS), and read-back checks (digests re-hashed).
//! - [`tls`]: a test CA and a server certificate for `127.0.0.1`, made
//!   with the `openssl` CLI.
//! - [`skopeo`]: `skopeo copy`/`inspect`/`delete`, e.g. to load a
//!   generated OCI layout or archive into a registry (with credentials and
//!   the test CA), returning the digest, and to move or delete a tag.
//! - [`proxy`]: a TCP proxy that cuts every connection after N response
//!   bytes (a source registry gone mid-blob), refuses, or throttles.
//! - [`pty`]: socat pty pairs, for serial lines and consoles.
//! - [`images`]: sample images as transfer manifests and blob bytes, from a
//!   seed; [`imagegen`] writes OCI archives and layouts to disk.
//! - [`sender`]: a sender that seals frames with the proto API and sends
//!   them over UDP, dropping or altering what a test asks.
//! - [`receiver`]: a receiver that verifies frames and rebuilds objects.
//! - [`replies`]: a console handler's reply as text.
//! - [`scrape`]: a metrics endpoint read over HTTP, its samples looked up,
//!   its text checked by `promtool check metrics`.
//! - [`small_disk`]: a small tmpfs on a directory (root), a state disk
//!   that fills in bytes or in inodes.
//! - [`wait`]: polling with a deadline.

pub mod cosign;
pub mod images;
pub mod proxy;
pub mod pty;
pub mod receiver;
pub mod registry;
pub mod replies;
pub mod scrape;
pub mod sender;
pub mod skopeo;
pub mod small_disk;
pub mod tls;
pub mod tools;
pub mod wait;

pub use images::{bytes_from, genesis_record, sample_image, sample_index, SampleImage};
pub use proxy::TcpProxy;
pub use receiver::{HeldObject, Reassembler, SeenShard};
pub use registry::{
    htpasswd_line, registry_or_skip, Registry, RegistryOptions, TestRegistry, RIGHT_PASSWORD_BCRYPT,
};
pub use sender::{Tamper, TestSender};
pub use tls::TestCerts;
pub use wait::wait_for;
pub use weir_imagegen as imagegen;
