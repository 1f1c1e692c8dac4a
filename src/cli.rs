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
    /// Benchmark Check against a no-op ext_authz server in the same run.
    Bench(crate::bench::BenchArgs),
    /// (internal) Run the no-op ext_authz server the benchmark compares against.
    #[command(hide = true)]
    NoopServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
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
enum AuditCommand {
    /// Verify the hash chain and checkpoint signatures of the audit log.
    Verify {
        /// Data directory [default: ./aegis-data, or AEGIS_DATA_DIR].
        #[arg(long, env = "AEGIS_DATA_DIR", default_value = "./aegis-data")]
        data_dir: PathBuf,
        /// Trusted public key file(s) [default: the data directory's signing.pub].
        #[arg(long = "public-key")]
        public_keys: Vec<PathBuf>,
    },
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
            let signer = Signer::load_or_create(&config.data_dir)?;
            let now = crate::unix_nanos() / 1_000_000_000;
            let ttl =
                i64::try_from(ttl_secs.unwrap_or(config.token.lifetime_secs)).unwrap_or(i64::MAX);
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
        }) => audit_verify(&data_dir, &public_keys),
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
            };
            let compiled = CompiledBundle::load(&source, &opts)
                .map_err(|e| anyhow::anyhow!("policy bundle {source}: {e}"))?;
            let text = std::fs::read_to_string(&input)
                .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
            let doc = regorus::Value::from_json_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
            let raw = compiled.evaluate_raw(doc)?;
            let decision = crate::policy::Decision::from_value(&raw)?;
            let out = serde_json::json!({
                "decision": decision.verdict.as_str(),
                "reason": decision.reason,
                "policy_version": compiled.revision(),
                "result": serde_json::to_value(&raw).unwrap_or(serde_json::Value::Null),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            runtime()?.block_on(crate::bench::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::NoopServer { listen } => {
            runtime()?.block_on(crate::bench::noop_server_main(listen))?;
            Ok(ExitCode::SUCCESS)
        }
    }
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

fn audit_verify(data_dir: &std::path::Path, public_keys: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let keys = if public_keys.is_empty() {
        let path = data_dir.join(crate::keys::PUBLIC_KEY_FILE);
        vec![crate::keys::read_public_key(&path)?]
    } else {
        public_keys
            .iter()
            .map(|p| crate::keys::read_public_key(p))
            .collect::<Result<Vec<_>, _>>()?
    };
    let db = data_dir.join(crate::audit::store::AUDIT_DB_FILE);
    match crate::audit::verify::verify_file(&db, &keys)? {
        Ok(summary) => {
            println!(
                "audit log intact: {} rows, {} signed checkpoints, head {}",
                summary.rows,
                summary.checkpoints,
                crate::hex(&summary.head)
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(finding) => {
            println!("audit log BROKEN at {finding}");
            Ok(ExitCode::from(1))
        }
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

fn random_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        b = crate::unix_nanos()
            .to_be_bytes()
            .repeat(2)
            .try_into()
            .unwrap_or([0; 16]);
    }
    crate::hex(&b)
}
