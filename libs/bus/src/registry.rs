//! What runs in this process, by name: the table that [`crate::serve`]'s servers and
//! [`crate::hand_over`]'s takers are found in.
//!
//! An entry holds a name until its [`Place`] drops. Of two entries registered under one name
//! (replicas in one test, say), the first holds it; the second may [`Place::claim`] it once
//! the first has dropped.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Entries by name; an entry is told from another by its `Arc`'s address.
pub(crate) struct Registry<T: ?Sized> {
    entries: RwLock<HashMap<String, Arc<T>>>,
}

impl<T: ?Sized> Default for Registry<T> {
    fn default() -> Self {
        Self { entries: RwLock::new(HashMap::new()) }
    }
}

impl<T: ?Sized> Registry<T> {
    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Arc<T>>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Arc<T>>> {
        self.entries.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry holding `name`, if one does.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<T>> {
        self.read().get(name).cloned()
    }

    /// Registers `entry` under `name` until the returned place drops; it holds the name only
    /// if none does yet.
    pub(crate) fn register(self: &Arc<Self>, name: &str, entry: Arc<T>) -> Place<T> {
        let mut place = Place { registry: self.clone(), name: name.to_string(), entry, holds: false };
        place.claim();
        place
    }
}

/// An entry's place in a [`Registry`]; the name it holds is given up when it drops.
pub(crate) struct Place<T: ?Sized> {
    registry: Arc<Registry<T>>,
    name: String,
    entry: Arc<T>,
    holds: bool,
}

impl<T: ?Sized> Place<T> {
    /// Takes the name if no entry holds it (the one that did has dropped).
    pub(crate) fn claim(&mut self) {
        if !self.holds {
            let mut entries = self.registry.write();
            if !entries.contains_key(&self.name) {
                entries.insert(self.name.clone(), self.entry.clone());
                self.holds = true;
            }
        }
    }
}

impl<T: ?Sized> Drop for Place<T> {
    fn drop(&mut self) {
        let mut entries = self.registry.write();
        if entries.get(&self.name).is_some_and(|e| Arc::ptr_eq(e, &self.entry)) {
            entries.remove(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_entry_holds_a_name_and_the_second_may_claim_it_once_the_first_drops() {
        let registry = Arc::new(Registry::<str>::default());
        let first = registry.register("a", Arc::from("first"));
        let mut second = registry.register("a", Arc::from("second"));
        assert_eq!(registry.get("a").as_deref(), Some("first"));
        second.claim();
        assert_eq!(registry.get("a").as_deref(), Some("first"), "held: not claimed");
        drop(first);
        assert_eq!(registry.get("a"), None, "given up, and not passed on by itself");
        second.claim();
        assert_eq!(registry.get("a").as_deref(), Some("second"));
        let third = registry.register("a", Arc::from("third"));
        drop(third);
        assert_eq!(registry.get("a").as_deref(), Some("second"), "a place that never held the name leaves it be");
        drop(second);
        assert_eq!(registry.get("a"), None);
    }
}
