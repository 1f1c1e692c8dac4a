//! `aegis ctl`: the control-plane client, one subcommand per call of the service.
//!
//! Readable tables by default, `--json` for scripts (the messages as the service returns
//! them). Exit codes scripts can trust:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 2 | usage, or a local error (unreadable bundle or credential file) |
//! | 3 | refused: no, bad or expired credential, or the role or tenant does not allow it |
//! | 4 | not found |
//! | 5 | refused as asked: invalid argument, wrong state (already frozen, not pending, …) |
//! | 6 | the control plane is unreachable or failed (nothing was done) |
//! | 7 | the action took effect but its audit row could not be written: do not retry |

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::control::pb::{self, control_plane_client::ControlPlaneClient};
use crate::time::secs_or_dash;

mod commands;
mod render;

use commands::*;
use render::*;

/// `aegis ctl` and its connection settings.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Control-plane URL.
    #[arg(
        long,
        env = "AEGIS_CONTROL_URL",
        default_value = "http://127.0.0.1:9193",
        global = true
    )]
    server: String,
    /// Operator credential (`aegis operator issue`).
    #[arg(
        long,
        env = "AEGIS_OPERATOR_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// File holding the operator credential.
    #[arg(long, env = "AEGIS_OPERATOR_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// https --server: CA bundle (PEM) its certificate must chain to [default: Mozilla roots].
    #[arg(long, env = "AEGIS_CONTROL_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a control plane that requires mTLS.
    #[arg(
        long,
        env = "AEGIS_CONTROL_CERT_FILE",
        global = true,
        requires = "key_file"
    )]
    cert_file: Option<PathBuf>,
    /// Private key (PEM) of --cert-file.
    #[arg(
        long,
        env = "AEGIS_CONTROL_KEY_FILE",
        global = true,
        requires = "cert_file"
    )]
    key_file: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Show who the credential belongs to.
    Whoami,
    /// Agents: register, inspect, freeze, unfreeze, revoke.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Agent tokens: issue, rotate, revoke, list.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Kill every token of a token, session, agent, tenant, or everything.
    #[command(subcommand)]
    Kill(KillCommand),
    /// Approvals raised by approval_needed decisions.
    #[command(subcommand)]
    Approvals(ApprovalsCommand),
    /// Tenant settings: enforcement mode and SOC autonomy level.
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// Per-agent call and cost budgets.
    #[command(subcommand)]
    Budgets(BudgetsCommand),
    /// Policy revisions: push, history, rollback.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Incidents raised by the correlation engine.
    #[command(subcommand)]
    Incidents(IncidentsCommand),
    /// The control state's epoch and version; confirm a restored backup.
    #[command(subcommand)]
    State(StateCommand),
}

#[derive(Debug, Subcommand)]
enum StateCommand {
    /// Show the epoch and version, and any sidecar that reported a newer state.
    Show,
    /// Raise the epoch: the state this control plane holds now (restored from a backup,
    /// failed over to a replica) is intended. Sidecars that refused it as a rollback follow
    /// it again, keeping the revocations and kill marks they knew until their tokens expire.
    /// Re-apply first what the backup lacks (freezes, tenant settings, policy).
    ConfirmRestore {
        #[command(flatten)]
        r: Reason,
    },
}

