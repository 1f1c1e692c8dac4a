//! A fleet sidecar following the control plane.
//!
//! The sidecar opens `Watch` with its sidecar credential and applies the snapshot, then
//! each delta, to its [`State`] as it arrives: a kill reaches it as one small message, no
//! polling. When the stream breaks (the control plane restarts, the network drops; HTTP/2
//! keepalives notice a silent peer) the sidecar keeps deciding from what it has, retries
//! with exponential backoff and jitter (100 ms doubling to 5 s), and on reconnecting
//! applies a fresh snapshot, so whatever it missed is included.
//!
//! Policy revisions are installed by a separate task (fetch the bundle by digest, compile,
//! swap), so a slow compile never holds back a kill behind it; the newest revision wins.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::pb::{self, control_plane_client::ControlPlaneClient};
use super::state::State;
use crate::policy::{BundleFiles, CompiledBundle, Policy};

/// The follower's connection, for health and metrics.
#[derive(Debug, Default)]
pub struct FollowStatus {
    /// A watch stream is open and its snapshot applied.
    pub connected: AtomicBool,
    /// Streams opened (the first and every reconnect).
    pub connects: AtomicU64,
    /// Events applied (snapshots and deltas).
    pub events: AtomicU64,
    /// Policy bundles fetched and installed.
    pub policies_installed: AtomicU64,
}

/// What the follower needs.
#[derive(Debug, Clone)]
pub struct Follow {
    pub channel: Channel,
    pub credential: String,
    pub name: String,
    pub state: Arc<State>,
    pub policy: Arc<Policy>,
    pub status: Arc<FollowStatus>,
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Follows the control plane until `shutdown`.
pub async fn run(f: Follow, mut shutdown: watch::Receiver<bool>) {
    let credential: MetadataValue<tonic::metadata::Ascii> =
        match format!("Bearer {}", f.credential).parse() {
            Ok(v) => v,
            Err(_) => {
                crate::log!(
                    error,
                    "control plane: the sidecar credential is not ASCII; not following"
                );
                return;
            }
        };
    let (want_tx, want_rx) = watch::channel::<Option<pb::PolicyRef>>(None);
    let installer = tokio::spawn(install_policies(
        f.clone(),
        credential.clone(),
        want_rx,
        shutdown.clone(),
    ));
    let mut backoff = BACKOFF_START;
    let mut last_error = String::new();
    loop {
        let outcome = tokio::select! {
            r = follow_once(&f, &credential, &want_tx) => r,
            _ = shutdown.changed() => break,
        };
        let was_connected = f.status.connected.swap(false, Ordering::AcqRel);
        if was_connected {
            backoff = BACKOFF_START;
        }
        let message = match outcome {
            Ok(()) => "the control plane closed the watch stream".to_owned(),
            Err(e) => e,
        };
        if was_connected || message != last_error {
            crate::log!(
                warn,
                "control plane: {message}; deciding from state version {} and retrying",
                f.state.version()
            );
            last_error = message;
        }
        let wait = jitter(backoff);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => break,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    f.status.connected.store(false, Ordering::Release);
    let _ = installer.await;
}

/// One watch stream, until it ends.
async fn follow_once(
    f: &Follow,
    credential: &MetadataValue<tonic::metadata::Ascii>,
    want: &watch::Sender<Option<pb::PolicyRef>>,
) -> Result<(), String> {
    let mut client = ControlPlaneClient::new(f.channel.clone());
    let mut req = tonic::Request::new(pb::WatchRequest {
        sidecar: f.name.clone(),
    });
    req.metadata_mut()
        .insert("authorization", credential.clone());
    let mut stream = client
        .watch(req)
        .await
        .map_err(|s| format!("watch refused: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    f.status.connects.fetch_add(1, Ordering::Relaxed);
    loop {
        let event = stream
            .message()
            .await
            .map_err(|s| format!("watch broke: {:?}: {}", s.code(), s.message()))?;
        let Some(event) = event else { return Ok(()) };
        let policy = f.state.apply(&event);
        f.status.events.fetch_add(1, Ordering::Relaxed);
        if event.snapshot && !f.status.connected.swap(true, Ordering::AcqRel) {
            crate::log!(
                info,
                "control plane: following at version {} ({} items)",
                event.version,
                event.items.len()
            );
        }
        if let Some(p) = policy {
            want.send_replace(Some(p));
        }
    }
}

/// Installs the newest policy revision the control plane names.
async fn install_policies(
    f: Follow,
    credential: MetadataValue<tonic::metadata::Ascii>,
    mut want: watch::Receiver<Option<pb::PolicyRef>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = want.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
        let Some(target) = want.borrow_and_update().clone() else {
            continue;
        };
        if f.policy.current().digest() == target.digest {
            continue;
        }
        match fetch_and_compile(&f, &credential, &target).await {
            Ok(compiled) => {
                f.policy.install(Arc::new(compiled));
                f.status.policies_installed.fetch_add(1, Ordering::Relaxed);
                crate::log!(
                    info,
                    "policy revision {} ({}) installed from the control plane",
                    target.revision,
                    target.digest
                );
            }
            Err(e) => {
                crate::log!(
                    error,
                    "policy revision {} ({}) not installed, the current one keeps serving: {e}",
                    target.revision,
                    target.digest
                );
                // Try again on the next change or reconnect (a snapshot names it again).
            }
        }
    }
}

async fn fetch_and_compile(
    f: &Follow,
    credential: &MetadataValue<tonic::metadata::Ascii>,
    target: &pb::PolicyRef,
) -> Result<CompiledBundle, String> {
    let mut client = ControlPlaneClient::new(f.channel.clone());
    let mut req = tonic::Request::new(pb::GetBundleRequest {
        digest: target.digest.clone(),
    });
    req.metadata_mut()
        .insert("authorization", credential.clone());
    let bundle = client
        .get_bundle(req)
        .await
        .map_err(|s| format!("fetch: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let files = BundleFiles::from(bundle);
    let opts = f.policy.options().clone();
    let digest = target.digest.clone();
    tokio::task::spawn_blocking(move || {
        opts.verify(&files).map_err(|e| e.to_string())?;
        let parsed = files.parse().map_err(|e| e.to_string())?;
        if parsed.digest != digest {
            return Err(format!(
                "the bundle fetched has digest {}, not {digest}",
                parsed.digest
            ));
        }
        CompiledBundle::compile(parsed, &opts).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() {
        u16::from_be_bytes(b)
    } else {
        0
    };
    // 75% to 125% of d.
    d * 3 / 4 + d * u32::from(r) / (2 * u32::from(u16::MAX))
}

/// A channel to the control plane: connects lazily (the sidecar starts without it), and
/// keeps HTTP/2 pings going so a silent, vanished peer is noticed within seconds.
pub fn channel(
    url: &str,
    connect_timeout: Duration,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<Channel, String> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| format!("control plane URL {url:?}: {e}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("control plane URL {url:?}: TLS: {e}"))?;
    }
    Ok(endpoint.connect_lazy())
}
