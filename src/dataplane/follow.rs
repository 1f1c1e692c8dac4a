//! A fleet sidecar following the control plane.
//!
//! The sidecar opens `Watch` with its sidecar credential and applies the snapshot, then
//! each delta, to its [`State`] as it arrives: a kill reaches it as one small message, no
//! polling. When the stream breaks (the control plane restarts, the network drops; HTTP/2
//! keepalives notice a silent peer) the sidecar keeps deciding from what it has, retries
//! with exponential backoff and jitter (100 ms doubling to 5 s), and on reconnecting
//! applies a fresh snapshot, so whatever it missed is included.
//!
//! A snapshot behind the state held (a lower epoch, or a lower version of the same epoch:
//! the control plane was restored from a backup, failed over to a stale replica, or had
//! its database replaced) is refused ([`super::state::admission`]): the sidecar keeps
//! deciding from what it holds, adds only the revocations and kill marks it is sent (they
//! can only deny more), logs an error naming both (epoch, version) pairs, counts it, and
//! says so in `/readyz` and the metrics. It stays SERVING: the state it decides from is
//! the newest it knew, stricter than the offered one, and taking every agent pod out of
//! service because a backup was restored would turn a recovery into an outage. When an
//! operator confirms the restore (`aegis ctl state confirm-restore`, which raises the
//! epoch) the sidecar resyncs and follows, keeping the revocations and kill marks it knew
//! until the tokens they cover expire.
//!
//! Policy revisions are installed by a separate task (fetch the bundle by digest, compile,
//! swap), so a slow compile never holds back a kill behind it; the newest revision wins.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::held::Held;
use super::state::{Admission, State};
use crate::control::pb::{self, control_plane_client::ControlPlaneClient};
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
    /// The channel to the control plane.
    pub channel: ControlChannel,
    /// The sidecar's credential (a `sidecar` operator token).
    pub credential: String,
    /// This sidecar's name, as the control plane lists its watchers.
    pub name: String,
    /// The control state this sidecar enforces, updated as events arrive.
    pub state: Arc<State>,
    /// The live policy, replaced when the control plane activates a revision.
    pub policy: Arc<Policy>,
    /// How the follower is doing, for readiness and `/metrics`.
    pub status: Arc<FollowStatus>,
    /// Seconds past `exp` a token is still accepted (clock skew), plus a margin.
    pub token_slack_secs: i64,
    /// The longest token lifetime (`control.max_token_ttl_secs`): how long a kill mark
    /// kept across a confirmed restore can still cover a live token.
    pub max_token_ttl_secs: i64,
    /// Where the sidecar remembers its position and revocations ([`super::held`]).
    pub held_file: std::path::PathBuf,
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
    let (dirty_tx, dirty_rx) = watch::channel(());
    let saver = tokio::spawn(save_held(f.clone(), dirty_rx, shutdown.clone()));
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
            r = follow_once(&f, &credential, &want_tx, &dirty_tx) => r,
            _ = shutdown.changed() => break,
        };
        let was_connected = f.status.connected.swap(false, Ordering::AcqRel);
        // The next try on a new connection: behind a Service it may reach another replica
        // (one that lost its store ends its streams but keeps the connection open).
        f.channel.renew();
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
    drop(dirty_tx);
    let _ = saver.await;
}

