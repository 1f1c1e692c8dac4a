//! Which parts of the input document a bundle can read.
//!
//! Found from the bundle's parsed modules by the walk that bounds its depth
//! ([`super::graph::check`]): every reference rooted at `input`, up to its first index
//! that is not a literal, in every rule, function, default, `else`, comprehension,
//! `every`, head key and `with … as` value, and every import of `input…`. A bare `input` (passed to a function, to `walk`, `json.marshal`,
//! `object.get`…) or an index that is not a literal right at the root reads the whole
//! document.
//!
//! The Check builds only those parts ([`crate::check::input::build`]): a policy cannot
//! observe a key it never names, so its decisions are the same as on the whole document.
//! What is read is built whole below the deepest literal step, and arrays are always built
//! whole. The analysis over-approximates: a name that might be `input` counts as `input`.

use std::collections::BTreeMap;

/// The parts of a document read: all of it, or some of its keys (each with what is read
/// under it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reads {
    /// The whole value.
    All,
    /// Only these keys of an object (an empty map reads nothing).
    Keys(BTreeMap<String, Reads>),
}

/// The whole document: what a caller without a bundle's analysis builds.
pub static ALL: Reads = Reads::All;

impl Default for Reads {
    fn default() -> Self {
        Reads::Keys(BTreeMap::new())
    }
}

impl Reads {
    /// Notes that everything at `path` is read.
    pub fn read(&mut self, path: &[String]) {
        let mut at = self;
        for key in path {
            match at {
                Reads::All => return,
                Reads::Keys(keys) => {
                    at = keys
                        .entry(key.clone())
                        .or_insert_with(|| Reads::Keys(BTreeMap::new()));
                }
            }
        }
        *at = Reads::All;
    }

    /// What is read under `key`: `None` when nothing is.
    pub fn get(&self, key: &str) -> Option<&Reads> {
        match self {
            Reads::All => Some(&ALL),
            Reads::Keys(keys) => keys.get(key),
        }
    }

    /// Whether the whole value is read.
    pub fn is_all(&self) -> bool {
        matches!(self, Reads::All)
    }

    /// The paths read, each as `input.a.b` (for logs and tests); `input` alone
    /// when the whole document is.
    pub fn paths(&self) -> Vec<String> {
        fn walk(r: &Reads, at: &mut Vec<String>, out: &mut Vec<String>) {
            match r {
                Reads::All => out.push(at.join(".")),
                Reads::Keys(keys) => {
                    for (k, v) in keys {
                        at.push(k.clone());
                        walk(v, at, out);
                        at.pop();
                    }
                }
            }
        }
        let mut out = Vec::new();
        walk(self, &mut vec!["input".to_owned()], &mut out);
        out
    }

    /// What a Check builds, for logs: `the whole input`, or the paths read.
    pub fn describe(&self) -> String {
        match self {
            Reads::All => "the whole input".to_owned(),
            Reads::Keys(keys) if keys.is_empty() => "nothing of the input".to_owned(),
            Reads::Keys(_) => self.paths().join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> Vec<String> {
        p.split('.')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_read_covers_everything_below_it_and_the_root_reads_all() {
        let mut r = Reads::default();
        assert_eq!(r.paths(), Vec::<String>::new());
        assert!(r.get("tool").is_none());
        r.read(&path("tool.arguments.url"));
        r.read(&path("tool.name"));
        r.read(&path("agent"));
        r.read(&path("agent.scopes")); // below a whole read: no change
        assert_eq!(
            r.paths(),
            ["input.agent", "input.tool.arguments.url", "input.tool.name"]
        );
        assert!(r.get("agent").is_some_and(Reads::is_all));
        assert!(r.get("agent").and_then(|a| a.get("anything")).is_some());
        assert!(!r.get("tool").is_some_and(Reads::is_all));
        r.read(&path("tool"));
        assert_eq!(r.paths(), ["input.agent", "input.tool"]);
        r.read(&[]);
        assert_eq!(r, Reads::All);
        assert_eq!(r.paths(), ["input"]);
    }
}
