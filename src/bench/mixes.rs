//! `aegis bench --mixes`: the Check path one kind of request at a time, each beside the
//! no-op server in the same run, reporting the server CPU each Check cost by thread; and
//! `aegis bench --guard FILE`, the short run the test command uses to fail when that cost
//! rises against the no-op's past the margin recorded in FILE.
//!
//! One Aegis (full pipeline, fresh data directory) and one no-op server serve every mix.
//! For each mix the no-op is driven first, then Aegis, with the same requests, closed loop.
//! A mix whose answers are not what it is meant to measure (an "allow" mix that was
//! denied) fails the run: its figures would describe another path.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::google::protobuf::value::Kind;

use super::{
    BenchArgs, CpuSample, PhaseResult, SCOPE_SETS, Setup, agent_token, clients, saturate,
    saturate_feed,
};
use crate::keys::Signer;
use crate::testkit::{ChildServer, request};

/// One kind of request.
struct Mix {
    name: &'static str,
    about: &'static str,
    work: Arc<Vec<CheckRequest>>,
    /// Taken round and round (false: each request once, for fresh tokens).
    wrap: bool,
    /// What the answers must be.
    expect: Expect,
    /// A request of the mix (not one of `work` when `wrap` is false), whose whole answer
    /// is checked before the mix is measured.
    probe: CheckRequest,
}

/// What a mix's answers must be, or its figures would describe another path.
#[derive(Clone, Copy)]
enum Expect {
    /// This decision (the `decision` key of the dynamic metadata) and reason (the
    /// `x-aegis-reason` of a denial), checked on the probe; then every answer allowed or
    /// every one denied, as the decision says.
    One {
        decision: &'static str,
        reason: &'static str,
    },
    /// The varied workload: this share of the answers allowed, within 5 points.
    Allowed(f64),
}

/// An allowed call.
const ALLOW: Expect = Expect::One {
    decision: "allow",
    reason: "",
};

/// The share of the varied workload's requests the default bundle allows (measured:
/// 23.0% in every run of the main benchmark).
const VARIED_ALLOWED: f64 = 0.23;

/// Fresh tokens minted for the cache-miss mix per second of the phase: enough that the
/// phase does not run out before its time on the development machine (Aegis answered
/// ~7,400 of these a second). Each token is sent once whatever the count.
const FRESH_TOKENS_PER_SEC: usize = 15_000;

/// The longest cache-miss phase minted for, in seconds: the tokens are made up front.
const FRESH_TOKENS_MAX_SECS: u64 = 30;

