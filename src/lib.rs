//! Aegis: a runtime security gateway for AI agents.
//!
//! Envoy's ext_authz filter asks Aegis, over `envoy.service.auth.v3.Authorization/Check`,
//! whether an agent's call to a tool may go on. Aegis identifies the agent (EdDSA JWT),
//! evaluates a Rego bundle in-process (regorus), records a signed, hash-chained audit row
//! that is durable before the answer leaves, emits one OpenTelemetry span, and answers.
//!
//! # Layout
//! - [`check`]: the hot path, one short function per step:
//!   decode → identify → build input → evaluate → enforce → record → respond.
//! - [`identity`]: agent tokens (EdDSA JWTs): minting, verification, the verified-token
//!   cache and the revocation set checked on every call.
//! - [`policy`]: bundles (directory or `.tar.gz`), compilation, the engine pool, hot reload,
//!   the decision document and `aegis policy test`.
//! - [`audit`]: the audit log: canonical row encoding, the group-commit writer, signed
//!   checkpoints and the verifier.
//! - [`telemetry`]: the OTLP exporter and the per-Check span.
//! - [`keys`]: the Ed25519 signing key kept in the data directory.
//! - [`config`]: the one configuration struct (file, `AEGIS_*` env, flags): plain data,
//!   at the bottom of the module graph.
//! - [`types`], [`time`], [`ids`], [`endpoint`]: the bottom of the module graph, importing
//!   nothing from the crate: the domain's words as enums (agent status, severity, response
//!   action), the one date algorithm, the one id maker and id check, a webhook URL.
//! - [`control`]: the control plane: operator credentials, the control store, the
//!   actions (freeze, revoke, kill, approvals, shadow mode, budgets, policy rollback),
//!   the gRPC service.
//! - [`dataplane`]: the data plane's view of the control state (snapshot + deltas), how a
//!   sidecar follows it, budgets, and the gRPC client of the control plane.
//! - [`seam`]: the one seam between the planes: [`seam::ControlPlane`] (local or remote,
//!   same trait) and [`seam::LocalDataPlane`].
//! - [`correlate`]: the correlation engine: attack patterns in the decision stream,
//!   reported to the control plane as incidents.
//! - [`ctl`]: `aegis ctl`, the control-plane client.
//! - [`server`]: `aegis serve`: listeners, modes, health, reflection, reload, shutdown.
//! - [`admin`]: the admin HTTP listener: `/metrics`, `/healthz`, `/readyz`.
//! - [`bench`]: `aegis bench`, the benchmark beside a no-op ext_authz server.
//! - [`cli`]: the command line.
//! - `fuzzing`: the fuzz harnesses behind `fuzz/` (hidden from the docs).

pub mod admin;
pub mod audit;
pub mod bench;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod correlate;
pub mod ctl;
pub mod dataplane;
pub mod endpoint;
#[doc(hidden)]
pub mod files;
pub mod fuzzing;
pub mod identity;
pub mod ids;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod seam;
pub mod server;
pub mod telemetry;
pub mod testkit;
pub mod time;
pub mod tls;
pub mod types;

/// The ext_authz file descriptor set, for gRPC reflection (compiled by `build.rs`).
pub const EXT_AUTHZ_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ext_authz_descriptor.bin"));

pub use ids::{hex, unhex};
pub use time::unix_nanos;

/// Writes one log line to stderr: `<unix-ms> <level> <message>`.
#[macro_export]
macro_rules! log {
    ($level:ident, $($arg:tt)*) => {
        eprintln!("{} {} {}", $crate::unix_nanos() / 1_000_000, stringify!($level), format_args!($($arg)*))
    };
}
