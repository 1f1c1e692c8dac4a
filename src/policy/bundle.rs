//! Policy bundles: a directory, an OPA bundle `.tar.gz`, or the default bundle embedded
//! from `policies/`.
//!
//! Layout as OPA's: `.manifest` (JSON: `revision`, `roots`, optional `rego_version`),
//! `*.rego` modules, and `data.json` / `data.yaml` files whose directory is their path in
//! `data` (`a/b/data.json` is `data.a.b`). Without a manifest revision the revision is
//! `sha256:` and the first 12 hex digits of the bundle digest.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// Bundles larger than this, uncompressed, are refused.
pub const MAX_BUNDLE_BYTES: u64 = 64 * 1024 * 1024;

/// Deepest nesting of `[` and `{` a Rego module may have. regorus's parser takes time
/// exponential in this depth, closed or not (measured: depth 14 0.6 s, 18 11.6 s, 20
/// 50 s; found by the `bundle` fuzz target), so a module past it is refused before it
/// reaches the parser. Real policies nest a handful of levels; at 12 a parse is ~0.2 s.
pub const MAX_REGO_NESTING: usize = 12;

/// Most operators and reference links one Rego expression may chain (see
/// `check_nesting`). regorus parses `- - - … x`, `a + b + … + z`, `x in a in b …` and
/// `a[0][0]…` / `a.b.c…` without its own depth limit, and its compiler and evaluator
/// recurse once per link: 1,000 unary minuses overflowed a 2 MiB thread
/// stack (the process aborts), 5,000 `+` across lines too (tried by hand after the
/// `bundle` fuzz target died of SIGSEGV in CI). Real policies chain a handful.
pub const MAX_REGO_OPERATORS: usize = 128;

/// Deepest nesting of `(` a Rego module may have (calls included). regorus bounds
/// parenthesised expressions at 32 but not call arguments: `abs(abs(…))` recursed without
/// a limit in its parser.
pub const MAX_REGO_PARENS: usize = 32;

/// Deepest directory a data file may sit in: each directory is a level of `data`, and
/// regorus frees and walks values recursively (an archive's long names could otherwise
/// make `data` 50,000 levels deep).
pub const MAX_DATA_DIRS: usize = 64;

/// Where a bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleSource {
    /// The default bundle built into the binary from `policies/`.
    Embedded,
    /// A directory on disk.
    Dir(PathBuf),
    /// An OPA bundle archive (`.tar.gz`).
    Archive(PathBuf),
}

impl BundleSource {
    /// A path: a directory, or an archive by its `.tar.gz`/`.tgz` name.
    pub fn from_path(path: &Path) -> Self {
        let name = path.to_string_lossy();
        if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            BundleSource::Archive(path.to_path_buf())
        } else {
            BundleSource::Dir(path.to_path_buf())
        }
    }

    /// The file or directory to watch for changes, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            BundleSource::Embedded => None,
            BundleSource::Dir(p) | BundleSource::Archive(p) => Some(p),
        }
    }
}

impl std::fmt::Display for BundleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BundleSource::Embedded => f.write_str("embedded default bundle"),
            BundleSource::Dir(p) | BundleSource::Archive(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A failure to read or make sense of a bundle. Names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A bundle file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A bundle file is not what it must be (a bad manifest, data file or path).
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// The bundle is over [`MAX_BUNDLE_BYTES`] once uncompressed.
    #[error("bundle is over {MAX_BUNDLE_BYTES} bytes uncompressed")]
    TooLarge,
    /// regorus refused the modules or data (its message).
    #[error("{0}")]
    Compile(String),
    /// The bundle holds no `.rego` module.
    #[error("bundle has no .rego module")]
    Empty,
    /// A signed-bundle check failed (see [`super::signing::verify`]).
    #[error("{0}")]
    Signature(String),
}

/// The files of a bundle, by normalized relative path, sorted.
#[derive(Debug, Clone)]
pub struct BundleFiles {
    /// Each file's path in the bundle (`/`-separated, relative) and its bytes.
    pub files: Vec<(String, Vec<u8>)>,
}

