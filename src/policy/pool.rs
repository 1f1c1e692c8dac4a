//! The evaluation pool: policy evaluations run on dedicated threads, never on the tokio
//! workers that serve other Checks, audit, health and the control plane.
//!
//! A slow evaluation (a hostile input, a careless policy) then only holds one pool thread,
//! which the OS preempts like any other; past [`SLOW_AFTER`] the watchdog lowers that
//! thread's priority and puts a fresh thread in its place, so slow evaluations neither
//! take the CPU unrelated Checks need nor the pool's places. The pool is bounded
//! ([`PoolOptions::threads`] serving, as many again finishing slow evaluations, a queue of
//! [`QUEUE_BOUND`]); every evaluation is bounded by its deadline (`eval_timeout` from the
//! moment it was asked for, queue wait included): regorus's timer between evaluation
//! steps, the bounded builtins inside the ones that build by size ([`super::bounded`]).
//! The Check waits at most its deadline plus [`ANSWER_MARGIN`]: past it, it answers
//! DEADLINE_EXCEEDED even if the thread is still busy.
//!
//! The hop costs a channel send and a wake-up each way; see the README's benchmark
//! figures for what it costs per Check.
//!
//! A Check that gave up (its caller cancelled it, or its deadline passed) before a thread
//! took its evaluation is skipped, not evaluated. A panic inside an evaluation is caught
//! and answered as an error; the thread goes on.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::bounded::{self, Refusal};
use super::{CompiledBundle, Decision, EvalError};

/// How long past its deadline a Check still waits for its evaluation's answer before
/// answering DEADLINE_EXCEEDED itself. An evaluation stopped by the timer normally answers
/// within a millisecond of its deadline; the margin covers timer checks between steps and
/// one bounded builtin's work between two looks at the deadline.
pub const ANSWER_MARGIN: Duration = Duration::from_millis(5);

/// Evaluations waiting for a thread, at most; past it a Check is shed (RESOURCE_EXHAUSTED).
pub const QUEUE_BOUND: usize = 4096;

/// How the pool is sized.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    /// Evaluation threads (`policy.eval_threads`).
    pub threads: usize,
}

impl PoolOptions {
    /// The default: four threads per core, at least 8, at most 64. More threads than
    /// cores so that a few slow evaluations cannot hold them all: the OS shares the cores
    /// between the slow ones and the rest.
    pub fn default_threads() -> usize {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        (cores * 4).clamp(8, 64)
    }
}

/// One evaluation asked for.
struct Job {
    bundle: Arc<CompiledBundle>,
    input: regorus::Value,
    /// When the evaluation must be over (`eval_timeout` after it was asked for).
    deadline: Instant,
    reply: tokio::sync::oneshot::Sender<Result<Decision, EvalError>>,
}

/// The evaluation threads and their queue.
#[derive(Debug)]
pub struct EvalPool {
    queue: SyncSender<Job>,
    threads: usize,
    /// Tells the watchdog to stop when the pool goes.
    stopped: Arc<AtomicBool>,
}

/// What the watchdog knows of one evaluation thread.
#[derive(Debug, Default)]
struct Worker {
    /// The thread's OS id (Linux), for setpriority.
    tid: AtomicI64,
    /// When its current evaluation started, in µs since the pool started; 0: idle.
    busy_since_us: AtomicU64,
    /// Its priority was lowered: it leaves after its evaluation.
    demoted: AtomicBool,
    /// A fresh thread already took its place.
    replaced: AtomicBool,
    /// It left without a replacement; the watchdog starts one.
    exited: AtomicBool,
}

/// The threads' shared view: the job queue, the current workers, the pool's epoch.
#[derive(Debug)]
struct Shared {
    jobs: Mutex<Receiver<Job>>,
    workers: Mutex<Vec<Arc<Worker>>>,
    /// Evaluation threads alive, demoted ones still finishing included.
    live: AtomicUsize,
    /// At most this many threads alive: `threads` serving, the rest finishing slow
    /// evaluations at low priority.
    max_live: usize,
    epoch: Instant,
}

impl Shared {
    fn now_us(&self) -> u64 {
        (self.epoch.elapsed().as_micros() as u64).max(1)
    }
}

