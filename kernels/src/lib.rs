//! The two loops that take most of the pair's CPU per byte, each with a
//! SIMD path chosen at run time and a portable one:
//!
//! - [`parity`]: Reed-Solomon parity shards as GF(2^8) matrix products,
//!   with GFNI on AVX-512 (64 bytes multiplied per instruction), or nibble
//!   tables on AVX2 (32 bytes per pair of lookups);
//! - [`hmac`]: HMAC-SHA256 tags of many frames at once, sixteen SHA-256
//!   states side by side in AVX-512 registers, where hashing one frame at a
//!   time is bound by the latency of each compression.
//!
//! Both compute exactly what the portable code computes; the tests check
//! them against it.

pub mod hmac;
pub mod parity;

pub use hmac::HmacKey;
pub use parity::ParityRows;
