//! The module graph of `src/`: no import circle between files, and the README's graph
//! of the top-level modules stays true.
//!
//! An edge `a.rs -> b.rs` is a path in `a.rs` that starts with `crate::` or `super::`
//! (in a `use` declaration, `{..}` groups expanded, or inline in the code) and names an
//! item of `b.rs`. Items under exactly `#[cfg(test)]` are not edges (tests may reach
//! anywhere), nor is a `mod x;` declaration (a parent declaring its children is not a
//! dependency).
//! Comments, strings and `$crate` in macros are skipped.
//!
//! Why a hand-written scanner rather than `syn`: the check must keep working while the
//! crate is broken, needs no new dependency, and only has to recognise paths, `use`
//! trees, attributes and braces, which a small tokenizer does reliably.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

// === the check on this repository ===

#[test]
fn src_has_no_import_circle() {
    let graph = Graph::build(&read_src());
    let circles = graph.circles();
    assert!(
        circles.is_empty(),
        "import circles in src/ (each must be broken):\n{}",
        graph.describe_circles(&circles)
    );
}

#[test]
fn readme_layout_shows_the_module_graph() {
    let graph = Graph::build(&read_src());
    let expected = graph.top_level_block();
    println!("{expected}");
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .unwrap_or_default();
    let found = readme_graph_block(&readme);
    assert_eq!(
        found.as_deref(),
        Some(expected.as_str()),
        "the README's module graph (the fenced block after `{MARKER}` in `## Layout`) differs \
         from src/; put this block there:\n```\n{expected}```"
    );
}

/// The line that introduces the graph's fenced block in the README's Layout section.
const MARKER: &str = "<!-- module graph: checked by tests/module_graph.rs -->";

/// Every `.rs` file under `src/` but `main.rs` (the binary's own crate), as its path
/// relative to `src/` and its text.
fn read_src() -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let rel = rel.to_string_lossy().replace('\\', "/");
                if rel != "main.rs" {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    out.push((rel, text));
                }
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    assert!(out.len() > 10, "src/ not found under {}", root.display());
    out.sort();
    out
}

/// The text of the fenced block that follows [`MARKER`] inside the README's Layout
/// section, without the fences.
fn readme_graph_block(readme: &str) -> Option<String> {
    let layout = readme.split("## Layout").nth(1)?;
    let after = layout.split(MARKER).nth(1)?;
    let mut lines = after.lines().skip_while(|l| l.trim().is_empty());
    if !lines.next()?.starts_with("```") {
        return None;
    }
    let mut block = String::new();
    for line in lines {
        if line.starts_with("```") {
            return Some(block);
        }
        block.push_str(line);
        block.push('\n');
    }
    None
}

// === the graph ===

/// Files (by path relative to `src/`) and the edges between them, each edge with one
/// path that makes it (for the failure message).
struct Graph {
    edges: BTreeMap<String, BTreeMap<String, String>>,
}

impl Graph {
    /// The graph of `files` (paths relative to `src/`, and their text).
    fn build(files: &[(String, String)]) -> Graph {
        let modules: BTreeMap<Vec<String>, String> = files
            .iter()
            .map(|(path, _)| (module_of(path), path.clone()))
            .collect();
        let mut edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (path, text) in files {
            let from = edges.entry(path.clone()).or_default();
            for (module, used) in paths_in(&module_of(path), text) {
                let Some(abs) = absolute(&module, &used) else {
                    continue;
                };
                let target = (0..=abs.len())
                    .rev()
                    .find_map(|k| abs.get(..k).and_then(|prefix| modules.get(prefix)));
                if let Some(target) = target
                    && target != path
                {
                    from.entry(target.clone())
                        .or_insert_with(|| used.join("::"));
                }
            }
        }
        Graph { edges }
    }

