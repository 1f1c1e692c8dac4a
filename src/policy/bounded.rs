//! Bounded builtins: the regorus builtins whose output grows with a number or a product
//! of sizes taken from the input, replaced by versions that refuse past a stated bound.
//!
//! regorus checks its execution timer between evaluation steps, not inside builtins, and
//! its memory guard is a no-op without its `allocator-memory-limits` feature (a global
//! allocator change). So `numbers.range(1, n)` with `n` from a header ran for as long as
//! `n` said, with one allocation of `n` elements up front: `i64::MAX` panicked (capacity
//! overflow), and an `n` too large to allocate aborts the process (a failed allocation
//! does in Rust). OPA bounds these by
//! checking its query's cancellation inside the builtin loops; Aegis does the same here:
//! - builtins that build arrays by count (`numbers.range`, `numbers.range_step`,
//!   `net.cidr_expand`) refuse more than [`MAX_ELEMENTS`] elements before allocating,
//!   and the ranges check the evaluation's deadline as they fill;
//! - builtins whose output string is a product of input sizes (`replace`,
//!   `regex.replace`, `strings.replace_n`, `concat`, `sprintf` widths) refuse an output
//!   that could exceed
//!   [`MAX_STRING_BYTES`] before building it.
//!
//! - `json.filter` and `json.remove`, which recurse once per segment of a path inside one
//!   call, refuse paths of more than [`MAX_JSON_PATH_SEGMENTS`] segments;
//! - `graph.reachable_paths`, which regorus walks by recursing once per vertex along a
//!   path, is walked here with a stack of its own, checking the deadline, and refuses
//!   once the paths it finds (duplicates included) pass [`MAX_ELEMENTS`] elements: they
//!   can be exponential in the graph.
//!
//! Every other builtin's output is bounded by its inputs, and the decoded Check is capped
//! at 256 KiB; loops over them are what regorus's timer does check.
//!
//! A refusal is a [`regorus::LimitError`], the one error regorus propagates even with
//! strict builtin errors off (so `not numbers.range(...)` cannot turn a refusal into a
//! true), and is also noted in a thread-local that the evaluation pool reads after every
//! evaluation: whatever the policy made of the error, the Check fails closed with the
//! refusal's own message.
//!
//! The RVM calls builtins through its program's table of resolved functions, which is
//! patched ([`patch_program`]); the interpreter looks extensions up before builtins, so the
//! same functions are registered as extensions of that name ([`register`]).

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use regorus::Value;
use regorus::unstable::{Expr, Ref, Span};

/// The most elements one builtin call may build (16 MiB of values and more).
pub const MAX_ELEMENTS: u64 = 1_000_000;
/// The longest string one builtin call may build.
pub const MAX_STRING_BYTES: u64 = 16 * 1024 * 1024;
/// The most segments one `json.filter` / `json.remove` path may have: regorus builds a
/// tree one level per segment and frees it recursively, so a 1 MB `"a/a/a/…"` string
/// would overflow the stack.
pub const MAX_JSON_PATH_SEGMENTS: usize = 128;
/// Elements built between two looks at the deadline.
const DEADLINE_EVERY: usize = 4096;

type Builtin = fn(&Span, &[Ref<Expr>], &[Value], bool) -> anyhow::Result<Value>;

/// (name, argument count, bounded version).
const BOUNDED: &[(&str, u8, Builtin)] = &[
    ("numbers.range", 2, range),
    ("numbers.range_step", 3, range_step),
    ("net.cidr_expand", 1, cidr_expand),
    ("replace", 3, replace),
    ("regex.replace", 3, regex_replace),
    ("strings.replace_n", 2, replace_n),
    ("concat", 2, concat),
    ("sprintf", 2, sprintf),
    ("json.filter", 2, json_filter),
    ("json.remove", 2, json_remove),
    ("graph.reachable_paths", 2, reachable_paths),
];

thread_local! {
    /// When the evaluation running on this thread must stop (set by the evaluation pool).
    static DEADLINE: Cell<Option<(Instant, Duration)>> = const { Cell::new(None) };
    /// The first refusal of the evaluation running on this thread.
    static REFUSED: RefCell<Option<Refusal>> = const { RefCell::new(None) };
}

/// Why a bounded builtin stopped an evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The evaluation's deadline passed inside a builtin.
    Deadline(Duration),
    /// The builtin's output would pass its bound.
    TooLarge(String),
}

