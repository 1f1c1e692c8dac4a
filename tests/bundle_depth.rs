//! Bundles that would overflow regorus's stack: recursion and chains too deep are refused
//! at load, naming the rule; bundles just inside the bound evaluate, on the threads Aegis
//! gives regorus, with room to spare. Without these checks each refused bundle here loaded,
//! and several aborted the process (a stack overflow), at load, when an input drove them
//! deep, or when the bundle was freed.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use aegis::policy::graph::{MAX_EVAL_DEPTH, REGO_STACK};
use aegis::policy::{BundleFiles, BundleSource, CompiledBundle, Policy, PolicyOptions};
use common::*;

const HEAD: &str = "package aegis.authz\nimport rego.v1\n";

fn opts() -> PolicyOptions {
    PolicyOptions {
        query: "data.aegis.authz.decision".into(),
        eval_timeout: Duration::from_secs(10),
        eval_threads: 1,
        verification_keys: Vec::new(),
    }
}

fn files(modules: &[(&str, &str)]) -> BundleFiles {
    BundleFiles::from_files(
        modules
            .iter()
            .map(|(path, text)| (path.to_string(), text.as_bytes().to_vec()))
            .collect(),
    )
}

fn compile(modules: &[(&str, &str)]) -> Result<CompiledBundle, String> {
    let parsed = files(modules).parse().map_err(|e| e.to_string())?;
    CompiledBundle::compile(parsed, &opts()).map_err(|e| e.to_string())
}

fn refusal(modules: &[(&str, &str)]) -> String {
    match compile(modules) {
        Ok(_) => panic!(
            "loaded: {}",
            modules[0].1.lines().take(6).collect::<Vec<_>>().join("\n")
        ),
        Err(e) => e,
    }
}

/// The cost the graph check gives a single-module bundle.
fn cost(module: &str) -> usize {
    let mut engine = regorus::Engine::new();
    engine
        .add_policy("aegis/authz.rego".into(), module.into())
        .expect("parses");
    aegis::policy::graph::costliest(engine.get_modules())
        .expect("not recursive")
        .expect("has rules")
        .cost
}

/// `f(count(input.p))` recursing once per character of `p`: regorus loads it.
const RECURSIVE: &str = r#"package aegis.authz
import rego.v1
f(x) := 0 if x <= 0
f(x) := f(x - 1) + 1 if x > 0
decision := {"allowed": f(count(input.p)) > 0}
"#;

#[test]
fn a_recursive_function_an_input_could_drive_deep_is_refused_naming_the_cycle() {
    let e = refusal(&[("aegis/authz.rego", RECURSIVE)]);
    assert!(
        e.starts_with("aegis/authz.rego:3: rule data.aegis.authz.f is recursive: data.aegis.authz.f -> data.aegis.authz.f"),
        "{e}"
    );
}

#[test]
fn recursion_through_another_package_and_an_import_alias_is_refused() {
    let lib = "package lib\nimport rego.v1\nimport data.aegis.authz as a\nhelper(x) := a.g(x - 1) if x > 0\n";
    let authz = format!(
        "{HEAD}import data.lib\ng(x) := lib.helper(x)\ndecision := {{\"allowed\": g(count(input.p)) > 0}}\n"
    );
    let e = refusal(&[("aegis/authz.rego", &authz), ("lib/lib.rego", lib)]);
    assert!(e.contains(" is recursive: "), "{e}");
    assert!(
        e.contains("data.aegis.authz.g") && e.contains("data.lib.helper"),
        "names both: {e}"
    );
}

#[test]
fn a_rule_reading_its_own_package_through_a_dynamic_key_is_refused_as_opa_does() {
    // OPA: `rego_recursion_error: rule allow is recursive: allow -> allow` (open-policy-agent/opa#3876).
    let module = format!("{HEAD}allow if data[input.pkg].x\ndecision := {{\"allowed\": allow}}\n");
    let e = refusal(&[("aegis/authz.rego", &module)]);
    assert!(
        e.contains("rule data.aegis.authz.allow is recursive: data.aegis.authz.allow -> data.aegis.authz.allow"),
        "{e}"
    );
}

