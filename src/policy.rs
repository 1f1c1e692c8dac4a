//! Policy: bundles compiled once, evaluated per Check without re-parsing.
//!
//! A [`CompiledBundle`] holds a prepared regorus engine (modules parsed, data merged, one
//! warm-up evaluation done). Checks are evaluated by regorus's RVM: the decision rule
//! compiled once to a program, run by a pool of VMs (evaluation takes `&mut self`, so each
//! concurrent evaluation takes a VM from the pool and puts it back). Measured on the default
//! bundle and the same input, the RVM took ~18 µs where the interpreter took ~64 µs. A bundle the RVM cannot
//! compile (it has no `walk`, for one) is served by the interpreter instead, with a log
//! line saying so; the interpreter also runs `aegis policy test`, and a differential test
//! holds the two to the same decisions. Both run under regorus's execution timer, with
//! the builtins that build by a size from the input replaced by bounded versions
//! ([`bounded`]); Checks evaluate on the evaluation pool ([`pool`]), off the async workers.
//!
//! [`Policy`] is the live slot: a reload compiles the new bundle off to the side and swaps
//! it in atomically; a broken bundle is refused and the last good one keeps serving.

mod bounded;
pub mod build;
mod bundle;
mod decision;
pub mod graph;
pub mod pool;
pub mod reads;
pub mod routes;
pub mod signing;
pub mod testing;
pub mod watch;

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use regorus::Engine;
use regorus::rvm::program::Program;
use regorus::rvm::vm::RegoVM;
use regorus::utils::limits::ExecutionTimerConfig;

pub use bounded::{MAX_ELEMENTS, MAX_STRING_BYTES};
pub use bundle::{BundleError, BundleFiles, BundleSource, ParsedBundle};
pub use decision::{Decision, DecisionError, Verdict};

/// A failure to evaluate the policy for one request. Aegis's own failure: answered as a
/// gRPC error so Envoy's `failure_mode_allow`/`status_on_error` decide.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// regorus failed to evaluate the query.
    #[error("policy evaluation of {query} failed: {message}")]
    Failed {
        /// The rule evaluated.
        query: String,
        /// regorus's message.
        message: String,
    },
    /// The evaluation ran past its limit (the limit).
    #[error("policy evaluation exceeded its {0:?} time limit")]
    Timeout(Duration),
    /// A bounded builtin refused to build an output past its bound.
    #[error("policy evaluation refused: {0}")]
    Bounded(String),
    /// regorus panicked inside the evaluation (the panic's message), caught.
    #[error("policy evaluation panicked: {0}")]
    Panicked(String),
    /// The evaluation pool's queue is full (the Checks waiting).
    #[error("policy evaluation queue full ({0} waiting)")]
    Overloaded(usize),
    /// The rule's result is not a decision document.
    #[error(transparent)]
    Decision(#[from] DecisionError),
}

/// How bundles are compiled and evaluated.
#[derive(Debug, Clone)]
pub struct PolicyOptions {
    /// The rule that yields the decision, e.g. `data.aegis.authz.decision`.
    pub query: String,
    /// Wall-clock limit of one evaluation.
    pub eval_timeout: Duration,
    /// Keys a bundle's `.signatures.json` must verify with (`policy.verification_key`);
    /// empty: signatures are not checked.
    pub verification_keys: Vec<ed25519_dalek::VerifyingKey>,
    /// Threads of the evaluation pool (`policy.eval_threads`); 0: the default
    /// ([`pool::PoolOptions::default_threads`]).
    pub eval_threads: usize,
}

impl PolicyOptions {
    /// With verification keys configured, refuses a bundle whose signature does not
    /// verify or does not cover its files exactly; without, accepts every bundle.
    pub fn verify(&self, files: &BundleFiles) -> Result<(), BundleError> {
        if self.verification_keys.is_empty() {
            return Ok(());
        }
        signing::verify(files, &self.verification_keys)
    }
}

/// A compiled bundle and its evaluator pool.
pub struct CompiledBundle {
    revision: String,
    digest: String,
    query: String,
    eval_timeout: Duration,
    /// The prepared interpreter: the fallback evaluator and the test runner.
    template: Engine,
    pool: Mutex<Vec<Engine>>,
    /// The RVM program of the decision rule, when the RVM can compile the bundle.
    vm: Option<VmParts>,
    /// The route catalogue (`data.aegis.routes`).
    routes: routes::Catalogue,
    /// The parts of the input document the bundle can read: all a Check builds.
    reads: reads::Reads,
}