/// The mixes: allow (token cache hit), allow with a token the server has never seen (a
/// cache miss: signature verification), deny, an MCP body, sanitize, approval, and the
/// varied workload of the main benchmark (`varied`, the one [`Setup`] made).
fn mixes(
    signer: &Signer,
    agents: usize,
    secs: u64,
    varied: &Arc<Vec<CheckRequest>>,
) -> anyhow::Result<Vec<Mix>> {
    let agents = agents.max(SCOPE_SETS.len());
    let tokens: Vec<String> = (0..agents)
        .map(|a| agent_token(signer, a, &format!("jti-{a}")))
        .collect::<anyhow::Result<_>>()?;
    // Requests `f` makes for the agents whose scopes are SCOPE_SETS[set].
    let each = |set: usize, f: &dyn Fn(&str) -> CheckRequest| -> Vec<CheckRequest> {
        tokens
            .iter()
            .enumerate()
            .filter(|(a, _)| a % SCOPE_SETS.len() == set)
            .map(|(_, t)| f(t))
            .collect()
    };
    let allow = |t: &str| request(t, "invoices", "read", "{}", false, false);
    // Agents of set 0 (invoices:read), each token new.
    let set0: Vec<usize> = (0..agents).step_by(SCOPE_SETS.len()).collect();
    let fresh_token = |n: usize, jti: &str| {
        let a = super::nth_wrapping(&set0, n).copied().unwrap_or(0);
        agent_token(signer, a, jti)
    };
    let fresh_secs = usize::try_from(secs.clamp(1, FRESH_TOKENS_MAX_SECS)).unwrap_or(1);
    let miss = (0..fresh_secs * FRESH_TOKENS_PER_SEC)
        .map(|n| Ok(allow(&fresh_token(n, &format!("fresh-{n}"))?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mix = |name, about, work: Vec<CheckRequest>, expect| {
        Mix::wrapping(name, about, Arc::new(work), expect)
    };
    Ok(vec![
        mix(
            "allow",
            "invoices.read on its Envoy route, scope granted (token cached)",
            each(0, &allow),
            ALLOW,
        )?,
        Mix {
            name: "allow-new-token",
            about: "the same with a token never seen before (signature verified)",
            work: Arc::new(miss),
            wrap: false,
            expect: ALLOW,
            probe: allow(&fresh_token(0, "fresh-probe")?),
        },
        mix(
            "deny",
            "invoices.read without the scope",
            each(3, &allow),
            Expect::One {
                decision: "deny",
                reason: "missing_scope",
            },
        )?,
        mix(
            "mcp",
            "invoices.read as an MCP tools/call body (JSON parsed, allowed)",
            each(0, &|t| {
                request(t, "invoices", "read", r#"{"id":"inv-1"}"#, true, false)
            }),
            ALLOW,
        )?,
        mix(
            "sanitize",
            "github.read_issue carrying an Authorization header (removed)",
            each(1, &|t| {
                request(t, "github", "read_issue", "{}", false, true)
            }),
            Expect::One {
                decision: "sanitize",
                reason: "",
            },
        )?,
        mix(
            "approval",
            "payments.create over the threshold, MCP (approval requested)",
            each(0, &|t| {
                request(t, "payments", "create", r#"{"amount":5000}"#, true, false)
            }),
            Expect::One {
                decision: "approval_needed",
                reason: "payment_above_threshold",
            },
        )?,
        Mix::varied(varied)?,
    ])
}

impl Mix {
    /// A mix taken round and round; its first request is the probe.
    fn wrapping(
        name: &'static str,
        about: &'static str,
        work: Arc<Vec<CheckRequest>>,
        expect: Expect,
    ) -> anyhow::Result<Self> {
        let probe = work.first().cloned().context("a mix without requests")?;
        Ok(Self {
            name,
            about,
            work,
            wrap: true,
            expect,
            probe,
        })
    }

    /// The main benchmark's varied workload.
    fn varied(work: &Arc<Vec<CheckRequest>>) -> anyhow::Result<Self> {
        Self::wrapping(
            "varied",
            "the main benchmark's workload (all of the above and more)",
            work.clone(),
            Expect::Allowed(VARIED_ALLOWED),
        )
    }
}

/// The probe's whole answer is what `mix` is meant to measure: the decision, the reason
/// of a denial, and a sanitize's removal of the credential header.
fn check_probe(mix: &Mix, answer: &CheckResponse) -> anyhow::Result<()> {
    let Expect::One { decision, reason } = mix.expect else {
        return Ok(());
    };
    let got = answer
        .dynamic_metadata
        .as_ref()
        .and_then(|m| m.fields.get("decision"))
        .and_then(|v| match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.as_str()),
            _ => None,
        })
        .unwrap_or("none");
    let got_reason = match &answer.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == "x-aegis-reason")
            .map_or("", |h| h.value.as_str()),
        _ => "",
    };
    let removed = match &answer.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok.headers_to_remove.clone(),
        _ => Vec::new(),
    };
    let sanitized = decision != "sanitize" || removed.iter().any(|h| h == "authorization");
    if got != decision || got_reason != reason || !sanitized {
        bail!(
            "mix {}: the probe was answered {got} ({got_reason:?}, removing {removed:?}), \
             not {decision} ({reason:?}): not the path the mix is meant to measure",
            mix.name
        );
    }
    Ok(())
}

/// Every answer of the measured phase agrees with what the mix expects.
fn check_answers(mix: &Mix, r: &PhaseResult) -> anyhow::Result<()> {
    let answered = r.allowed + r.denied;
    let ok = match mix.expect {
        Expect::One {
            decision: "allow" | "sanitize",
            ..
        } => r.denied == 0,
        Expect::One { .. } => r.allowed == 0,
        Expect::Allowed(share) => {
            answered > 0 && (r.allowed as f64 / answered as f64 - share).abs() <= 0.05
        }
    };
    if answered == 0 || !ok {
        bail!(
            "mix {}: {} allowed, {} denied: not the path it is meant to measure",
            mix.name,
            r.allowed,
            r.denied
        );
    }
    Ok(())
}

/// The result of one mix on one server.
struct Measured {
    result: PhaseResult,
    /// µs of CPU per Check by thread group (the eval pool's threads as one).
    threads: Vec<(String, f64)>,
    /// µs of CPU per Check of the whole server process.
    total: f64,
}