#[test]
fn chains_too_deep_are_refused_naming_the_top_rule_and_the_chain() {
    // On 2 MiB threads, before the check: 500 chained rules aborted the process at load,
    // 1,000 functions and 2,000 `some … in` statements at the first evaluation.
    let rules = shape("rules", 3000);
    let e = refusal(&[("aegis/authz.rego", &rules)]);
    assert!(
        e.starts_with("aegis/authz.rego:3004: rule data.aegis.authz.decision nests too deep to evaluate safely: its chain of 3002 rules (data.aegis.authz.decision -> data.aegis.authz.r3000 -> data.aegis.authz.r2999 -> … 2997 more … -> data.aegis.authz.r1 -> data.aegis.authz.r0) costs "),
        "{e}"
    );
    assert!(
        e.ends_with(&format!("the most Aegis accepts is {MAX_EVAL_DEPTH}")),
        "{e}"
    );

    let mut funcs = String::from(HEAD);
    funcs.push_str("f0(x) := x + 1\n");
    for i in 1..=1000 {
        funcs.push_str(&format!("f{i}(x) := f{}(x) + 1\n", i - 1));
    }
    funcs.push_str("decision := {\"allowed\": f1000(count(input.p)) > 0}\n");
    let e = refusal(&[("aegis/authz.rego", &funcs)]);
    assert!(
        e.contains("data.aegis.authz.f1000 -> data.aegis.authz.f999"),
        "{e}"
    );

    let mut body = format!("{HEAD}decision := {{\"allowed\": true}} if {{\n");
    for i in 0..3000 {
        body.push_str(&format!("  some x{i} in [1]\n"));
    }
    body.push_str("}\n");
    let e = refusal(&[("aegis/authz.rego", &body)]);
    assert!(
        e.starts_with("aegis/authz.rego:3: rule data.aegis.authz.decision nests too deep to evaluate safely: its chain of 1 rules (data.aegis.authz.decision) costs "),
        "{e}"
    );
}

#[test]
fn imports_cannot_hide_a_cycle_or_a_chain() {
    // regorus takes the package's own `f` when the import names no function.
    let behind_input = format!(
        "{HEAD}import input.f\nf(n) := 0 if n <= 0\nf(n) := f(n - 1) + 1 if n > 0\n\
         decision := {{\"allowed\": f(count(input.p)) > 0}}\n"
    );
    let e = refusal(&[("aegis/authz.rego", &behind_input)]);
    assert!(e.contains("rule data.aegis.authz.f is recursive"), "{e}");

    // An alias bound in another module of the package.
    let alias = format!(
        "{HEAD}import data.aegis.authz.f as g\ndecision := {{\"allowed\": f(count(input.p)) > 0}}\n"
    );
    let user = format!("{HEAD}f(n) := 0 if n <= 0\nf(n) := g(n - 1) + 1 if n > 0\n");
    let e = refusal(&[("aegis/a.rego", &alias), ("aegis/b.rego", &user)]);
    assert!(e.contains("rule data.aegis.authz.f is recursive"), "{e}");

    // A chain of rules whose root name is also an import of `input`.
    let mut chain = format!("{HEAD}import input.x\nx.r0 := count(input.p)\n");
    for i in 1..=3000 {
        chain.push_str(&format!("x.r{i} := x.r{} + 1\n", i - 1));
    }
    chain.push_str("decision := {\"allowed\": x.r3000 > 0}\n");
    let e = refusal(&[("aegis/authz.rego", &chain)]);
    assert!(e.contains("nests too deep"), "{e}");
}

#[test]
fn keys_in_rule_heads_count_as_references() {
    let mut chain = format!("{HEAD}r0 := 1\n");
    for i in 1..=3000 {
        chain.push_str(&format!("r{i}[count(r{})] := 1\n", i - 1));
    }
    chain.push_str("decision := {\"allowed\": count(r3000) > 0}\n");
    let e = refusal(&[("aegis/authz.rego", &chain)]);
    assert!(
        e.contains("data.aegis.authz.r3000 -> data.aegis.authz.r2999"),
        "{e}"
    );
}