/// What a new RVM is made of, and the pool of ready ones.
struct VmParts {
    compiled: regorus::CompiledPolicy,
    program: Arc<Program>,
    data: regorus::Value,
    timer: ExecutionTimerConfig,
    pool: Mutex<Vec<RegoVM>>,
}

/// Which evaluator serves Checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evaluator {
    /// regorus's RVM: the decision rule compiled to a program (faster).
    Rvm,
    /// regorus's interpreter: for bundles the RVM cannot compile.
    Interpreter,
}

/// The engines hold what their last evaluation computed, which a bundle inside the bounds of
/// [`graph::check`] can still make a few thousand levels deep, and regorus frees values
/// recursively. The last reference to a bundle goes wherever a reload or a Check lets go of
/// it: a tokio thread with 2 MiB of stack. So the engines are freed on a thread with
/// [`graph::REGO_STACK`].
impl Drop for CompiledBundle {
    fn drop(&mut self) {
        let template = std::mem::replace(&mut self.template, Engine::new());
        let pool = std::mem::take(self.pool.get_mut().unwrap_or_else(|p| p.into_inner()));
        let vm = self.vm.take();
        if let Err(e) = graph::on_rego_stack(move || drop((template, pool, vm))) {
            crate::log!(
                error,
                "cannot free a policy bundle on a thread of its own: {e}"
            );
        }
    }
}

impl std::fmt::Debug for CompiledBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledBundle")
            .field("revision", &self.revision)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

// === impl CompiledBundle ===

impl CompiledBundle {
    /// Reads and compiles the bundle at `source`.
    pub fn load(source: &BundleSource, opts: &PolicyOptions) -> Result<Self, BundleError> {
        Self::compile(BundleFiles::read(source)?.parse()?, opts)
    }

    /// Compiles a parsed bundle: modules, data, the execution timer, one warm-up evaluation,
    /// and the RVM program of the decision rule.
    pub fn compile(parsed: ParsedBundle, opts: &PolicyOptions) -> Result<Self, BundleError> {
        Self::compile_with(parsed, opts, true)
    }

    /// [`Self::compile`] for the interpreter only (`aegis policy test`: test rules use
    /// `with`, which the RVM does not compile, and the interpreter is the reference).
    pub fn compile_interpreter(
        parsed: ParsedBundle,
        opts: &PolicyOptions,
    ) -> Result<Self, BundleError> {
        Self::compile_with(parsed, opts, false)
    }

    /// Compiles on a thread of its own with [`graph::REGO_STACK`] of stack: the warm-up
    /// evaluations run here, and may go as deep as [`graph::check`] allows, whatever thread
    /// asked (a tokio worker or blocking thread has 2 MiB).
    fn compile_with(
        parsed: ParsedBundle,
        opts: &PolicyOptions,
        with_vm: bool,
    ) -> Result<Self, BundleError> {
        graph::on_rego_stack(move || Self::compile_here(parsed, opts, with_vm)).unwrap_or_else(
            |e| {
                Err(BundleError::Compile(format!(
                    "compiling the bundle on a thread of its own: {e}"
                )))
            },
        )
    }