/// A bundle's parsed parts, ready for the engine.
#[derive(Debug)]
pub struct ParsedBundle {
    /// The revision (manifest, else digest-derived).
    pub revision: String,
    /// `sha256:<hex>` over every file's path and contents.
    pub digest: String,
    /// Whether the manifest asks for Rego v0 syntax.
    pub rego_v0: bool,
    /// `(path, source)` of every module.
    pub modules: Vec<(String, String)>,
    /// `(path in data, value)` of every data file.
    pub data: Vec<(Vec<String>, regorus::Value)>,
}

#[derive(Debug, serde::Deserialize)]
struct Manifest {
    #[serde(default)]
    revision: Option<String>,
    #[serde(default)]
    #[allow(dead_code)] // roots are accepted for OPA compatibility; every path is loaded.
    roots: Option<Vec<String>>,
    #[serde(default)]
    rego_version: Option<u8>,
    #[serde(flatten)]
    _other: serde_json::Map<String, serde_json::Value>,
}

// === impl BundleFiles ===

impl BundleFiles {
    /// Reads the bundle from its source.
    pub fn read(source: &BundleSource) -> Result<Self, BundleError> {
        let mut files = match source {
            BundleSource::Embedded => embedded(),
            BundleSource::Dir(dir) => read_dir(dir)?,
            BundleSource::Archive(path) => read_archive(path)?,
        };
        files.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self { files })
    }

    /// Reads an OPA bundle archive (`.tar.gz`) from `reader`; `label` names it in errors.
    pub fn from_archive(label: &Path, reader: impl Read) -> Result<Self, BundleError> {
        let mut files = read_archive_from(label, reader)?;
        files.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self { files })
    }

    /// A bundle of the given (path, contents) files, as if read from a directory.
    pub fn from_files(mut files: Vec<(String, Vec<u8>)>) -> Self {
        files.retain(|(p, _)| is_bundle_file(p));
        files.sort_by(|a, b| a.0.cmp(&b.0));
        Self { files }
    }

    /// Parses manifest, modules and data.
    pub fn parse(&self) -> Result<ParsedBundle, BundleError> {
        let mut hasher = Sha256::new();
        let mut manifest = None;
        let mut modules = Vec::new();
        let mut data = Vec::new();
        for (path, bytes) in &self.files {
            hasher.update((path.len() as u64).to_be_bytes());
            hasher.update(path.as_bytes());
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
            let invalid = |message: String| BundleError::Invalid {
                path: path.clone(),
                message,
            };
            let name = path.rsplit('/').next().unwrap_or(path);
            if path == ".manifest" {
                let m: Manifest =
                    serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
                manifest = Some(m);
            } else if name.ends_with(".rego") {
                let text =
                    String::from_utf8(bytes.clone()).map_err(|_| invalid("not UTF-8".into()))?;
                check_nesting(&text).map_err(invalid)?;
                modules.push((path.clone(), text));
            } else if name == "data.json" || name == "data.yaml" || name == "data.yml" {
                let text = std::str::from_utf8(bytes).map_err(|_| invalid("not UTF-8".into()))?;
                let value = if name == "data.json" {
                    regorus::Value::from_json_str(text)
                } else {
                    regorus::Value::from_yaml_str(text)
                }
                .map_err(|e| invalid(e.to_string()))?;
                if !matches!(value, regorus::Value::Object(_)) {
                    return Err(invalid("data must be an object".into()));
                }
                let mut dir: Vec<String> = path.split('/').map(String::from).collect();
                dir.pop();
                if dir.len() > MAX_DATA_DIRS {
                    return Err(invalid(format!(
                        "data file {} directories deep; the most is {MAX_DATA_DIRS}",
                        dir.len()
                    )));
                }
                data.push((dir, value));
            }
        }
        if modules.is_empty() {
            return Err(BundleError::Empty);
        }
        let digest = format!("sha256:{}", crate::hex(&hasher.finalize()));
        let (revision, rego_v0) = match manifest {
            Some(m) => (
                m.revision.filter(|r| !r.is_empty()),
                m.rego_version == Some(0),
            ),
            None => (None, false),
        };
        let revision = revision.unwrap_or_else(|| digest.get(..19).unwrap_or(&digest).to_owned());
        Ok(ParsedBundle {
            revision,
            digest,
            rego_v0,
            modules,
            data,
        })
    }
}

