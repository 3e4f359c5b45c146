//! Framings: how frames are laid out where a transport does not keep them
//! apart by itself.
//!
//! - [`stream`]: COBS between zero bytes, for byte streams (a serial line);
//! - [`batch`]: length-prefixed records in one file, for the directory link.
//!
//! Both are pure encode and decode on byte buffers; the links that read and
//! write devices and files are in the host crate.

pub mod batch;
pub mod stream;