    fn compile_here(
        parsed: ParsedBundle,
        opts: &PolicyOptions,
        with_vm: bool,
    ) -> Result<Self, BundleError> {
        let mut engine = Engine::new();
        engine.set_rego_v0(parsed.rego_v0);
        engine.set_strict_builtin_errors(false);
        bounded::register(&mut engine).map_err(|e| BundleError::Compile(e.to_string()))?;
        for (path, text) in parsed.modules {
            engine
                .add_policy(path, text)
                .map_err(|e| BundleError::Compile(e.to_string()))?;
        }
        // Before anything evaluates: regorus would recurse without bound.
        let reads = graph::check(engine.get_modules()).map_err(BundleError::Compile)?;
        for (dir, value) in parsed.data {
            let mut nested = value;
            for key in dir.iter().rev() {
                let mut map = std::collections::BTreeMap::new();
                map.insert(regorus::Value::from(key.as_str()), nested);
                nested = regorus::Value::from(map);
            }
            let at = if dir.is_empty() {
                "data.json".to_owned()
            } else {
                format!("{}/data.json", dir.join("/"))
            };
            engine.add_data(nested).map_err(|e| BundleError::Invalid {
                path: at,
                message: e.to_string(),
            })?;
        }
        let timer = ExecutionTimerConfig {
            limit: opts.eval_timeout,
            check_interval: CHECK_INTERVAL,
        };
        engine.set_execution_timer_config(timer);
        let routes = routes::Catalogue::from_data(&engine.get_data()).map_err(|message| {
            BundleError::Invalid {
                path: "data.aegis.routes".into(),
                message,
            }
        })?;
        // Warm up: the first evaluation prepares the engine (rule indexes, scheduling); the
        // clones made from it then start prepared. It also proves the query names a rule.
        engine.set_input(regorus::Value::new_object());
        engine
            .eval_rule(opts.query.clone())
            .map_err(|e| BundleError::Compile(format!("query {}: {e}", opts.query)))?;
        let vm = match with_vm.then(|| compile_vm(&engine, &opts.query, timer)) {
            None => None,
            Some(Ok(parts)) => Some(parts),
            Some(Err(e)) => {
                crate::log!(
                    warn,
                    "the RVM cannot compile this bundle ({e}); evaluating with the interpreter"
                );
                None
            }
        };
        Ok(Self {
            revision: parsed.revision,
            digest: parsed.digest,
            query: opts.query.clone(),
            eval_timeout: opts.eval_timeout,
            template: engine,
            pool: Mutex::new(Vec::new()),
            vm,
            routes,
            reads,
        })
    }

    /// The evaluator serving Checks for this bundle.
    pub fn evaluator(&self) -> Evaluator {
        if self.vm.is_some() {
            Evaluator::Rvm
        } else {
            Evaluator::Interpreter
        }
    }

    /// The bundle revision: the `policy_version` of every decision.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// `sha256:` digest of the bundle's files.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The parts of the input document the bundle can read (see [`reads`]).
    pub fn reads(&self) -> &reads::Reads {
        &self.reads
    }

    /// The bundle's route catalogue.
    pub fn routes(&self) -> &routes::Catalogue {
        &self.routes
    }

    /// The bundle's data document (a copy).
    pub fn data(&self) -> regorus::Value {
        self.template.get_data()
    }

    /// Evaluates the decision rule for `input` on the calling thread (Checks go through
    /// [`Policy::evaluate`], which runs it on the evaluation pool).
    pub fn evaluate(&self, input: regorus::Value) -> Result<Decision, EvalError> {
        self.evaluate_within(input, self.eval_timeout)
    }

    /// [`Self::evaluate`] with `limit` as its time limit (what is left of a Check's
    /// `eval_timeout` once a pool thread takes it).
    pub fn evaluate_within(
        &self,
        input: regorus::Value,
        limit: Duration,
    ) -> Result<Decision, EvalError> {
        let value = self.evaluate_raw_within(input, limit)?;
        Ok(Decision::from_value(&value)?)
    }

    /// Evaluates the decision rule and returns its raw value.
    pub fn evaluate_raw(&self, input: regorus::Value) -> Result<regorus::Value, EvalError> {
        self.evaluate_raw_within(input, self.eval_timeout)
    }

    fn evaluate_raw_within(
        &self,
        input: regorus::Value,
        limit: Duration,
    ) -> Result<regorus::Value, EvalError> {
        let started = std::time::Instant::now();
        let timer = ExecutionTimerConfig {
            limit,
            check_interval: CHECK_INTERVAL,
        };
        let result = match &self.vm {
            Some(vm) => vm.evaluate(&self.query, input, timer),
            None => self.interpret_with(input, timer),
        };
        result.map_err(|e| {
            let message = e.to_string();
            if started.elapsed() >= limit || message.contains("time limit") {
                EvalError::Timeout(self.eval_timeout)
            } else {
                EvalError::Failed {
                    query: self.query.clone(),
                    message,
                }
            }
        })
    }

    /// Evaluates the decision rule with the interpreter (the reference semantics).
    pub fn interpret(&self, input: regorus::Value) -> anyhow::Result<regorus::Value> {
        let timer = ExecutionTimerConfig {
            limit: self.eval_timeout,
            check_interval: CHECK_INTERVAL,
        };
        self.interpret_with(input, timer)
    }

    fn interpret_with(
        &self,
        input: regorus::Value,
        timer: ExecutionTimerConfig,
    ) -> anyhow::Result<regorus::Value> {
        let mut engine = self.checkout();
        engine.set_execution_timer_config(timer);
        engine.set_input(input);
        let result = engine.eval_rule(self.query.clone());
        self.checkin(engine);
        result
    }