#[derive(Debug, Subcommand)]
enum IncidentsCommand {
    List {
        /// open, acknowledged or closed [default: all].
        #[arg(long, default_value = "")]
        status: String,
        #[arg(long, default_value = "")]
        agent: String,
        #[command(flatten)]
        t: TenantArg,
    },
    Show {
        id: String,
        #[command(flatten)]
        t: TenantArg,
    },
    Ack {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        t: TenantArg,
    },
    Close {
        id: String,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
    /// The evidence graph: incident, decisions, agent, run, tokens, approvals, policy.
    Graph {
        id: String,
        /// json, dot (Graphviz: `| dot -Tsvg`) or mermaid.
        #[arg(long, default_value = "dot")]
        format: GraphFormat,
        #[command(flatten)]
        t: TenantArg,
    },
    /// Print incidents as they are raised and change, one line each (JSON lines with
    /// --json), until interrupted.
    Watch {
        /// Only what happens from now on (default: the open incidents first).
        #[arg(long)]
        new_only: bool,
        #[command(flatten)]
        t: TenantArg,
    },
    /// What the response engine would do for the incident at a level (default: the tenant's).
    DryRun {
        id: String,
        /// 1-4 (or L1-L4).
        #[arg(long)]
        level: Option<String>,
        #[command(flatten)]
        t: TenantArg,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum GraphFormat {
    Json,
    Dot,
    Mermaid,
}

/// The tenant a command applies to (default: the credential's own).
#[derive(Debug, Args, Clone, Default)]
struct TenantArg {
    #[arg(long, default_value = "")]
    tenant: String,
}

#[derive(Debug, Args)]
struct Reason {
    /// Why: recorded in the audit log with your identity.
    #[arg(long)]
    reason: String,
}

#[derive(Debug, Subcommand)]
enum AgentsCommand {
    Register {
        id: String,
        /// low, medium, high or critical.
        #[arg(long, default_value = "medium")]
        risk_tier: String,
        #[command(flatten)]
        t: TenantArg,
    },
    Get {
        id: String,
        #[command(flatten)]
        t: TenantArg,
    },
    List {
        /// active, frozen or revoked.
        #[arg(long, default_value = "")]
        status: String,
        #[command(flatten)]
        t: TenantArg,
    },
    /// Deny every call of the agent, everywhere, until unfrozen.
    Freeze {
        id: String,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
    /// Hold the agent's state-mutating calls for approval (what autonomy L2 does after an
    /// incident); `unfreeze` lifts it.
    Restrict {
        id: String,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
    /// Back to active, from frozen or restricted.
    Unfreeze {
        id: String,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
    /// Final: the agent is denied for good and can get no new token.
    Revoke {
        id: String,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Mint an agent token (printed alone on stdout without --json).
    Issue {
        #[arg(long)]
        agent: String,
        /// Comma-separated scopes, e.g. invoices:read,payments:create.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        #[arg(long, default_value_t = 0)]
        ttl_secs: u64,
        /// Session id [default: a new one].
        #[arg(long, default_value = "")]
        session: String,
        #[command(flatten)]
        t: TenantArg,
    },
    /// A new token for the same agent, session and scopes; the old one is revoked.
    Rotate {
        jti: String,
        #[arg(long, default_value_t = 0)]
        ttl_secs: u64,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
    Revoke {
        jti: String,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
    /// An agent's live tokens (--all: also revoked and expired).
    List {
        #[arg(long, default_value = "")]
        agent: String,
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        t: TenantArg,
    },
}

#[derive(Debug, Subcommand)]
enum KillCommand {
    Token {
        jti: String,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
    Session {
        session: String,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
    Agent {
        id: String,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
    /// Every token of the tenant.
    Tenant {
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
    /// Every token of every tenant: needs --confirm-kill-all and an admin of every tenant.
    All {
        #[arg(long)]
        confirm_kill_all: bool,
        #[command(flatten)]
        r: Reason,
    },
}

#[derive(Debug, Subcommand)]
enum ApprovalsCommand {
    List {
        /// pending (default), approved, denied, expired, used, or all.
        #[arg(long, default_value = "")]
        status: String,
        #[arg(long, default_value = "")]
        agent: String,
        #[command(flatten)]
        t: TenantArg,
    },
    Show {
        id: String,
        #[command(flatten)]
        t: TenantArg,
    },
    /// Approve: prints the single-use override token the agent sends in x-aegis-override.
    Approve {
        id: String,
        #[arg(long, default_value_t = 0)]
        override_ttl_secs: u64,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
    Deny {
        id: String,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
}

#[derive(Debug, Subcommand)]
enum TenantsCommand {
    Get {
        #[arg(default_value = "")]
        tenant: String,
    },
    Set {
        #[arg(default_value = "")]
        tenant: String,
        /// enforce or shadow.
        #[arg(long)]
        mode: Option<String>,
        /// SOC autonomy level: 1-4 (or L1-L4).
        #[arg(long)]
        autonomy: Option<String>,
        #[command(flatten)]
        r: Reason,
    },
}

#[derive(Debug, Subcommand)]
enum BudgetsCommand {
    Set {
        agent: String,
        #[arg(long, default_value_t = 0)]
        max_calls: u64,
        #[arg(long, default_value_t = 0.0)]
        max_cost: f64,
        #[arg(long, default_value_t = 3600)]
        window_secs: u64,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
    Remove {
        agent: String,
        #[command(flatten)]
        r: Reason,
        #[command(flatten)]
        t: TenantArg,
    },
    List {
        #[arg(long, default_value = "")]
        agent: String,
        #[command(flatten)]
        t: TenantArg,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Activate a bundle (directory or .tar.gz) at every data plane.
    Push {
        bundle: PathBuf,
        #[command(flatten)]
        r: Reason,
    },
    History {
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Reactivate an earlier revision (a history id, revision or digest; default: the one
    /// before the current).
    Rollback {
        #[arg(long, default_value = "")]
        to: String,
        #[command(flatten)]
        r: Reason,
    },
}

/// A failure of `aegis ctl`, with its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CtlError {
    /// The process's exit code.
    pub code: u8,
    /// What went wrong, printed on stderr.
    pub message: String,
}

impl CtlError {
    fn local(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<Status> for CtlError {
    fn from(s: Status) -> Self {
        let code = match s.code() {
            Code::Unauthenticated | Code::PermissionDenied => 3,
            Code::NotFound => 4,
            Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists => 5,
            Code::Internal => 7,
            _ => 6,
        };
        Self {
            code,
            message: format!("{:?}: {}", s.code(), s.message()),
        }
    }
}

/// Runs `aegis ctl`; prints errors on stderr and returns the exit code.
pub fn main(args: CtlArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aegis ctl: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aegis ctl: {e}");
            ExitCode::from(e.code)
        }
    }
}

struct Client {
    inner: ControlPlaneClient<Channel>,
    credential: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    json: bool,
}

impl Client {
    fn req<T>(&self, body: T) -> Request<T> {
        let mut r = Request::new(body);
        r.metadata_mut()
            .insert("authorization", self.credential.clone());
        r
    }

    /// Prints `value` as JSON, or as the readable form `text` makes.
    fn show<T: Serialize>(
        &self,
        value: &T,
        text: impl FnOnce(&T) -> String,
    ) -> Result<(), CtlError> {
        if self.json {
            let s =
                serde_json::to_string_pretty(value).map_err(|e| CtlError::local(e.to_string()))?;
            println!("{s}");
        } else {
            print!("{}", text(value));
        }
        Ok(())
    }
}

async fn run(args: CtlArgs) -> Result<(), CtlError> {
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.trim().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| CtlError::local(format!("{}: {e}", path.display())))?
            .trim()
            .to_owned(),
        (None, None) => {
            return Err(CtlError::local(
                "no operator credential: --token, --token-file, AEGIS_OPERATOR_TOKEN or \
                 AEGIS_OPERATOR_TOKEN_FILE (aegis operator issue mints one)",
            ));
        }
    };
    let credential = format!("Bearer {token}")
        .parse()
        .map_err(|_| CtlError::local("the operator credential is not ASCII"))?;
    let mut endpoint = tonic::transport::Endpoint::from_shared(args.server.clone())
        .map_err(|e| CtlError::local(format!("--server {:?}: {e}", args.server)))?
        .connect_timeout(std::time::Duration::from_secs(5));
    let files = crate::tls::ClientFiles {
        ca: args.ca_file.as_deref().map(|p| ("--ca-file", p)),
        cert: args.cert_file.as_deref().map(|p| ("--cert-file", p)),
        key: args.key_file.as_deref().map(|p| ("--key-file", p)),
    };
    if let Some(tls) = crate::tls::client(&args.server, files).map_err(CtlError::local)? {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| CtlError::local(format!("--server {:?}: TLS: {e}", args.server)))?;
    }
    let channel = endpoint.connect().await.map_err(|e| CtlError {
        code: 6,
        message: format!("cannot reach the control plane at {}: {e}", args.server),
    })?;
    let c = Client {
        inner: ControlPlaneClient::new(channel),
        credential,
        json: args.json,
    };
    match args.command {
        CtlCommand::Whoami => {
            let mut inner = c.inner.clone();
            let op = inner
                .who_am_i(c.req(pb::WhoAmIRequest {}))
                .await?
                .into_inner();
            c.show(&op, |o| {
                format!(
                    "name:    {}\nrole:    {}\ntenant:  {}\nexpires: {}\n",
                    o.name,
                    o.role,
                    o.tenant,
                    secs_or_dash(o.expires_at)
                )
            })
        }
        CtlCommand::Agents(cmd) => agents(&c, cmd).await,
        CtlCommand::Tokens(cmd) => tokens(&c, cmd).await,
        CtlCommand::Kill(cmd) => kill(&c, cmd).await,
        CtlCommand::Approvals(cmd) => approvals(&c, cmd).await,
        CtlCommand::Tenants(cmd) => tenants(&c, cmd).await,
        CtlCommand::Budgets(cmd) => budgets(&c, cmd).await,
        CtlCommand::Policy(cmd) => policy(&c, cmd).await,
        CtlCommand::Incidents(cmd) => incidents(&c, cmd).await,
        CtlCommand::State(cmd) => state(&c, cmd).await,
    }
}
