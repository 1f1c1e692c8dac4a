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
use envoy_types::ext_authz::v3::pb::CheckRequest;

use super::{
    BenchArgs, CpuSample, PerCheck, PhaseResult, SCOPE_SETS, Setup, agent_token, clients, saturate,
    saturate_feed, workload,
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
    /// What every answer must be: allowed (true) or denied.
    allowed: bool,
}

/// Fresh tokens minted for the cache-miss mix, per second of the phase: more than Aegis
/// answers in a second on the development machine, so no token is sent twice.
const FRESH_TOKENS_PER_SEC: u64 = 15_000;

/// The mixes: allow (token cache hit), allow with a token the server has never seen (a
/// cache miss: signature verification), deny, an MCP body, sanitize, approval, and the
/// varied workload of the main benchmark.
fn mixes(signer: &Signer, agents: usize, secs: u64) -> anyhow::Result<Vec<Mix>> {
    let agents = agents.max(SCOPE_SETS.len());
    let tokens: Vec<String> = (0..agents)
        .map(|a| agent_token(signer, a, &format!("jti-{a}")))
        .collect::<anyhow::Result<_>>()?;
    // Agents whose scopes are SCOPE_SETS[set], with their tokens.
    let of_set = |set: usize| {
        tokens
            .iter()
            .enumerate()
            .filter(move |(a, _)| a % SCOPE_SETS.len() == set)
            .map(|(_, t)| t)
    };
    let each = |set: usize, f: &dyn Fn(&str) -> CheckRequest| -> Arc<Vec<CheckRequest>> {
        Arc::new(of_set(set).map(|t| f(t)).collect())
    };
    let fresh = (secs.max(1) * FRESH_TOKENS_PER_SEC) as usize;
    let mut miss = Vec::with_capacity(fresh);
    // Agents of set 0 (invoices:read), each token new.
    let set0: Vec<usize> = (0..agents).step_by(SCOPE_SETS.len()).collect();
    for n in 0..fresh {
        let a = super::nth_wrapping(&set0, n).copied().unwrap_or(0);
        let token = agent_token(signer, a, &format!("fresh-{n}"))?;
        miss.push(request(&token, "invoices", "read", "{}", false, false));
    }
    Ok(vec![
        Mix {
            name: "allow",
            about: "invoices.read on its Envoy route, scope granted (token cached)",
            work: each(0, &|t| request(t, "invoices", "read", "{}", false, false)),
            wrap: true,
            allowed: true,
        },
        Mix {
            name: "allow-new-token",
            about: "the same with a token never seen before (signature verified)",
            work: Arc::new(miss),
            wrap: false,
            allowed: true,
        },
        Mix {
            name: "deny",
            about: "invoices.read without the scope",
            work: each(3, &|t| request(t, "invoices", "read", "{}", false, false)),
            wrap: true,
            allowed: false,
        },
        Mix {
            name: "mcp",
            about: "invoices.read as an MCP tools/call body (JSON parsed, allowed)",
            work: each(0, &|t| {
                request(t, "invoices", "read", r#"{"id":"inv-1"}"#, true, false)
            }),
            wrap: true,
            allowed: true,
        },
        Mix {
            name: "sanitize",
            about: "github.read_issue carrying an Authorization header (removed)",
            work: each(1, &|t| {
                request(t, "github", "read_issue", "{}", false, true)
            }),
            wrap: true,
            allowed: true,
        },
        Mix {
            name: "approval",
            about: "payments.create over the threshold, MCP (approval requested)",
            work: each(0, &|t| {
                request(t, "payments", "create", r#"{"amount":5000}"#, true, false)
            }),
            wrap: true,
            allowed: false,
        },
        Mix {
            name: "varied",
            about: "the main benchmark's workload (all of the above and more)",
            work: Arc::new(workload(signer, agents)?),
            wrap: true,
            allowed: false,
        },
    ])
}

/// The result of one mix on one server.
struct Measured {
    result: PhaseResult,
    /// µs of CPU per Check by thread group, and the server's total last.
    cpu: Vec<(String, f64)>,
}

impl Measured {
    fn total(&self) -> f64 {
        self.cpu.last().map_or(0.0, |(_, us)| *us)
    }
}

/// The two servers every mix runs against.
struct Servers {
    setup: Setup,
    noop: ChildServer,
    aegis: super::AegisServer,
    args: BenchArgs,
}

impl Servers {
    async fn start(args: &BenchArgs, prefix: &str) -> anyhow::Result<Self> {
        let setup = Setup::new(prefix, args.agents).await?;
        let noop = ChildServer::spawn(
            &["noop-server", "--listen", "127.0.0.1:0"],
            "noop ext_authz listening on ",
        )?;
        let aegis = setup.aegis("mixes", args)?;
        Ok(Self {
            setup,
            noop,
            aegis,
            args: args.clone(),
        })
    }

    /// Drives one server with `mix` for `secs` (after a half-second warm-up on wrapping
    /// mixes) and samples its threads' CPU over the measured part.
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
        let ticks = cpu.since();
        if result.errors > 0 {
            bail!("{name}, mix {}: {} Checks failed", mix.name, result.errors);
        }
        // Thread groups: the eval pool's threads `aegis-eval-N` as one line.
        let mut grouped = BTreeMap::<(String, String), u64>::new();
        for ((process, thread), t) in ticks {
            let group = thread.trim_end_matches(|c: char| c.is_ascii_digit());
            let group = group.strip_suffix('-').unwrap_or(group).to_owned();
            *grouped.entry((process, group)).or_insert(0) += t;
        }
        Ok(Measured {
            cpu: grouped.per_check(result.requests),
            result,
        })
    }

    fn stop(mut self) -> anyhow::Result<String> {
        self.noop.stop()?;
        self.aegis.stop_and_verify()
    }
}

/// `aegis bench --mixes`.
pub(super) async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let secs = args.duration_secs.max(1);
    let servers = Servers::start(args, "aegis-mixes-").await?;
    let signer = Signer::load_or_create(&servers.setup.key_dir)?;
    let mixes = mixes(&signer, args.agents, secs)?;
    println!(
        "aegis bench --mixes: {secs} s per mix and server, {} callers over {} connections; \
         server CPU per Check from /proc (10 ms ticks)",
        args.concurrency, args.connections
    );
    let mut rows = Vec::new();
    for mix in &mixes {
        let noop = servers.measure(false, mix, secs).await?;
        let aegis = servers.measure(true, mix, secs).await?;
        let r = &aegis.result;
        let answered_as_meant = if mix.allowed {
            r.denied == 0
        } else {
            mix.name == "varied" || r.allowed == 0
        };
        if !answered_as_meant {
            bail!(
                "mix {}: {} allowed, {} denied: not the path it is meant to measure",
                mix.name,
                r.allowed,
                r.denied
            );
        }
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
            aegis.total(),
            noop.total(),
            aegis.total() / noop.total().max(1e-9),
            mix.about
        );
    }
    println!();
    println!("Aegis CPU per Check by thread (µs):");
    let threads: std::collections::BTreeSet<&str> = rows
        .iter()
        .flat_map(|(_, _, a)| a.cpu.iter().map(|(t, _)| t.as_str()))
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
                .cpu
                .iter()
                .find(|(t, _)| t == thread)
                .map_or(0.0, |(_, us)| *us);
            print!(" {us:>9.1}");
        }
        println!();
    }
    println!("audit log: {log}");
    Ok(())
}