    /// Evaluates any rule path against `input` (used by `aegis policy test`).
    pub fn eval_rule(&self, rule: &str, input: regorus::Value) -> Result<regorus::Value, String> {
        let mut engine = self.checkout();
        engine.set_input(input);
        let result = engine.eval_rule(rule.to_owned()).map_err(|e| e.to_string());
        self.checkin(engine);
        result
    }

    fn checkout(&self) -> Engine {
        let pooled = self.pool.lock().ok().and_then(|mut p| p.pop());
        pooled.unwrap_or_else(|| self.template.clone())
    }

    fn checkin(&self, engine: Engine) {
        if let Ok(mut pool) = self.pool.lock() {
            // More engines than concurrent evaluations are never needed; keep a few spare.
            if pool.len() < 64 {
                pool.push(engine);
            }
        }
    }
}

/// Evaluation steps between two looks at regorus's execution timer.
const CHECK_INTERVAL: NonZeroU32 = match NonZeroU32::new(64) {
    Some(n) => n,
    None => NonZeroU32::MIN,
};

fn compile_vm(
    engine: &Engine,
    query: &str,
    timer: ExecutionTimerConfig,
) -> anyhow::Result<VmParts> {
    let compiled = engine.clone().compile_with_entrypoint(&Arc::from(query))?;
    let program =
        regorus::languages::rego::compiler::Compiler::compile_from_policy(&compiled, &[query])?;
    // The RVM calls builtins through the program's table: the bounded ones go in there.
    let mut program = Arc::unwrap_or_clone(program);
    bounded::patch_program(&mut program);
    let program = Arc::new(program);
    let parts = VmParts {
        compiled,
        program,
        data: engine.get_data(),
        timer,
        pool: Mutex::new(Vec::new()),
    };
    // Prove a VM can be made and run before this bundle is accepted.
    let mut vm = parts.new_vm()?;
    vm.set_input(regorus::Value::new_object());
    vm.execute_entry_point_by_name(query)?;
    parts.checkin(vm);
    Ok(parts)
}

// === impl VmParts ===

impl VmParts {
    fn new_vm(&self) -> anyhow::Result<RegoVM> {
        let mut vm = RegoVM::new_with_policy(self.compiled.clone());
        vm.load_program(self.program.clone());
        vm.set_data(self.data.clone())?;
        vm.set_execution_timer_config(Some(self.timer));
        // The RVM's own default budget (25,000 VM instructions) would fail large but sound
        // policies; the wall-clock limit (`policy.eval_timeout_ms`) is the bound Aegis
        // documents, so the instruction cap is set far out of its way.
        vm.set_max_instructions(usize::MAX / 2);
        Ok(vm)
    }

    fn evaluate(
        &self,
        query: &str,
        input: regorus::Value,
        timer: ExecutionTimerConfig,
    ) -> anyhow::Result<regorus::Value> {
        let pooled = self.pool.lock().ok().and_then(|mut p| p.pop());
        let mut vm = match pooled {
            Some(vm) => vm,
            None => self.new_vm()?,
        };
        vm.set_execution_timer_config(Some(timer));
        vm.set_input(input);
        let result = vm.execute_entry_point_by_name(query);
        // A VM whose run failed is dropped, not reused: no state of a failed run lingers.
        if result.is_ok() {
            self.checkin(vm);
        }
        Ok(result?)
    }

    fn checkin(&self, vm: RegoVM) {
        if let Ok(mut pool) = self.pool.lock()
            && pool.len() < 64
        {
            pool.push(vm);
        }
    }
}

/// The live policy: the current compiled bundle, swapped atomically on reload.
#[derive(Debug)]
pub struct Policy {
    source: BundleSource,
    opts: PolicyOptions,
    current: RwLock<Arc<CompiledBundle>>,
    /// Evaluations that failed in a row (error or timeout); reset by a success or a swap.
    failures_in_a_row: std::sync::atomic::AtomicU64,
    /// Reloads refused since start (unreadable, broken or unverifiable bundles).
    reload_failures: std::sync::atomic::AtomicU64,
    /// The evaluation threads, started by the first Check.
    pool: OnceLock<Result<pool::EvalPool, String>>,
}

/// Failed evaluations in a row after which the policy counts as unusable for readiness:
/// one bad input must not flip health, a bundle that fails on everything must.
pub const UNUSABLE_AFTER_FAILURES: u64 = 20;

