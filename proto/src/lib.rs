pub mod manifest;
pub use manifest::*;