/// Runs `f` as one evaluation with `limit` as its deadline, and returns its result with the
/// refusal a bounded builtin made during it, if any.
pub fn with_deadline<T>(limit: Duration, f: impl FnOnce() -> T) -> (T, Option<Refusal>) {
    DEADLINE.with(|d| d.set(Some((Instant::now() + limit, limit))));
    REFUSED.with(|r| r.borrow_mut().take());
    let out = f();
    DEADLINE.with(|d| d.set(None));
    (out, REFUSED.with(|r| r.borrow_mut().take()))
}

/// Swaps the bounded versions into an RVM program's table of builtins.
pub fn patch_program(program: &mut regorus::rvm::program::Program) {
    for (i, info) in program.builtin_info_table.iter().enumerate() {
        let bounded = BOUNDED.iter().find(|(name, ..)| *name == info.name);
        if let (Some((_, nargs, f)), Some(slot)) = (bounded, program.resolved_builtins.get_mut(i)) {
            *slot = (*f, *nargs);
        }
    }
}

/// Registers the bounded versions as interpreter extensions (looked up before builtins).
pub fn register(engine: &mut regorus::Engine) -> anyhow::Result<()> {
    for (name, nargs, f) in BOUNDED {
        let f = *f;
        let span = dummy_span()?;
        let params = null_params(&span, usize::from(*nargs));
        // Extensions are called only with every argument defined; strict errors are off
        // in Aegis (OPA's default), as in the RVM.
        engine.add_extension(
            (*name).to_owned(),
            *nargs,
            Box::new(move |args: Vec<Value>| f(&span, &params, &args, false)),
        )?;
    }
    Ok(())
}

/// The items of an array or a set, in order; `None` for anything else.
fn elements(v: Option<&Value>) -> Option<Vec<&Value>> {
    match v {
        Some(Value::Array(a)) => Some(a.iter().collect()),
        Some(Value::Set(s)) => Some(s.iter().collect()),
        _ => None,
    }
}

/// `n` placeholder argument expressions (builtins read only their spans, for errors).
fn null_params(span: &Span, n: usize) -> Vec<Ref<Expr>> {
    (0..n)
        .map(|_| {
            Ref::new(Expr::Null {
                span: span.clone(),
                value: Value::Null,
                eidx: 0,
            })
        })
        .collect()
}

fn dummy_span() -> anyhow::Result<Span> {
    Ok(Span {
        source: regorus::Source::from_contents("<builtin>".into(), String::new())?,
        line: 1,
        col: 1,
        start: 0,
        end: 0,
    })
}

/// regorus's own version of `name`.
fn original(name: &str) -> anyhow::Result<Builtin> {
    regorus::unstable::BUILTINS
        .get(name)
        .map(|(f, _)| *f)
        .ok_or_else(|| anyhow::anyhow!("builtin {name} is not built in"))
}

fn refuse(refusal: Refusal) -> anyhow::Error {
    let error = match &refusal {
        Refusal::Deadline(limit) => regorus::LimitError::TimeLimitExceeded {
            elapsed: *limit,
            limit: *limit,
        },
        Refusal::TooLarge(_) => regorus::LimitError::MemoryLimitExceeded {
            usage: 0,
            limit: MAX_STRING_BYTES,
        },
    };
    REFUSED.with(|r| {
        r.borrow_mut().get_or_insert(refusal);
    });
    anyhow::Error::new(error)
}

fn too_large(what: String) -> anyhow::Error {
    refuse(Refusal::TooLarge(what))
}

/// `Err` once the evaluation's deadline has passed.
fn check_deadline() -> anyhow::Result<()> {
    match DEADLINE.with(Cell::get) {
        Some((at, limit)) if Instant::now() >= at => Err(refuse(Refusal::Deadline(limit))),
        _ => Ok(()),
    }
}

fn integer(v: &Value) -> Option<i64> {
    let n = v.as_number().ok()?;
    if n.is_integer() { n.as_i64() } else { None }
}

fn bounded_count(name: &str, count: u128) -> anyhow::Result<()> {
    if count > u128::from(MAX_ELEMENTS) {
        return Err(too_large(format!(
            "{name} would build {count} elements, over the bound of {MAX_ELEMENTS}"
        )));
    }
    Ok(())
}

/// Builds `first, first+step, ...` `count` times, looking at the deadline as it goes.
fn build_range(first: i64, step: i64, count: u128) -> anyhow::Result<Value> {
    let count = usize::try_from(count)?;
    let mut values = Vec::with_capacity(count);
    let mut v = i128::from(first);
    for i in 0..count {
        if i % DEADLINE_EVERY == DEADLINE_EVERY - 1 {
            check_deadline()?;
        }
        values.push(Value::from(i64::try_from(v)?));
        v += i128::from(step);
    }
    Ok(Value::from(values))
}