/// The two servers every mix runs against.
struct Servers {
    setup: Setup,
    noop: ChildServer,
    aegis: super::AegisServer,
    args: BenchArgs,
}

impl Servers {
    async fn start(args: &BenchArgs, prefix: &str, name: &str) -> anyhow::Result<Self> {
        let setup = Setup::new(prefix, args.agents).await?;
        let noop = ChildServer::spawn(
            &["noop-server", "--listen", "127.0.0.1:0"],
            "noop ext_authz listening on ",
        )?;
        let aegis = setup.aegis(name, args)?;
        Ok(Self {
            setup,
            noop,
            aegis,
            args: args.clone(),
        })
    }

    /// Checks Aegis's answer to the mix's probe.
    async fn probe(&self, mix: &Mix) -> anyhow::Result<()> {
        let mut conns = clients(self.aegis.child.addr, 1).await?;
        let client = conns.first_mut().context("no connection")?;
        let answer = client
            .check(mix.probe.clone())
            .await
            .with_context(|| format!("mix {}: the probe failed", mix.name))?;
        check_probe(mix, answer.get_ref())
    }

    /// Drives one server with `mix` for `secs` (after a half-second warm-up on wrapping
    /// mixes) and samples its CPU over the measured part.
    async fn measure(&self, aegis: bool, mix: &Mix, secs: u64) -> anyhow::Result<Measured> {
        let (name, pid, addr) = if aegis {
            ("aegis", self.aegis.child.child.id(), self.aegis.child.addr)
        } else {
            ("no-op", self.noop.child.id(), self.noop.addr)
        };
        let conns = clients(addr, self.args.connections).await?;
        if mix.wrap {
            saturate(
                &conns,
                &mix.work,
                self.args.concurrency,
                Duration::from_millis(500),
            )
            .await;
        }
        let cpu = CpuSample::take(&[(name, pid)]);
        let result = saturate_feed(
            &conns,
            &mix.work,
            self.args.concurrency,
            Duration::from_secs(secs.max(1)),
            mix.wrap,
        )
        .await;
        let spent = cpu.since();
        if result.errors > 0 {
            bail!("{name}, mix {}: {} Checks failed", mix.name, result.errors);
        }
        if aegis {
            check_answers(mix, &result)?;
        }
        let total = spent
            .total_per_check(name, result.requests)
            .with_context(|| {
                format!(
                    "{name}, mix {}: no CPU time measured over {} Checks (is /proc/{pid}/stat \
                     readable?)",
                    mix.name, result.requests
                )
            })?;
        // Thread groups: the eval pool's threads `aegis-eval-N` as one line.
        let mut grouped = BTreeMap::<(String, String), u64>::new();
        for ((process, thread), t) in spent.threads {
            let group = thread.trim_end_matches(|c: char| c.is_ascii_digit());
            let group = group.strip_suffix('-').unwrap_or(group).to_owned();
            *grouped.entry((process, group)).or_insert(0) += t;
        }
        let threads = grouped
            .into_iter()
            .map(|((p, t), ticks)| (format!("{p}/{t}"), super::us_per(ticks, result.requests)))
            .collect();
        Ok(Measured {
            result,
            threads,
            total,
        })
    }

    /// Stops both servers; the audit log's verdict, which must be intact.
    fn stop(mut self) -> anyhow::Result<String> {
        self.noop.stop()?;
        let log = self.aegis.stop_and_verify()?;
        if log.starts_with("BROKEN") {
            bail!("the audit log does not verify: {log}");
        }
        Ok(log)
    }
}

