//! The span queue: finished spans wait here for the export thread, which sends them to the
//! collector in batches.
//!
//! The SDK's own batch processor does the same with two differences that matter to a
//! sidecar: its queue is a ring allocated whole at start-up (each slot holds a span inline,
//! ~2.8 MiB resident for the default 8,192 spans, collector or not), and the spans it drops
//! when the queue is full are counted nowhere Aegis can read (its internal log is compiled
//! out in Aegis's build). Here the queue holds what is waiting (its buffers shrink back
//! after a backlog), and what was exported, failed and dropped is counted for
//! `/metrics` ([`SpanStats`]): an operator sees the collector fall behind before the SIEM
//! misses decisions.
//!
//! A Check only ever takes the queue's lock for a push: a full queue drops the span, never
//! waits. The export thread swaps the waiting spans out under the lock and exports them
//! outside it, at most `batch` per export, every `delay` or as soon as a batch is waiting.
//! Spans being exported still count against the capacity, so at most `capacity` spans are
//! held at any time.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

/// How the queue is sized and paced.
#[derive(Debug, Clone, Copy)]
pub struct QueueOptions {
    /// Spans held at most (`otlp.queue_size`); past it new spans are dropped.
    pub capacity: usize,
    /// Spans per export at most.
    pub batch: usize,
    /// How long a span waits at most before it is exported.
    pub delay: Duration,
}

