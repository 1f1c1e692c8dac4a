//! The command line: `aegis serve | token | audit | policy | bench`.
//!
//! Exit codes scripts can trust: 0 success; 1 the thing checked is bad (a broken audit
//! chain, a failing policy test, a policy that denies in `policy eval --exit-code`);
//! 2 usage, configuration or I/O errors.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, Overrides};
use crate::identity::{Audience, Claims};
use crate::keys::Signer;
use crate::policy::{BundleSource, CompiledBundle, PolicyOptions};
use crate::types::Severity;

#[derive(Debug, Parser)]
#[command(
    name = "aegis",
    version,
    about = "Runtime security gateway for AI agents (Envoy ext_authz)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the ext_authz sidecar (all-in-one).
    Serve(Overrides),
    /// Agent tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Policy bundles.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Send one Check to a running sidecar, as Envoy would, and print the decision.
    Check(CheckArgs),
    /// The control plane: agents, tokens, kills, approvals, tenants, budgets, policy.
    Ctl(crate::ctl::CtlArgs),
    /// Operator credentials for the control plane.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Benchmark Check against a no-op ext_authz server in the same run.
    Bench(crate::bench::BenchArgs),
    /// (internal) Run the no-op ext_authz server the benchmark compares against.
    #[command(hide = true)]
    NoopServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
}

/// `aegis check`: exit 0 if allowed (or sanitized), 1 if denied, 2 if the Check failed.
#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Sidecar address.
    #[arg(long, default_value = "127.0.0.1:9191")]
    addr: std::net::SocketAddr,
    /// Agent token (sent in x-aegis-token).
    #[arg(long, env = "AEGIS_TOKEN")]
    token: Option<String>,
    /// Tool and action, sent as the route labels `aegis.tool` / `aegis.action` (Envoy's
    /// per-route context_extensions); without them the bundle's route catalogue decides.
    #[arg(long)]
    tool: Option<String>,
    #[arg(long)]
    action: Option<String>,
    /// Another route label `name=value`, e.g. `aegis.protocol=mcp` (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// HTTP method and path of the tool call.
    #[arg(long, default_value = "GET")]
    method: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// Request body, with its content type.
    #[arg(long)]
    body: Option<String>,
    #[arg(long, default_value = "application/json")]
    content_type: String,
    /// Extra request header `name=value` (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
}

/// `name=value`, both trimmed; `what` names it in the error.
fn name_value(s: &str, what: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{what} {s:?} is not name=value"))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    name_value(s, "label")
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    name_value(s, "header").map(|(k, v)| (k.to_ascii_lowercase(), v))
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Mint an agent token signed with the data directory's key.
    Issue {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        agent: String,
        /// Comma-separated scopes, e.g. invoices:read,payments:create.
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Session id [default: a random one].
        #[arg(long)]
        session: Option<String>,
        /// Lifetime in seconds [default: token.lifetime_secs, 900].
        #[arg(long)]
        ttl_secs: Option<u64>,
        #[command(flatten)]
        overrides: Overrides,
    },
}