/// `aegis bench --mixes`.
pub(super) async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let secs = args.duration_secs.max(1);
    let servers = Servers::start(args, "aegis-mixes-", "mixes").await?;
    let signer = Signer::load_or_create(&servers.setup.key_dir)?;
    let mixes = mixes(&signer, args.agents, secs, &servers.setup.workload)?;
    println!(
        "aegis bench --mixes: {secs} s per mix and server, {} callers over {} connections; \
         server CPU per Check from /proc (10 ms ticks)",
        args.concurrency, args.connections
    );
    let mut rows = Vec::new();
    for mix in &mixes {
        servers.probe(mix).await?;
        let noop = servers.measure(false, mix, secs).await?;
        let aegis = servers.measure(true, mix, secs).await?;
        rows.push((mix, noop, aegis));
    }
    let log = servers.stop()?;

    println!();
    println!(
        "{:<16} {:>9} {:>8} {:>8} {:>11} {:>11} {:>6}  what",
        "mix", "checks/s", "p50 µs", "p99 µs", "aegis µs/Ck", "no-op µs/Ck", "ratio"
    );
    for (mix, noop, aegis) in &rows {
        let r = &aegis.result;
        println!(
            "{:<16} {:>9.0} {:>8} {:>8} {:>11.1} {:>11.1} {:>6.2}  {}",
            mix.name,
            r.throughput(),
            r.p50_us,
            r.p99_us,
            aegis.total,
            noop.total,
            aegis.total / noop.total,
            mix.about
        );
    }
    println!();
    println!(
        "Aegis CPU per Check by thread (µs; the total is the process's, threads that ended \
         included):"
    );
    let threads: std::collections::BTreeSet<&str> = rows
        .iter()
        .flat_map(|(_, _, a)| a.threads.iter().map(|(t, _)| t.as_str()))
        .collect();
    print!("{:<28}", "thread");
    for (mix, _, _) in &rows {
        print!(" {:>9.9}", mix.name);
    }
    println!();
    for thread in threads {
        print!("{thread:<28}");
        for (_, _, aegis) in &rows {
            let us = aegis
                .threads
                .iter()
                .find(|(t, _)| t == thread)
                .map_or(0.0, |(_, us)| *us);
            print!(" {us:>9.1}");
        }
        println!();
    }
    print!("{:<28}", "aegis total");
    for (_, _, aegis) in &rows {
        print!(" {:>9.1}", aegis.total);
    }
    println!();
    println!("audit log: {log}");
    let t = token_costs(&signer)?;
    let noop = rows
        .iter()
        .find(|(m, _, _)| m.name == "allow-new-token")
        .map_or(f64::NAN, |(_, n, _)| n.total);
    println!(
        "a token in process ({TOKEN_COST_ROUNDS} tokens, one thread, the fastest of \
         {TOKEN_COST_REPEATS} passes): a cache miss {:.1} µs, \
         of which the EdDSA strict signature check {:.1} µs ({:.2}× the no-op's whole Check \
         in the allow-new-token mix); a cache hit {:.2} µs",
        t.miss_us,
        t.signature_us,
        t.signature_us / noop,
        t.hit_us
    );
    Ok(())
}

/// Tokens [`token_costs`] times in one pass.
const TOKEN_COST_ROUNDS: usize = 2_000;

/// Passes [`token_costs`] makes of each kind, keeping the fastest.
const TOKEN_COST_REPEATS: usize = 3;

/// What identifying an agent costs on this machine, outside the server: the floor under
/// the token-miss mix, which no pipeline change moves.
struct TokenCosts {
    miss_us: f64,
    hit_us: f64,
    signature_us: f64,
}