fn range(span: &Span, params: &[Ref<Expr>], args: &[Value], strict: bool) -> anyhow::Result<Value> {
    let (Some(a), Some(b)) = (
        args.first().and_then(integer),
        args.get(1).and_then(integer),
    ) else {
        // Not two integers: regorus's own answer (undefined, or its error).
        return original("numbers.range")?(span, params, args, strict);
    };
    let count = (i128::from(b) - i128::from(a)).unsigned_abs() + 1;
    bounded_count("numbers.range", count)?;
    build_range(a, if b >= a { 1 } else { -1 }, count)
}

fn range_step(
    span: &Span,
    params: &[Ref<Expr>],
    args: &[Value],
    strict: bool,
) -> anyhow::Result<Value> {
    let ints = (
        args.first().and_then(integer),
        args.get(1).and_then(integer),
        args.get(2).and_then(integer),
    );
    let (Some(a), Some(b), Some(step)) = ints else {
        return original("numbers.range_step")?(span, params, args, strict);
    };
    if step <= 0 {
        // regorus divides by the step before checking it (a panic at 0); OPA refuses it.
        anyhow::bail!("numbers.range_step: step must be a positive integer, not {step}");
    }
    let count = (i128::from(b) - i128::from(a)).unsigned_abs() / step.unsigned_abs() as u128 + 1;
    bounded_count("numbers.range_step", count)?;
    build_range(a, if b >= a { step } else { -step }, count)
}

fn cidr_expand(
    span: &Span,
    params: &[Ref<Expr>],
    args: &[Value],
    strict: bool,
) -> anyhow::Result<Value> {
    let hosts = args
        .first()
        .and_then(|v| v.as_string().ok())
        .and_then(|cidr| {
            let (addr, prefix) = cidr.split_once('/')?;
            let bits: u32 = match addr.parse::<std::net::IpAddr>().ok()? {
                std::net::IpAddr::V4(_) => 32,
                std::net::IpAddr::V6(_) => 128,
            };
            let host_bits = bits.checked_sub(prefix.parse::<u32>().ok()?)?;
            Some(1u128.checked_shl(host_bits).unwrap_or(u128::MAX))
        });
    if let Some(hosts) = hosts {
        bounded_count("net.cidr_expand", hosts)?;
    }
    original("net.cidr_expand")?(span, params, args, strict)
}

fn str_len(v: Option<&Value>) -> Option<u64> {
    Some(v?.as_string().ok()?.len() as u64)
}

/// The longest string replacing every `old` in a string of `len` bytes by `new` can give.
fn replaced_len(len: u64, old: u64, new: u64) -> u64 {
    let matches = len.checked_div(old).unwrap_or(len + 1);
    len.saturating_add(matches.saturating_mul(new))
}

fn bounded_len(name: &str, len: u64) -> anyhow::Result<()> {
    if len > MAX_STRING_BYTES {
        return Err(too_large(format!(
            "{name} could build a string of {len} bytes, over the bound of {MAX_STRING_BYTES}"
        )));
    }
    Ok(())
}

fn replace(
    span: &Span,
    params: &[Ref<Expr>],
    args: &[Value],
    strict: bool,
) -> anyhow::Result<Value> {
    if let (Some(s), Some(old), Some(new)) = (
        str_len(args.first()),
        str_len(args.get(1)),
        str_len(args.get(2)),
    ) {
        bounded_len("replace", replaced_len(s, old, new))?;
    }
    original("replace")?(span, params, args, strict)
}

thread_local! {
    /// Patterns `regex.replace` was called with, compiled (cleared past 64).
    static PATTERNS: RefCell<std::collections::HashMap<String, regex::Regex>> =
        RefCell::new(std::collections::HashMap::new());
}

/// The longest result `regex.replace(s, pattern, value)` can give: every match replaced by
/// `value`, each `$` in it expanding to at most the whole match.
fn regex_replaced_len(s: &str, pattern: &str, value: &str) -> Option<u64> {
    PATTERNS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if !cache.contains_key(pattern) {
            if cache.len() >= 64 {
                cache.clear();
            }
            cache.insert(pattern.to_owned(), regex::Regex::new(pattern).ok()?);
        }
        let re = cache.get(pattern)?;
        let dollars = value.matches('$').count() as u64;
        let value_len = value.len() as u64;
        let grown = re
            .find_iter(s)
            .map(|m| value_len.saturating_add(dollars.saturating_mul(m.len() as u64)))
            .fold(0u64, u64::saturating_add);
        Some((s.len() as u64).saturating_add(grown))
    })
}