#[test]
fn every_loop_in_a_statement_counts() {
    // regorus evaluates the rest of a body inside each `x[_]` of a statement: 400
    // statements of 10 loops are 4,000 levels, not 400.
    let mut body = format!("{HEAD}a := [1]\ndeep if {{\n");
    for i in 0..400 {
        body.push_str(&format!("  x{i} := {}\n", ["a[_]"; 10].join(" + ")));
    }
    body.push_str("}\ndecision := {\"allowed\": deep}\n");
    assert!(cost(&body) > 4000, "{}", cost(&body));
    let e = refusal(&[("aegis/authz.rego", &body)]);
    assert!(
        e.contains("rule data.aegis.authz.decision nests too deep"),
        "{e}"
    );
}

#[test]
fn a_function_replaced_with_another_adds_its_whole_cost() {
    // `c99(x) with f as g` runs g at the bottom of c99's chain; g100 does that 100 times
    // over: ~10,000 calls deep, though each chain alone is short.
    let mut m = format!("{HEAD}f(x) := x\nc0(x) := f(x)\n");
    for i in 1..100 {
        m.push_str(&format!("c{i}(x) := c{}(x)\n", i - 1));
    }
    m.push_str("g0(x) := x\n");
    for i in 1..=100 {
        m.push_str(&format!(
            "g{i}(x) := y if {{ y := c99(x) with f as g{} }}\n",
            i - 1
        ));
    }
    m.push_str("decision := {\"allowed\": y > 0} if { y := c99(count(input.p)) with f as g100 }\n");
    let e = refusal(&[("aegis/authz.rego", &m)]);
    assert!(
        e.contains("rule data.aegis.authz.decision nests too deep"),
        "{e}"
    );
}

#[test]
fn data_too_many_directories_deep_is_refused() {
    let deep = format!("{}data.json", "a/".repeat(65));
    let ok = format!("{}data.json", "b/".repeat(64));
    let module = format!("{HEAD}decision := {{\"allowed\": true}}\n");
    let files = |data: &str| {
        BundleFiles::from_files(vec![
            ("aegis/authz.rego".into(), module.clone().into_bytes()),
            (data.to_owned(), b"{}".to_vec()),
        ])
    };
    let e = files(&deep).parse().expect_err("refused");
    assert_eq!(
        e.to_string(),
        format!("{deep}: data file 65 directories deep; the most is 64")
    );
    assert!(files(&ok).parse().is_ok());
}

/// Builtins that recurse once per segment of what they are given refuse past their bound,
/// with a gRPC error naming them; just inside it they are decided. `graph.reachable_paths`
/// is walked without recursing, and refuses an exponential number of paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtins_that_recurse_on_their_input_refuse_past_their_bound() {
    let _shared = common::CORES.read().await;
    let policy = format!(
        r#"{HEAD}
h := input.attributes.request.http.headers
n := to_number(h["x-n"])
chain := {{sprintf("%d", [i]): [sprintf("%d", [i + 1])] | some i in numbers.range(0, n - 1)}}
decision := {{"allowed": count(json.filter({{}}, [h["x-path"]])) >= 0}} if input.tool.name == "filter"
decision := {{"allowed": count(json.remove({{}}, [h["x-path"]])) >= 0}} if input.tool.name == "remove"
decision := {{"allowed": count(graph.reachable_paths(chain, ["0"])) > 0}} if input.tool.name == "paths"
ladder := {{sprintf("%d", [i]): [sprintf("%d", [i + 1]), sprintf("%d", [i + 1])] | some i in numbers.range(0, n - 1)}}
decision := {{"allowed": count(graph.reachable_paths(ladder, ["0"])) > 0}} if input.tool.name == "ladder"
"#
    );
    let (_tmp, b) = rego_bundle(&policy);
    let mut s = start_with(|c| {
        c.policy.bundle = Some(b);
        c.policy.eval_timeout_ms = 5_000;
    })
    .await;
    let t = s.token("acme", "mallory", &[]);
    let call = |tool: &str, path: &str, n: &str| {
        Req::get(&format!("/{tool}"))
            .token(&t)
            .tool(tool, "read")
            .header("x-path", path)
            .header("x-n", n)
            .build()
    };
    let inside = vec!["a"; 128].join("/");
    let past = vec!["a"; 20_000].join("/");
    for tool in ["filter", "remove"] {
        let r = s.check(call(tool, &inside, "1")).await.expect("decided");
        assert_eq!(code(&r), 0, "{tool} at 128 segments");
        let err = s.check(call(tool, &past, "1")).await.expect_err("refused");
        assert_eq!(
            err.code(),
            tonic::Code::ResourceExhausted,
            "{tool}: {err:?}"
        );
        assert!(
            err.message().contains(&format!(
                "json.{tool} was given a path of 20000 segments; the most is 128"
            )),
            "{}",
            err.message()
        );
    }
    // A chain of 20,000 vertices is one path 20,000 long: walked without recursing.
    let r = s.check(call("paths", "", "20000")).await.expect("decided");
    assert_eq!(code(&r), 0, "reachable_paths along 20,000 vertices");
    // Two edges to each next vertex: 2^40 paths to walk.
    let err = s
        .check(call("ladder", "", "40"))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("graph.reachable_paths would build more than 1000000 elements"),
        "{}",
        err.message()
    );
    s.stop().await;
}

