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

/// A TCP front to a server (PostgreSQL) that can go silent: while `silent` is set it reads nothing and
/// forwards nothing, and closes nothing either, as a lost node or a network black hole
/// does (the kernel still acknowledges, so keepalives see a live peer).
pub async fn silent_front(target: u16) -> (u16, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let silent = Arc::new(AtomicBool::new(false));
    let flag = silent.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                continue;
            };
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            for (mut from, mut to, flag) in [
                (
                    Box::new(ri) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    flag.clone(),
                ),
                (Box::new(ro) as _, Box::new(wi) as _, flag.clone()),
            ] {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        while flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        while flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (port, silent)
}
