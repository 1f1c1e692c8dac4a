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
//! - **depth** is bounded: each rule costs [`RULE_FRAME`] plus, for its deepest body, one
//!   unit per statement (a loop recurses into the statements after it) and one per level
//!   of its deepest expression (comprehensions and `every` add their own queries). The
//!   costliest chain of rules reaching each other may cost at most [`MAX_EVAL_DEPTH`]; a
//!   rule past it is refused, naming the chain. Aegis runs regorus on threads with a
//!   [`REGO_STACK`]-byte stack, sized so that a bundle at the bound evaluates with room
//!   to spare (measured by `tests/bundle_depth.rs`).
//!
//! What refers to what is read statically. Where that cannot be exact it errs toward more
//! dependencies, never fewer: a reference with a dynamic key (`data.p[x]`) depends on
//! every rule under its static part (as in OPA, `data[input.x]` inside a package is a
//! cycle), and a call always names the function of its name. A name is local from the
//! statement that declares it (`some`, `:=`, `some … in`, an argument, `every`) to the end
//! of its scope (the rule body and its head, a comprehension, an `every` body); anywhere
//! else it names the rule. The walk of each expression recurses, which is safe because
//! `check_nesting` bounded expression depth before regorus parsed the module.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use regorus::unstable::{Expr, Literal, Module, Query, Ref, Rule, RuleBody, RuleHead};

/// What one rule costs besides its statements and expressions (in units of
/// [`MAX_EVAL_DEPTH`]). Measured on 2 MiB threads, debug build: a chain of rules took at
/// most ~4.5 KiB of stack per rule, a function 30 calls deep at most ~1.8 KiB per call.
pub const RULE_FRAME: usize = 4;

/// The most a chain of rules may cost: a reference, a statement or an expression level
/// are one unit each, a rule [`RULE_FRAME`].
pub const MAX_EVAL_DEPTH: usize = 2_048;

/// Stack of every thread that runs regorus (the evaluation pool, bundle compilation). At
/// the bound, the deepest shape measured (`tests/bundle_depth.rs`'s, debug build, the
/// interpreter) needed 4 MiB; this is four times that. Only touched pages are resident.
pub const REGO_STACK: usize = 16 * 1024 * 1024;

/// One rule (all its definitions at one path).
struct Node {
    /// `data.pkg.name`.
    path: Vec<String>,
    /// Where it is first defined: `file:line`.
    at: String,
    /// Its own cost: the costliest of its definitions.
    cost: usize,
    /// The paths its definitions refer to.
    refs: Vec<Vec<String>>,
}

/// The costliest chain of rules in a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Its cost, in units of [`MAX_EVAL_DEPTH`].
    pub cost: usize,
    /// The rules from the top down (`data.pkg.name`).
    pub rules: Vec<String>,
    /// Where the top rule is defined: `file:line`.
    pub at: String,
}

/// Checks the modules of a bundle: no recursion, no chain costlier than
/// [`MAX_EVAL_DEPTH`]. The error names the rule, where it is, and the cycle or the chain.
pub fn check(modules: &[Ref<Module>]) -> Result<(), String> {
    let Some(chain) = costliest(modules)? else {
        return Ok(());
    };
    if chain.cost <= MAX_EVAL_DEPTH {
        return Ok(());
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
         units of stack (one per rule reference, statement and expression level, {RULE_FRAME} \
         per rule); the most Aegis accepts is {MAX_EVAL_DEPTH}",
        chain.at,
        rules.first().map_or("", String::as_str),
        rules.len(),
        named.join(" -> "),
        chain.cost,
    ))
}

