//! A value read on every use and replaced whole on reload: certificates, allowlists.

use std::sync::{Arc, RwLock};

/// A value read on every use and replaced whole on reload.
pub struct Swap<T>(RwLock<Arc<T>>);

impl<T> Swap<T> {
    pub fn new(value: T) -> Self {
        Swap(RwLock::new(Arc::new(value)))
    }

    pub fn load(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn store(&self, value: T) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
    }
}