    /// The strongly connected components of more than one file (Tarjan), each sorted.
    fn circles(&self) -> Vec<Vec<String>> {
        struct Tarjan<'a> {
            graph: &'a Graph,
            index: BTreeMap<&'a str, usize>,
            low: BTreeMap<&'a str, usize>,
            stack: Vec<&'a str>,
            on_stack: BTreeSet<&'a str>,
            out: Vec<Vec<String>>,
        }
        impl<'a> Tarjan<'a> {
            fn visit(&mut self, v: &'a str) {
                let n = self.index.len();
                self.index.insert(v, n);
                self.low.insert(v, n);
                self.stack.push(v);
                self.on_stack.insert(v);
                let graph = self.graph;
                for w in graph.edges.get(v).into_iter().flat_map(|e| e.keys()) {
                    let w = w.as_str();
                    if !self.index.contains_key(w) {
                        self.visit(w);
                        let lw = self.low[w];
                        let lv = self.low[v];
                        self.low.insert(v, lv.min(lw));
                    } else if self.on_stack.contains(w) {
                        let iw = self.index[w];
                        let lv = self.low[v];
                        self.low.insert(v, lv.min(iw));
                    }
                }
                if self.low[v] == self.index[v] {
                    let mut component = Vec::new();
                    while let Some(w) = self.stack.pop() {
                        self.on_stack.remove(w);
                        component.push(w.to_string());
                        if w == v {
                            break;
                        }
                    }
                    if component.len() > 1 {
                        component.sort();
                        self.out.push(component);
                    }
                }
            }
        }
        let mut t = Tarjan {
            graph: self,
            index: BTreeMap::new(),
            low: BTreeMap::new(),
            stack: Vec::new(),
            on_stack: BTreeSet::new(),
            out: Vec::new(),
        };
        for v in self.edges.keys() {
            if !t.index.contains_key(v.as_str()) {
                t.visit(v);
            }
        }
        t.out.sort();
        t.out
    }

    /// Each circle's files and the edges between them, with the path behind each edge.
    fn describe_circles(&self, circles: &[Vec<String>]) -> String {
        let mut s = String::new();
        for files in circles {
            s.push_str(&format!(
                "circle of {} files: {}\n",
                files.len(),
                files.join(", ")
            ));
            for from in files {
                for (to, why) in self.edges.get(from).into_iter().flatten() {
                    if files.contains(to) {
                        s.push_str(&format!("  {from} -> {to}  ({why})\n"));
                    }
                }
            }
        }
        s
    }

    /// The graph collapsed to top-level modules (`control/store.rs` is `control`), one
    /// line per module: `module -> the modules it imports`. The crate root (`lib.rs`:
    /// `hex`, `unix_nanos`, `log!`) is left out: everything may use it.
    fn top_level_block(&self) -> String {
        let top = |file: &str| {
            let first = file.split('/').next().unwrap_or(file);
            first.trim_end_matches(".rs").to_string()
        };
        let mut collapsed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, tos) in &self.edges {
            let f = top(from);
            if f == "lib" {
                continue;
            }
            let set = collapsed.entry(f.clone()).or_default();
            for to in tos.keys() {
                let t = top(to);
                if t != f && t != "lib" {
                    set.insert(t);
                }
            }
        }
        let width = collapsed.keys().map(String::len).max().unwrap_or(0);
        let mut s = String::new();
        for (module, uses) in &collapsed {
            let uses: Vec<&str> = uses.iter().map(String::as_str).collect();
            let uses = if uses.is_empty() {
                "(nothing)".to_string()
            } else {
                uses.join(" ")
            };
            s.push_str(&format!("{module:<width$} -> {uses}\n"));
        }
        s
    }
}

/// The module path of a file: `lib.rs` is the root, `a/b.rs` and `a/b/mod.rs` are `a::b`.
fn module_of(path: &str) -> Vec<String> {
    let path = path.trim_end_matches(".rs");
    let mut segments: Vec<String> = path.split('/').map(str::to_string).collect();
    if segments.last().is_some_and(|s| s == "mod" || s == "lib") {
        segments.pop();
    }
    segments
}

