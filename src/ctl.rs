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

async fn state(c: &Client, cmd: StateCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let v = match cmd {
        StateCommand::Show => api
            .get_state_version(c.req(pb::GetStateVersionRequest {}))
            .await?
            .into_inner(),
        StateCommand::ConfirmRestore { r } => api
            .confirm_restore(c.req(pb::ConfirmRestoreRequest { reason: r.reason }))
            .await?
            .into_inner(),
    };
    c.show(&v, |v| {
        let mut out = format!("epoch:   {}\nversion: {}\n", v.epoch, v.version);
        if (v.highest_seen_epoch, v.highest_seen_version) > (v.epoch, v.version) {
            out.push_str(&format!(
                "warning: sidecar {:?} reported epoch {} version {}, ahead of this control \
                 plane: restored from a backup? Sidecars refuse this state until \
                 `aegis ctl state confirm-restore`\n",
                v.highest_seen_by, v.highest_seen_epoch, v.highest_seen_version
            ));
        }
        out
    })
}

async fn agents(c: &Client, cmd: AgentsCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let agent = match cmd {
        AgentsCommand::List { status, t } => {
            let r = api
                .list_agents(c.req(pb::ListAgentsRequest {
                    tenant: t.tenant,
                    status,
                }))
                .await?
                .into_inner();
            return c.show(&r, |r| agent_table(&r.agents));
        }
        AgentsCommand::Register { id, risk_tier, t } => {
            api.register_agent(c.req(pb::RegisterAgentRequest {
                tenant: t.tenant,
                id,
                risk_tier,
            }))
            .await?
        }
        AgentsCommand::Get { id, t } => {
            api.get_agent(c.req(pb::AgentRef {
                tenant: t.tenant,
                id,
            }))
            .await?
        }
        AgentsCommand::Freeze { id, r, t } => api.freeze_agent(c.req(action(t, id, r))).await?,
        AgentsCommand::Unfreeze { id, r, t } => api.unfreeze_agent(c.req(action(t, id, r))).await?,
        AgentsCommand::Restrict { id, r, t } => api.restrict_agent(c.req(action(t, id, r))).await?,
        AgentsCommand::Revoke { id, r, t } => api.revoke_agent(c.req(action(t, id, r))).await?,
    };
    c.show(&agent.into_inner(), |a| {
        format!(
            "agent:       {}/{}\nstatus:      {}\nrisk tier:   {}\nlive tokens: {}\nreason:      {}\nupdated:     {} by {}\ncreated:     {}\n",
            a.tenant,
            a.id,
            a.status,
            a.risk_tier,
            a.live_tokens,
            a.reason,
            secs_or_dash(a.updated_at),
            a.updated_by,
            secs_or_dash(a.created_at)
        )
    })
}

fn action(t: TenantArg, id: String, r: Reason) -> pb::AgentActionRequest {
    pb::AgentActionRequest {
        tenant: t.tenant,
        id,
        reason: r.reason,
    }
}

async fn tokens(c: &Client, cmd: TokensCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let issued = match cmd {
        TokensCommand::List { agent, all, t } => {
            let r = api
                .list_tokens(c.req(pb::ListTokensRequest {
                    tenant: t.tenant,
                    agent,
                    all,
                }))
                .await?
                .into_inner();
            return c.show(&r, |r| token_table(&r.tokens));
        }
        TokensCommand::Revoke { jti, r, t } => {
            let info = api
                .revoke_token(c.req(pb::RevokeTokenRequest {
                    tenant: t.tenant,
                    jti,
                    reason: r.reason,
                }))
                .await?
                .into_inner();
            return c.show(&info, |i| token_table(std::slice::from_ref(i)));
        }
        TokensCommand::Issue {
            agent,
            scopes,
            ttl_secs,
            session,
            t,
        } => {
            api.issue_token(c.req(pb::IssueTokenRequest {
                tenant: t.tenant,
                agent,
                scopes,
                ttl_secs,
                session,
            }))
            .await?
        }
        TokensCommand::Rotate {
            jti,
            ttl_secs,
            r,
            t,
        } => {
            api.rotate_token(c.req(pb::RotateTokenRequest {
                tenant: t.tenant,
                jti,
                reason: r.reason,
                ttl_secs,
            }))
            .await?
        }
    };
    let issued = issued.into_inner();
    if let Some(info) = &issued.info {
        // The token alone on stdout (for $(...)); what it is on stderr.
        eprintln!(
            "token {} for {}/{} session {} expires {}",
            info.jti,
            info.tenant,
            info.agent,
            info.session,
            secs_or_dash(info.expires_at)
        );
    }
    c.show(&issued, |i| format!("{}\n", i.token))
}

