//! The rule graph of a bundle, checked before regorus evaluates anything: recursion is
//! refused and the depth of evaluation is bounded.
//!
//! regorus's interpreter and RVM evaluate a rule that refers to another rule, a function
//! call, a loop over the rest of a query and a nested expression by recursing on the
//! thread's stack, and bound none of it. A bundle that is too deep does not fail: it
//! overflows the stack, and the process aborts. Measured on a 2 MiB thread (debug build):
//! a chain of 500 rules (`r1 := r0 + 1`, …) aborted at load; a chain of 1,000 functions
//! aborted at the first evaluation; a recursive `f(x) := f(x - 1) + 1 if x > 0`, which
//! regorus loads, aborted when an input drove it 1,000 deep. An agent that controls the
//! depth (its path, a header, a body) could so take the sidecar down, and Envoy then
//! fails closed for every agent on the node.
//!
//! So, over the parsed modules:
//! - **recursion** (a cycle of rules or functions) is refused, as OPA refuses it
//!   (`rego_recursion_error`), naming the cycle;
//! - **depth** is bounded. A rule costs [`RULE_FRAME`], plus for its costliest body: one
//!   unit per statement and one per loop in it (`some … in`, each `x[_]` or `x[i]` index
//!   that may iterate, `walk`), since regorus evaluates everything after a loop inside
//!   it; plus the depth of its deepest statement (each link of a reference, each nested
//!   call, comprehension or `every` is a level); plus the depth of its deepest head key or
//!   value; plus one per link of its head (`a.b.c := …` has two). A chain costs the
//!   sum of its rules; a `with f as g` adds the whole cost of `g` to the rule holding it
//!   (the replaced call runs `g` at the bottom of what it calls). The costliest chain may
//!   cost [`MAX_EVAL_DEPTH`]; past it the bundle is refused, naming the chain. Aegis runs
//!   regorus on threads with a [`REGO_STACK`]-byte stack, sized so that a bundle at the
//!   bound evaluates with room to spare (checked by `tests/bundle_depth.rs` on half that
//!   stack).
//!
//! What refers to what is read statically. Where that cannot be exact it errs toward more
//! dependencies, never fewer:
//! - a reference with a dynamic key (`data.p[x]`) depends on every rule under its static
//!   part (as in OPA, `data[input.x]` inside a package is a cycle);
//! - a name that is not local refers both to the package's rule of that name and to what
//!   any import of the package (in any of its modules) binds it to, as regorus may take
//!   either (it prefers the package's rules for references, and an import's function for
//!   calls only when that function exists);
//! - a call always names the function of its name;
//! - a name is local from the statement that declares it (`some`, `:=`, `some … in`, an
//!   argument, `every`) to the end of its scope (the rule body and its head, a
//!   comprehension, an `every` body).
//!
//! Each referenced path is a node of its own pointing at the rules it reads, so the graph
//! grows with references plus rules times the prefixes of their paths that are read, not
//! with rules times references (a package of 20,000 rules read by 20,000 rules is 60,000
//! edges, not 400 million). The walk of each expression
//! recurses, which is safe because `check_nesting` bounded expression depth before
//! regorus parsed the module.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use regorus::unstable::{Expr, Literal, Module, Query, Ref, Rule, RuleBody, RuleHead};

use super::reads::Reads;

/// What one rule costs besides its statements and expressions (in the units
/// [`MAX_EVAL_DEPTH`] bounds). Measured on 2 MiB threads, debug build: a chain of rules took at
/// most ~4.5 KiB of stack per rule, a function 30 calls deep at most ~1.8 KiB per call.
pub const RULE_FRAME: usize = 4;

/// The most a chain of rules may cost: a statement, a loop or an expression level are one
/// unit each, a rule [`RULE_FRAME`].
pub const MAX_EVAL_DEPTH: usize = 2_048;

/// Stack of every thread that runs regorus (the evaluation pool, bundle compilation, the
/// `aegis policy` commands). At the bound, the deepest of `tests/bundle_depth.rs`'s shapes,
/// measured separately (debug build, the interpreter), needed 4 MiB; this is four times
/// that. Only touched pages are resident.
pub const REGO_STACK: usize = 16 * 1024 * 1024;

/// Runs `f` on a thread with a [`REGO_STACK`] stack and waits for it: for regorus work
/// started from a thread whose stack Aegis does not choose (a command's main thread).
pub fn on_rego_stack<T: Send>(f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("aegis-rego".into())
            .stack_size(REGO_STACK)
            .spawn_scoped(scope, f)?;
        thread
            .join()
            .map_err(|_| std::io::Error::other("the regorus thread panicked"))
    })
}

/// One rule (all its definitions at one path), or one referenced path.
struct Node {
    /// `data.pkg.name`; for a reference, the path it reads.
    path: Vec<String>,
    /// A reference, not a rule: costs nothing and is not named in chains.
    is_ref: bool,
    /// Where it is first defined: `file:line`.
    at: String,
    /// Its own cost: the costliest of its definitions.
    cost: usize,
    /// What it reads (references for a rule; rules for a reference).
    deps: BTreeSet<usize>,
    /// References whose whole cost adds to this rule's (`with … as` values).
    adds: BTreeSet<usize>,
}