/// What `--guard FILE` compares against.
#[derive(Debug, PartialEq)]
pub(crate) struct Guard {
    /// Server CPU per Check, Aegis / no-op, recorded for this build profile.
    pub ratio: f64,
    /// How far above `ratio` a run may land, as a fraction of it.
    pub margin: f64,
}

impl Guard {
    /// Reads `debug_ratio` or `release_ratio` (for the profile this binary was built
    /// with) and `margin` from `key = value` lines; `#` starts a comment.
    pub(crate) fn parse(text: &str, debug: bool) -> anyhow::Result<Self> {
        let want = if debug {
            "debug_ratio"
        } else {
            "release_ratio"
        };
        let mut values = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .with_context(|| format!("line {}: expected `key = value`", n + 1))?;
            let v: f64 = v
                .trim()
                .parse()
                .with_context(|| format!("line {}: {:?} is not a number", n + 1, v.trim()))?;
            if !v.is_finite() || v <= 0.0 {
                bail!("line {}: {} must be a positive number", n + 1, k.trim());
            }
            values.insert(k.trim().to_owned(), v);
        }
        let get = |k: &str| values.get(k).copied().with_context(|| format!("no `{k}`"));
        Ok(Self {
            ratio: get(want)?,
            margin: get("margin")?,
        })
    }

    /// The highest ratio a run may measure.
    pub(crate) fn limit(&self) -> f64 {
        self.ratio * (1.0 + self.margin)
    }
}