#[test]
fn dynamic_metadata_deeper_than_envoy_needs_fails_closed() {
    // A policy can nest its output thousands of levels (a rule per level); the response
    // metadata is converted recursively on 2 MiB async workers.
    let nested = |n: usize| {
        let mut m = format!("{HEAD}m0 := {{\"a\": 1}}\n");
        for i in 1..n {
            m.push_str(&format!("m{i} := {{\"a\": m{}}}\n", i - 1));
        }
        m.push_str(&format!(
            "decision := {{\"allowed\": true, \"dynamic_metadata\": m{}}}\n",
            n - 1
        ));
        m
    };
    let input = || regorus::Value::from_json_str("{}").expect("json");
    let ok = compile(&[("aegis/authz.rego", &nested(64))]).expect("loads");
    assert!(ok.evaluate(input()).is_ok());
    let deep = compile(&[("aegis/authz.rego", &nested(65))]).expect("loads");
    let e = deep
        .evaluate(input())
        .expect_err("fails closed")
        .to_string();
    assert!(
        e.contains("dynamic_metadata") && e.contains("nests more than 64 levels deep"),
        "{e}"
    );
    // Shared values: cheap for regorus to build, 2^60 values to convert.
    let mut shared = format!("{HEAD}m0 := {{\"a\": 1}}\n");
    for i in 1..=60 {
        shared.push_str(&format!("m{i} := {{\"a\": m{0}, \"b\": m{0}}}\n", i - 1));
    }
    shared.push_str("decision := {\"allowed\": true, \"dynamic_metadata\": m60}\n");
    let wide = compile(&[("aegis/authz.rego", &shared)]).expect("loads");
    let e = wide
        .evaluate(input())
        .expect_err("fails closed")
        .to_string();
    assert!(e.contains("holds more than 10000 values"), "{e}");
}

#[test]
fn the_paths_of_rule_heads_count_toward_depth() {
    // Each head nests its value 127 levels into `data`. By a review's reading of regorus
    // (not run here), 408 of them make its data tree 52,000 levels deep, which it frees
    // recursively wherever the bundle is let go of. Each head link now costs a unit.
    let links = ".a".repeat(126);
    let mut m = format!("{HEAD}p0{links} := 1\n");
    for i in 1..408 {
        m.push_str(&format!("p{i}{links} := p{}\n", i - 1));
    }
    m.push_str("decision := {\"allowed\": count(p407) >= 0}\n");
    let e = refusal(&[("aegis/authz.rego", &m)]);
    assert!(e.contains("nests too deep"), "{e}");
}