/// Times [`crate::identity::Identifier::identify`] over fresh tokens (each a cache miss),
/// then over the same tokens again (hits), and the signature check alone; each the
/// fastest of [`TOKEN_COST_REPEATS`] passes, so that a pass the machine stalled does not
/// count. The identifier is the one `aegis serve` builds from its default configuration.
fn token_costs(signer: &Signer) -> anyhow::Result<TokenCosts> {
    use crate::identity::{Identifier, KeyRing, Revocations};
    use base64::Engine as _;
    let tokens = (0..TOKEN_COST_ROUNDS)
        .map(|n| agent_token(signer, n, &format!("cost-{n}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut keys = KeyRing::default();
    keys.insert(signer.verifying_key());
    let config = crate::config::Config::default();
    let now = crate::unix_nanos() / 1_000_000_000;
    let per_token = |started: std::time::Instant| {
        started.elapsed().as_secs_f64() * 1e6 / TOKEN_COST_ROUNDS as f64
    };
    let pass = |ids: &Identifier| -> anyhow::Result<f64> {
        let started = std::time::Instant::now();
        for t in &tokens {
            ids.identify(std::hint::black_box(t), now)
                .map_err(|r| anyhow::anyhow!("a benchmark token was refused: {}", r.error))?;
        }
        Ok(per_token(started))
    };
    let (mut miss_us, mut hit_us) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..TOKEN_COST_REPEATS {
        // A fresh cache each time: the first pass misses on every token.
        let ids =
            crate::server::identifier(&config, keys.clone(), Arc::new(Revocations::default()));
        miss_us = miss_us.min(pass(&ids)?);
        hit_us = hit_us.min(pass(&ids)?);
    }
    let first = tokens.first().context("no token")?;
    let (signed, sig) = first
        .rsplit_once('.')
        .context("a token without a signature")?;
    let sig: [u8; 64] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig)?
        .try_into()
        .map_err(|_| anyhow::anyhow!("a signature that is not 64 bytes"))?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig);
    let key = signer.verifying_key();
    let mut signature_us = f64::INFINITY;
    for _ in 0..TOKEN_COST_REPEATS {
        let started = std::time::Instant::now();
        for _ in 0..TOKEN_COST_ROUNDS {
            key.verify_strict(std::hint::black_box(signed.as_bytes()), &sig)?;
        }
        signature_us = signature_us.min(per_token(started));
    }
    Ok(TokenCosts {
        miss_us,
        hit_us,
        signature_us,
    })
}

/// What `--guard FILE` compares against.
#[derive(Debug, PartialEq)]
pub(crate) struct Guard {
    /// Server CPU per Check, Aegis / no-op, recorded for this build profile.
    pub ratio: f64,
    /// How far above `ratio` a run may land, as a fraction of it (below 1).
    pub margin: f64,
}

impl Guard {
    /// Reads `debug_ratio`, `release_ratio` and `margin` from `key = value` lines (`#`
    /// starts a comment), and keeps the ratio of the profile this binary was built with.
    /// Every key must be there once, with a positive number; no other key is allowed.
    pub(crate) fn parse(text: &str, debug: bool) -> anyhow::Result<Self> {
        const KEYS: [&str; 3] = ["debug_ratio", "release_ratio", "margin"];
        let mut values = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = || format!("line {}", n + 1);
            let (k, v) = line
                .split_once('=')
                .with_context(|| format!("{}: expected `key = value`", at()))?;
            let (k, v) = (k.trim(), v.trim());
            if !KEYS.contains(&k) {
                bail!("{}: unknown key `{k}` (known: {})", at(), KEYS.join(", "));
            }
            let v: f64 = v
                .parse()
                .with_context(|| format!("{}: {v:?} is not a number", at()))?;
            if !v.is_finite() || v <= 0.0 {
                bail!("{}: {k} must be a positive number", at());
            }
            if values.insert(k, v).is_some() {
                bail!("{}: `{k}` is given twice", at());
            }
        }
        let get = |k: &str| values.get(k).copied().with_context(|| format!("no `{k}`"));
        let guard = Self {
            ratio: get(if debug {
                "debug_ratio"
            } else {
                "release_ratio"
            })?,
            margin: get("margin")?,
        };
        // Checked whichever profile runs: a typo in the other one would go unseen.
        get(if debug {
            "release_ratio"
        } else {
            "debug_ratio"
        })?;
        if guard.margin >= 1.0 {
            bail!("margin must be below 1 (a fraction of the ratio)");
        }
        Ok(guard)
    }

    /// The highest ratio a run may measure.
    pub(crate) fn limit(&self) -> f64 {
        self.ratio * (1.0 + self.margin)
    }

    /// The median of the rounds' ratios, if it is within the limit; else why not.
    pub(crate) fn judge(&self, mut ratios: Vec<f64>) -> Result<f64, String> {
        ratios.sort_by(f64::total_cmp);
        let Some(median) = ratios.get(ratios.len() / 2).copied() else {
            return Err("no round was measured".into());
        };
        if median.is_finite() && median > 0.0 && median <= self.limit() {
            Ok(median)
        } else {
            Err(format!(
                "CPU per Check rose: Aegis costs {median:.2}× the no-op's (median of {} \
                 rounds), above the limit of {:.2}",
                ratios.len(),
                self.limit()
            ))
        }
    }
}

/// Rounds of the guard; the median ratio is judged. Five since 2026-12-06 (three before):
/// one round's no-op swinging fast can no longer decide the run with a second.
const GUARD_ROUNDS: usize = 5;