impl Drop for EvalPool {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

impl EvalPool {
    /// Starts `opts.threads` evaluation threads and their watchdog.
    pub fn start(opts: PoolOptions) -> std::io::Result<Self> {
        let threads = opts.threads.max(1);
        let (queue, jobs) = std::sync::mpsc::sync_channel(QUEUE_BOUND);
        let shared = Arc::new(Shared {
            jobs: Mutex::new(jobs),
            workers: Mutex::new(Vec::with_capacity(threads)),
            live: AtomicUsize::new(0),
            max_live: threads * 2,
            epoch: Instant::now(),
        });
        for i in 0..threads {
            let worker = spawn_worker(&shared, i)?;
            if let Ok(mut workers) = shared.workers.lock() {
                workers.push(worker);
            }
        }
        let stopped = Arc::new(AtomicBool::new(false));
        let watch = (shared, stopped.clone());
        std::thread::Builder::new()
            .name("aegis-eval-watchdog".into())
            .spawn(move || watchdog(&watch.0, &watch.1))?;
        Ok(Self {
            queue,
            threads,
            stopped,
        })
    }

    /// Evaluation threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Evaluates the decision rule of `bundle` for `input` on a pool thread; answers
    /// DEADLINE_EXCEEDED at the latest `eval_timeout` + [`ANSWER_MARGIN`] from now.
    pub async fn evaluate(
        &self,
        bundle: Arc<CompiledBundle>,
        input: regorus::Value,
    ) -> Result<Decision, EvalError> {
        let limit = bundle.eval_timeout;
        let deadline = Instant::now() + limit;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job {
            bundle,
            input,
            deadline,
            reply,
        };
        match self.queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(EvalError::Overloaded(QUEUE_BOUND)),
            Err(TrySendError::Disconnected(_)) => {
                return Err(EvalError::Failed {
                    query: String::new(),
                    message: "the evaluation threads have stopped".into(),
                });
            }
        }
        let answer_by = tokio::time::Instant::from_std(deadline + ANSWER_MARGIN);
        match tokio::time::timeout_at(answer_by, answer).await {
            Ok(Ok(result)) => result,
            // The thread dropped the job without answering: it found the deadline passed.
            Ok(Err(_)) | Err(_) => Err(EvalError::Timeout(limit)),
        }
    }
}

/// An evaluation running longer than this is slow: its thread's OS priority is lowered.
pub const SLOW_AFTER: Duration = Duration::from_millis(5);
/// The nice value a slow evaluation's thread gets (0 is the default, 19 the lowest).
const SLOW_NICE: i32 = 5;

fn spawn_worker(shared: &Arc<Shared>, i: usize) -> std::io::Result<Arc<Worker>> {
    let worker = Arc::new(Worker::default());
    let (for_thread, mine) = (shared.clone(), worker.clone());
    shared.live.fetch_add(1, Ordering::AcqRel);
    let spawned = std::thread::Builder::new()
        .name(format!("aegis-eval-{i}"))
        .stack_size(super::graph::REGO_STACK)
        .spawn(move || work(&for_thread, &mine));
    if let Err(e) = spawned {
        shared.live.fetch_sub(1, Ordering::AcqRel);
        return Err(e);
    }
    Ok(worker)
}

/// How often the watchdog looks while an evaluation runs, and while none does (an idle
/// sidecar wakes it 50 times a second, not 1,000).
const WATCH_BUSY: Duration = Duration::from_millis(1);
const WATCH_IDLE: Duration = Duration::from_millis(20);