/// The costliest chain of rules in a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Its cost, in the units [`MAX_EVAL_DEPTH`] bounds.
    pub cost: usize,
    /// The rules from the top down (`data.pkg.name`).
    pub rules: Vec<String>,
    /// Where the top rule is defined: `file:line`.
    pub at: String,
}

/// Checks the modules of a bundle: no recursion, no chain costlier than
/// [`MAX_EVAL_DEPTH`]. The error names the rule, where it is, and the cycle or the chain.
/// A bundle that passes gets the parts of `input` its modules can read (see
/// [`super::reads`]), found by the same walk.
pub fn check(modules: &[Ref<Module>]) -> Result<Reads, String> {
    let graph = Graph::build(modules);
    let Some(chain) = graph.costliest()? else {
        return Ok(graph.input);
    };
    if chain.cost <= MAX_EVAL_DEPTH {
        return Ok(graph.input);
    }
    // Long chains are named by their first three rules and their last two.
    let rules = &chain.rules;
    let more = format!("… {} more …", rules.len().saturating_sub(5));
    let named: Vec<&str> = if rules.len() > 6 {
        let head = rules.iter().take(3).map(String::as_str);
        let tail = rules.iter().skip(rules.len() - 2).map(String::as_str);
        head.chain([more.as_str()]).chain(tail).collect()
    } else {
        rules.iter().map(String::as_str).collect()
    };
    Err(format!(
        "{}: rule {} nests too deep to evaluate safely: its chain of {} rules ({}) costs {} \
         units of stack ({RULE_FRAME} per rule, one per statement, loop, expression level \
         and head link, `with` values whole); the most Aegis accepts is {MAX_EVAL_DEPTH}",
        chain.at,
        rules.first().map_or("", String::as_str),
        rules.len(),
        named.join(" -> "),
        chain.cost,
    ))
}

/// The rules of a bundle and what they read.
#[derive(Default)]
struct Graph {
    nodes: Vec<Node>,
    rules: BTreeMap<Vec<String>, usize>,
    refs: BTreeMap<Vec<String>, usize>,
    /// What every rule, function and default reads of `input`, and every import of
    /// `input…`.
    input: Reads,
}

impl Graph {
    fn name(&self, i: usize) -> String {
        self.nodes
            .get(i)
            .map_or_else(String::new, |n| n.path.join("."))
    }

    fn is_rule(&self, i: usize) -> bool {
        self.nodes.get(i).is_some_and(|n| !n.is_ref)
    }

    /// The node of a referenced path, made on first use.
    fn reference(&mut self, path: Vec<String>) -> usize {
        if let Some(&i) = self.refs.get(&path) {
            return i;
        }
        let i = self.nodes.len();
        self.refs.insert(path.clone(), i);
        self.nodes.push(Node {
            path,
            is_ref: true,
            at: String::new(),
            cost: 0,
            deps: BTreeSet::new(),
            adds: BTreeSet::new(),
        });
        i
    }

    /// Points each reference at the rules it reads: every rule whose path is a prefix of
    /// it (`data.p.r.x` reads rule `r`) or has it as prefix (`data.p` reads all of `p`).
    fn link(&mut self) {
        let refs: Vec<(Vec<String>, usize)> =
            self.refs.iter().map(|(p, &i)| (p.clone(), i)).collect();
        for (path, i) in refs {
            let mut deps = BTreeSet::new();
            let mut prefix = Vec::with_capacity(path.len());
            for field in &path {
                if let Some(&r) = self.rules.get(&prefix) {
                    deps.insert(r);
                }
                prefix.push(field.clone());
            }
            for (p, &r) in self.rules.range(path.clone()..) {
                if !p.starts_with(&path) {
                    break;
                }
                deps.insert(r);
            }
            if let Some(node) = self.nodes.get_mut(i) {
                node.deps = deps;
            }
        }
    }

    fn build(modules: &[Ref<Module>]) -> Self {
        let scopes = Scopes::new(modules);
        let mut graph = Graph::default();
        for module in modules {
            for import in &module.imports {
                let mut dynamic = Vec::new();
                match static_path(&import.refr, &mut dynamic) {
                    Some((root, fields)) if root == "input" && dynamic.is_empty() => {
                        graph.input.read(&fields)
                    }
                    Some((root, _)) if root != "input" => {}
                    // `import input[x]` does not parse; were it to, it reads everything.
                    _ => graph.input.read(&[]),
                }
            }
            let Some(scope) = scopes.of(module) else {
                // Every module has its package's scope; were one missing, read everything.
                graph.input.read(&[]);
                continue;
            };
            for rule in &module.policy {
                let walked = scope.rule(rule);
                for path in &walked.input {
                    graph.input.read(path);
                }
                let refs: BTreeSet<usize> = walked
                    .refs
                    .into_iter()
                    .map(|p| graph.reference(p))
                    .collect();
                let adds: BTreeSet<usize> = walked
                    .adds
                    .into_iter()
                    .map(|p| graph.reference(p))
                    .collect();
                match graph.rules.get(&walked.path).copied() {
                    Some(i) => {
                        if let Some(node) = graph.nodes.get_mut(i) {
                            node.cost = node.cost.max(walked.cost);
                            node.deps.extend(refs);
                            node.adds.extend(adds);
                        }
                    }
                    None => {
                        graph.rules.insert(walked.path.clone(), graph.nodes.len());
                        graph.nodes.push(Node {
                            path: walked.path,
                            is_ref: false,
                            at: walked.at,
                            cost: walked.cost,
                            deps: refs,
                            adds,
                        });
                    }
                }
            }
        }
        graph.link();
        graph
    }