async fn kill(c: &Client, cmd: KillCommand) -> Result<(), CtlError> {
    use pb::KillScope;
    let (scope, tenant, target, reason, confirm_all) = match cmd {
        KillCommand::Token { jti, r, t } => (KillScope::Token, t.tenant, jti, r.reason, false),
        KillCommand::Session { session, r, t } => {
            (KillScope::Session, t.tenant, session, r.reason, false)
        }
        KillCommand::Agent { id, r, t } => (KillScope::Agent, t.tenant, id, r.reason, false),
        KillCommand::Tenant { r, t } => {
            (KillScope::Tenant, t.tenant, String::new(), r.reason, false)
        }
        KillCommand::All {
            confirm_kill_all,
            r,
        } => (
            KillScope::All,
            String::new(),
            String::new(),
            r.reason,
            confirm_kill_all,
        ),
    };
    let mut api = c.inner.clone();
    let k = api
        .kill(c.req(pb::KillRequest {
            scope: scope as i32,
            tenant,
            target,
            reason,
            confirm_all,
        }))
        .await?
        .into_inner();
    c.show(&k, |k| {
        let scope = KillScope::try_from(k.scope).map_or("?", |s| s.as_str_name());
        format!(
            "killed {} {}{}: {} live tokens in {} sessions of {} agents in {} tenants; every token of the scope issued at or before {} is refused\n",
            scope.trim_start_matches("KILL_SCOPE_").to_ascii_lowercase(),
            if k.tenant.is_empty() { "*" } else { &k.tenant },
            if k.target.is_empty() { String::new() } else { format!("/{}", k.target) },
            k.tokens,
            k.sessions,
            k.agents,
            k.tenants,
            secs_or_dash(k.before)
        )
    })
}

async fn approvals(c: &Client, cmd: ApprovalsCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    match cmd {
        ApprovalsCommand::List { status, agent, t } => {
            let r = api
                .list_approvals(c.req(pb::ListApprovalsRequest {
                    tenant: t.tenant,
                    status,
                    agent,
                }))
                .await?
                .into_inner();
            c.show(&r, |r| approval_table(&r.approvals))
        }
        ApprovalsCommand::Show { id, t } => {
            let a = api
                .get_approval(c.req(pb::ApprovalRef {
                    tenant: t.tenant,
                    id,
                }))
                .await?
                .into_inner();
            c.show(&a, approval_text)
        }
        ApprovalsCommand::Approve {
            id,
            override_ttl_secs,
            r,
            t,
        } => {
            let d = api
                .approve_approval(c.req(pb::DecideApprovalRequest {
                    tenant: t.tenant,
                    id,
                    reason: r.reason,
                    override_ttl_secs,
                }))
                .await?
                .into_inner();
            if let Some(a) = &d.approval {
                eprintln!(
                    "approved {} ({}.{} for {}/{}); override token valid until {}, once",
                    a.id,
                    a.tool,
                    a.action,
                    a.tenant,
                    a.agent,
                    secs_or_dash(a.override_expires_at)
                );
            }
            c.show(&d, |d| format!("{}\n", d.override_token))
        }
        ApprovalsCommand::Deny { id, r, t } => {
            let d = api
                .deny_approval(c.req(pb::DecideApprovalRequest {
                    tenant: t.tenant,
                    id,
                    reason: r.reason,
                    override_ttl_secs: 0,
                }))
                .await?
                .into_inner();
            c.show(&d, |d| {
                d.approval.as_ref().map(approval_text).unwrap_or_default()
            })
        }
    }
}

async fn tenants(c: &Client, cmd: TenantsCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let t = match cmd {
        TenantsCommand::Get { tenant } => api.get_tenant(c.req(pb::TenantRef { tenant })).await?,
        TenantsCommand::Set {
            tenant,
            mode,
            autonomy,
            r,
        } => {
            let autonomy_level = autonomy
                .map(|a| {
                    a.trim_start_matches(['L', 'l'])
                        .parse::<u32>()
                        .map_err(|_| CtlError {
                            code: 5,
                            message: format!("--autonomy {a:?} is not 1-4 or L1-L4"),
                        })
                })
                .transpose()?;
            api.update_tenant(c.req(pb::UpdateTenantRequest {
                tenant,
                mode,
                autonomy_level,
                reason: r.reason,
            }))
            .await?
        }
    };
    c.show(&t.into_inner(), |t| {
        format!(
            "tenant:   {}\nmode:     {}\nautonomy: L{}\nupdated:  {}{}\n",
            t.name,
            t.mode,
            t.autonomy_level,
            if t.updated_at == 0 {
                "never (defaults)".into()
            } else {
                secs_or_dash(t.updated_at)
            },
            if t.updated_by.is_empty() {
                String::new()
            } else {
                format!(" by {}", t.updated_by)
            }
        )
    })
}