/// The costliest chain of rules (`None` without rules), or the error naming a cycle.
pub fn costliest(modules: &[Ref<Module>]) -> Result<Option<Chain>, String> {
    let mut nodes: Vec<Node> = Vec::new();
    let mut index: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    for module in modules {
        let package = static_path(&module.package.refr, &mut Vec::new())
            .map(|(root, fields)| {
                let mut path = vec!["data".to_owned(), root];
                path.extend(fields);
                path
            })
            .unwrap_or_else(|| vec!["data".to_owned()]);
        let scope = Scope::new(module, package);
        for rule in &module.policy {
            let (path, at, cost, refs) = scope.rule(rule);
            match index.get(&path).and_then(|&i| nodes.get_mut(i)) {
                Some(node) => {
                    node.cost = node.cost.max(cost);
                    node.refs.extend(refs);
                }
                None => {
                    index.insert(path.clone(), nodes.len());
                    nodes.push(Node {
                        path,
                        at,
                        cost,
                        refs,
                    });
                }
            }
        }
    }
    let name = |i: usize| nodes.get(i).map_or_else(String::new, |n| n.path.join("."));
    let deps = link(&nodes, &index);
    let order = topological(&deps).map_err(|cycle| {
        let first = cycle.first().and_then(|&i| nodes.get(i));
        let names: Vec<String> = cycle.iter().map(|&i| name(i)).collect();
        format!(
            "{}: rule {} is recursive: {} (Rego forbids recursion; Aegis refuses it rather than \
             let an input drive it deep enough to abort the process)",
            first.map_or("", |n| n.at.as_str()),
            first.map_or_else(String::new, |n| n.path.join(".")),
            names.join(" -> ")
        )
    })?;
    // The costliest chain from each rule down, dependencies first: (cost, next rule).
    let mut below: Vec<(usize, Option<usize>)> = vec![(0, None); nodes.len()];
    for &i in &order {
        let total = |d: usize| below.get(d).map_or(0, |b| b.0);
        let deepest = deps
            .get(i)
            .and_then(|ds| ds.iter().copied().max_by_key(|&d| total(d)));
        let own = nodes.get(i).map_or(0, |n| n.cost);
        let cost = own + deepest.map_or(0, total);
        if let Some(b) = below.get_mut(i) {
            *b = (cost, deepest);
        }
    }
    let top = below
        .iter()
        .enumerate()
        .max_by_key(|&(i, b)| (b.0, std::cmp::Reverse(i)));
    let Some((top, &(cost, mut next))) = top else {
        return Ok(None);
    };
    let mut rules = vec![name(top)];
    while let Some(d) = next {
        rules.push(name(d));
        next = below.get(d).and_then(|b| b.1);
    }
    Ok(Some(Chain {
        cost,
        rules,
        at: nodes.get(top).map_or_else(String::new, |n| n.at.clone()),
    }))
}

/// The rules each rule depends on: every rule whose path is a prefix of one of its
/// references (`data.p.r.x` reads rule `r`), or has one as prefix (`data.p` reads all of
/// package `p`).
fn link(nodes: &[Node], index: &BTreeMap<Vec<String>, usize>) -> Vec<Vec<usize>> {
    nodes
        .iter()
        .map(|node| {
            let mut deps = BTreeSet::new();
            for path in &node.refs {
                let mut prefix = Vec::with_capacity(path.len());
                for field in path {
                    if let Some(&i) = index.get(&prefix) {
                        deps.insert(i);
                    }
                    prefix.push(field.clone());
                }
                for (p, &i) in index.range(path.clone()..) {
                    if !p.starts_with(path) {
                        break;
                    }
                    deps.insert(i);
                }
            }
            deps.into_iter().collect()
        })
        .collect()
}

/// The rules in an order where each comes after all it depends on, or a cycle.
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
    // Every rule left waits on another one left: walking dependencies among them must
    // come back to a rule already seen.
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

/// A module's package and import aliases: what a name in its rules refers to.
struct Scope {
    package: Vec<String>,
    /// Alias → the `data` path it stands for (`None`: an alias of `input`).
    aliases: BTreeMap<String, Option<Vec<String>>>,
}