    /// The error naming a cycle: its rules round to the first again, from the rule defined
    /// first (references are not named).
    fn recursion(&self, cycle: &[usize]) -> String {
        let mut rules: Vec<usize> = cycle
            .iter()
            .take(cycle.len().saturating_sub(1))
            .copied()
            .filter(|&i| self.is_rule(i))
            .collect();
        if let Some(first) = (0..rules.len()).min_by_key(|&k| rules.get(k).copied()) {
            rules.rotate_left(first);
        }
        rules.extend(rules.first().copied());
        let first = rules.first().and_then(|&i| self.nodes.get(i));
        let names: Vec<String> = rules.iter().map(|&i| self.name(i)).collect();
        format!(
            "{}: rule {} is recursive: {} (Rego forbids recursion; Aegis refuses it rather \
             than let an input drive it deep enough to abort the process)",
            first.map_or("", |n| n.at.as_str()),
            first.map_or_else(String::new, |n| n.path.join(".")),
            names.join(" -> ")
        )
    }

    fn costliest(&self) -> Result<Option<Chain>, String> {
        let deps: Vec<Vec<usize>> = self
            .nodes
            .iter()
            .map(|n| n.deps.union(&n.adds).copied().collect())
            .collect();
        let order = topological(&deps).map_err(|cycle| self.recursion(&cycle))?;
        // The costliest chain from each node down, dependencies first: (cost, next node).
        // Sums saturate: `with` values can double a cost at each level.
        let mut below: Vec<(usize, Option<usize>)> = vec![(0, None); self.nodes.len()];
        for &i in &order {
            let total = |d: usize| below.get(d).map_or(0, |b| b.0);
            let Some(node) = self.nodes.get(i) else {
                continue;
            };
            let deepest = node.deps.iter().copied().max_by_key(|&d| total(d));
            let added = node
                .adds
                .iter()
                .fold(0usize, |sum, &a| sum.saturating_add(total(a)));
            let cost = node
                .cost
                .saturating_add(added)
                .saturating_add(deepest.map_or(0, total));
            if let Some(b) = below.get_mut(i) {
                *b = (cost, deepest);
            }
        }
        let top = below
            .iter()
            .enumerate()
            .filter(|&(i, _)| self.is_rule(i))
            .max_by_key(|&(i, b)| (b.0, std::cmp::Reverse(i)));
        let Some((top, &(cost, mut next))) = top else {
            return Ok(None);
        };
        let mut rules = vec![self.name(top)];
        while let Some(d) = next {
            if self.is_rule(d) {
                rules.push(self.name(d));
            }
            next = below.get(d).and_then(|b| b.1);
        }
        Ok(Some(Chain {
            cost,
            rules,
            at: self
                .nodes
                .get(top)
                .map_or_else(String::new, |n| n.at.clone()),
        }))
    }
}

/// The costliest chain of rules (`None` without rules), or the error naming a cycle.
pub fn costliest(modules: &[Ref<Module>]) -> Result<Option<Chain>, String> {
    Graph::build(modules).costliest()
}

