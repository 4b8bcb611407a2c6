//! What a running relay can change without a restart: certificates (fixed files and the CA that
//! mints), `allow_sources` and `destinations`. A reload builds everything new first and swaps only
//! when all of it built, so a bad new configuration leaves the running one untouched. Existing
//! connections keep going. Listener and upstream changes need a restart and are refused / reported.

use std::sync::{Arc, Mutex};

use crate::config::{Config, ValidConfig};
use crate::policy::{DestinationPolicy, SourcePolicy};
use crate::relay::Relay;
use crate::relay::door::DoorHandle;
use crate::swap::Swap;
use crate::tls::TlsSetupError;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("listeners changed ({0}): that needs a restart")]
    ListenersChanged(String),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

pub struct Reloader {
    current: Mutex<ValidConfig>,
    relay: Arc<Relay>,
    doors: Vec<DoorHandle>,
    sources: Vec<Arc<Swap<SourcePolicy>>>,
}

impl Reloader {
    pub fn new(
        config: ValidConfig,
        relay: Arc<Relay>,
        doors: Vec<DoorHandle>,
        sources: Vec<Arc<Swap<SourcePolicy>>>,
    ) -> Self {
        Reloader {
            current: Mutex::new(config),
            relay,
            doors,
            sources,
        }
    }

    /// Applies `new`, or changes nothing and says why.
    pub fn reload(&self, new: ValidConfig) -> Result<(), ReloadError> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let shape = |c: &Config| {
            c.listeners
                .iter()
                .map(|l| format!("{}/{:?}/{}/{}", l.name, l.mode, l.bind, l.upstream_port))
                .collect::<Vec<_>>()
        };
        if shape(&current) != shape(&new) {
            return Err(ReloadError::ListenersChanged(format!(
                "{:?} -> {:?}",
                shape(&current),
                shape(&new)
            )));
        }
        let destinations = DestinationPolicy::new(new.destinations.iter().cloned());
        // Build every door's part first; swap nothing unless all of it built.
        let mut commits = Vec::new();
        for door in &self.doors {
            commits.push(door.reload(&new)?);
        }
        for commit in commits {
            commit();
        }
        for (swap, listener) in self.sources.iter().zip(&new.listeners) {
            swap.store(SourcePolicy::new(listener.allow_sources.clone()));
        }
        self.relay.set_destinations(destinations);
        // Compared as values, not as masked text: a new proxy password alone is a change.
        if current.upstream != new.upstream {
            tracing::warn!("upstream settings changed: they take effect after a restart");
        }
        if current.workers != new.workers {
            tracing::warn!("workers changed: that takes effect after a restart");
        }
        *current = new;
        tracing::info!("configuration reloaded: certificates, allow_sources and destinations");
        Ok(())
    }
}
