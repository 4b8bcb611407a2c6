//! What a running relay can change without a restart: certificates (fixed files, the CA that
//! mints, the upstream identities' certificates, and a relay chain's client certificate), forward-proxy users files and `tunnels`,
//! `allow_sources` and `destinations`. A reload builds everything new first and swaps only when
//! all of it built, so a bad new configuration leaves the running one untouched. Existing
//! connections keep going, except upstream connections of a changed identity certificate: they
//! take no new requests, finish theirs and close, so new requests go on new connections that
//! present the new certificate. Listener and other upstream changes need a restart and are
//! refused / reported. Minted leaves are minted again by every reload, and at the latest
//! `REMINT_AFTER` after the last one, well before they expire: `remint_loop` runs with the relay
//! and waits for that moment, which moves whenever a reload mints (and which `make_remint_due`
//! brings forward, the clock seam tests use instead of waiting a year).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ValidConfig};
use crate::policy::{DestinationPolicy, SourcePolicy};
use crate::relay::Relay;
use crate::relay::door::DoorHandle;
use crate::swap::Swap;
use crate::tls::TlsSetupError;
use crate::tls::client::ClientIdentity;
use crate::tls::pki::LEAF_VALIDITY_DAYS;
use crate::upstream::identity::certificate_identity;

/// How long after minting listener leaves they are minted again: 30 days before they expire.
pub const REMINT_AFTER: Duration = Duration::from_secs((LEAF_VALIDITY_DAYS as u64 - 30) * 86_400);
/// After a minting that failed (a CA file unreadable, say), when it is tried again.
const REMINT_RETRY: Duration = Duration::from_secs(3600);

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
    /// The upstream identities' certificates, in `upstream.identities` order.
    identities: Vec<Arc<ClientIdentity>>,
    /// The inside relay's certificate towards its DMZ relay (`upstream.relay.client_cert`).
    chain_identity: Option<Arc<ClientIdentity>>,
    /// When the listeners' minted leaves are next due to be minted again; a reload moves it.
    remint_at: watch::Sender<Instant>,
}

impl Reloader {
    pub fn new(
        config: ValidConfig,
        relay: Arc<Relay>,
        doors: Vec<DoorHandle>,
        sources: Vec<Arc<Swap<SourcePolicy>>>,
        identities: Vec<Arc<ClientIdentity>>,
        chain_identity: Option<Arc<ClientIdentity>>,
    ) -> Self {
        Reloader {
            current: Mutex::new(config),
            relay,
            doors,
            sources,
            identities,
            chain_identity,
            remint_at: watch::Sender::new(Instant::now() + REMINT_AFTER),
        }
    }

    /// Whether the listeners' minted leaves are due to be minted again (`REMINT_AFTER`).
    pub fn remint_due(&self) -> bool {
        *self.remint_at.borrow() <= Instant::now()
    }

    /// When the listeners' minted leaves are next due, as it changes.
    pub fn remint_at(&self) -> watch::Receiver<Instant> {
        self.remint_at.subscribe()
    }

    /// The clock seam: makes the minted leaves due now, as if `REMINT_AFTER` had passed.
    pub fn make_remint_due(&self) {
        self.remint_at.send_replace(Instant::now());
    }

    /// Builds the listeners' certificates again from the running configuration: minted leaves
    /// are minted anew, fixed files read again.
    pub fn renew_certificates(&self) -> Result<(), ReloadError> {
        let current = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.reload(current)
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
        // Identity certificates by topic, so a reordered list still finds its own; a topic that
        // is new or gone is an upstream change that needs a restart.
        let mut renewed = Vec::new();
        for (identity, old) in self.identities.iter().zip(&current.upstream.identities) {
            if let Some((i, id)) = new
                .upstream
                .identities
                .iter()
                .enumerate()
                .find(|(_, id)| id.topic == old.topic)
            {
                let next =
                    ClientIdentity::load(&format!("upstream.identities[{i}]"), &id.cert, &id.key)?;
                renewed.push((identity, next, id.topic.clone()));
            }
        }
        // The inside relay's certificate towards its DMZ relay, read again (a relay chain set up
        // or given up is an upstream change that needs a restart).
        let chain_renewed = match (
            &self.chain_identity,
            new.upstream
                .relay
                .as_ref()
                .and_then(|r| r.client_cert.as_ref().zip(r.client_key.as_ref())),
        ) {
            (Some(identity), Some((cert, key))) => Some((
                identity,
                ClientIdentity::load_as(
                    ("upstream.relay.client_cert", cert),
                    ("upstream.relay.client_key", key),
                )?,
            )),
            _ => None,
        };
        for commit in commits {
            commit();
        }
        // Connections to the DMZ relay already open were authenticated with the old one: they
        // drain, new connections present this one.
        if let Some((identity, next)) = chain_renewed
            && identity.replace(next)
        {
            let drained = self.relay.pool().drain_all();
            tracing::info!(
                connections = drained,
                "upstream.relay.client_cert renewed: open connections to the DMZ relay drain, new ones present it"
            );
        }
        self.remint_at.send_replace(Instant::now() + REMINT_AFTER);
        for (identity, next, topic) in renewed {
            // Open connections presented the old certificate: they drain, new ones present this.
            if identity.replace(next) {
                self.relay
                    .pool()
                    .drain_identity(&certificate_identity(&topic));
            }
            self.relay
                .metrics()
                .identity_certificate(&topic, identity.not_after());
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
        tracing::info!(
            "configuration reloaded: certificates, proxy users, allow_sources, destinations and tunnels"
        );
        Ok(())
    }
}

/// Mints the listeners' leaves again whenever they are due, until `shutdown`. New handshakes
/// get the new leaf; connections already open keep the one they were served.
pub async fn remint_loop(reloader: Arc<Reloader>, shutdown: CancellationToken) {
    let mut due = reloader.remint_at();
    loop {
        let at = *due.borrow_and_update();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            // Moved by a reload, or brought forward: wait for the new moment.
            changed = due.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            _ = tokio::time::sleep_until(at) => {}
        }
        tracing::info!("minting listener certificates again before they expire");
        if let Err(e) = reloader.renew_certificates() {
            tracing::error!(error = %e, retry_in = ?REMINT_RETRY, "minting listener certificates again failed; the current ones stay");
            reloader
                .remint_at
                .send_replace(Instant::now() + REMINT_RETRY);
        }
    }
}