async fn budgets(c: &Client, cmd: BudgetsCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let req = match cmd {
        BudgetsCommand::List { agent, t } => {
            let r = api
                .list_budgets(c.req(pb::ListBudgetsRequest {
                    tenant: t.tenant,
                    agent,
                }))
                .await?
                .into_inner();
            return c.show(&r, |r| budget_table(&r.budgets));
        }
        BudgetsCommand::Set {
            agent,
            max_calls,
            max_cost,
            window_secs,
            r,
            t,
        } => pb::SetBudgetRequest {
            tenant: t.tenant,
            agent,
            max_calls,
            max_cost,
            window_secs,
            reason: r.reason,
        },
        BudgetsCommand::Remove { agent, r, t } => pb::SetBudgetRequest {
            tenant: t.tenant,
            agent,
            reason: r.reason,
            ..Default::default()
        },
    };
    let b = api.set_budget(c.req(req)).await?.into_inner();
    c.show(&b, |b| budget_table(std::slice::from_ref(b)))
}

async fn policy(c: &Client, cmd: PolicyCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let rev = match cmd {
        PolicyCommand::History { limit } => {
            let r = api
                .list_policy_revisions(c.req(pb::ListPolicyRevisionsRequest { limit }))
                .await?
                .into_inner();
            return c.show(&r, |r| revision_table(&r.revisions));
        }
        PolicyCommand::Push { bundle, r } => {
            let source = crate::policy::BundleSource::from_path(&bundle);
            let files = crate::policy::BundleFiles::read(&source)
                .map_err(|e| CtlError::local(format!("bundle {}: {e}", bundle.display())))?;
            let bundle = pb::Bundle::from(&files);
            api.activate_policy(c.req(pb::ActivatePolicyRequest {
                bundle: Some(bundle),
                reason: r.reason,
            }))
            .await?
        }
        PolicyCommand::Rollback { to, r } => {
            api.rollback_policy(c.req(pb::RollbackPolicyRequest {
                to,
                reason: r.reason,
            }))
            .await?
        }
    };
    c.show(&rev.into_inner(), |r| {
        revision_table(std::slice::from_ref(r))
    })
}

async fn incidents(c: &Client, cmd: IncidentsCommand) -> Result<(), CtlError> {
    let mut api = c.inner.clone();
    let incident = match cmd {
        IncidentsCommand::List { status, agent, t } => {
            let r = api
                .list_incidents(c.req(pb::ListIncidentsRequest {
                    tenant: t.tenant,
                    status,
                    agent,
                }))
                .await?
                .into_inner();
            return c.show(&r, |r| incident_table(&r.incidents));
        }
        IncidentsCommand::DryRun { id, level, t } => {
            let autonomy_level = match level {
                None => 0,
                Some(l) => l
                    .trim_start_matches(['L', 'l'])
                    .parse::<u32>()
                    .map_err(|_| CtlError {
                        code: 5,
                        message: format!("--level {l:?} is not 1-4 or L1-L4"),
                    })?,
            };
            let p = api
                .plan_response(c.req(pb::PlanResponseRequest {
                    tenant: t.tenant,
                    id,
                    autonomy_level,
                }))
                .await?
                .into_inner();
            return c.show(&p, |p| {
                format!("at L{}: {}\n", p.autonomy_level, p.actions.join(", "))
            });
        }
        IncidentsCommand::Graph { id, format, t } => {
            let g = api
                .get_incident_graph(c.req(pb::IncidentRef {
                    tenant: t.tenant,
                    id,
                }))
                .await?
                .into_inner();
            let text = match format {
                GraphFormat::Json => {
                    serde_json::to_string_pretty(&g).map_err(|e| CtlError::local(e.to_string()))?
                        + "\n"
                }
                GraphFormat::Dot => crate::control::graph::dot(&g),
                GraphFormat::Mermaid => crate::control::graph::mermaid(&g),
            };
            print!("{text}");
            return Ok(());
        }
        IncidentsCommand::Watch { new_only, t } => {
            let mut stream = api
                .watch_incidents(c.req(pb::WatchIncidentsRequest {
                    tenant: t.tenant,
                    new_only,
                }))
                .await?
                .into_inner();
            while let Some(ev) = stream.message().await? {
                let line = if c.json {
                    serde_json::to_string(&ev).map_err(|e| CtlError::local(e.to_string()))?
                } else {
                    let i = ev.incident.unwrap_or_default();
                    format!(
                        "{} {} {} {} ({}) {}/{} status={} actions=[{}] {}",
                        secs_or_dash(i.updated_at.max(i.created_at_ns / 1_000_000_000)),
                        ev.event,
                        i.id,
                        i.kind,
                        i.severity,
                        i.tenant,
                        i.agent,
                        i.status,
                        i.actions.join("; "),
                        i.summary
                    )
                };
                let line = printable(&line).replace('\n', " ");
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                // A closed pipe (`| head`) ends the watch quietly.
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    return Ok(());
                }
            }
            return Err(CtlError {
                code: 6,
                message: "the control plane ended the watch".into(),
            });
        }
        IncidentsCommand::Show { id, t } => {
            api.get_incident(c.req(pb::IncidentRef {
                tenant: t.tenant,
                id,
            }))
            .await?
        }
        IncidentsCommand::Ack { id, reason, t } => {
            api.acknowledge_incident(c.req(pb::IncidentActionRequest {
                tenant: t.tenant,
                id,
                reason,
            }))
            .await?
        }
        IncidentsCommand::Close { id, r, t } => {
            api.close_incident(c.req(pb::IncidentActionRequest {
                tenant: t.tenant,
                id,
                reason: r.reason,
            }))
            .await?
        }
    };
    c.show(&incident.into_inner(), incident_text)
}