/// Every millisecond while evaluations run: lowers the priority of the threads whose evaluation has run past
/// [`SLOW_AFTER`] and puts a fresh thread in their place.
///
/// A slow evaluation (a hostile input, a careless policy) then takes only the CPU that
/// the async workers, the audit writer and the other evaluations leave, and no longer
/// holds a place in the pool: unrelated Checks keep their pace even with more slow
/// evaluations than cores. Threads finishing slow evaluations are bounded (as many as
/// the pool's); past that, a demoted thread keeps its place until it is done. The OS
/// cannot be asked to give a thread its priority back (that needs privileges), so a
/// demoted thread leaves after its evaluation; fresh threads are started here, at the
/// default priority (a thread inherits its creator's).
fn watchdog(shared: &Arc<Shared>, stopped: &AtomicBool) {
    let slow_us = SLOW_AFTER.as_micros() as u64;
    let mut period = WATCH_BUSY;
    while !stopped.load(Ordering::Relaxed) {
        std::thread::sleep(period);
        let now = shared.now_us();
        let Ok(mut workers) = shared.workers.lock() else {
            return;
        };
        period = WATCH_IDLE;
        for (i, worker) in workers.iter_mut().enumerate() {
            let since = worker.busy_since_us.load(Ordering::Acquire);
            if since != 0 {
                period = WATCH_BUSY;
            }
            if since != 0
                && now.saturating_sub(since) > slow_us
                && !worker.demoted.swap(true, Ordering::AcqRel)
            {
                demote(worker.tid.load(Ordering::Acquire));
            }
            let leave = worker.exited.load(Ordering::Acquire)
                || (worker.demoted.load(Ordering::Acquire)
                    && shared.live.load(Ordering::Acquire) < shared.max_live);
            if leave {
                match spawn_worker(shared, i) {
                    Ok(fresh) => {
                        worker.replaced.store(true, Ordering::Release);
                        *worker = fresh;
                    }
                    Err(e) => crate::log!(error, "cannot start evaluation thread {i}: {e}"),
                }
            }
        }
    }
}

/// Lowers the OS priority of thread `tid` (Linux; elsewhere slow evaluations only share
/// the cores).
fn demote(tid: i64) {
    #[cfg(target_os = "linux")]
    if let Ok(tid) = libc::id_t::try_from(tid) {
        // SAFETY: setpriority only reads its integer arguments; on Linux, PRIO_PROCESS with
        // a thread id sets that thread's nice value. Raising a nice value needs no privilege.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, tid, SLOW_NICE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = tid;
}

fn current_tid() -> i64 {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no arguments and cannot fail.
        i64::from(unsafe { libc::gettid() })
    }
    #[cfg(not(target_os = "linux"))]
    0
}

/// A pool thread: takes jobs until the pool is dropped, or until its priority was lowered
/// during an evaluation.
fn work(shared: &Shared, me: &Worker) {
    me.tid.store(current_tid(), Ordering::Release);
    loop {
        let job = {
            let Ok(jobs) = shared.jobs.lock() else { break };
            match jobs.recv() {
                Ok(job) => job,
                Err(_) => break,
            }
        };
        // The Check gave up while this job waited (cancelled, or past its deadline).
        if job.reply.is_closed() {
            continue;
        }
        let Some(left) = job.deadline.checked_duration_since(Instant::now()) else {
            let _ = job
                .reply
                .send(Err(EvalError::Timeout(job.bundle.eval_timeout)));
            continue;
        };
        me.busy_since_us.store(shared.now_us(), Ordering::Release);
        let result = evaluate(&job.bundle, job.input, left);
        me.busy_since_us.store(0, Ordering::Release);
        // The Check may have stopped waiting; its answer is then dropped.
        let _ = job.reply.send(result);
        if me.demoted.load(Ordering::Acquire) {
            break;
        }
    }
    shared.live.fetch_sub(1, Ordering::AcqRel);
    me.exited.store(true, Ordering::Release);
}

/// One evaluation with `left` as its time limit, panics caught, bounded builtins' refusals
/// taking precedence over whatever the policy made of them.
fn evaluate(
    bundle: &CompiledBundle,
    input: regorus::Value,
    left: Duration,
) -> Result<Decision, EvalError> {
    let (result, refused) = bounded::with_deadline(left, || {
        std::panic::catch_unwind(AssertUnwindSafe(|| bundle.evaluate_within(input, left)))
    });
    match (refused, result) {
        (Some(Refusal::Deadline(_)), _) => Err(EvalError::Timeout(bundle.eval_timeout)),
        (Some(Refusal::TooLarge(what)), _) => Err(EvalError::Bounded(what)),
        (None, Ok(result)) => result,
        (None, Err(panic)) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            crate::log!(error, "policy evaluation panicked: {message}");
            Err(EvalError::Panicked(message))
        }
    }
}