/// One watch stream, until it ends.
async fn follow_once(
    f: &Follow,
    credential: &MetadataValue<tonic::metadata::Ascii>,
    want: &watch::Sender<Option<pb::PolicyRef>>,
    dirty: &watch::Sender<()>,
) -> Result<(), String> {
    let mut client = ControlPlaneClient::new(f.channel.get());
    // What it holds (or remembered from before a restart), so that a control plane
    // behind it can tell it was restored.
    let (seen_epoch, seen_version, seen_chain) = f.state.held_with_chain().unwrap_or_default();
    let mut req = tonic::Request::new(pb::WatchRequest {
        sidecar: f.name.clone(),
        seen_epoch,
        seen_version,
        seen_chain,
    });
    req.metadata_mut()
        .insert("authorization", credential.clone());
    let mut stream = client
        .watch(req)
        .await
        .map_err(|s| format!("watch refused: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    f.status.connects.fetch_add(1, Ordering::Relaxed);
    // The epoch of this stream's snapshot, and whether that snapshot was refused.
    let mut stream_epoch = 0;
    let mut refusing = false;
    loop {
        let event = stream
            .message()
            .await
            .map_err(|s| format!("watch broke: {:?}: {}", s.code(), s.message()))?;
        let Some(event) = event else { return Ok(()) };
        if !event.snapshot && event.epoch != stream_epoch {
            // An operator raised the epoch: judge a fresh snapshot of it.
            return Err(format!(
                "the control plane moved to state epoch {}; resyncing",
                event.epoch
            ));
        }
        let policy = if !event.snapshot {
            if refusing {
                f.state.apply_restrictive(&event.items, true);
                dirty.send_replace(());
                continue;
            }
            f.state.apply(&event)
        } else {
            stream_epoch = event.epoch;
            refusing = false;
            match f.state.admit(&event) {
                Admission::Follow => f.state.apply(&event),
                Admission::Restore => restore(f, &event),
                Admission::Refuse => {
                    let rollback = f.state.refuse(&event);
                    crate::log!(error, "{rollback}");
                    refusing = true;
                    dirty.send_replace(());
                    continue;
                }
            }
        };
        dirty.send_replace(());
        f.status.events.fetch_add(1, Ordering::Relaxed);
        if event.snapshot && !f.status.connected.swap(true, Ordering::AcqRel) {
            crate::log!(
                info,
                "control plane: following at epoch {} version {} ({} items)",
                event.epoch,
                event.version,
                event.items.len()
            );
        }
        if let Some(p) = policy {
            want.send_replace(Some(p));
        }
    }
}

/// Saves what the sidecar holds for its next start ([`Held`]) whenever it changed, and
/// once more on shutdown: on the blocking pool (the file is synced), a burst of events
/// coalesced into one write of the latest state. A failure is logged, not fatal: the
/// sidecar goes on deciding, only a restart would forget.
async fn save_held(f: Follow, mut dirty: watch::Receiver<()>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let last = tokio::select! {
            r = dirty.changed() => r.is_err(),
            _ = shutdown.changed() => true,
        };
        if let Some(held) = Held::of(&f.state) {
            let path = f.held_file.clone();
            let saved = tokio::task::spawn_blocking(move || held.save(&path))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            if let Err(e) = saved {
                crate::log!(
                    error,
                    "control plane: cannot remember the state held for the next start: {e}"
                );
            }
        }
        if last {
            return;
        }
    }
}

/// Follows the snapshot of a raised epoch, or the first forward one after a refused
/// rollback, keeping what the state it replaces lacks.
fn restore(f: &Follow, event: &pb::WatchEvent) -> Option<pb::PolicyRef> {
    let held = f.state.held().unwrap_or_default();
    let (policy, (tokens, kills)) = f.state.restore(
        event,
        crate::control::now_secs(),
        f.token_slack_secs,
        f.max_token_ttl_secs,
    );
    let why = if event.epoch > held.0 {
        "an operator confirmed a restored state"
    } else {
        "the control plane moved forward after a refused rollback"
    };
    crate::log!(
        warn,
        "control plane: {why}: following epoch {} version {} (held epoch {} version {}), \
         keeping {tokens} revoked tokens and {kills} kill marks it lacks until their tokens \
         expire",
        event.epoch,
        event.version,
        held.0,
        held.1
    );
    policy
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
                let reads = compiled.reads().describe();
                f.policy.install(Arc::new(compiled));
                f.status.policies_installed.fetch_add(1, Ordering::Relaxed);
                crate::log!(
                    info,
                    "policy revision {} ({}) installed from the control plane, reads {reads}",
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
    let mut client = ControlPlaneClient::new(f.channel.get());
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

/// The channel to the control plane, and how to make it anew.
#[derive(Debug, Clone)]
pub struct ControlChannel {
    endpoint: tonic::transport::Endpoint,
    /// The channel in use, and when it was made by a renewal.
    current: Arc<std::sync::Mutex<(Channel, Option<std::time::Instant>)>>,
}

/// The least time between two renewals: a slow control plane whose calls time out does
/// not have every call throw away a warm connection.
const RENEW_AT_MOST_EVERY: Duration = Duration::from_secs(2);

impl ControlChannel {
    /// The channel in use.
    pub fn get(&self) -> Channel {
        match self.current.lock() {
            Ok(c) => c.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// Replaces the channel with one that connects anew (lazily), unless it was renewed
    /// less than [`RENEW_AT_MOST_EVERY`] ago; calls in flight on the old one finish on it.
    pub fn renew(&self) {
        let mut current = match self.current.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current
            .1
            .is_some_and(|at| at.elapsed() < RENEW_AT_MOST_EVERY)
        {
            return;
        }
        *current = (
            self.endpoint.connect_lazy(),
            Some(std::time::Instant::now()),
        );
    }
}

/// A channel to the control plane: connects lazily (the sidecar starts without it), and
/// keeps HTTP/2 pings going so a silent, vanished peer is noticed within seconds.
pub fn channel(
    url: &str,
    connect_timeout: Duration,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<ControlChannel, String> {
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
    Ok(ControlChannel {
        current: Arc::new(std::sync::Mutex::new((endpoint.connect_lazy(), None))),
        endpoint,
    })
}
