//! Pull: the sender's second intake. Polls source registries by the sync
//! list, gates each selected image on the same rules as a drop, streams its
//! manifests and blobs into the object store, and queues it for the
//! carousel exactly as a drop is queued.

pub mod scan;
pub mod source;
pub mod sync;
