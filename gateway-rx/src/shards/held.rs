//! The objects the receiver holds whole. The store alone changes the set;
//! the verifiers look at a shared copy to drop a later pass's shards of
//! those objects before checking their tags, which is most of what a frame
//! costs. A receiver in steady state sees little else: the carousel sends
//! every image again and again, and each repeat of what it holds could
//! change nothing.

use rustc_hash::FxHashSet as HashSet;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use weir_proto::ObjectId;

/// Objects in the blob store, or pruned from it after their images were
/// delivered: their shards are duplicates, whatever else they carry.
pub struct HeldObjects {
    /// The store's own copy, read per shard without a lock.
    ids: HashSet<ObjectId>,
    shared: HeldView,
}

/// A read-only look at [`HeldObjects`] from other threads. It may lag the
/// store's copy by an instant: a shard it lets through is judged by the
/// store, and one it stops is of an object the store held a moment ago.
#[derive(Clone, Default)]
pub struct HeldView(Arc<RwLock<HashSet<ObjectId>>>);

impl HeldObjects {
    pub fn new(ids: impl IntoIterator<Item = ObjectId>) -> HeldObjects {
        let ids: HashSet<ObjectId> = ids.into_iter().collect();
        HeldObjects {
            shared: HeldView(Arc::new(RwLock::new(ids.clone()))),
            ids,
        }
    }

    pub fn contains(&self, id: &ObjectId) -> bool {
        self.ids.contains(id)
    }

    pub fn insert(&mut self, id: ObjectId) {
        if self.ids.insert(id) {
            self.shared.write().insert(id);
        }
    }

    pub fn remove(&mut self, id: &ObjectId) {
        if self.ids.remove(id) {
            self.shared.write().remove(id);
        }
    }

    pub fn view(&self) -> HeldView {
        self.shared.clone()
    }
}

impl HeldView {
    /// The set as it stands, for several frames at once. The store waits
    /// to change it while a look is held: hold it for a few frames only.
    pub fn look(&self) -> RwLockReadGuard<'_, HashSet<ObjectId>> {
        // A thread that panicked holding the lock left the set whole:
        // inserts and removes do not panic halfway.
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashSet<ObjectId>> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_follows_the_store() {
        let (a, b) = (ObjectId([1; 32]), ObjectId([2; 32]));
        let mut held = HeldObjects::new([a]);
        let view = held.view();
        assert!(view.look().contains(&a) && !view.look().contains(&b));
        held.insert(b);
        assert!(view.look().contains(&b) && held.contains(&b));
        held.remove(&a);
        assert!(!view.look().contains(&a) && !held.contains(&a));
    }
}
