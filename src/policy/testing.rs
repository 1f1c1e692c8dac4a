//! `aegis policy test`: runs every rule named `test_*` in the bundle, like `opa test`.
//!
//! A test passes when its rule evaluates to `true`; `false` or undefined fails it; an
//! evaluation error is reported as an error.

use super::{BundleError, BundleFiles, BundleSource, CompiledBundle, PolicyOptions};

/// The outcome of one test rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The rule evaluated to `true`.
    Pass,
    /// The rule evaluated to `false` or was undefined.
    Fail,
    /// The evaluation failed (its message).
    Error(String),
}

/// One test's result.
#[derive(Debug, Clone)]
pub struct TestResult {
    /// `data.<package>.<rule>`.
    pub rule: String,
    /// Module path.
    pub file: String,
    /// What the rule gave.
    pub outcome: Outcome,
}

/// Loads the bundle and runs its tests.
pub fn run(source: &BundleSource, opts: &PolicyOptions) -> Result<Vec<TestResult>, BundleError> {
    let parsed = BundleFiles::read(source)?.parse()?;
    let tests: Vec<(String, String)> = parsed
        .modules
        .iter()
        .flat_map(|(file, text)| {
            test_rules(text)
                .into_iter()
                .map(move |rule| (file.clone(), rule))
        })
        .collect();
    // Compile against the first test rule: a test bundle need not define the decision rule.
    let opts = PolicyOptions {
        query: tests
            .first()
            .map_or_else(|| opts.query.clone(), |t| t.1.clone()),
        ..opts.clone()
    };
    let compiled = CompiledBundle::compile_interpreter(parsed, &opts)?;
    // Test rules evaluate on the calling thread's stack otherwise (a command's main
    // thread): give them the stack the sidecar gives its evaluations.
    let evaluate = || -> Vec<TestResult> {
        tests
            .into_iter()
            .map(|(file, rule)| {
                let outcome = match compiled.eval_rule(&rule, regorus::Value::new_object()) {
                    Ok(regorus::Value::Bool(true)) => Outcome::Pass,
                    Ok(_) => Outcome::Fail,
                    Err(e) => Outcome::Error(e),
                };
                TestResult {
                    rule,
                    file,
                    outcome,
                }
            })
            .collect()
    };
    super::graph::on_rego_stack(evaluate).map_err(|e| {
        BundleError::Compile(format!("running the tests on a thread of their own: {e}"))
    })
}

/// `data.<package>.test_*` for every top-level test rule of a module, in source order.
/// Rules start at column 0 in formatted Rego (`opa fmt`), which is what this relies on.
fn test_rules(text: &str) -> Vec<String> {
    let package = text.lines().find_map(|l| {
        l.trim()
            .strip_prefix("package ")
            .map(|p| p.trim().to_owned())
    });
    let Some(package) = package else {
        return Vec::new();
    };
    let mut seen = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("test_") else {
            continue;
        };
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let rule = format!("data.{package}.test_{}", &rest[..name_len]);
        if !seen.contains(&rule) {
            seen.push(rule);
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_test_rules() {
        let text = "package a.b\nimport rego.v1\n\ntest_one if { true }\ntest_two if {\n}\nnot_a_test if true\n  test_nested := 1\ntest_one if { false }\n";
        assert_eq!(
            super::test_rules(text),
            vec!["data.a.b.test_one", "data.a.b.test_two"]
        );
    }
}