#[derive(Debug, Subcommand)]
enum OperatorCommand {
    /// Mint an operator credential signed with the data directory's key (run it where the
    /// control plane's data directory is).
    Issue {
        /// The operator's name, recorded as the actor of each action.
        #[arg(long)]
        name: String,
        /// admin, operator, approver, viewer, or sidecar (a fleet sidecar's credential).
        #[arg(long, value_enum)]
        role: crate::control::auth::Role,
        /// The tenant, or '*' for every tenant. A sidecar credential names the tenant(s)
        /// its sidecar serves, never '*': repeat the flag or give a comma list
        /// (--tenant acme --tenant globex).
        #[arg(long, required = true, value_delimiter = ',')]
        tenant: Vec<String>,
        /// Lifetime in seconds [default: control.operator_ttl_secs, 8 h].
        #[arg(long)]
        ttl_secs: Option<u64>,
        #[command(flatten)]
        overrides: Overrides,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify the hash chain and checkpoint signatures of the audit log.
    Verify {
        /// Data directory [default: ./aegis-data, or AEGIS_DATA_DIR].
        #[arg(long, env = "AEGIS_DATA_DIR", default_value = "./aegis-data")]
        data_dir: PathBuf,
        /// Trusted public key file(s) [default: the data directory's audit.pub, or its
        /// signing.pub in a directory from before the audit key].
        #[arg(long = "public-key")]
        public_keys: Vec<PathBuf>,
        /// The token key's public key (signing.pub), trusted only for format 1
        /// checkpoints before the audit key took over: a log begun before the audit key.
        #[arg(long = "legacy-key")]
        legacy_keys: Vec<PathBuf>,
        /// Checkpoints published as they were made (`audit.witness_file`, or the
        /// `aegis.audit.checkpoint` spans' lines): the log must contain and extend each.
        #[arg(long)]
        witness: Option<PathBuf>,
    },
    /// Prove one decision without the log: its row, its audit path to the newest signed
    /// tree head, and (--from-size) that the log extends an earlier signed tree head.
    Prove {
        /// Data directory [default: ./aegis-data, or AEGIS_DATA_DIR].
        #[arg(long, env = "AEGIS_DATA_DIR", default_value = "./aegis-data")]
        data_dir: PathBuf,
        /// The decision id (`x-aegis-decision-id`).
        #[arg(long)]
        decision: String,
        /// The tree size of a checkpoint the reader already holds (e.g. from the witness).
        #[arg(long)]
        from_size: Option<u64>,
        /// Write the proof here [default: stdout].
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Check a proof from `aegis audit prove` against the pinned audit key(s). Exit 0:
    /// proven; 1: not; 2: unreadable.
    VerifyProof {
        file: PathBuf,
        /// The audit public key(s) (audit.pub) the checkpoints must be signed by.
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<PathBuf>,
        /// Checkpoints you hold (a witness file): the proof's earlier tree head must be one
        /// of them, else its consistency proof shows nothing a thief of the key could not
        /// make.
        #[arg(long)]
        witness: Option<PathBuf>,
    },
    /// Write an evidence bundle: one tenant's rows (others' as commitments only), the
    /// checkpoints that sign them, incidents, approvals and policy revisions.
    Export(Box<ExportArgs>),
    /// Check an evidence bundle: its signature, hash, chain, checkpoint signatures,
    /// counts, tenant and redaction. Exit 0: intact and signed by a trusted key; 1 otherwise.
    VerifyBundle {
        /// The bundle (JSON).
        file: PathBuf,
        /// Trusted public key file(s): the bundle and every checkpoint must be signed by
        /// one of them.
        #[arg(long = "public-key")]
        public_keys: Vec<PathBuf>,
        /// Without --public-key, accept a bundle checked only against the keys it carries
        /// (exit 0, saying so): anyone can make such a bundle with a key of their own.
        #[arg(long)]
        allow_unpinned: bool,
    },
    /// Check an incident's evidence against the reporting data plane's exported log: each
    /// decision's audit row (sequence number and hash, as the sidecar reported them) must
    /// be in the bundle, with that hash, that decision id and the incident's tenant.
    CheckEvidence {
        /// The incident as `aegis ctl --json incidents show ID` prints it.
        #[arg(long)]
        incident: PathBuf,
        /// The bundle `aegis audit export` wrote from the reporting sidecar's data
        /// directory (covering the evidence rows).
        #[arg(long)]
        bundle: PathBuf,
        /// The sidecar's audit public key file(s) (its audit.pub) the bundle must be
        /// signed with.
        #[arg(long = "public-key")]
        public_keys: Vec<PathBuf>,
        /// Without --public-key, accept a bundle checked only against the keys it carries.
        #[arg(long)]
        allow_unpinned: bool,
    },
}

#[derive(Debug, clap::Args)]
struct ExportArgs {
    /// Data directory [default: ./aegis-data, or AEGIS_DATA_DIR].
    #[arg(long, env = "AEGIS_DATA_DIR", default_value = "./aegis-data")]
    data_dir: PathBuf,
    /// The tenant ('*' for every tenant).
    #[arg(long)]
    tenant: String,
    /// An incident (INC-...): its evidence rows and the control actions naming it.
    #[arg(long)]
    incident: Option<String>,
    /// Rows at or after this time (RFC 3339 or Unix seconds).
    #[arg(long, value_parser = parse_time)]
    since: Option<i64>,
    /// Rows before this time (RFC 3339 or Unix seconds).
    #[arg(long, value_parser = parse_time)]
    until: Option<i64>,
    #[arg(long)]
    agent: Option<String>,
    /// Row kind.
    #[arg(long, value_parser = ["check", "control"])]
    kind: Option<String>,
    /// Incidents at or above this severity.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(Severity::ALL.iter().map(|s| s.as_str())))]
    min_severity: Option<String>,
    /// Fields to redact, comma-separated (e.g. resource,arguments,session).
    #[arg(long, value_delimiter = ',')]
    redact: Vec<String>,
    /// Public key file(s) of keys that signed older checkpoints, besides signing.pub.
    #[arg(long = "public-key")]
    public_keys: Vec<PathBuf>,
    /// The audit key to sign the bundle with, when it is not the data directory's
    /// audit.key (`audit.signing_key_file`).
    #[arg(long)]
    audit_key: Option<PathBuf>,
    /// The control database with incidents, approvals and policy history [default:
    /// control.db in the data directory, if any; in a fleet, the control plane's].
    #[arg(long)]
    control_db: Option<PathBuf>,
    /// The control store as a URL instead of --control-db: postgres://... (the store
    /// control-plane replicas share) or sqlite:PATH.
    #[arg(long, env = "AEGIS_CONTROL_DATABASE_URL")]
    control_database_url: Option<String>,
    /// The bundle file to write.
    #[arg(short = 'o', long)]
    output: PathBuf,
}

fn parse_time(s: &str) -> Result<i64, String> {
    crate::time::parse(s)
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Run the bundle's `test_*` rules, like `opa test`.
    Test {
        /// Bundle directory or .tar.gz [default: the built-in bundle].
        bundle: Option<PathBuf>,
        /// Print every test, not only failures.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Print the decision for one input document.
    Eval {
        /// The input document (JSON).
        #[arg(long)]
        input: PathBuf,
        /// Bundle directory or .tar.gz [default: the built-in bundle].
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Decision rule.
        #[arg(long, default_value = "data.aegis.authz.decision")]
        query: String,
    },
    /// Write an OPA-compatible bundle (.tar.gz) of a directory, optionally signed.
    Build(BuildArgs),
    /// Write a new bundle signing key (seed, mode 0600) to FILE and its public key to FILE.pub.
    Keygen {
        #[arg(short = 'o', long)]
        output: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    /// The bundle directory (.rego modules, data.json/data.yaml, optional .manifest).
    dir: PathBuf,
    /// The archive to write.
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Revision [default: the directory's .manifest revision, else derived from the
    /// content digest].
    #[arg(long)]
    revision: Option<String>,
    /// Manifest root (repeatable) [default: the directory's .manifest roots, else ""].
    #[arg(long = "root")]
    roots: Vec<String>,
    /// Sign with this key file (64 hex digits, the format of signing.key).
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// Key id in the signature [default: the key's id, ed25519:<16 hex digits>].
    #[arg(long, requires = "signing_key")]
    key_id: Option<String>,
    /// Decision rule the bundle must define (it is compiled as `aegis serve` would).
    #[arg(long, default_value = "data.aegis.authz.decision")]
    query: String,
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aegis: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(o) => serve(Config::load(&o)?),
        Command::Token(TokenCommand::Issue {
            tenant,
            agent,
            scopes,
            session,
            ttl_secs,
            overrides,
        }) => {
            let config = Config::load(&overrides)?;
            let signer = Signer::for_config(&config)?;
            let now = crate::unix_nanos() / 1_000_000_000;
            let ttl_secs = ttl_secs.unwrap_or(config.token.lifetime_secs);
            if ttl_secs > config.control.max_token_ttl_secs {
                anyhow::bail!(
                    "--ttl-secs {ttl_secs} is over control.max_token_ttl_secs ({}): Aegis refuses such a token",
                    config.control.max_token_ttl_secs
                );
            }
            let ttl = i64::try_from(ttl_secs).unwrap_or(i64::MAX);
            let given = [("--tenant", &tenant), ("--agent", &agent)]
                .into_iter()
                .chain(session.iter().map(|s| ("--session", s)))
                .chain(scopes.iter().map(|s| ("--scopes", s)));
            for (flag, value) in given {
                if let Some(why) = crate::identity::id_claim_problem(value) {
                    anyhow::bail!("{flag} {value:?} is not an id: {why}");
                }
            }
            let claims = Claims {
                iss: config.token.issuer.clone(),
                aud: Audience::One(config.token.audience.clone()),
                sub: agent,
                tenant,
                scopes,
                sid: session.unwrap_or_else(|| format!("sess-{}", random_id())),
                jti: random_id(),
                iat: now,
                nbf: now,
                exp: now.saturating_add(ttl),
            };
            println!("{}", crate::identity::mint(&signer, &claims)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::Verify {
            data_dir,
            public_keys,
            legacy_keys,
            witness,
        }) => audit_verify(&data_dir, &public_keys, &legacy_keys, witness.as_deref()),
        Command::Audit(AuditCommand::Prove {
            data_dir,
            decision,
            from_size,
            output,
        }) => {
            let db = data_dir.join(crate::audit::store::AUDIT_DB_FILE);
            let proof = crate::audit::prove::prove(&db, &decision, from_size)
                .map_err(|e| anyhow::anyhow!("cannot prove {decision}: {e}"))?;
            let text = serde_json::to_string_pretty(&proof)?;
            match output {
                Some(path) => std::fs::write(&path, text + "\n")?,
                None => println!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit(AuditCommand::VerifyProof {
            file,
            public_keys,
            witness,
        }) => {
            let keys = public_keys
                .iter()
                .map(|p| crate::keys::read_public_key(p))
                .collect::<Result<Vec<_>, _>>()?;
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let proof: crate::audit::prove::Proof = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not a proof: {e}", file.display()))?;
            match crate::audit::prove::check(&proof, &keys, witness.as_deref()) {
                Ok(what) => {
                    println!("proven: {what}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(problems) => {
                    println!("NOT proven:");
                    for p in problems {
                        println!("  {p}");
                    }
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Audit(AuditCommand::Export(args)) => audit_export(*args),
        Command::Audit(AuditCommand::VerifyBundle {
            file,
            public_keys,
            allow_unpinned,
        }) => audit_verify_bundle(&file, &public_keys, allow_unpinned),
        Command::Audit(AuditCommand::CheckEvidence {
            incident,
            bundle,
            public_keys,
            allow_unpinned,
        }) => audit_check_evidence(&incident, &bundle, &public_keys, allow_unpinned),
        Command::Policy(PolicyCommand::Test { bundle, verbose }) => policy_test(bundle, verbose),
        Command::Policy(PolicyCommand::Eval {
            input,
            bundle,
            query,
        }) => {
            let source = bundle
                .as_deref()
                .map_or(BundleSource::Embedded, BundleSource::from_path);
            let opts = PolicyOptions {
                query,
                eval_timeout: std::time::Duration::from_secs(5),
                eval_threads: 0,
                verification_keys: Vec::new(),
            };
            let compiled = CompiledBundle::load(&source, &opts)
                .map_err(|e| anyhow::anyhow!("policy bundle {source}: {e}"))?;
            let text = std::fs::read_to_string(&input)
                .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
            let doc = regorus::Value::from_json_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
            // The result is converted, printed and freed (recursively) where it was made:
            // on a thread with the stack the sidecar gives its evaluations.
            crate::policy::graph::on_rego_stack(|| -> anyhow::Result<()> {
                let raw = compiled.evaluate_raw(doc)?;
                let decision = crate::policy::Decision::from_value(&raw)?;
                let out = serde_json::json!({
                    "decision": decision.verdict.as_str(),
                    "reason": decision.reason,
                    "policy_version": compiled.revision(),
                    "result": serde_json::to_value(&raw).unwrap_or(serde_json::Value::Null),
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
                Ok(())
            })??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(PolicyCommand::Build(args)) => policy_build(args),
        Command::Policy(PolicyCommand::Keygen { output }) => {
            let signer = crate::keys::write_keypair(&output)?;
            println!(
                "wrote {} (secret) and {}.pub; key id {}",
                output.display(),
                output.display(),
                signer.kid()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => runtime()?.block_on(check(args)),
        Command::Ctl(args) => Ok(crate::ctl::main(args)),
        Command::Operator(OperatorCommand::Issue {
            name,
            role,
            tenant,
            ttl_secs,
            overrides,
        }) => {
            if tenant.len() > 1 && role != crate::control::auth::Role::Sidecar {
                anyhow::bail!(
                    "--tenant given {} times: only a sidecar credential names several tenants",
                    tenant.len()
                );
            }
            let tenant = tenant.join(",");
            let config = Config::load(&overrides)?;
            let signer = Signer::for_config(&config)?;
            let token = crate::control::auth::mint_operator(
                &signer,
                &config.token.issuer,
                &name,
                role,
                &tenant,
                ttl_secs.unwrap_or(config.control.operator_ttl_secs),
            )?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            runtime()?.block_on(crate::bench::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::NoopServer { listen } => {
            runtime()?.block_on(crate::testkit::noop_server_main(listen))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    use envoy_types::ext_authz::v3::pb::HttpResponse;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let mut headers: std::collections::HashMap<String, String> = args.headers.into_iter().collect();
    let mut put = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            headers.insert(k.to_owned(), v);
        }
    };
    put("x-aegis-token", args.token);
    put(
        "content-type",
        args.body.as_ref().map(|_| args.content_type.clone()),
    );
    let http = HttpRequest {
        method: args.method,
        path: args.path,
        headers,
        body: args.body.unwrap_or_default(),
        protocol: "HTTP/1.1".into(),
        ..Default::default()
    };
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", args.addr))?
        .connect()
        .await?;
    let mut request = crate::testkit::check_request(http);
    if let Some(a) = request.attributes.as_mut() {
        let labels = &mut a.context_extensions;
        labels.extend(args.labels);
        if let Some(t) = args.tool {
            labels.insert("aegis.tool".into(), t);
        }
        if let Some(act) = args.action {
            labels.insert("aegis.action".into(), act);
        }
    }
    let response = match AuthorizationClient::new(channel).check(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            println!(
                "{}",
                serde_json::json!({"error": status.code().to_string(), "message": status.message()})
            );
            return Ok(ExitCode::from(2));
        }
    };
    let metadata = response
        .dynamic_metadata
        .as_ref()
        .map(crate::check::protojson::struct_to_json);
    let field = |k: &str| {
        metadata
            .as_ref()
            .and_then(|m| m.get(k))
            .cloned()
            .unwrap_or_default()
    };
    let header = |hs: &[envoy_types::ext_authz::v3::pb::HeaderValueOption], k: &str| {
        hs.iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == k)
            .map(|h| h.value.clone())
    };
    let (allowed, out) = match &response.http_response {
        Some(HttpResponse::DeniedResponse(d)) => (
            false,
            serde_json::json!({
                "decision": field("decision"),
                "http_status": d.status.as_ref().map(|s| s.code),
                "reason": header(&d.headers, "x-aegis-reason"),
                "approval_id": header(&d.headers, "x-aegis-approval-id"),
                "decision_id": field("decision_id"),
                "policy_version": field("policy_version"),
                "body": d.body,
            }),
        ),
        Some(HttpResponse::OkResponse(o)) => (
            true,
            serde_json::json!({
                "decision": field("decision"),
                "decision_id": field("decision_id"),
                "policy_version": field("policy_version"),
                "headers_to_remove": o.headers_to_remove,
                "query_parameters_to_remove": o.query_parameters_to_remove,
            }),
        ),
        Some(HttpResponse::ErrorResponse(e)) => {
            (false, serde_json::json!({"error_response": e.body}))
        }
        None => (
            response.status.as_ref().is_none_or(|s| s.code == 0),
            serde_json::json!({"status": response.status.as_ref().map(|s| s.code)}),
        ),
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(if allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn serve(config: Config) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let running = crate::server::start(config).await?;
        let stop = running.shutdown_handle();
        tokio::spawn(async move {
            wait_for_signal().await;
            crate::log!(info, "signal received: draining in-flight Checks");
            let _ = stop.send(true);
        });
        running.wait().await;
        Ok(ExitCode::SUCCESS)
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn audit_verify(
    data_dir: &std::path::Path,
    public_keys: &[PathBuf],
    legacy_keys: &[PathBuf],
    witness: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    use crate::keys::{AUDIT_PUBLIC_KEY_FILE, PUBLIC_KEY_FILE, read_public_key};
    let read = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| read_public_key(p))
            .collect::<Result<Vec<_>, _>>()
    };
    let keys = if public_keys.is_empty() {
        let audit = data_dir.join(AUDIT_PUBLIC_KEY_FILE);
        if audit.exists() {
            vec![read_public_key(&audit)?]
        } else {
            // A data directory from before the audit key.
            vec![read_public_key(&data_dir.join(PUBLIC_KEY_FILE))?]
        }
    } else {
        read(public_keys)?
    };
    let legacy = read(legacy_keys)?;
    let trust = crate::audit::verify::Trust {
        keys: &keys,
        legacy: &legacy,
    };
    let db = data_dir.join(crate::audit::store::AUDIT_DB_FILE);
    match crate::audit::verify::verify_file_with(&db, trust, witness)? {
        Ok(summary) => {
            println!(
                "audit log intact: {} rows, {} signed checkpoints, head {}, tree head {}",
                summary.rows,
                summary.checkpoints,
                crate::hex(&summary.head),
                crate::hex(&summary.tree_head)
            );
            match witness {
                Some(w) => println!(
                    "witness {}: the log contains and extends all {} witnessed checkpoints",
                    w.display(),
                    summary.witnessed
                ),
                None => println!(
                    "no witness given: this proves the rows match what the key signed, not \
                     that nothing was cut from the end or signed again by the key's holder \
                     (see --witness)"
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(finding) => {
            println!("audit log BROKEN at {finding}");
            if legacy_keys.is_empty() && finding.detail.contains("untrusted key") {
                println!(
                    "(a log begun before the audit key has checkpoints signed by the token key: \
                     if so, add --legacy-key signing.pub)"
                );
            }
            Ok(ExitCode::from(1))
        }
    }
}

fn audit_export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    use crate::audit::export::{ExportOptions, export};
    let extra_keys = args
        .public_keys
        .iter()
        .map(|p| crate::keys::read_public_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = ExportOptions {
        tenant: args.tenant,
        incident: args.incident,
        since: args.since,
        until: args.until,
        agent: args.agent,
        kind: args.kind,
        min_severity: args.min_severity,
        redact: args.redact,
        extra_keys,
        control_db: args.control_db,
        control_database_url: args.control_database_url,
        audit_key: args.audit_key,
    };
    let bundle = export(&args.data_dir, &opts)?;
    let json = serde_json::to_vec_pretty(&bundle)?;
    write_new_file(&args.output, &json)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.output.display()))?;
    let c = &bundle.counts;
    println!(
        "wrote {}: {} rows ({} selected), {} checkpoints, {} incidents, {} approvals, \
         {} policy revisions; bundle_hash {}",
        args.output.display(),
        c.rows_included,
        c.rows_selected,
        c.checkpoints,
        c.incidents,
        c.approvals,
        c.policy_revisions,
        bundle.bundle_hash
    );
    Ok(ExitCode::SUCCESS)
}

fn policy_build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    use crate::policy::build::{BuildOptions, build};
    let signer = match &args.signing_key {
        Some(path) => {
            let signer = Signer::load_file(path)?;
            let kid = args
                .key_id
                .clone()
                .unwrap_or_else(|| signer.kid().to_owned());
            Some((signer, kid))
        }
        None => None,
    };
    let opts = BuildOptions {
        revision: args.revision,
        roots: args.roots,
        signer,
        policy: PolicyOptions {
            query: args.query,
            eval_timeout: std::time::Duration::from_secs(5),
            eval_threads: 0,
            verification_keys: Vec::new(),
        },
    };
    let built = build(&args.dir, &opts)
        .map_err(|e| anyhow::anyhow!("policy bundle {}: {e}", args.dir.display()))?;
    crate::files::write_atomic(&args.output, &built.archive, 0o644)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.output.display()))?;
    println!(
        "wrote {}: revision {}, {} files{}",
        args.output.display(),
        built.revision,
        built.files.len(),
        if opts.signer.is_some() {
            ", signed"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes `bytes` to `path` (0600) through a temporary file renamed into place: a reader
/// never sees half a bundle ([`crate::files::write_atomic`]).
fn write_new_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::files::write_atomic(path, bytes, 0o600)
}

fn audit_check_evidence(
    incident: &std::path::Path,
    file: &std::path::Path,
    public_keys: &[PathBuf],
    allow_unpinned: bool,
) -> anyhow::Result<ExitCode> {
    use crate::audit::bundle::{Bundle, verify};
    use crate::audit::evidence::{Incident, check};
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    };
    let incident: Incident = serde_json::from_str(&read(incident)?)
        .map_err(|e| anyhow::anyhow!("{}: not an incident: {e}", incident.display()))?;
    let bundle: Bundle = serde_json::from_str(&read(file)?)
        .map_err(|e| anyhow::anyhow!("{}: not an evidence bundle: {e}", file.display()))?;
    let trusted = public_keys
        .iter()
        .map(|p| crate::keys::read_public_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    let report = verify(&bundle, (!trusted.is_empty()).then_some(trusted.as_slice()));
    let mut problems: Vec<String> = report
        .problems
        .iter()
        .map(|p| format!("bundle: {p}"))
        .collect();
    if !report.pinned && !allow_unpinned {
        problems.push(
            "bundle: not pinned to the reporting sidecar's audit key (--public-key its \
             audit.pub): anyone can make a bundle that agrees with any evidence"
                .into(),
        );
    }
    problems.extend(check(&bundle, &incident));
    if !problems.is_empty() {
        for p in &problems {
            println!("evidence BROKEN: {p}");
        }
        return Ok(ExitCode::from(1));
    }
    println!(
        "evidence holds: incident {} (reported by {}): each of its {} decisions is the row \
         the data plane signed{}",
        incident.id,
        incident.reported_by,
        incident.decisions.len(),
        if report.pinned {
            ", in a bundle signed by a trusted key"
        } else {
            " (UNPINNED: checked only against the bundle's own keys)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn audit_verify_bundle(
    file: &std::path::Path,
    public_keys: &[PathBuf],
    allow_unpinned: bool,
) -> anyhow::Result<ExitCode> {
    use crate::audit::bundle::{Bundle, SCHEMA, verify};
    let trusted = public_keys
        .iter()
        .map(|p| crate::keys::read_public_key(p))
        .collect::<Result<Vec<_>, _>>()?;
    let text =
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", file.display()))?;
    let broken = |what: String| {
        println!("bundle BROKEN: {what}");
        Ok(ExitCode::from(1))
    };
    match value.get("schema").and_then(serde_json::Value::as_str) {
        Some(SCHEMA) => {}
        Some(other) => {
            return broken(format!(
                "schema: {other:?} is not {SCHEMA:?}, the version this aegis reads"
            ));
        }
        None => return broken(format!("schema: missing; not an {SCHEMA} file")),
    }
    let bundle: Bundle = match serde_json::from_value(value) {
        Ok(b) => b,
        Err(e) => return broken(format!("not a well-formed {SCHEMA}: {e}")),
    };
    let report = verify(&bundle, (!trusted.is_empty()).then_some(trusted.as_slice()));
    if !report.problems.is_empty() {
        for p in &report.problems {
            println!("bundle BROKEN: {p}");
        }
        return Ok(ExitCode::from(1));
    }
    let c = &bundle.counts;
    println!(
        "bundle intact: tenant {}, {} rows ({} selected), {} signed checkpoints, {} incidents, \
         {} approvals, {} policy revisions, redacted: {}",
        bundle.filters.tenant,
        c.rows_included,
        c.rows_selected,
        c.checkpoints,
        c.incidents,
        c.approvals,
        c.policy_revisions,
        if bundle.redaction.is_empty() {
            "nothing".to_owned()
        } else {
            bundle.redaction.join(", ")
        }
    );
    let signers = report.signers.join(", ");
    if report.pinned {
        println!(
            "signer pinned: the bundle and every checkpoint are signed by a trusted key \
             ({signers})"
        );
        Ok(ExitCode::SUCCESS)
    } else if allow_unpinned {
        println!(
            "signer not pinned (accepted with --allow-unpinned): the bundle is \
             self-consistent and signed by {signers}, but nothing here says that key is \
             yours"
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "signer NOT pinned: the bundle is self-consistent and signed by {signers}, but \
             anyone can sign a bundle with a key of their own; pass --public-key with the \
             key you trust (or --allow-unpinned to accept it anyway)"
        );
        Ok(ExitCode::from(1))
    }
}

fn policy_test(bundle: Option<PathBuf>, verbose: bool) -> anyhow::Result<ExitCode> {
    use crate::policy::testing::{self, Outcome};
    let source = bundle
        .as_deref()
        .map_or(BundleSource::Embedded, BundleSource::from_path);
    let opts = PolicyOptions {
        query: "data.aegis.authz.decision".into(),
        eval_timeout: std::time::Duration::from_secs(5),
        eval_threads: 0,
        verification_keys: Vec::new(),
    };
    let results =
        testing::run(&source, &opts).map_err(|e| anyhow::anyhow!("policy bundle {source}: {e}"))?;
    let mut failed = 0;
    for r in &results {
        match &r.outcome {
            Outcome::Pass if verbose => println!("PASS {} ({})", r.rule, r.file),
            Outcome::Pass => {}
            Outcome::Fail => {
                failed += 1;
                println!("FAIL {} ({})", r.rule, r.file);
            }
            Outcome::Error(e) => {
                failed += 1;
                println!("ERROR {} ({}): {e}", r.rule, r.file);
            }
        }
    }
    println!("{}", "-".repeat(60));
    if results.is_empty() {
        println!("no test_* rules found in {source}");
        return Ok(ExitCode::from(1));
    }
    println!("PASS: {}/{}", results.len() - failed, results.len());
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// 32 random hex digits (a token id, a session).
fn random_id() -> String {
    crate::ids::random_id::<16>("")
}