/// The nodes in an order where each comes after all it depends on, or a cycle.
fn topological(deps: &[Vec<usize>]) -> Result<Vec<usize>, Vec<usize>> {
    let n = deps.len();
    let mut waiting: Vec<usize> = deps.iter().map(Vec::len).collect();
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, ds) in deps.iter().enumerate() {
        for &d in ds {
            if let Some(u) = users.get_mut(d) {
                u.push(i);
            }
        }
    }
    let mut ready: VecDeque<usize> = (0..n).filter(|&i| waiting.get(i) == Some(&0)).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(d) = ready.pop_front() {
        order.push(d);
        for &u in users.get(d).map_or(&[][..], Vec::as_slice) {
            if let Some(w) = waiting.get_mut(u) {
                *w -= 1;
                if *w == 0 {
                    ready.push_back(u);
                }
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Every node left waits on another one left: walking dependencies among them must
    // come back to a node already seen.
    let left = |i: usize| waiting.get(i).is_some_and(|&w| w > 0);
    let Some(start) = (0..n).find(|&i| left(i)) else {
        return Err(Vec::new());
    };
    let mut walk = vec![start];
    let mut seen = BTreeMap::from([(start, 0usize)]);
    let mut at = start;
    loop {
        let next = deps
            .get(at)
            .and_then(|ds| ds.iter().copied().find(|&d| left(d)));
        let Some(d) = next else {
            return Err(walk);
        };
        if let Some(&from) = seen.get(&d) {
            let mut cycle = walk.split_off(from);
            cycle.push(d);
            return Err(cycle);
        }
        seen.insert(d, walk.len());
        walk.push(d);
        at = d;
    }
}

/// Each package's path and import aliases (over all its modules: regorus keys imports by
/// package).
struct Scopes {
    packages: BTreeMap<Vec<String>, Scope>,
}

/// A package and its import aliases: what a name in its rules refers to.
struct Scope {
    package: Vec<String>,
    /// Alias → the `data` paths it is bound to (`input` aliases are left out: they read
    /// no rule).
    aliases: BTreeMap<String, Vec<Vec<String>>>,
}

fn package_of(module: &Module) -> Vec<String> {
    static_path(&module.package.refr, &mut Vec::new())
        .map(|(root, fields)| {
            let mut path = vec!["data".to_owned(), root];
            path.extend(fields);
            path
        })
        .unwrap_or_else(|| vec!["data".to_owned()])
}

impl Scopes {
    fn new(modules: &[Ref<Module>]) -> Self {
        let mut packages: BTreeMap<Vec<String>, Scope> = BTreeMap::new();
        for module in modules {
            let package = package_of(module);
            let scope = packages.entry(package.clone()).or_insert_with(|| Scope {
                package,
                aliases: BTreeMap::new(),
            });
            for import in &module.imports {
                let Some((root, fields)) = static_path(&import.refr, &mut Vec::new()) else {
                    continue;
                };
                if root != "data" {
                    continue; // input, future.keywords, rego.v1
                }
                let alias = match &import.r#as {
                    Some(span) => span.text().to_owned(),
                    None => fields.last().cloned().unwrap_or_else(|| root.clone()),
                };
                let mut path = vec![root];
                path.extend(fields);
                scope.aliases.entry(alias).or_default().push(path);
            }
        }
        Self { packages }
    }

    fn of(&self, module: &Module) -> Option<&Scope> {
        self.packages.get(&package_of(module))
    }
}

/// What walking one rule found.
struct Walked {
    path: Vec<String>,
    at: String,
    cost: usize,
    refs: Vec<Vec<String>>,
    adds: Vec<Vec<String>>,
    /// The paths of `input` it reads.
    input: Vec<Vec<String>>,
}

impl Scope {
    /// A rule's path, where it is, its own cost and the paths it refers to.
    fn rule(&self, rule: &Rule) -> Walked {
        let mut walk = Walk {
            scope: self,
            locals: Vec::new(),
            refs: Vec::new(),
            adds: Vec::new(),
            input: Vec::new(),
            loops: 0,
        };
        let (span, head_ref, cost) = match rule {
            Rule::Spec { span, head, bodies } => {
                let (head_ref, args) = match head {
                    RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. } => (refr, &[][..]),
                    RuleHead::Func { refr, args, .. } => (refr, &args[..]),
                };
                args.iter().for_each(|a| walk.declare_pattern(a));
                let args_cost = args.iter().map(|a| walk.expr(a)).max().unwrap_or(0);
                // The keys in a head (`p[k]`, `p[k].x[j]`)
                let mut keys = Vec::new();
                static_path(head_ref, &mut keys);
                // A head's keys and value are evaluated once a body holds, seeing what the
                // body declared: each is walked in the scope of each body.
                let mut cost = args_cost;
                // A rule without a body (`r := 1`) is walked once, with no body.
                let bodies: Vec<Option<&RuleBody>> = if bodies.is_empty() {
                    vec![None]
                } else {
                    bodies.iter().map(Some).collect()
                };
                for body in bodies {
                    let mark = walk.locals.len();
                    let query = body.map_or(0, |b| walk.query(&b.query));
                    let mut value = match head {
                        RuleHead::Compr { assign, .. } | RuleHead::Func { assign, .. } => {
                            assign.as_ref().map_or(0, |a| walk.expr(&a.value))
                        }
                        RuleHead::Set { key, .. } => key.as_ref().map_or(0, |k| walk.expr(k)),
                    };
                    for key in &keys {
                        value = value.max(walk.expr(key));
                    }
                    let own = body
                        .and_then(|b| b.assign.as_ref())
                        .map_or(0, |a| walk.expr(&a.value));
                    walk.locals.truncate(mark);
                    cost = cost.max(query + value.max(own));
                }
                (span, head_ref, cost)
            }
            Rule::Default {
                span,
                refr,
                args,
                value,
                ..
            } => {
                args.iter().for_each(|a| walk.declare_pattern(a));
                (span, refr, walk.expr(value))
            }
        };
        let mut path = self.package.clone();
        if let Some((root, fields)) = static_path(head_ref, &mut Vec::new()) {
            path.push(root);
            path.extend(fields);
        }
        // Each link of the head nests the rule's value one level deeper in `data`: a chain
        // of rules could otherwise build a value tens of thousands of levels deep, which
        // regorus frees (and compares, and marshals) recursively.
        Walked {
            path,
            at: format!("{}:{}", span.source.file(), span.line),
            cost: RULE_FRAME + links(head_ref) + cost,
            refs: walk.refs,
            adds: walk.adds,
            input: walk.input,
        }
    }
}