/// Control characters (terminal escapes in a tool name an agent chose) shown as `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect()
}

fn incident_text(i: &pb::Incident) -> String {
    printable(&format!(
        "incident:  {}\nkind:      {} ({})\nagent:     {}/{} (session {}, run {})\nsummary:   {}\nevidence:  {}\nstatus:    {}{}{}\nraised:    {} at L{} by {} (policy {})\nactions:   {}\nnotified:  {}\n{}",
        i.id,
        i.kind,
        i.severity,
        i.tenant,
        i.agent,
        i.session,
        i.run_id,
        i.summary,
        i.evidence.join(", "),
        i.status,
        if i.acknowledged_by.is_empty() {
            String::new()
        } else {
            format!(", acknowledged by {}", i.acknowledged_by)
        },
        if i.closed_by.is_empty() {
            String::new()
        } else {
            format!(", closed by {}: {}", i.closed_by, i.close_reason)
        },
        secs_or_dash(i.created_at_ns / 1_000_000_000),
        i.autonomy_level,
        i.reported_by,
        i.policy_revision,
        i.actions.join("; "),
        if i.notifications.is_empty() {
            "-".to_owned()
        } else {
            i.notifications.join("; ")
        },
        i.decisions
            .iter()
            .map(|d| format!(
                "  {} {} {}.{} -> {} ({}{})\n",
                secs_or_dash(d.time_ns / 1_000_000_000),
                d.decision_id,
                d.tool,
                d.action,
                d.decision,
                d.reason,
                if d.trust_level.is_empty() {
                    String::new()
                } else {
                    format!(", {}", d.trust_level)
                }
            ))
            .collect::<String>()
    ))
}

fn incident_table(incidents: &[pb::Incident]) -> String {
    table(
        &[
            "ID", "KIND", "SEVERITY", "AGENT", "STATUS", "RAISED", "ACTIONS", "SUMMARY",
        ],
        incidents
            .iter()
            .map(|i| {
                vec![
                    i.id.clone(),
                    i.kind.clone(),
                    i.severity.clone(),
                    format!("{}/{}", i.tenant, i.agent),
                    i.status.clone(),
                    secs_or_dash(i.created_at_ns / 1_000_000_000),
                    i.actions.join("; "),
                    i.summary.clone(),
                ]
            })
            .collect(),
    )
}

// === tables ===

fn agent_table(agents: &[pb::Agent]) -> String {
    table(
        &[
            "TENANT", "AGENT", "STATUS", "RISK", "TOKENS", "UPDATED", "BY", "REASON",
        ],
        agents
            .iter()
            .map(|a| {
                vec![
                    a.tenant.clone(),
                    a.id.clone(),
                    a.status.clone(),
                    a.risk_tier.clone(),
                    a.live_tokens.to_string(),
                    secs_or_dash(a.updated_at),
                    a.updated_by.clone(),
                    a.reason.clone(),
                ]
            })
            .collect(),
    )
}