/// A [`SpanProcessor`] feeding `exporter` from a bounded queue, counted in [`SpanStats`].
#[derive(Debug)]
pub struct SpanQueue {
    shared: Arc<SpanStats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The queue's state, shared by the Checks, the export thread and `/metrics`: what it
/// counted since start-up, and what it holds now ([`SpanStats::held`]).
#[derive(Debug)]
pub struct SpanStats {
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans in exports that failed (collector down, refused, past the export timeout).
    pub failed: AtomicU64,
    /// Spans dropped because the queue was full, or ended after the shutdown began.
    pub dropped: AtomicU64,
    state: Mutex<State>,
    /// Wakes the export thread: a batch is waiting, a flush or the shutdown was asked.
    work: Condvar,
    /// Wakes the callers of flush and shutdown: an export round ended.
    rounds: Condvar,
    opts: QueueOptions,
}

#[derive(Debug, Default)]
struct State {
    waiting: VecDeque<SpanData>,
    /// Spans the export thread took and has not exported yet.
    exporting: usize,
    /// Export rounds begun and ended; a flush waits for a round begun after it asked.
    rounds_begun: u64,
    rounds_ended: u64,
    /// A flush was asked: the thread exports without waiting for a full batch.
    flush: bool,
    /// The resource for the exporter (the provider sets it once it is built).
    resource: Option<Resource>,
    shutdown: bool,
    /// The export thread has left.
    stopped: bool,
}

impl SpanQueue {
    /// Starts the export thread. Each export runs to its end on `runtime` (the exporter's
    /// futures need the runtime its channel was built on).
    pub fn start<E>(
        exporter: E,
        opts: QueueOptions,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<Self>
    where
        E: SpanExporter + 'static,
    {
        let opts = QueueOptions {
            capacity: opts.capacity.max(1),
            batch: opts.batch.clamp(1, opts.capacity.max(1)),
            delay: opts.delay,
        };
        let shared = Arc::new(SpanStats {
            exported: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            rounds: Condvar::new(),
            opts,
        });
        let for_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("aegis-otlp-export".into())
            .spawn(move || export_loop(&for_thread, exporter, &runtime))?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// What the queue counted and holds, for `/metrics`.
    pub fn stats(&self) -> Arc<SpanStats> {
        self.shared.clone()
    }

    /// Asks the export thread for a round (`ask`), then waits until `done` holds or the
    /// thread stopped, at most `timeout`.
    fn ask_and_wait(
        &self,
        ask: impl FnOnce(&mut State),
        done: impl Fn(&State, u64) -> bool,
        timeout: Duration,
    ) -> OTelSdkResult {
        let until = Instant::now().checked_add(timeout);
        let mut st = self.shared.lock();
        ask(&mut st);
        // The round that takes what is waiting now begins after the one under way.
        let round = st.rounds_begun + 1;
        self.shared.work.notify_one();
        while !st.stopped && !done(&st, round) {
            // No `until`: a timeout too long to add to now, waited out a day at a time.
            let left = match until {
                Some(until) => match until.checked_duration_since(Instant::now()) {
                    Some(left) => left,
                    None => return Err(OTelSdkError::Timeout(timeout)),
                },
                None => Duration::from_secs(86_400),
            };
            st = match self.shared.rounds.wait_timeout(st, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        Ok(())
    }
}

impl SpanStats {
    /// Spans held now: waiting, or being exported.
    pub fn held(&self) -> u64 {
        let st = self.lock();
        (st.waiting.len() + st.exporting) as u64
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays whole even if a holder panicked: every change is one field.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SpanProcessor for SpanQueue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let mut st = self.shared.lock();
        if st.shutdown || st.waiting.len() + st.exporting >= self.shared.opts.capacity {
            drop(st);
            self.shared.dropped.fetch_add(1, Relaxed);
            return;
        }
        st.waiting.push_back(span);
        let ready = st.waiting.len() == self.shared.opts.batch;
        drop(st);
        if ready {
            self.shared.work.notify_one();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask_and_wait(
            |st| st.flush = true,
            |st, round| st.rounds_ended >= round,
            Duration::from_secs(5),
        )
    }

    /// Exports what is waiting, shuts the exporter down and stops the thread.
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let result = self.ask_and_wait(|st| st.shutdown = true, |_, _| false, timeout);
        if self.shared.lock().stopped
            && let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take()
        {
            let _ = thread.join();
        }
        result
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.shared.lock().resource = Some(resource.clone());
        self.shared.work.notify_one();
    }
}

impl Drop for SpanQueue {
    /// A provider dropped without a shutdown: the thread exports what is waiting and leaves.
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_one();
    }
}

/// How often dropped or failed spans are logged at most (each log line gives the counts).
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Marks the export thread stopped when it leaves, by returning or by a panic, so that
/// flush and shutdown never wait on a thread that is gone.
struct Stopped<'a>(&'a SpanStats);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.lock().stopped = true;
        self.0.rounds.notify_all();
    }
}

fn export_loop<E: SpanExporter>(
    shared: &SpanStats,
    mut exporter: E,
    runtime: &tokio::runtime::Handle,
) {
    let _stopped = Stopped(shared);
    let opts = shared.opts;
    let mut taken: VecDeque<SpanData> = VecDeque::new();
    let mut last_round = Instant::now();
    let (mut logged_at, mut logged_dropped, mut logged_failed) = (None::<Instant>, 0, 0);
    loop {
        // Wait for a batch, the delay, a flush or the shutdown; then take what is waiting.
        let (round, shutdown) = {
            let mut st = shared.lock();
            loop {
                if let Some(resource) = st.resource.take() {
                    drop(st);
                    exporter.set_resource(&resource);
                    st = shared.lock();
                    continue;
                }
                let due = last_round.elapsed() >= opts.delay;
                if st.shutdown || st.flush || due || st.waiting.len() >= opts.batch {
                    break;
                }
                let left = opts.delay.saturating_sub(last_round.elapsed());
                st = match shared.work.wait_timeout(st, left) {
                    Ok((guard, _)) => guard,
                    Err(poisoned) => poisoned.into_inner().0,
                };
            }
            std::mem::swap(&mut st.waiting, &mut taken);
            st.exporting = taken.len();
            st.flush = false;
            st.rounds_begun += 1;
            (st.rounds_begun, st.shutdown)
        };
        last_round = Instant::now();
        while !taken.is_empty() {
            let n = taken.len().min(opts.batch);
            let batch: Vec<SpanData> = taken.drain(..n).collect();
            // A runtime shutting down under the export panics inside it: a failed export.
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                runtime.block_on(exporter.export(batch))
            }));
            match result {
                Ok(Ok(())) => shared.exported.fetch_add(n as u64, Relaxed),
                Ok(Err(_)) | Err(_) => shared.failed.fetch_add(n as u64, Relaxed),
            };
            shared.lock().exporting = taken.len();
        }
        // A backlog (a collector that was down) grew this buffer; it is not kept for good.
        // Both buffers pass here in turn, so neither stays larger than two batches.
        taken.shrink_to(2 * opts.batch);
        let (dropped, failed) = (shared.dropped.load(Relaxed), shared.failed.load(Relaxed));
        if (dropped, failed) != (logged_dropped, logged_failed)
            && logged_at.is_none_or(|at| at.elapsed() >= LOG_EVERY)
        {
            crate::log!(
                warn,
                "span export: {} spans dropped (the queue of otlp.queue_size = {} was full) and {} in failed exports since the last report; each decision is still in the audit log",
                dropped - logged_dropped,
                opts.capacity,
                failed - logged_failed
            );
            (logged_at, logged_dropped, logged_failed) = (Some(Instant::now()), dropped, failed);
        }
        shared.lock().rounds_ended = round;
        if shutdown {
            let _ = std::panic::catch_unwind(AssertUnwindSafe(|| exporter.shutdown()));
            return; // `_stopped` marks the thread stopped and wakes the waiters.
        }
        shared.rounds.notify_all();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    /// An exporter that records what it is given and, while `stall` is set, holds each
    /// export until it is cleared (a collector that does not answer).
    #[derive(Debug, Clone, Default)]
    struct Recorder {
        got: Arc<Mutex<Vec<String>>>,
        /// Exports begun.
        entered: Arc<AtomicU64>,
        stall: Arc<(Mutex<bool>, Condvar)>,
        resource_name: Arc<Mutex<Option<String>>>,
        /// The resource's service.name as each export saw it.
        exported_under: Arc<Mutex<Vec<Option<String>>>>,
        /// Exports fail (a collector that refuses).
        refuse: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Recorder {
        fn stall(&self, on: bool) {
            *self.stall.0.lock().unwrap() = on;
            self.stall.1.notify_all();
        }
        fn names(&self) -> Vec<String> {
            self.got.lock().unwrap().clone()
        }
    }

    impl SpanExporter for Recorder {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.entered.fetch_add(1, Relaxed);
            let mut stalled = self.stall.0.lock().unwrap();
            while *stalled {
                stalled = self.stall.1.wait(stalled).unwrap();
            }
            drop(stalled);
            let name = self.resource_name.lock().unwrap().clone();
            self.exported_under.lock().unwrap().push(name);
            if self.refuse.load(Relaxed) {
                return Err(OTelSdkError::InternalFailure("refused".into()));
            }
            let mut got = self.got.lock().unwrap();
            got.extend(batch.into_iter().map(|s| s.name.into_owned()));
            Ok(())
        }

        fn set_resource(&mut self, resource: &Resource) {
            *self.resource_name.lock().unwrap() = resource
                .get(&opentelemetry::Key::new("service.name"))
                .map(|v| v.to_string());
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn provider(
        rec: &Recorder,
        capacity: usize,
        rt: &tokio::runtime::Runtime,
    ) -> (SdkTracerProvider, Arc<SpanStats>) {
        let queue = SpanQueue::start(
            rec.clone(),
            QueueOptions {
                capacity,
                batch: 4,
                delay: Duration::from_millis(50),
            },
            rt.handle().clone(),
        )
        .unwrap();
        let stats = queue.stats();
        let provider = SdkTracerProvider::builder()
            .with_resource(
                Resource::builder()
                    .with_service_name("svc-under-test")
                    .build(),
            )
            .with_span_processor(queue)
            .build();
        (provider, stats)
    }

    fn end_spans(provider: &SdkTracerProvider, n: usize) {
        let tracer = provider.tracer("t");
        for i in 0..n {
            drop(tracer.start(format!("s{i}")));
        }
    }

    #[test]
    fn every_span_is_exported_in_order_and_counted() {
        let rt = runtime();
        let rec = Recorder::default();
        let (provider, stats) = provider(&rec, 100, &rt);
        end_spans(&provider, 10);
        provider.force_flush().unwrap();
        let want: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
        assert_eq!(rec.names(), want);
        assert_eq!(stats.exported.load(Relaxed), 10);
        assert_eq!(stats.held(), 0);
        assert_eq!(stats.dropped.load(Relaxed), 0);
        // The provider's resource reached the exporter before its first export.
        let under = rec.exported_under.lock().unwrap().clone();
        assert!(!under.is_empty());
        assert!(
            under.iter().all(|n| n.as_deref() == Some("svc-under-test")),
            "{under:?}"
        );
        provider.shutdown().unwrap();
    }

    #[test]
    fn spans_past_the_capacity_are_dropped_and_counted_spans_in_export_included() {
        let rt = runtime();
        let rec = Recorder::default();
        rec.stall(true);
        let (provider, stats) = provider(&rec, 8, &rt);
        // 4 fill a batch: the thread takes them and stalls in the export.
        end_spans(&provider, 4);
        let took = Instant::now();
        while rec.entered.load(Relaxed) == 0 {
            assert!(took.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        // 4 being exported + 4 waiting reach the capacity of 8: the next 6 are dropped.
        end_spans(&provider, 10);
        assert_eq!(stats.dropped.load(Relaxed), 6);
        assert_eq!(stats.held(), 8);
        rec.stall(false);
        provider.force_flush().unwrap();
        assert_eq!(rec.names().len(), 8);
        assert_eq!(stats.exported.load(Relaxed), 8);
        assert_eq!(stats.held(), 0);
        provider.shutdown().unwrap();
    }

    #[test]
    fn a_backlog_does_not_keep_its_memory() {
        let rt = runtime();
        let rec = Recorder::default();
        rec.stall(true);
        // Batches of 4; a collector that stalls while 1,000 spans pile up.
        let (provider, stats) = provider(&rec, 1000, &rt);
        end_spans(&provider, 1004);
        assert_eq!(stats.held(), 1000);
        // Between them the two buffers grew to the backlog (the export thread may have
        // taken any part of it before the collector stalled it).
        let grown = {
            let st = stats.lock();
            st.waiting.capacity() + st.exporting
        };
        assert!(grown >= 990, "{grown}");
        rec.stall(false);
        // Rounds enough for each of the two buffers to be exported from and shrunk.
        for _ in 0..3 {
            provider.force_flush().unwrap();
        }
        assert_eq!(stats.exported.load(Relaxed), 1000);
        assert_eq!(stats.dropped.load(Relaxed), 4);
        let cap = stats.lock().waiting.capacity();
        assert!(cap <= 8, "the waiting buffer kept {cap} slots");
        provider.force_flush().unwrap();
        let cap = stats.lock().waiting.capacity();
        assert!(cap <= 8, "the other buffer kept {cap} slots");
        provider.shutdown().unwrap();
    }

    #[test]
    fn failed_exports_are_counted_and_a_stalled_one_bounds_the_shutdown() {
        let rt = runtime();
        let rec = Recorder::default();
        rec.refuse.store(true, Relaxed);
        let (provider, stats) = provider(&rec, 100, &rt);
        end_spans(&provider, 6);
        provider.force_flush().unwrap();
        assert_eq!(stats.failed.load(Relaxed), 6);
        assert_eq!(stats.exported.load(Relaxed), 0);
        assert_eq!(stats.held(), 0);

        rec.stall(true);
        end_spans(&provider, 2);
        let asked = Instant::now();
        let r = provider.shutdown_with_timeout(Duration::from_millis(200));
        let took = asked.elapsed();
        assert!(
            r.is_err(),
            "a stalled export cannot finish the shutdown: {r:?}"
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
        rec.stall(false);
    }

    #[test]
    fn shutdown_exports_what_waits() {
        let rt = runtime();
        let rec = Recorder::default();
        let (provider, stats) = provider(&rec, 100, &rt);
        end_spans(&provider, 3);
        provider.shutdown().unwrap();
        assert_eq!(rec.names(), ["s0", "s1", "s2"]);
        assert_eq!(stats.exported.load(Relaxed), 3);
    }
}