/// `used` (starting with `crate` or `super`) as a path from the crate root, seen from
/// inside `module`; `None` when it climbs above the root.
fn absolute(module: &[String], used: &[String]) -> Option<Vec<String>> {
    let (first, rest) = used.split_first()?;
    if first == "crate" {
        return Some(rest.to_vec());
    }
    let mut base = module.to_vec();
    let mut rest = used;
    while let Some((s, tail)) = rest.split_first() {
        if s != "super" {
            break;
        }
        base.pop()?;
        rest = tail;
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

// === the scanner ===

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

/// The tokens of `src` that matter here: identifiers (keywords and numbers included),
/// `::` and single punctuation; comments, string, char and byte literals and lifetimes
/// are dropped.
fn tokenize(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let mut toks = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = at(i);
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && at(i) != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if at(i) == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if at(i) == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if ch == '"' {
            i = skip_string(&c, i + 1);
        } else if ch == '\'' {
            if at(i + 1) == '\\' {
                // An escaped char literal: to the closing quote.
                i += 2;
                while i < c.len() && at(i) != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                // A lifetime or a label.
                i += 1;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
            }
        } else if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let raw_prefix = matches!(word.as_str(), "r" | "br" | "cr");
            if raw_prefix && (at(i) == '"' || (at(i) == '#' && matches!(at(i + 1), '"' | '#'))) {
                let mut hashes = 0;
                while at(i) == '#' {
                    hashes += 1;
                    i += 1;
                }
                i += 1;
                'raw: while i < c.len() {
                    if at(i) == '"' && (1..=hashes).all(|h| at(i + h) == '#') {
                        i += 1 + hashes;
                        break 'raw;
                    }
                    i += 1;
                }
            } else if matches!(word.as_str(), "b" | "c") && at(i) == '"' {
                i = skip_string(&c, i + 1);
            } else if word == "b" && at(i) == '\'' {
                i += 1;
                if at(i) == '\\' {
                    i += 1;
                }
                i += 1;
                while i < c.len() && at(i) != '\'' {
                    i += 1;
                }
                i += 1;
            } else if word == "r" && at(i) == '#' {
                // A raw identifier, `r#type`.
                i += 1;
                let start = i;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
                toks.push(Tok::Ident(c[start..i].iter().collect()));
            } else {
                toks.push(Tok::Ident(word));
            }
        } else if ch == ':' && at(i + 1) == ':' {
            toks.push(Tok::PathSep);
            i += 2;
        } else {
            toks.push(Tok::Punct(ch));
            i += 1;
        }
    }
    toks
}