/// The walk of one rule: the names in scope, the paths it refers to.
struct Walk<'s> {
    scope: &'s Scope,
    /// Names declared so far in the scopes being walked (arguments, `some`, `:=`,
    /// `some … in`, `every`), innermost last.
    locals: Vec<String>,
    refs: Vec<Vec<String>>,
    /// References in `with … as` values.
    adds: Vec<Vec<String>>,
    /// Paths of `input` read, local or not (a name that might be `input` counts).
    input: Vec<Vec<String>>,
    /// Loops met in the statement being walked.
    loops: usize,
}

impl Walk<'_> {
    fn is_local(&self, name: &str) -> bool {
        self.locals.iter().any(|l| l == name)
    }

    /// The variables of a pattern (`x`, `[x, y]`, `{"k": x}`) as locals.
    fn declare_pattern(&mut self, expr: &Expr) {
        match expr {
            Expr::Var { span, .. } => {
                self.locals.push(span.text().to_owned());
            }
            Expr::Array { items, .. } => items.iter().for_each(|i| self.declare_pattern(i)),
            Expr::Object { fields, .. } => {
                fields.iter().for_each(|(_, _, v)| self.declare_pattern(v));
            }
            _ => {}
        }
    }

    /// The cost of a query: one unit per statement and per loop in it (regorus evaluates
    /// the rest of the query inside each loop), plus its costliest statement. What it
    /// declares stays in scope (a rule's head sees its body's names); nested queries go
    /// through [`Self::nested`].
    fn query(&mut self, query: &Query) -> usize {
        let mut deepest = 0;
        let mut levels = 0usize;
        for stmt in &query.stmts {
            self.loops = 0;
            // What a statement declares is local from its pattern on: the collection or
            // the value it is declared from is walked first (`x := x + 1` reads rule x).
            let mut cost = match &stmt.literal {
                Literal::SomeVars { vars, .. } => {
                    self.locals.extend(vars.iter().map(|v| v.text().to_owned()));
                    0
                }
                Literal::SomeIn {
                    key,
                    value,
                    collection,
                    ..
                } => {
                    self.loops += 1;
                    let collection = self.expr(collection);
                    if let Some(key) = key {
                        self.declare_pattern(key);
                    }
                    self.declare_pattern(value);
                    let key = key.as_ref().map_or(0, |k| self.expr(k));
                    collection.max(key).max(self.expr(value))
                }
                Literal::Expr { expr, .. } => match expr.as_ref() {
                    Expr::AssignExpr {
                        op: regorus::unstable::AssignOp::ColEq,
                        lhs,
                        rhs,
                        ..
                    } => {
                        let rhs = self.expr(rhs);
                        self.declare_pattern(lhs);
                        1 + rhs.max(self.expr(lhs))
                    }
                    _ => self.expr(expr),
                },
                Literal::NotExpr { expr, .. } => self.expr(expr),
                Literal::Every {
                    key,
                    value,
                    domain,
                    query,
                    ..
                } => {
                    let domain = self.expr(domain);
                    let mark = self.locals.len();
                    self.locals.extend(key.iter().map(|k| k.text().to_owned()));
                    self.locals.push(value.text().to_owned());
                    let body = self.nested(query, |_| 0);
                    self.locals.truncate(mark);
                    domain.max(body)
                }
            };
            for with in &stmt.with_mods {
                let before = self.refs.len();
                cost = cost.max(self.expr(&with.r#as));
                // Counted once, whole, on top of the rest: not also as a dependency.
                let added = self.refs.split_off(before);
                self.adds.extend(added);
            }
            levels = levels.saturating_add(1 + self.loops);
            deepest = deepest.max(cost);
        }
        levels + deepest
    }

    /// A query in a scope of its own (a comprehension, `every`), with what is evaluated in
    /// that scope after it (a comprehension's term). Its loops are its own.
    fn nested(&mut self, query: &Query, then: impl FnOnce(&mut Self) -> usize) -> usize {
        let (mark, loops) = (self.locals.len(), self.loops);
        let cost = self.query(query) + then(self);
        self.locals.truncate(mark);
        self.loops = loops;
        cost
    }

    /// The depth of an expression, noting the rule paths it refers to and the loops in it.
    fn expr(&mut self, expr: &Expr) -> usize {
        match expr {
            Expr::Var { span, .. } => {
                let name = span.text();
                if name == "input" {
                    self.input.push(Vec::new());
                }
                if !self.is_local(name) {
                    self.refer(name, Vec::new());
                }
                1
            }
            Expr::RefDot { .. } | Expr::RefBrack { .. } => {
                let mut dynamic = Vec::new();
                let deepest = match static_path(expr, &mut dynamic) {
                    Some((root, fields)) => {
                        if root == "input" {
                            self.input.push(fields.clone());
                        }
                        if !self.is_local(&root) {
                            self.refer(&root, fields);
                        }
                        0
                    }
                    // Rooted in something else than a name (a call, a literal).
                    None => dynamic.pop().map_or(0, |root| self.expr(root)),
                };
                // Any index that is not a literal may iterate.
                self.loops += dynamic.len();
                let indexes = dynamic.iter().map(|e| self.expr(e)).max().unwrap_or(0);
                // regorus recurses once per link of a reference.
                links(expr) + deepest.max(indexes)
            }
            Expr::Call { fcn, params, .. } => {
                // A call names a function whatever the locals are: locals cannot be called.
                if let Some((root, fields)) = static_path(fcn, &mut Vec::new()) {
                    // `walk(x, [path, value])` iterates.
                    if root == "walk" && fields.is_empty() && params.len() > 1 {
                        self.loops += 1;
                    }
                    self.refer(&root, fields);
                }
                1 + params.iter().map(|p| self.expr(p)).max().unwrap_or(0)
            }
            Expr::ArrayCompr { term, query, .. } | Expr::SetCompr { term, query, .. } => {
                1 + self.nested(query, |w| w.expr(term))
            }
            Expr::ObjectCompr {
                key, value, query, ..
            } => 1 + self.nested(query, |w| w.expr(key).max(w.expr(value))),
            _ => {
                let mut deepest = 0;
                if !for_children(expr, |e| deepest = deepest.max(self.expr(e))) {
                    // An expression this walk does not know may read anything.
                    self.input.push(Vec::new());
                }
                1 + deepest
            }
        }
    }

    /// Notes a reference to `root.fields…`: to the package's rule of that name, and to
    /// what the package's imports bind the name to.
    fn refer(&mut self, root: &str, fields: Vec<String>) {
        match root {
            "input" => {}
            "data" => {
                let mut path = vec!["data".to_owned()];
                path.extend(fields);
                self.refs.push(path);
            }
            _ => {
                for target in self.scope.aliases.get(root).into_iter().flatten() {
                    let mut path = target.clone();
                    path.extend(fields.iter().cloned());
                    self.refs.push(path);
                }
                let mut path = self.scope.package.clone();
                path.push(root.to_owned());
                path.extend(fields);
                self.refs.push(path);
            }
        }
    }
}

/// `a.b["c"][x].d` as its root name and the fields up to its first dynamic index (here
/// `a`, `[b, c]`); the dynamic indexes go to `dynamic`. `None` when the reference is not
/// rooted at a name (the root expression is then the last of `dynamic`).
fn static_path<'e>(expr: &'e Expr, dynamic: &mut Vec<&'e Expr>) -> Option<(String, Vec<String>)> {
    let mut fields = Vec::new();
    let mut at = expr;
    loop {
        match at {
            Expr::RefDot { refr, field, .. } => {
                fields.push(
                    field
                        .1
                        .as_string()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                );
                at = refr;
            }
            Expr::RefBrack { refr, index, .. } => {
                match index.as_ref() {
                    Expr::String { value, .. } | Expr::RawString { value, .. } => {
                        fields.push(value.as_string().map(|s| s.to_string()).unwrap_or_default());
                    }
                    Expr::Number { value, .. } => {
                        fields.push(value.to_json_str().unwrap_or_default());
                    }
                    other => {
                        // Everything read after a dynamic index is dynamic.
                        fields.clear();
                        dynamic.push(other);
                    }
                }
                at = refr;
            }
            Expr::Var { span, .. } => {
                fields.reverse();
                return Some((span.text().to_owned(), fields));
            }
            other => {
                dynamic.push(other);
                return None;
            }
        }
    }
}

