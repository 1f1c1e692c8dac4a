//! A TCP front for several backends, as a Kubernetes Service is for the pods behind it:
//! each new connection goes to the next backend in turn that accepts it (a dead one
//! refuses and is skipped), and its bytes are piped both ways until either side closes.
//! Sidecars and operators that follow the Service are moved to a live replica when
//! theirs dies, with no address of their own changed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};

/// The Service: its address and the backends it spreads connections over.
pub struct Service {
    pub addr: SocketAddr,
    /// Connections handed to each backend so far.
    pub handed: Arc<Vec<AtomicUsize>>,
    task: tokio::task::JoinHandle<()>,
}

impl Service {
    /// Listens on a loopback port for `backends`.
    pub async fn start(backends: Vec<SocketAddr>) -> Service {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let handed: Arc<Vec<AtomicUsize>> =
            Arc::new(backends.iter().map(|_| AtomicUsize::new(0)).collect());
        let counts = handed.clone();
        let task = tokio::spawn(async move {
            let next = AtomicUsize::new(0);
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let first = next.fetch_add(1, Ordering::Relaxed);
                let mut outbound = None;
                for i in 0..backends.len() {
                    let n = (first + i) % backends.len();
                    if let Ok(s) = TcpStream::connect(backends[n]).await {
                        counts[n].fetch_add(1, Ordering::Relaxed);
                        outbound = Some(s);
                        break;
                    }
                }
                // No live backend: the connection is closed, as a Service with no ready
                // endpoint refuses.
                let Some(mut outbound) = outbound else {
                    continue;
                };
                let mut inbound = inbound;
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Service { addr, handed, task }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}