fn regex_replace(
    span: &Span,
    params: &[Ref<Expr>],
    args: &[Value],
    strict: bool,
) -> anyhow::Result<Value> {
    let text = |i: usize| args.get(i).and_then(|v| v.as_string().ok());
    if let (Some(s), Some(pattern), Some(value)) = (text(0), text(1), text(2))
        && let Some(len) = regex_replaced_len(s, pattern, value)
    {
        bounded_len("regex.replace", len)?;
    }
    // A pattern that does not compile: regorus's own answer.
    original("regex.replace")?(span, params, args, strict)
}

fn replace_n(
    span: &Span,
    params: &[Ref<Expr>],
    args: &[Value],
    strict: bool,
) -> anyhow::Result<Value> {
    if let (Some(patterns), Some(mut len)) = (
        args.first().and_then(|v| v.as_object().ok()),
        str_len(args.get(1)),
    ) {
        for (old, new) in patterns.iter() {
            len = replaced_len(
                len,
                str_len(Some(old)).unwrap_or(0),
                str_len(Some(new)).unwrap_or(0),
            );
        }
        bounded_len("strings.replace_n", len)?;
    }
    original("strings.replace_n")?(span, params, args, strict)
}

fn concat(
    span: &Span,
    params: &[Ref<Expr>],
    args: &[Value],
    strict: bool,
) -> anyhow::Result<Value> {
    let parts = elements(args.get(1));
    if let (Some(delim), Some(parts)) = (str_len(args.first()), parts) {
        let total = parts
            .iter()
            .map(|p| str_len(Some(p)).unwrap_or(0))
            .fold(0u64, u64::saturating_add);
        let n = parts.len() as u64;
        bounded_len(
            "concat",
            total.saturating_add(delim.saturating_mul(n.saturating_sub(1))),
        )?;
    }
    original("concat")?(span, params, args, strict)
}

fn json_filter(
    span: &Span,
    params: &[Ref<Expr>],
    args: &[Value],
    strict: bool,
) -> anyhow::Result<Value> {
    bounded_json_paths("json.filter", args.get(1))?;
    original("json.filter")?(span, params, args, strict)
}

fn json_remove(
    span: &Span,
    params: &[Ref<Expr>],
    args: &[Value],
    strict: bool,
) -> anyhow::Result<Value> {
    bounded_json_paths("json.remove", args.get(1))?;
    original("json.remove")?(span, params, args, strict)
}

/// Refuses a path (`"a/b/c"` or `["a", "b", "c"]`) of more than
/// [`MAX_JSON_PATH_SEGMENTS`] segments.
fn bounded_json_paths(name: &str, paths: Option<&Value>) -> anyhow::Result<()> {
    for path in elements(paths).unwrap_or_default() {
        let segments = match path {
            Value::String(s) => s.split('/').count(),
            Value::Array(a) => a.len(),
            _ => 0,
        };
        if segments > MAX_JSON_PATH_SEGMENTS {
            return Err(too_large(format!(
                "{name} was given a path of {segments} segments; the most is \
                 {MAX_JSON_PATH_SEGMENTS}"
            )));
        }
    }
    Ok(())
}

