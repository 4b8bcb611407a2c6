//! What a listener knows of a front door: serve an accepted connection, and take a new
//! configuration. A front door is one file implementing `Door`, plus one arm where `App` lists the
//! doors by `Mode`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::{ListenerConfig, ValidConfig};
use crate::tls::TlsSetupError;

/// Applies what a `Door::reload` built. Infallible: everything that can fail happened before.
pub type Commit = Box<dyn FnOnce() + Send>;

/// A connection being served.
pub type Serving = Pin<Box<dyn Future<Output = ()> + Send>>;

pub trait Door: Send + Sync + 'static {
    /// Serves one connection let in by the listener, until it ends or `shutdown`.
    fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Serving;

    /// Builds what this door would use under `config` (its own listener in it, by index) without
    /// changing anything yet; the `Commit` swaps it in. On error the running door is untouched.
    fn reload(&self, config: &ValidConfig) -> Result<Commit, TlsSetupError>;

    /// What a connection above `limits.max_connections` is told before it is closed: written
    /// once, without waiting. None where TLS must come first (the client could not read it).
    fn busy_answer(&self) -> Option<Vec<u8>> {
        None
    }
}

/// How listeners and the reloader hold a front door.
pub type DoorHandle = Arc<dyn Door>;

/// The listener at `index` of `config`: a door's own, on reload.
pub fn listener_at(config: &ValidConfig, index: usize) -> Result<&ListenerConfig, TlsSetupError> {
    config.listeners.get(index).ok_or_else(|| {
        TlsSetupError::new(
            &format!("listeners[{index}]"),
            std::path::Path::new("-"),
            "the listener is gone from the new configuration",
        )
    })
}