/// The index after the closing quote of a string whose body starts at `i`.
fn skip_string(c: &[char], mut i: usize) -> usize {
    while let Some(&ch) = c.get(i) {
        match ch {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// Every `crate::`/`super::` path in `src` outside `#[cfg(test)]` items, with the module
/// it is written in (`file_module` plus any inline `mod x { .. }` around it).
fn paths_in(file_module: &[String], src: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let toks = tokenize(src);
    let t = |i: usize| toks.get(i);
    let punct = |i: usize, p: char| t(i) == Some(&Tok::Punct(p));
    let mut out = Vec::new();
    // Open braces; `Some(name)` for the brace of an inline `mod name {`.
    let mut braces: Vec<Option<String>> = Vec::new();
    let module = |braces: &[Option<String>]| {
        let mut m = file_module.to_vec();
        m.extend(braces.iter().flatten().cloned());
        m
    };
    let mut i = 0;
    while i < toks.len() {
        if punct(i, '#') {
            let inner = punct(i + 1, '!');
            let open = if inner { i + 2 } else { i + 1 };
            if punct(open, '[') {
                let close = matching(&toks, open);
                let is_cfg_test = toks.get(open + 1..close)
                    == Some(
                        &[
                            Tok::Ident("cfg".into()),
                            Tok::Punct('('),
                            Tok::Ident("test".into()),
                            Tok::Punct(')'),
                        ][..],
                    );
                i = close + 1;
                if is_cfg_test {
                    if inner {
                        // `#![cfg(test)]`: the whole file or module is test code.
                        return if braces.is_empty() { Vec::new() } else { out };
                    }
                    i = skip_item(&toks, i);
                }
                continue;
            }
        }
        match t(i) {
            Some(Tok::Ident(w)) if w == "use" => {
                let end = (i..toks.len())
                    .find(|&j| punct(j, ';'))
                    .unwrap_or(toks.len());
                let here = module(&braces);
                for path in expand_use(toks.get(i + 1..end).unwrap_or_default()) {
                    if matches!(path.first().map(String::as_str), Some("crate" | "super")) {
                        out.push((here.clone(), path));
                    }
                }
                i = end + 1;
            }
            Some(Tok::Ident(w)) if w == "mod" && punct(i + 2, '{') => {
                if let Some(Tok::Ident(name)) = t(i + 1) {
                    braces.push(Some(name.clone()));
                }
                i += 3;
            }
            Some(Tok::Ident(w))
                if (w == "crate" || w == "super")
                    && t(i + 1) == Some(&Tok::PathSep)
                    && !(i > 0 && (punct(i - 1, '$') || t(i - 1) == Some(&Tok::PathSep))) =>
            {
                let mut path = vec![w.clone()];
                let mut j = i + 1;
                while t(j) == Some(&Tok::PathSep) {
                    match t(j + 1) {
                        Some(Tok::Ident(s)) => {
                            path.push(s.clone());
                            j += 2;
                        }
                        _ => break,
                    }
                }
                out.push((module(&braces), path));
                i = j;
            }
            Some(Tok::Punct('{')) => {
                braces.push(None);
                i += 1;
            }
            Some(Tok::Punct('}')) => {
                braces.pop();
                i += 1;
            }
            _ => i += 1,
        }
    }
    out
}

/// The index of the bracket that closes the one at `open` (or the last token).
fn matching(toks: &[Tok], open: usize) -> usize {
    let mut depth = 0usize;
    for (j, tok) in toks.iter().enumerate().skip(open) {
        match tok {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return j;
                }
            }
            _ => {}
        }
    }
    toks.len().saturating_sub(1)
}

/// The index after the item starting at `i` (its further attributes included): after
/// its `;`, or after its first `{ .. }` block, or at a bracket that closes around it.
fn skip_item(toks: &[Tok], mut i: usize) -> usize {
    while let Some(tok) = toks.get(i) {
        match tok {
            Tok::Punct(';') => return i + 1,
            Tok::Punct('{') => return matching(toks, i) + 1,
            Tok::Punct('(' | '[') => i = matching(toks, i) + 1,
            Tok::Punct(')' | ']' | '}') => return i,
            _ => i += 1,
        }
    }
    i
}

/// The paths of a use tree (the tokens between `use` and `;`), groups expanded:
/// `crate::a::{b, c::{d, self}}` is `crate::a::b`, `crate::a::c::d` and `crate::a::c`.
/// A leading `pub`/`pub(..)` is for the caller to have dropped; `as` renames and `*`
/// globs end a path.
fn expand_use(toks: &[Tok]) -> Vec<Vec<String>> {
    fn tree(toks: &[Tok], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut path = prefix.to_vec();
        loop {
            match toks.get(*i) {
                Some(Tok::Ident(s)) if s == "self" && !path.is_empty() => *i += 1,
                Some(Tok::Ident(s)) if s == "as" => {
                    *i += 2;
                    break;
                }
                Some(Tok::Ident(s)) => {
                    path.push(s.clone());
                    *i += 1;
                }
                Some(Tok::PathSep) => *i += 1,
                Some(Tok::Punct('*')) => {
                    *i += 1;
                    break;
                }
                Some(Tok::Punct('{')) => {
                    *i += 1;
                    while !matches!(toks.get(*i), None | Some(Tok::Punct('}'))) {
                        tree(toks, i, &path, out);
                        if toks.get(*i) == Some(&Tok::Punct(',')) {
                            *i += 1;
                        }
                    }
                    *i += 1;
                    return;
                }
                _ => break,
            }
        }
        out.push(path);
    }
    let mut out = Vec::new();
    let mut i = 0;
    // `pub use` / `pub(crate) use` reach here only as the tokens after `use`.
    while i < toks.len() {
        let before = i;
        tree(toks, &mut i, &[], &mut out);
        if toks.get(i) == Some(&Tok::Punct(',')) {
            i += 1;
        }
        if i == before {
            i += 1;
        }
    }
    out
}

// === the check's own tests, on small synthetic trees ===

fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect()
}