/// Shapes of deep evaluation, each `n` levels of its kind, each reaching the input.
fn shape(kind: &str, n: usize) -> String {
    let mut s = String::from(HEAD);
    s.push_str("r0 := count(input.p)\n");
    let top = match kind {
        // A rule per level.
        "rules" => {
            for i in 1..=n {
                s.push_str(&format!("r{i} := r{} + 1\n", i - 1));
            }
            format!("r{n} > 0")
        }
        // A function per level, each call 30 calls deep (the costliest unit measured).
        "calls" => {
            s.push_str("f0(x) := x + 1\n");
            for i in 1..=n {
                s.push_str(&format!(
                    "f{i}(x) := {}f{}(x){}\n",
                    "abs(".repeat(30),
                    i - 1,
                    ")".repeat(30)
                ));
            }
            format!("f{n}(r0) > 0")
        }
        // One body of `n` loops, each recursing into the rest.
        "loops" => {
            s.push_str("deep if {\n");
            for i in 0..n {
                s.push_str(&format!("  some x{i} in [r0]\n"));
            }
            s.push_str("}\n");
            "deep".into()
        }
        // A rule per level holding 20 loops.
        "loop_chain" => {
            for i in 1..=n {
                s.push_str(&format!(
                    "r{i} := y if {{\n{}  y := r{}\n}}\n",
                    "  some _ in [1]\n".repeat(20),
                    i - 1
                ));
            }
            format!("r{n} > 0")
        }
        // A rule per level, ten comprehensions deep.
        "comprehensions" => {
            for i in 1..=n {
                s.push_str(&format!(
                    "r{i} := {}r{}{}\n",
                    "[x | x := ".repeat(10),
                    i - 1,
                    "]".repeat(10)
                ));
            }
            format!("count(r{n}) > 0")
        }
        // A rule per level whose head is 60 links long, reading the one below through
        // its whole path.
        "head_paths" => {
            let links = ".a".repeat(59);
            s.push_str(&format!("h0{links} := r0\n"));
            for i in 1..=n {
                s.push_str(&format!("h{i}{links} := h{}{links} + 1\n", i - 1));
            }
            format!("h{n}{links} > 0")
        }
        // A rule per level, ten `every` deep.
        "every" => {
            for i in 1..=n {
                let open: String = (0..10).map(|k| format!("every x{k} in [1] {{ ")).collect();
                s.push_str(&format!(
                    "r{i} := r{} + 1 if {{ {open}r{} > 0 {} }}\n",
                    i - 1,
                    i - 1,
                    "}".repeat(10)
                ));
            }
            format!("r{n} > 0")
        }
        // One body of `n` statements, each with ten loops.
        "index_loops" => {
            s.push_str("a := [r0]\ndeep if {\n");
            for i in 0..n {
                s.push_str(&format!("  x{i} := {}\n", ["a[_]"; 10].join(" + ")));
            }
            s.push_str("}\n");
            "deep".into()
        }
        // A rule per level reading a reference 100 links long.
        "references" => {
            for i in 1..=n {
                s.push_str(&format!(
                    "r{i} := r{} + count(input.d{})\n",
                    i - 1,
                    ".a".repeat(99)
                ));
            }
            format!("r{n} > 0")
        }
        _ => unreachable!(),
    };
    s.push_str(&format!("decision := {{\"allowed\": {top}}}\n"));
    s
}