/// `aegis bench --guard FILE`: the varied mix, [`GUARD_ROUNDS`] rounds of no-op then
/// Aegis for `duration_secs` each; fails when the median ratio of server CPU per Check
/// exceeds the recorded one by more than the margin, or when Aegis's answers are not the
/// varied workload's (a pipeline that fails closed on everything is cheap, not fast).
pub(super) async fn guard(args: &BenchArgs, file: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let debug = cfg!(debug_assertions);
    let guard = Guard::parse(&text, debug).with_context(|| file.display().to_string())?;
    let secs = args.duration_secs.max(1);
    let servers = Servers::start(args, "aegis-guard-", "guard").await?;
    let varied = Mix::varied(&servers.setup.workload)?;
    let mut ratios = Vec::new();
    for round in 1..=GUARD_ROUNDS {
        let noop = servers.measure(false, &varied, secs).await?;
        let aegis = servers.measure(true, &varied, secs).await?;
        let ratio = aegis.total / noop.total;
        println!(
            "round {round}: aegis {:.1} µs of CPU per Check ({:.0} Checks/s, {:.0}% allowed), \
             no-op {:.1} ({:.0}/s): ratio {ratio:.2}",
            aegis.total,
            aegis.result.throughput(),
            100.0 * aegis.result.allowed as f64 / aegis.result.requests.max(1) as f64,
            noop.total,
            noop.result.throughput()
        );
        ratios.push(ratio);
    }
    let log = servers.stop()?;
    println!("audit log: {log}");
    let profile = if debug { "debug" } else { "release" };
    println!(
        "recorded for the {profile} build {:.2}, margin {:.0}%: limit {:.2}",
        guard.ratio,
        guard.margin * 100.0,
        guard.limit()
    );
    let median = guard
        .judge(ratios)
        .map_err(|e| anyhow::anyhow!("{e} ({profile}_ratio in {})", file.display()))?;
    println!("guard passed: median ratio {median:.2}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Guard;

    #[test]
    fn a_token_miss_is_timed_with_its_signature_check_and_a_hit_without() {
        let signer = crate::keys::Signer::generate().expect("a key");
        let t = super::token_costs(&signer).expect("every token identified");
        assert!(t.signature_us > 0.0, "{}", t.signature_us);
        // A miss verifies the signature and a hit does not: ~50 µs against under one
        // in a release build, ~80 against ~6 in a debug build. Each is the fastest of
        // three passes, and only their order is asserted.
        assert!(
            t.miss_us > t.hit_us && t.signature_us > t.hit_us,
            "miss {} signature {} hit {}",
            t.miss_us,
            t.signature_us,
            t.hit_us
        );
    }

    const FILE: &str =
        "# comment\ndebug_ratio = 3.5\nrelease_ratio = 6.0 # trailing\nmargin = 0.2\n";

    #[test]
    fn the_guard_file_is_read_for_the_build_profile() {
        assert_eq!(
            Guard::parse(FILE, true).ok(),
            Some(Guard {
                ratio: 3.5,
                margin: 0.2
            })
        );
        let release = Guard::parse(FILE, false).ok();
        assert_eq!(release.as_ref().map(|g| g.ratio), Some(6.0));
        assert!(release.is_some_and(|g| (g.limit() - 7.2).abs() < 1e-9));
    }

    #[test]
    fn a_broken_guard_file_is_named() {
        let err = |text: &str| Guard::parse(text, true).err().map(|e| format!("{e:#}"));
        assert_eq!(
            err("release_ratio = 6\nmargin = 0.3\n").as_deref(),
            Some("no `debug_ratio`")
        );
        assert_eq!(
            err("debug_ratio = 3\nmargin = 0.3\n").as_deref(),
            Some("no `release_ratio`"),
            "the other profile's ratio is checked too"
        );
        let bad = err("debug_ratio = fast\nrelease_ratio = 6\nmargin = 0.3\n");
        assert!(bad.is_some_and(|e| e.contains("line 1") && e.contains("fast")));
        assert!(err("debug_ratio = -1\nrelease_ratio = 6\nmargin = 0.3\n").is_some());
        let typo = err("debug_ratio = 3\nrelease_ration = 6\nmargin = 0.3\n");
        assert!(typo.is_some_and(|e| e.contains("unknown key `release_ration`")));
        let twice = err("debug_ratio = 3\ndebug_ratio = 9\nrelease_ratio = 6\nmargin = 0.3\n");
        assert!(twice.is_some_and(|e| e.contains("given twice")));
        let wide = err("debug_ratio = 3\nrelease_ratio = 6\nmargin = 30\n");
        assert!(wide.is_some_and(|e| e.contains("below 1")));
    }

    #[test]
    fn the_median_round_is_judged_against_the_limit() {
        let g = Guard {
            ratio: 3.5,
            margin: 0.2,
        };
        // Limit 4.2: one slow round does not fail the run, two do.
        assert_eq!(g.judge(vec![3.4, 9.0, 3.6]), Ok(3.6));
        assert!(g.judge(vec![4.3, 9.0, 3.6]).is_err());
        assert!(g.judge(vec![4.21, 4.3, 4.4]).is_err());
        assert!(g.judge(Vec::new()).is_err());
        assert!(g.judge(vec![f64::NAN]).is_err());
    }
}
