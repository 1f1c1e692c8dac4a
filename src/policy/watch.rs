//! Hot reload: the bundle's files are watched (polled for a change of size, modification
//! time or file set; no inotify dependency, works on every file system including
//! Kubernetes ConfigMap symlink swaps) and SIGHUP forces a reload. Each reload is atomic;
//! a broken bundle is logged with the file and line at fault and the last good one serves.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Policy;

/// A cheap fingerprint of the files under `path`: every file's path, size and mtime.
pub fn fingerprint(path: &Path) -> Vec<(String, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&p) else {
            out.push((p.display().to_string(), u64::MAX, None));
            continue;
        };
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
            }
        } else {
            out.push((p.display().to_string(), meta.len(), meta.modified().ok()));
        }
    }
    out.sort();
    out
}

/// A bundle the watcher has just installed.
pub type Reloaded = (Arc<super::CompiledBundle>, super::BundleFiles);

/// Runs until `shutdown` fires: reloads on a change seen by polling every `interval`, and
/// on SIGHUP. Each bundle installed is also sent to `installed` (the control plane records
/// it as an activation).
pub async fn run(
    policy: Arc<Policy>,
    interval: Duration,
    installed: Option<tokio::sync::mpsc::UnboundedSender<Reloaded>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            crate::log!(warn, "SIGHUP reload unavailable: {e}");
            None
        }
    };
    let path = policy.source().path().map(Path::to_path_buf);
    let mut last = path.as_deref().map(fingerprint);
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(50)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = ticker.tick() => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = shutdown.changed() => return,
        };
        if !forced {
            let Some(p) = path.as_deref() else { continue };
            let now = fingerprint(p);
            if last.as_ref() == Some(&now) {
                continue;
            }
            last = Some(now);
        }
        let p = policy.clone();
        match tokio::task::spawn_blocking(move || p.reload()).await {
            Ok(Ok((compiled, files))) => {
                crate::log!(
                    info,
                    "policy bundle reloaded from {}: revision {}, reads {}",
                    policy.source(),
                    compiled.revision(),
                    compiled.reads().describe()
                );
                if let Some(tx) = &installed {
                    let _ = tx.send((compiled, files));
                }
            }
            Ok(Err(e)) => crate::log!(
                error,
                "policy bundle reload refused, last good bundle keeps serving: {e}"
            ),
            Err(e) => crate::log!(error, "policy bundle reload task failed: {e}"),
        }
    }
}