/// The deepest `n` of a shape the bound accepts (costs grow linearly with `n`).
fn deepest_accepted(kind: &str) -> usize {
    let (one, two) = (cost(&shape(kind, 1)), cost(&shape(kind, 2)));
    let step = two - one;
    let n = 1 + (MAX_EVAL_DEPTH - one) / step;
    assert!(cost(&shape(kind, n)) <= MAX_EVAL_DEPTH);
    assert!(cost(&shape(kind, n + 1)) > MAX_EVAL_DEPTH);
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_at_the_bound_evaluate_on_the_pool_and_on_half_its_stack_and_one_past_is_refused() {
    let nested = format!("{}\"xy\"{}", "{\"a\": ".repeat(99), "}".repeat(99));
    let doc = format!("{{\"p\": \"xy\", \"d\": {nested}}}");
    let input = || regorus::Value::from_json_str(&doc).expect("json");
    for kind in [
        "rules",
        "calls",
        "loops",
        "loop_chain",
        "comprehensions",
        "references",
        "index_loops",
        "head_paths",
        "every",
    ] {
        let n = deepest_accepted(kind);
        let e = refusal(&[("aegis/authz.rego", &shape(kind, n + 1))]);
        assert!(e.contains("nests too deep"), "{kind}: {e}");

        // The real evaluation threads (compiled on Aegis's compile thread).
        let (_tmp, dir) = rego_bundle(&shape(kind, n));
        let policy = Policy::load(BundleSource::Dir(dir), opts())
            .unwrap_or_else(|e| panic!("{kind} at {n} loads: {e}"));
        let decision = policy
            .evaluate(policy.current(), input())
            .await
            .unwrap_or_else(|e| panic!("{kind} at {n}: {e}"));
        assert_eq!(decision.verdict.as_str(), "allow", "{kind} at {n}");

        // Half the stack, with the evaluator serving Checks and with the interpreter (the
        // fallback, and what `with` and `aegis policy test` use): the bound leaves at least
        // that much to spare.
        let (compiled, doc) = (policy.current(), input());
        let on_half = std::thread::Builder::new()
            .stack_size(REGO_STACK / 2)
            .spawn(move || {
                let served = compiled
                    .evaluate(doc.clone())
                    .map(|d| d.verdict.as_str().to_owned())
                    .map_err(|e| e.to_string());
                let interpreted = compiled
                    .interpret(doc)
                    .map(|v| v["allowed"].clone())
                    .map_err(|e| e.to_string());
                (served, interpreted)
            })
            .expect("spawn")
            .join()
            .expect("joined");
        assert_eq!(
            on_half,
            (Ok("allow".to_owned()), Ok(regorus::Value::from(true))),
            "{kind} at {n} on half the stack"
        );
        // What the engines computed is freed safely wherever the last reference goes (here,
        // a thread with tokio's 2 MiB stack).
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || drop(policy))
            .expect("spawn")
            .join()
            .expect("freed");
    }
}

/// What a hostile agent would do with a recursive bundle a careless operator ships: a
/// header long enough to recurse past any stack. The reload is refused, the last good
/// bundle keeps deciding, and the sidecar stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recursive_bundle_is_not_taken_on_reload_and_a_deep_header_cannot_abort_the_sidecar() {
    let _shared = common::CORES.read().await;
    let (_tmp, bundle) = rego_bundle(&format!("{HEAD}decision := {{\"allowed\": true}}\n"));
    let b = bundle.clone();
    let mut server = start_with(|c| c.policy.bundle = Some(b)).await;
    let policy = server.running.as_ref().expect("running").policy.clone();
    let first = policy.revision();
    let t = server.token("acme", "mallory", &[]);
    let deep = |t: &str| {
        Req::get("/tools/x")
            .token(t)
            .tool("x", "read")
            .header("x-n", &"9".repeat(30_000))
            .build()
    };
    assert_eq!(code(&server.check(deep(&t)).await.expect("decided")), 0);

    let recursive = format!(
        "{HEAD}f(x) := 0 if x <= 0\nf(x) := f(x - 1) + 1 if x > 0\n\
         decision := {{\"allowed\": f(count(input.attributes.request.http.headers[\"x-n\"])) > 0}}\n"
    );
    std::fs::write(bundle.join("policy.rego"), recursive).expect("write");
    assert!(
        eventually(Duration::from_secs(10), || policy.reload_failures() >= 1).await,
        "the recursive bundle is seen and refused"
    );
    assert_eq!(
        policy.revision(),
        first,
        "the last good bundle still serves"
    );
    let r = server.check(deep(&t)).await.expect("still decided");
    assert_eq!(code(&r), 0);
    assert_eq!(policy_version(&r), first);
    let admin = server.running.as_ref().expect("running").admin_addr;
    let scrape = http_get(admin, "/metrics").await;
    assert!(
        scrape.contains("\naegis_policy_reload_failures_total 1\n"),
        "{scrape}"
    );
    server.stop().await;
}

#[test]
fn the_default_bundle_is_far_inside_the_bound() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let mut engine = regorus::Engine::new();
    for entry in ["aegis/authz.rego", "aegis/authz_test.rego"] {
        let text = std::fs::read_to_string(root.join(entry)).expect("read");
        engine.add_policy(entry.into(), text).expect("parses");
    }
    let chain = aegis::policy::graph::costliest(engine.get_modules())
        .expect("not recursive")
        .expect("has rules");
    println!("default bundle: {chain:?}");
    assert!(chain.cost * 8 < MAX_EVAL_DEPTH, "{chain:?}");
}