#[test]
fn a_circle_is_found_with_its_files_and_edges() {
    let g = Graph::build(&files(&[
        ("lib.rs", "pub mod a; pub mod b; pub mod c;"),
        ("a.rs", "use crate::b::B; pub struct A;"),
        ("b.rs", "pub struct B; fn f() { crate::c::g(); }"),
        ("c.rs", "use super::a::A; pub fn g() {}"),
    ]));
    let circles = g.circles();
    assert_eq!(circles, vec![vec!["a.rs", "b.rs", "c.rs"]]);
    let text = g.describe_circles(&circles);
    assert!(text.contains("a.rs -> b.rs  (crate::b::B)"), "{text}");
    assert!(text.contains("b.rs -> c.rs  (crate::c::g)"), "{text}");
    assert!(text.contains("c.rs -> a.rs  (super::a::A)"), "{text}");
}

#[test]
fn a_chain_is_not_a_circle() {
    let g = Graph::build(&files(&[
        ("lib.rs", "pub mod a; pub mod b; pub mod c;"),
        ("a.rs", "use crate::b::B;"),
        ("b.rs", "pub struct B; use crate::c::C;"),
        (
            "c.rs",
            "pub struct C; pub fn now() -> i64 { crate::unix_nanos() }",
        ),
    ]));
    assert!(g.circles().is_empty());
    assert_eq!(g.top_level_block(), "a -> b\nb -> c\nc -> (nothing)\n");
}

#[test]
fn cfg_test_items_comments_strings_and_mod_declarations_are_not_edges() {
    let g = Graph::build(&files(&[
        ("lib.rs", ""),
        ("a.rs", "pub mod inner; use crate::b::B;"),
        (
            "b.rs",
            r##"
            //! See [`crate::a::A`].
            pub struct B;
            const S: &str = "crate::a::A";
            const R: &str = r#"crate::a::A"#;
            /* crate::a::A */
            fn f<'a>(x: &'a str) -> char { let _ = x; '{' }
            #[cfg(test)]
            mod tests { use crate::a::A; fn t() { crate::a::f(); } }
            #[cfg(test)]
            use crate::a::Other;
            #[cfg(test)]
            fn helper() { crate::a::f() }
            macro_rules! m { () => { $crate::a::f() } }
            "##,
        ),
        ("a/inner.rs", ""),
    ]));
    assert!(g.circles().is_empty(), "{:?}", g.edges);
    assert_eq!(g.edges["b.rs"].len(), 0, "{:?}", g.edges);
    assert_eq!(g.edges["a.rs"].keys().collect::<Vec<_>>(), vec!["b.rs"]);
}

#[test]
fn use_groups_are_expanded_and_resolved_to_the_deepest_file() {
    let used = expand_use(&tokenize("crate::x::{a, b::{c as d, self}, e::*}"));
    let used: Vec<String> = used.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        used,
        vec![
            "crate::x::a",
            "crate::x::b::c",
            "crate::x::b",
            "crate::x::e"
        ]
    );
    let g = Graph::build(&files(&[
        ("lib.rs", ""),
        ("x.rs", "pub mod b;"),
        ("x/b.rs", "pub use crate::{y::Y, z};"),
        (
            "y.rs",
            "pub struct Y; pub(crate) use super::x::{b::{self}};",
        ),
        ("z.rs", ""),
    ]));
    let from_b: Vec<&String> = g.edges["x/b.rs"].keys().collect();
    assert_eq!(from_b, vec!["y.rs", "z.rs"]);
    assert_eq!(g.circles(), vec![vec!["x/b.rs", "y.rs"]]);
}

#[test]
fn super_is_resolved_from_inline_modules_and_nested_files() {
    let g = Graph::build(&files(&[
        ("lib.rs", ""),
        ("p.rs", "pub mod q; pub struct P;"),
        (
            "p/q.rs",
            "mod inner { use super::super::super::r::R; } fn f() { super::P; }",
        ),
        ("r.rs", ""),
    ]));
    let from_q: Vec<&String> = g.edges["p/q.rs"].keys().collect();
    assert_eq!(from_q, vec!["p.rs", "r.rs"]);
}

#[test]
fn the_readme_block_is_found_after_its_marker() {
    let readme = format!(
        "# A\n## Layout\n```\nfiles\n```\n{MARKER}\n```\na -> b\nb -> (nothing)\n```\n# B\n"
    );
    assert_eq!(
        readme_graph_block(&readme).as_deref(),
        Some("a -> b\nb -> (nothing)\n")
    );
    assert_eq!(readme_graph_block("## Layout\n```\nx\n```\n"), None);
}