fn embedded() -> Vec<(String, Vec<u8>)> {
    const FILES: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/default_bundle.rs"));
    FILES
        .iter()
        .map(|(p, b)| ((*p).to_owned(), b.to_vec()))
        .collect()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn read_dir(root: &Path) -> Result<Vec<(String, Vec<u8>)>, BundleError> {
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = entry.map_err(io_err(&dir))?.path();
            // A Kubernetes ConfigMap or Secret volume is a set of symlinks into `..data`,
            // itself a symlink to a timestamped `..2026_…` directory, swapped atomically
            // on update: read the visible names only, or every file would load twice.
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".."))
            {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            if !is_bundle_file(&rel) {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            total += bytes.len() as u64;
            if total > MAX_BUNDLE_BYTES {
                return Err(BundleError::TooLarge);
            }
            out.push((rel, bytes));
        }
    }
    Ok(out)
}

fn read_archive(path: &Path) -> Result<Vec<(String, Vec<u8>)>, BundleError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    read_archive_from(path, file)
}

fn read_archive_from(
    path: &Path,
    reader: impl Read,
) -> Result<Vec<(String, Vec<u8>)>, BundleError> {
    let gz = flate2::read::GzDecoder::new(reader);
    let mut archive = tar::Archive::new(gz);
    let mut out = Vec::new();
    let mut total = 0u64;
    let entries = archive.entries().map_err(io_err(path))?;
    for entry in entries {
        let mut entry = entry.map_err(io_err(path))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let raw = entry.path().map_err(io_err(path))?.into_owned();
        let rel = normalize(&raw).ok_or_else(|| BundleError::Invalid {
            path: format!("{}!{}", path.display(), raw.display()),
            message: "entry path leaves the bundle".into(),
        })?;
        if !is_bundle_file(&rel) {
            continue;
        }
        let mut bytes = Vec::new();
        let limit = MAX_BUNDLE_BYTES.saturating_sub(total) + 1;
        entry
            .by_ref()
            .take(limit)
            .read_to_end(&mut bytes)
            .map_err(io_err(path))?;
        total += bytes.len() as u64;
        if total > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge);
        }
        out.push((rel, bytes));
    }
    Ok(out)
}

/// Refuses a module whose `[`/`{` nesting passes [`MAX_REGO_NESTING`], whose `(` nesting
/// passes [`MAX_REGO_PARENS`], or one of whose expressions chains more than
/// [`MAX_REGO_OPERATORS`] links, naming the line. A lexical scan: comments (`#` to the end
/// of the line), strings (`"…"` with escapes) and raw strings (`` `…` ``) are skipped;
/// balance is left to the parser.
///
/// Links are counted along each path into an expression: every operator character (`-`
/// of `- - -` as much as of `a - b`; `==` counts two, `:=` one), every `.` and `[` (the
/// links of a reference, `a.b[0]`), and the keywords `in` and `or`; from the start of the
/// expression, through parentheses and brackets, whose contents sit below the operand
/// they form. A `,` or `;`, or a newline with no operator on either side, starts the next
/// expression at the count the enclosing bracket began with.
fn check_nesting(text: &str) -> Result<(), String> {
    let (mut depth, mut parens, mut line) = (0usize, 0usize, 1usize);
    // The link count where each open bracket began, and the count now.
    let mut bases: Vec<usize> = Vec::new();
    let mut ops = 0usize;
    // The last significant token was an operator; a newline was passed since it.
    let (mut after_op, mut newline) = (false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let base = bases.last().copied().unwrap_or(0);
        // A word, read whole: whether it is an operator decides the newline before it.
        let word = if c.is_alphanumeric() || c == '_' {
            let mut word = String::from(c);
            while let Some(&n) = chars.peek() {
                if !(n.is_alphanumeric() || n == '_') {
                    break;
                }
                word.push(n);
                chars.next();
            }
            Some(word)
        } else {
            None
        };
        let word_op = word.as_deref().is_some_and(|w| w == "in" || w == "or");
        if newline && !c.is_whitespace() && c != '#' {
            newline = false;
            if !after_op && !is_operator(c) && !word_op {
                ops = base;
            }
        }
        match c {
            '\n' => {
                line += 1;
                newline = true;
            }
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        newline = true;
                        break;
                    }
                }
            }
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            line += usize::from(chars.next() == Some('\n'));
                        }
                        '"' | '\n' => {
                            line += usize::from(c == '\n');
                            newline |= c == '\n';
                            break;
                        }
                        _ => {}
                    }
                }
                after_op = false;
            }
            '`' => {
                for c in chars.by_ref() {
                    line += usize::from(c == '\n');
                    if c == '`' {
                        break;
                    }
                }
                after_op = false;
            }
            '[' | '{' | '(' => {
                let (nested, limit, what) = if c == '(' {
                    parens += 1;
                    (parens, MAX_REGO_PARENS, "parentheses (calls included)")
                } else {
                    depth += 1;
                    (depth, MAX_REGO_NESTING, "brackets")
                };
                if nested > limit {
                    return Err(format!(
                        "line {line}: {what} nested more than {limit} deep (the Rego \
                         parser's time grows exponentially with bracket nesting, and its \
                         recursion with any)"
                    ));
                }
                ops += usize::from(c == '[');
                bases.push(ops);
                after_op = false;
            }
            ']' | '}' | ')' => {
                if c == ')' {
                    parens = parens.saturating_sub(1);
                } else {
                    depth = depth.saturating_sub(1);
                }
                ops = bases.pop().unwrap_or(0);
                after_op = false;
            }
            ',' | ';' => {
                ops = base;
                after_op = false;
            }
            c if is_operator(c) => {
                ops += 1;
                after_op = true;
            }
            _ if word.is_some() => {
                after_op = word_op;
                ops += usize::from(word_op);
            }
            _ => {}
        }
        if ops > MAX_REGO_OPERATORS {
            return Err(format!(
                "line {line}: an expression chains more than {MAX_REGO_OPERATORS} operators \
                 or reference links (the Rego compiler and evaluator recurse once per link: \
                 a longer chain could overflow their stack)"
            ));
        }
    }
    Ok(())
}

