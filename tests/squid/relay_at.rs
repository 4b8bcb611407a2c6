//! The relay in-process on a socket the test bound itself (say 127.77.x.1:443 on a veth), where
//! `support::relay::start` always binds 127.0.0.1:0.

use pushrelay::{App, config};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub struct RelayAt {
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RelayAt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RelayAt {
    /// Starts the relay from YAML with one listener, serving on `socket` (its `bind` is ignored).
    pub fn start(yaml: &str, socket: TcpListener) -> RelayAt {
        let loaded =
            config::from_yaml(yaml).unwrap_or_else(|e| panic!("test config invalid: {e}\n{yaml}"));
        let app = App::build(loaded.config).unwrap_or_else(|e| panic!("relay setup failed: {e}"));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run(vec![socket], async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        RelayAt {
            shutdown: Some(tx),
            task,
        }
    }

    /// Starts shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}