/// `graph.reachable_paths` as regorus computes it (every path from the given vertices,
/// each ending where it meets a vertex already on it, a missing vertex, `""` or a vertex
/// without neighbours), walked with a stack of its own instead of recursing once per
/// vertex along a path, checking the deadline as it goes, and refusing once the paths it
/// finds, duplicates included, pass [`MAX_ELEMENTS`] elements (paths can be exponential in
/// the vertices).
fn reachable_paths(
    span: &Span,
    params: &[Ref<Expr>],
    args: &[Value],
    strict: bool,
) -> anyhow::Result<Value> {
    let (Some(starts), Some(Value::Object(graph))) = (elements(args.get(1)), args.first()) else {
        return original("graph.reachable_paths")?(span, params, args, strict);
    };
    enum Step<'a> {
        Enter(&'a Value),
        /// Leave a vertex, and whether it had neighbours.
        Leave(&'a Value, bool),
    }
    let mut paths = std::collections::BTreeSet::new();
    let mut path: Vec<Value> = Vec::new();
    let mut on_path = std::collections::BTreeSet::new();
    let mut built = 0u64;
    let mut steps = 0usize;
    let mut emit = |path: &[Value], paths: &mut std::collections::BTreeSet<Value>| {
        built = built.saturating_add(path.len() as u64 + 1);
        if built > MAX_ELEMENTS {
            return Err(too_large(format!(
                "graph.reachable_paths would build more than {MAX_ELEMENTS} elements"
            )));
        }
        paths.insert(Value::from(path.to_vec()));
        Ok(())
    };
    for start in starts {
        let mut todo = vec![Step::Enter(start)];
        while let Some(step) = todo.pop() {
            steps += 1;
            if steps.is_multiple_of(DEADLINE_EVERY) {
                check_deadline()?;
            }
            match step {
                Step::Leave(vertex, had_neighbours) => {
                    if !had_neighbours && !path.is_empty() {
                        emit(&path, &mut paths)?;
                    }
                    on_path.remove(vertex);
                    path.pop();
                }
                Step::Enter(vertex) => {
                    let end = matches!(vertex, Value::String(s) if s.is_empty());
                    let neighbours = graph.get(vertex);
                    if end || neighbours.is_none() {
                        if !path.is_empty() {
                            emit(&path, &mut paths)?;
                        }
                        continue;
                    }
                    if on_path.contains(vertex) {
                        emit(&path, &mut paths)?;
                        continue;
                    }
                    let next = match neighbours {
                        Some(Value::Null) => Vec::new(),
                        other => elements(other).ok_or_else(|| {
                            anyhow::anyhow!("neighbors for node `{vertex}` must be array/set.")
                        })?,
                    };
                    path.push(vertex.clone());
                    on_path.insert(vertex);
                    todo.push(Step::Leave(vertex, !next.is_empty()));
                    // Last pushed, first walked: the neighbours in their order.
                    todo.extend(next.into_iter().rev().map(Step::Enter));
                }
            }
        }
    }
    Ok(Value::from(paths))
}

fn sprintf(
    span: &Span,
    params: &[Ref<Expr>],
    args: &[Value],
    strict: bool,
) -> anyhow::Result<Value> {
    if let Some(format) = args.first().and_then(|v| v.as_string().ok()) {
        bounded_len("sprintf", widest_field(format))?;
    }
    original("sprintf")?(span, params, args, strict)
}

/// The largest width or precision written in a format string (`%12d`, `%.300f`).
fn widest_field(format: &str) -> u64 {
    let mut widest = 0u64;
    let mut current: Option<u64> = None;
    let mut in_spec = false;
    for c in format.chars() {
        match c {
            '%' if !in_spec => in_spec = true,
            '0'..='9' if in_spec => {
                let digit = u64::from(c) - u64::from('0');
                current = Some(
                    current
                        .unwrap_or(0)
                        .saturating_mul(10)
                        .saturating_add(digit),
                );
            }
            '.' | '-' | '+' | ' ' | '#' if in_spec => {
                widest = widest.max(current.take().unwrap_or(0));
            }
            _ => {
                widest = widest.max(current.take().unwrap_or(0));
                in_spec = false;
            }
        }
    }
    widest.max(current.unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_are_read_from_format_strings() {
        assert_eq!(widest_field("%d and %s"), 0);
        assert_eq!(widest_field("%12d %.300f"), 300);
        assert_eq!(widest_field("%99999999999999999999999d"), u64::MAX);
        assert_eq!(widest_field("100%% of %5d"), 5);
    }

    #[test]
    fn reachable_paths_without_recursion_agree_with_regoruss() -> anyhow::Result<()> {
        let span = dummy_span()?;
        let params = null_params(&span, 2);
        let graphs = [
            // A chain, a cycle, a diamond, a missing vertex, `""`, null and set neighbours.
            (r#"{"a": ["b"], "b": ["c"], "c": []}"#, r#"["a"]"#),
            (r#"{"a": ["b"], "b": ["c"], "c": ["a"]}"#, r#"["a", "b"]"#),
            (
                r#"{"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}"#,
                r#"["a"]"#,
            ),
            (r#"{"a": ["x", "b"], "b": [""]}"#, r#"["a", "x"]"#),
            (r#"{"a": null, "b": ["a", "b"]}"#, r#"["b"]"#),
            (
                r#"{"a": ["b"], "b": ["a", "c"], "c": ["c"]}"#,
                r#"["c", "a"]"#,
            ),
        ];
        for (graph, starts) in graphs {
            let args = [Value::from_json_str(graph)?, Value::from_json_str(starts)?];
            let ours = reachable_paths(&span, &params, &args, false)?;
            let theirs = original("graph.reachable_paths")?(&span, &params, &args, false)?;
            assert_eq!(ours, theirs, "{graph} from {starts}");
        }
        Ok(())
    }

    #[test]
    fn replaced_length_bounds_the_empty_pattern() {
        assert_eq!(replaced_len(3, 0, 2), 3 + 4 * 2);
        assert_eq!(replaced_len(10, 2, 1), 15);
    }
}