/// A character of a Rego operator (`-` alone is also unary minus), or a reference's `.`.
fn is_operator(c: char) -> bool {
    matches!(
        c,
        '+' | '-' | '*' | '/' | '%' | '&' | '|' | '=' | '!' | '<' | '>' | '.'
    )
}

/// `./a/b` → `a/b`; `/a/b` → `a/b` (`opa build` writes every entry with a leading `/`,
/// meaning the bundle root); `None` for `..` or a Windows prefix.
fn normalize(path: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for (i, c) in path.components().enumerate() {
        match c {
            Component::Normal(s) => parts.push(s.to_str()?.to_owned()),
            Component::CurDir => {}
            Component::RootDir if i == 0 => {}
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn is_bundle_file(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    rel == ".manifest"
        || name.ends_with(".rego")
        || matches!(
            name,
            "data.json" | "data.yaml" | "data.yml" | ".signatures.json"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout kubelet gives a ConfigMap volume (`..data` → `..<timestamp>`, and a
    /// symlink per key): each file is read once, under its own name.
    #[test]
    fn a_configmap_volume_reads_each_file_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stamp = dir.path().join("..2026_11_29_21_00_00.000000001");
        std::fs::create_dir(&stamp).expect("mkdir");
        std::fs::write(stamp.join("authz.rego"), "package x\nallow := true\n").expect("write");
        std::fs::write(stamp.join("data.json"), "{}").expect("write");
        std::os::unix::fs::symlink(&stamp, dir.path().join("..data")).expect("symlink");
        for name in ["authz.rego", "data.json"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.path().join(name))
                .expect("symlink");
        }
        let mut files: Vec<String> = read_dir(dir.path())
            .expect("reads")
            .into_iter()
            .map(|(rel, _)| rel)
            .collect();
        files.sort();
        assert_eq!(files, ["authz.rego", "data.json"]);
    }

    #[test]
    fn nesting_past_the_limit_is_refused_with_its_line() {
        let deep = format!("package p\n\nx := {}1{}\n", "[".repeat(13), "]".repeat(13));
        let err = check_nesting(&deep).expect_err("too deep");
        assert!(err.starts_with("line 3: "), "{err}");
        let unclosed = format!("package p\nx := {}= true\n", "{".repeat(40));
        assert!(check_nesting(&unclosed).is_err(), "unclosed counts too");
        let ok = format!("package p\nx := {}1{}\n", "[".repeat(12), "]".repeat(12));
        assert_eq!(check_nesting(&ok), Ok(()));
    }

    #[test]
    fn operator_chains_past_the_limit_are_refused_with_their_line() {
        let minus = format!("package p\n\nx := {}1\n", "-".repeat(129));
        let err = check_nesting(&minus).expect_err("a long unary chain");
        assert!(err.starts_with("line 3: an expression chains"), "{err}");
        // Across lines: an operator at the end of a line continues the expression.
        let plus = format!("package p\nx := 1{}\n", " +\n1".repeat(200));
        assert!(check_nesting(&plus).is_err_and(|e| e.starts_with("line 129: ")));
        // An operator starting the next line continues it too.
        let leading = format!("package p\nx := [1{}]\n", "\n+ 1".repeat(200));
        assert!(check_nesting(&leading).is_err());
        // A chain inside brackets adds to the chain the brackets are an operand of.
        let inner = format!(
            "package p\nx := {} [{}]\n",
            "1 +".repeat(100),
            "1 +".repeat(40)
        );
        assert!(check_nesting(&inner).is_err());
        let ok = format!("package p\nx := {}1\n", "-".repeat(127)); // with `:=`, 128
        assert_eq!(check_nesting(&ok), Ok(()));
    }

    #[test]
    fn calls_refs_and_in_chains_are_bounded_across_lines() {
        // Calls nest without regorus's own limit; newlines between the `(`s.
        let calls = format!(
            "package p\nx := {}1{}\n",
            "abs(\n".repeat(40),
            ")".repeat(40)
        );
        let err = check_nesting(&calls).expect_err("deep calls");
        assert!(err.starts_with("line 34: parentheses"), "{err}");
        // A reference chain whose links are split by newlines inside the brackets.
        let refs = format!("package p\nx := input{}\n", "[\n0]".repeat(200));
        let err = check_nesting(&refs).expect_err("a long reference");
        assert!(err.contains("chains more than"), "{err}");
        let dots = format!("package p\nx := input{}\n", ".a".repeat(200));
        assert!(check_nesting(&dots).is_err());
        // `in` starting each line continues the expression.
        let ins = format!("package p\nx := 1{}\n", "\nin []".repeat(200));
        let err = check_nesting(&ins).expect_err("a long in chain");
        // Two links a line: `in` and the `[` of its operand.
        assert!(err.starts_with("line 66: "), "{err}");
        // What real policies write passes.
        let ok = "package p\nimport rego.v1\nr if {\n  input.a.b[0].c in {\"x\"}\n  count(split(lower(input.d), \",\")) > 1\n}\n";
        assert_eq!(check_nesting(ok), Ok(()));
    }

    #[test]
    fn operators_of_separate_expressions_do_not_add_up() {
        // 300 literals of a rule body, each with its operators; 300 set elements.
        let body = "  input.a + 1 == 2 - -1\n  y := input.b != 3\n".repeat(150);
        let set = (0..300)
            .map(|i| format!("{i} * 2"))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            "package p\nr if {{\n{body}}}\ns := {{{set}}}\n# {}\nt := \"{}\"\n",
            "-".repeat(500),
            "+".repeat(500)
        );
        assert_eq!(check_nesting(&text), Ok(()));
    }

    #[test]
    fn brackets_in_comments_and_strings_do_not_count() {
        let many = "[".repeat(50);
        let text = format!(
            "package p\n# {many}\nx := \"{many}\\\"{many}\"\ny := `{many}\n{many}`\nz := [1]\n"
        );
        assert_eq!(check_nesting(&text), Ok(()));
        // Line numbers survive the skipped parts.
        let after = format!("{text}w := {}\n", "{".repeat(13));
        assert!(
            check_nesting(&after).is_err_and(|e| e.starts_with("line 7: ")),
            "{:?}",
            check_nesting(&after)
        );
    }

    #[test]
    fn the_default_bundle_is_within_the_limit() {
        let files = BundleFiles::read(&BundleSource::Embedded).expect("embedded");
        files.parse().expect("the default bundle parses");
    }
}