fn token_table(tokens: &[pb::TokenInfo]) -> String {
    table(
        &[
            "JTI", "AGENT", "SESSION", "STATUS", "SCOPES", "ISSUED", "EXPIRES", "REVOKED",
        ],
        tokens
            .iter()
            .map(|t| {
                vec![
                    t.jti.clone(),
                    format!("{}/{}", t.tenant, t.agent),
                    t.session.clone(),
                    t.status.clone(),
                    t.scopes.join(","),
                    secs_or_dash(t.issued_at),
                    secs_or_dash(t.expires_at),
                    if t.revoked_at == 0 {
                        String::new()
                    } else {
                        format!("{} ({})", secs_or_dash(t.revoked_at), t.revoked_reason)
                    },
                ]
            })
            .collect(),
    )
}

fn approval_table(approvals: &[pb::Approval]) -> String {
    table(
        &[
            "ID",
            "AGENT",
            "CALL",
            "STATUS",
            "REASON",
            "CREATED",
            "EXPIRES",
            "DECIDED BY",
        ],
        approvals
            .iter()
            .map(|a| {
                vec![
                    a.id.clone(),
                    format!("{}/{}", a.tenant, a.agent),
                    format!("{}.{} {}", a.tool, a.action, a.resource),
                    a.status.clone(),
                    a.policy_reason.clone(),
                    secs_or_dash(a.created_at),
                    secs_or_dash(a.expires_at),
                    a.decided_by.clone(),
                ]
            })
            .collect(),
    )
}

fn approval_text(a: &pb::Approval) -> String {
    format!(
        "approval:  {}\nagent:     {}/{} (session {}, run {})\ncall:      {}.{} {}\narguments: {}\ncall hash: {}\nreason:    {}\nstatus:    {}\ncreated:   {} (decision {})\nexpires:   {}\ndecided:   {}\n{}",
        a.id,
        a.tenant,
        a.agent,
        a.session,
        a.run_id,
        a.tool,
        a.action,
        a.resource,
        a.arguments,
        a.call_hash,
        a.policy_reason,
        a.status,
        secs_or_dash(a.created_at),
        a.decision_id,
        secs_or_dash(a.expires_at),
        if a.decided_by.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{} by {}: {}",
                secs_or_dash(a.decided_at),
                a.decided_by,
                a.decision_reason
            )
        },
        if a.used_at == 0 {
            String::new()
        } else {
            format!(
                "used:      {} by decision {}\n",
                secs_or_dash(a.used_at),
                a.used_by_decision
            )
        }
    )
}

fn budget_table(budgets: &[pb::Budget]) -> String {
    table(
        &[
            "AGENT",
            "MAX CALLS",
            "MAX COST",
            "WINDOW",
            "USED CALLS",
            "USED COST",
            "UPDATED BY",
        ],
        budgets
            .iter()
            .map(|b| {
                let used = |v: String| if b.usage_known { v } else { "-".into() };
                vec![
                    format!("{}/{}", b.tenant, b.agent),
                    if b.max_calls == 0 {
                        "-".into()
                    } else {
                        b.max_calls.to_string()
                    },
                    if b.max_cost == 0.0 {
                        "-".into()
                    } else {
                        b.max_cost.to_string()
                    },
                    format!("{}s", b.window_secs),
                    used(b.used_calls.to_string()),
                    used(b.used_cost.to_string()),
                    b.updated_by.clone(),
                ]
            })
            .collect(),
    )
}

fn revision_table(revisions: &[pb::PolicyRevision]) -> String {
    table(
        &[
            "ID", "", "REVISION", "DIGEST", "ACTION", "BY", "AT", "REASON",
        ],
        revisions
            .iter()
            .map(|r| {
                vec![
                    r.id.to_string(),
                    if r.active { "*".into() } else { String::new() },
                    r.revision.clone(),
                    r.digest.chars().take(19).collect(),
                    r.action.clone(),
                    r.actor.clone(),
                    secs_or_dash(r.activated_at),
                    r.reason.clone(),
                ]
            })
            .collect(),
    )
}

/// Left-aligned columns, two spaces apart.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::time::secs_or_dash as time;

    #[test]
    fn times_print_as_utc() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1), "1970-01-01T00:00:01Z");
        assert_eq!(time(1_795_965_739), "2026-11-29T15:22:19Z");
        assert_eq!(time(951_782_400), "2000-02-29T00:00:00Z");
    }
}