/// Rounds of the guard; the median ratio is judged.
const GUARD_ROUNDS: usize = 3;

/// `aegis bench --guard FILE`: the varied mix, [`GUARD_ROUNDS`] rounds of no-op then
/// Aegis for `duration_secs` each; fails when the median ratio of server CPU per Check
/// exceeds the recorded one by more than the margin.
pub(super) async fn guard(args: &BenchArgs, file: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let guard =
        Guard::parse(&text, cfg!(debug_assertions)).with_context(|| file.display().to_string())?;
    let secs = args.duration_secs.max(1);
    let servers = Servers::start(args, "aegis-guard-").await?;
    let signer = Signer::load_or_create(&servers.setup.key_dir)?;
    let varied = Mix {
        name: "varied",
        about: "",
        work: Arc::new(workload(&signer, args.agents)?),
        wrap: true,
        allowed: false,
    };
    let mut ratios = Vec::new();
    for round in 1..=GUARD_ROUNDS {
        let noop = servers.measure(false, &varied, secs).await?;
        let aegis = servers.measure(true, &varied, secs).await?;
        let ratio = aegis.total() / noop.total().max(1e-9);
        println!(
            "round {round}: aegis {:.1} µs of CPU per Check ({:.0} Checks/s), no-op {:.1} \
             ({:.0}/s): ratio {ratio:.2}",
            aegis.total(),
            aegis.result.throughput(),
            noop.total(),
            noop.result.throughput()
        );
        ratios.push(ratio);
    }
    let log = servers.stop()?;
    println!("audit log: {log}");
    ratios.sort_by(f64::total_cmp);
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::MAX);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "median ratio {median:.2}; recorded for the {profile} build {:.2}, margin {:.0}%: \
         limit {:.2}",
        guard.ratio,
        guard.margin * 100.0,
        guard.limit()
    );
    if log.starts_with("BROKEN") {
        bail!("the audit log does not verify after the guard run");
    }
    if median > guard.limit() {
        bail!(
            "CPU per Check rose: Aegis costs {median:.2}× the no-op's, above the limit of \
             {:.2} ({} in {})",
            guard.limit(),
            if cfg!(debug_assertions) {
                "debug_ratio"
            } else {
                "release_ratio"
            },
            file.display()
        );
    }
    println!("guard passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Guard;

    #[test]
    fn the_guard_file_is_read_for_the_build_profile() {
        let text = "# comment\ndebug_ratio = 9.5\nrelease_ratio = 5.5 # trailing\nmargin = 0.3\n";
        assert_eq!(
            Guard::parse(text, true).ok(),
            Some(Guard {
                ratio: 9.5,
                margin: 0.3
            })
        );
        let release = Guard::parse(text, false).ok();
        assert_eq!(release.as_ref().map(|g| g.ratio), Some(5.5));
        assert!(release.is_some_and(|g| (g.limit() - 7.15).abs() < 1e-9));
    }

    #[test]
    fn a_broken_guard_file_is_named() {
        let missing = Guard::parse("margin = 0.3\n", true)
            .err()
            .map(|e| e.to_string());
        assert_eq!(missing.as_deref(), Some("no `debug_ratio`"));
        let bad = Guard::parse("debug_ratio = fast\nmargin = 0.3\n", true)
            .err()
            .map(|e| format!("{e:#}"));
        assert!(bad.is_some_and(|e| e.contains("line 1") && e.contains("fast")));
        let negative = Guard::parse("debug_ratio = -1\nmargin = 0.3\n", true).err();
        assert!(negative.is_some());
    }
}