// === impl Policy ===

impl Policy {
    /// Loads and compiles the bundle; an error here means the process must not start.
    pub fn load(source: BundleSource, opts: PolicyOptions) -> Result<Self, BundleError> {
        Self::load_with_files(source, opts).map(|(p, _)| p)
    }

    /// [`Self::load`], also returning the bundle's files (the control plane stores them).
    pub fn load_with_files(
        source: BundleSource,
        opts: PolicyOptions,
    ) -> Result<(Self, BundleFiles), BundleError> {
        let files = BundleFiles::read(&source)?;
        opts.verify(&files)?;
        let compiled = CompiledBundle::compile(files.parse()?, &opts)?;
        let policy = Self {
            source,
            opts,
            current: RwLock::new(Arc::new(compiled)),
            failures_in_a_row: std::sync::atomic::AtomicU64::new(0),
            reload_failures: std::sync::atomic::AtomicU64::new(0),
            pool: OnceLock::new(),
        };
        Ok((policy, files))
    }

    /// The bundle now serving.
    pub fn current(&self) -> Arc<CompiledBundle> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Evaluates the decision rule of `bundle` (the one [`Self::current`] gave the Check)
    /// on the evaluation pool: off the async workers, answered DEADLINE_EXCEEDED at the
    /// latest `eval_timeout` + [`pool::ANSWER_MARGIN`] from now.
    pub async fn evaluate(
        &self,
        bundle: Arc<CompiledBundle>,
        input: regorus::Value,
    ) -> Result<Decision, EvalError> {
        let pool = self.pool.get_or_init(|| {
            let threads = match self.opts.eval_threads {
                0 => pool::PoolOptions::default_threads(),
                n => n,
            };
            pool::EvalPool::start(pool::PoolOptions { threads })
                .map_err(|e| format!("cannot start the evaluation threads: {e}"))
        });
        match pool {
            Ok(pool) => pool.evaluate(bundle, input).await,
            Err(message) => Err(EvalError::Failed {
                query: self.opts.query.clone(),
                message: message.clone(),
            }),
        }
    }

    /// Records how an evaluation went, for [`Self::health`].
    pub fn note_evaluation(&self, ok: bool) {
        use std::sync::atomic::Ordering;
        if ok {
            // Most calls succeed: only write when there is something to reset.
            if self.failures_in_a_row.load(Ordering::Relaxed) != 0 {
                self.failures_in_a_row.store(0, Ordering::Relaxed);
            }
        } else {
            self.failures_in_a_row.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `Err` naming the problem while the last [`UNUSABLE_AFTER_FAILURES`] evaluations
    /// have all failed.
    pub fn health(&self) -> Result<(), String> {
        let n = self
            .failures_in_a_row
            .load(std::sync::atomic::Ordering::Relaxed);
        if n >= UNUSABLE_AFTER_FAILURES {
            Err(format!("policy: the last {n} evaluations failed"))
        } else {
            Ok(())
        }
    }

    /// Where the bundle is loaded from.
    pub fn source(&self) -> &BundleSource {
        &self.source
    }

    /// Recompiles from the source. On success the new bundle serves from the next Check on
    /// and is returned with its files; on failure the last good bundle keeps serving.
    /// A refused reload is counted ([`Self::reload_failures`]).
    pub fn reload(&self) -> Result<(Arc<CompiledBundle>, BundleFiles), BundleError> {
        let result = (|| {
            let files = BundleFiles::read(&self.source)?;
            self.opts.verify(&files)?;
            let compiled = Arc::new(CompiledBundle::compile(files.parse()?, &self.opts)?);
            Ok((compiled, files))
        })();
        match result {
            Ok((compiled, files)) => {
                self.install(compiled.clone());
                Ok((compiled, files))
            }
            Err(e) => {
                self.reload_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Reloads refused since start (the last good bundle kept serving each time).
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The revision of the bundle now serving.
    pub fn revision(&self) -> String {
        self.current().revision().to_owned()
    }

    /// Makes `compiled` the bundle serving from the next Check on (a control-plane
    /// activation or rollback).
    pub fn install(&self, compiled: Arc<CompiledBundle>) {
        let mut slot = self.current.write().unwrap_or_else(|p| p.into_inner());
        *slot = compiled;
        self.failures_in_a_row
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// How bundles are compiled for this policy.
    pub fn options(&self) -> &PolicyOptions {
        &self.opts
    }
}