impl Scope {
    fn new(module: &Module, package: Vec<String>) -> Self {
        let mut aliases = BTreeMap::new();
        for import in &module.imports {
            let Some((root, fields)) = static_path(&import.refr, &mut Vec::new()) else {
                continue;
            };
            let alias = match &import.r#as {
                Some(span) => span.text().to_owned(),
                None => match fields.last() {
                    Some(last) => last.clone(),
                    None => root.clone(),
                },
            };
            let target = match root.as_str() {
                "data" => {
                    let mut path = vec![root];
                    path.extend(fields);
                    Some(path)
                }
                "input" => None,
                _ => continue, // future.keywords, rego.v1
            };
            aliases.insert(alias, target);
        }
        Self { package, aliases }
    }

    /// A rule's path, where it is, its own cost and the paths it refers to.
    fn rule(&self, rule: &Rule) -> (Vec<String>, String, usize, Vec<Vec<String>>) {
        let mut walk = Walk {
            scope: self,
            locals: Vec::new(),
            refs: Vec::new(),
        };
        let (span, head_ref, cost) = match rule {
            Rule::Spec { span, head, bodies } => {
                let (head_ref, args) = match head {
                    RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. } => (refr, &[][..]),
                    RuleHead::Func { refr, args, .. } => (refr, &args[..]),
                };
                args.iter().for_each(|a| walk.declare_pattern(a));
                let args_cost = args.iter().map(|a| walk.expr(a)).max().unwrap_or(0);
                // A head's key and value are evaluated once a body holds, seeing what the
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
                    let value = match head {
                        RuleHead::Compr { assign, .. } | RuleHead::Func { assign, .. } => {
                            assign.as_ref().map_or(0, |a| walk.expr(&a.value))
                        }
                        RuleHead::Set { key, .. } => key.as_ref().map_or(0, |k| walk.expr(k)),
                    };
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
        let at = format!("{}:{}", span.source.file(), span.line);
        (path, at, RULE_FRAME + cost, walk.refs)
    }
}

/// The walk of one rule: the names in scope, the paths it refers to.
struct Walk<'s> {
    scope: &'s Scope,
    /// Names declared so far in the scopes being walked (arguments, `some`, `:=`,
    /// `some … in`, `every`), innermost last.
    locals: Vec<String>,
    refs: Vec<Vec<String>>,
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

    /// The cost of a query: one unit per statement, plus its costliest statement. What it
    /// declares stays in scope (a rule's head sees its body's names); nested queries go
    /// through [`Self::nested`].
    fn query(&mut self, query: &Query) -> usize {
        let mut deepest = 0;
        for stmt in &query.stmts {
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
                cost = cost.max(self.expr(&with.r#as));
            }
            deepest = deepest.max(cost);
        }
        query.stmts.len() + deepest
    }

    /// A query in a scope of its own (a comprehension, `every`), with what is evaluated in
    /// that scope after it (a comprehension's term).
    fn nested(&mut self, query: &Query, then: impl FnOnce(&mut Self) -> usize) -> usize {
        let mark = self.locals.len();
        let cost = self.query(query) + then(self);
        self.locals.truncate(mark);
        cost
    }

    /// The depth of an expression, noting the rule paths it refers to.
    fn expr(&mut self, expr: &Expr) -> usize {
        match expr {
            Expr::Var { span, .. } => {
                let name = span.text();
                if !self.is_local(name) {
                    self.refer(name, Vec::new());
                }
                1
            }
            Expr::RefDot { .. } | Expr::RefBrack { .. } => {
                let mut dynamic = Vec::new();
                let deepest = match static_path(expr, &mut dynamic) {
                    Some((root, fields)) => {
                        if !self.is_local(&root) {
                            self.refer(&root, fields);
                        }
                        0
                    }
                    // Rooted in something else than a name (a call, a literal).
                    None => dynamic.pop().map_or(0, |root| self.expr(root)),
                };
                let indexes = dynamic.iter().map(|e| self.expr(e)).max().unwrap_or(0);
                // regorus recurses once per link of a reference.
                links(expr) + deepest.max(indexes)
            }
            Expr::Call { fcn, params, .. } => {
                // A call names a function whatever the locals are: locals cannot be called.
                if let Some((root, fields)) = static_path(fcn, &mut Vec::new()) {
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
                for_children(expr, |e| deepest = deepest.max(self.expr(e)));
                1 + deepest
            }
        }
    }

    /// Notes a reference to `root.fields…` when it can name a rule.
    fn refer(&mut self, root: &str, fields: Vec<String>) {
        let mut path = match root {
            "input" => return,
            "data" => vec!["data".to_owned()],
            _ => match self.scope.aliases.get(root) {
                Some(None) => return,
                Some(Some(target)) => target.clone(),
                None => {
                    let mut path = self.scope.package.clone();
                    path.push(root.to_owned());
                    path
                }
            },
        };
        path.extend(fields);
        self.refs.push(path);
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

/// Calls `f` on each direct sub-expression of `expr` (comprehension queries excluded).
fn for_children(expr: &Expr, mut f: impl FnMut(&Expr)) {
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
        _ => {}
    }
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
        // Three statements; the costliest, `x == y`, is two deep.
        assert_eq!(loops.cost, RULE_FRAME + 3 + 2);
    }
}