/// The links of a reference: `a.b[c].d` has three.
fn links(expr: &Expr) -> usize {
    let mut n = 0;
    let mut at = expr;
    while let Expr::RefDot { refr, .. } | Expr::RefBrack { refr, .. } = at {
        n += 1;
        at = refr;
    }
    n
}

/// Calls `f` on each direct sub-expression of `expr` (comprehension queries excluded);
/// false for a kind of expression it does not know (none, with regorus's features as
/// Aegis builds it).
fn for_children(expr: &Expr, mut f: impl FnMut(&Expr)) -> bool {
    match expr {
        Expr::String { .. }
        | Expr::RawString { .. }
        | Expr::Number { .. }
        | Expr::Bool { .. }
        | Expr::Null { .. }
        | Expr::Var { .. } => {}
        Expr::Array { items, .. } | Expr::Set { items, .. } => items.iter().for_each(|i| f(i)),
        Expr::Object { fields, .. } => {
            for (_, k, v) in fields {
                f(k);
                f(v);
            }
        }
        Expr::ArrayCompr { term, .. } | Expr::SetCompr { term, .. } => f(term),
        Expr::ObjectCompr { key, value, .. } => {
            f(key);
            f(value);
        }
        Expr::Call { fcn, params, .. } => {
            f(fcn);
            params.iter().for_each(|p| f(p));
        }
        Expr::UnaryExpr { expr, .. } => f(expr),
        Expr::RefDot { refr, .. } => f(refr),
        Expr::RefBrack { refr, index, .. } => {
            f(refr);
            f(index);
        }
        Expr::BinExpr { lhs, rhs, .. }
        | Expr::BoolExpr { lhs, rhs, .. }
        | Expr::ArithExpr { lhs, rhs, .. }
        | Expr::AssignExpr { lhs, rhs, .. } => {
            f(lhs);
            f(rhs);
        }
        Expr::Membership {
            key,
            value,
            collection,
            ..
        } => {
            if let Some(key) = key {
                f(key);
            }
            f(value);
            f(collection);
        }
        #[allow(unreachable_patterns)]
        _ => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The costliest chain of the modules, or the refusal.
    fn analyse(modules: &[(&str, &str)]) -> Result<Option<Chain>, String> {
        let mut engine = regorus::Engine::new();
        for (path, text) in modules {
            engine
                .add_policy(path.to_string(), text.to_string())
                .map_err(|e| format!("parse: {e}"))?;
        }
        costliest(engine.get_modules())
    }

    fn one(text: &str) -> Result<Option<Chain>, String> {
        analyse(&[("p.rego", text)])
    }

    const HEAD: &str = "package p\nimport rego.v1\n";

    #[test]
    fn what_is_not_recursion_is_not_refused() {
        let sound = [
            // Ref heads: a.c reads a.b, not itself.
            "a.b := 1\na.c := a.b + 1\n",
            // A partial set read by another rule.
            "deny contains m if { m := input.m }\nallow if count(deny) == 0\n",
            // Locals named like rules: an argument, `some`, `some … in`, `:=`, a comprehension.
            "x := 1\nf(x) := x + 1\ng := y if { some x in [1]; y := x }\nh := [x | some x in [1, 2]]\nk := x if { x := 2 }\nm := y if { some x; x = 3; y := x }\n",
            // An else chain.
            "v := 1 if input.a\nelse := 2\n",
            // Tests replacing a function and the input.
            "f(v) := v\nallow if f(1) == 1\ntest_allow if { allow with input as {} with f as g }\ng(v) := 1\n",
            // Object rules reading each other's keys.
            "o[\"a\"] := 1\no[\"b\"] := o.a + 1\n",
        ];
        for text in sound {
            let text = format!("{HEAD}{text}");
            assert!(
                one(&text).is_ok_and(|c| c.is_some()),
                "{text}: {:?}",
                one(&text)
            );
        }
        // Packages that import each other, rules that do not (regorus issue #743's shape).
        let a = "package a\nimport rego.v1\nimport data.b\np := b.q\ns := 1\n";
        let b = "package b\nimport rego.v1\nimport data.a\nq := 2\nr := a.s\n";
        assert!(analyse(&[("a.rego", a), ("b.rego", b)]).is_ok());
    }

    #[test]
    fn every_kind_of_cycle_is_refused_naming_it() {
        let cases = [
            (
                "p := q\nq := p\n",
                "p.rego:3: rule data.p.p is recursive: data.p.p -> data.p.q -> data.p.p",
            ),
            (
                "f(x) := g(x)\ng(x) := f(x)\n",
                "is recursive: data.p.f -> data.p.g -> data.p.f",
            ),
            // A whole package read from inside it.
            (
                "r := count(data.p)\n",
                "rule data.p.r is recursive: data.p.r -> data.p.r",
            ),
            // An object rule whose keys come from itself.
            (
                "o[k] := 1 if { some k in object.keys(o) }\n",
                "rule data.p.o is recursive",
            ),
            // Through a comprehension, a `not`, an `every`, a `with` value.
            (
                "a if { not b }\nb if { x := [1 | a] }\n",
                "data.p.a -> data.p.b -> data.p.a",
            ),
            (
                "a if { every v in [1] { b } }\nb := a\n",
                "data.p.a -> data.p.b -> data.p.a",
            ),
            (
                "a if { true with input as b }\nb := a\n",
                "data.p.a -> data.p.b -> data.p.a",
            ),
            // A name local in one body, or in a comprehension, is the rule elsewhere.
            (
                "a if { b }\na if { some b; b = 1 }\nb if a\n",
                "data.p.a -> data.p.b -> data.p.a",
            ),
            (
                "a if { c := [b | some b in [1]]; b }\nb if a\n",
                "data.p.a -> data.p.b -> data.p.a",
            ),
            (
                "a if { every b in [1] { b } ; b }\nb if a\n",
                "data.p.a -> data.p.b -> data.p.a",
            ),
            (
                "a if { b := b + 1 }\nb := 1 if a\n",
                "data.p.a -> data.p.b -> data.p.a",
            ),
            (
                "a if { some b in [b] }\nb := [1] if a\n",
                "data.p.a -> data.p.b -> data.p.a",
            ),
            // Through a key in a rule head.
            (
                "r[count(r)] := 1\n",
                "rule data.p.r is recursive: data.p.r -> data.p.r",
            ),
            // A function called by a name that is also a local elsewhere.
            (
                "f(n) := y if { some f; f := 1; y := f(n - 1) }\n",
                "rule data.p.f is recursive",
            ),
        ];
        for (text, expected) in cases {
            let text = format!("{HEAD}{text}");
            let e = one(&text).expect_err(&text);
            assert!(e.contains(expected), "{text}: {e}");
        }
    }

    #[test]
    fn the_graph_grows_with_rules_and_references_not_their_product() {
        // 3,000 rules each reading a package of 3,000 rules: one node for `data.b`.
        let mut b = String::from("package b\n");
        let mut a = String::from("package a\nimport rego.v1\n");
        for i in 0..3000 {
            b.push_str(&format!("b{i} := 1\n"));
            a.push_str(&format!("a{i} := count(data.b)\n"));
        }
        let mut engine = regorus::Engine::new();
        engine.add_policy("a.rego".into(), a).expect("parses");
        engine.add_policy("b.rego".into(), b).expect("parses");
        let graph = Graph::build(engine.get_modules());
        let edges: usize = graph
            .nodes
            .iter()
            .map(|n| n.deps.len() + n.adds.len())
            .sum();
        // Each a_i reads two paths (`data.a.count`, which is no rule, and `data.b`);
        // `data.b` reads the 3,000 b_i. Rule to rule, this was 9 million edges.
        assert_eq!(edges, 3000 * 2 + 3000);
        assert!(graph.costliest().is_ok());
    }

    #[test]
    fn costs_add_up_along_the_chain() {
        // decision: a rule, one statement, `r > 0` two deep; r: a rule, `count(input.p)`
        // two deep (the call, one link).
        let c = one(&format!(
            "{HEAD}r := count(input.p)\ndecision if {{ r > 0 }}\n"
        ))
        .expect("sound")
        .expect("rules");
        assert_eq!(c.rules, ["data.p.decision", "data.p.r"]);
        assert_eq!(c.cost, (RULE_FRAME + 1 + 2) + (RULE_FRAME + 2));
        assert_eq!(c.at, "p.rego:4");
        // A loop adds its statement and the statements after it.
        let loops = one(&format!(
            "{HEAD}d if {{\n some x in input.a\n some y in input.b\n x == y\n}}\n"
        ))
        .expect("sound")
        .expect("rules");
        // Three statements, two of them loops; the costliest, `x == y`, is two deep.
        assert_eq!(loops.cost, RULE_FRAME + 3 + 2 + 2);
    }

    /// The `input` paths the modules can read, as `input.a.b`.
    fn reads(modules: &[(&str, &str)]) -> Vec<String> {
        let mut engine = regorus::Engine::new();
        for (path, text) in modules {
            engine
                .add_policy(path.to_string(), text.to_string())
                .expect("parses");
        }
        check(engine.get_modules())
            .expect("within the bound")
            .paths()
    }

    #[test]
    fn every_way_of_reading_input_is_found() {
        let cases: &[(&str, &[&str])] = &[
            ("allow if input.tool.name == \"x\"\n", &["input.tool.name"]),
            // Literal brackets are fields; an array index too (arrays are built whole).
            (
                "allow if input[\"tool\"][\"name\"] == \"x\"\nb if input.parsed_path[0] == \"a\"\n",
                &["input.parsed_path.0", "input.tool.name"],
            ),
            // Past a key that is not a literal, the whole of what comes before.
            (
                "allow if { some h; input.attributes.request.http.headers[h] }\n",
                &["input.attributes.request.http.headers"],
            ),
            ("allow if { some k; input[k] }\n", &["input"]),
            // A bare input: a function, walk, object.get, json.marshal, a local.
            ("allow if count(input) > 0\n", &["input"]),
            ("allow if { walk(input, [p, v]); v == 1 }\n", &["input"]),
            ("allow if object.get(input, [\"a\"], 1) == 1\n", &["input"]),
            ("x := input\nallow if x.a\n", &["input"]),
            // What is passed to a function, whole.
            (
                "f(x) := x.a\nallow if f(input.tool) == 1\n",
                &["input.tool"],
            ),
            // Comprehensions, every, else, head keys, default, dynamic keys' own reads.
            (
                "n := [s | some s in input.agent.scopes]\nallow if every s in input.parsed_path { s != \"\" }\n",
                &["input.agent.scopes", "input.parsed_path"],
            ),
            (
                "v := 1 if input.a\nelse := input.b\n",
                &["input.a", "input.b"],
            ),
            (
                "default d := false\nd if input.d\ndefault f(_) := false\nf(x) if x == input.f\n",
                &["input.d", "input.f"],
            ),
            ("p[input.k] := input.v\n", &["input.k", "input.v"]),
            (
                "h := input.attributes.request.http.headers[input.tool.name]\n",
                &["input.attributes.request.http.headers", "input.tool.name"],
            ),
            // Imports of input: everything under the imported path.
            (
                "import input.attributes.source as src\nallow if src.address\n",
                &["input.attributes.source"],
            ),
            ("import input\nallow if input.a\n", &["input"]),
            // `with`: the value replacing is read; the path replaced is not.
            (
                "r := input.agent.run_id\nallow if r with input.agent as input.context\ntest_r if { r with input as {\"agent\": {}} }\n",
                &["input.agent.run_id", "input.context"],
            ),
            // Reads in a package read through data, and none at all.
            ("allow := data.q.x\n", &[]),
        ];
        for (body, want) in cases {
            let text = format!("{HEAD}{body}");
            assert_eq!(reads(&[("p.rego", &text)]), *want, "{text}");
        }
        // Every module counts, whatever its package.
        let q = "package q\nimport rego.v1\nx := input.context.trust_level\n";
        assert_eq!(
            reads(&[
                ("p.rego", &format!("{HEAD}allow := data.q.x\n")),
                ("q.rego", q)
            ]),
            ["input.context.trust_level"]
        );
    }
}
