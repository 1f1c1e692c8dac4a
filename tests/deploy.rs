//! The deployment artifacts (`deploy/envoy.yaml`, `deploy/k8s/`, `Dockerfile`) checked
//! against real schemas by `scripts/validate_deploy.py`: Envoy's v3 protos from the
//! `xds-protos` package and Kubernetes' OpenAPI schemas from `kubernetes-validate`,
//! installed once into a virtualenv beside the build (`<target>/deploy-venv`).
//!
//! The negative tests feed the validator broken copies, so a validator that passed
//! everything would fail them.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use aegis::policy::{BundleFiles, BundleSource};
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> &'static Path {
    common::venv_python()
}

/// Runs the validator with `args`; returns whether it passed and its JSON report.
fn validate(args: &[&str]) -> (bool, Value) {
    let out = Command::new(python())
        .arg(root().join("scripts/validate_deploy.py"))
        .args(["--root", root().to_str().expect("utf-8 path")])
        .args(args)
        .output()
        .expect("run scripts/validate_deploy.py");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "validator printed no JSON ({e}); exit {}:\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let ok = report["ok"].as_bool().expect("ok is a bool");
    assert_eq!(
        out.status.success(),
        ok,
        "exit status and report disagree: {report:#}"
    );
    (ok, report)
}

fn errors(report: &Value) -> String {
    report["errors"].to_string()
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().expect("string"))
        .collect()
}

#[test]
fn the_committed_artifacts_pass_the_schemas_and_checks() {
    let (ok, r) = validate(&[]);
    assert!(ok, "validator failed: {r:#}");

    // Envoy: the ext_authz cluster is Aegis's default listen address, over HTTP/2.
    let authz = &r["envoy"]["ext_authz"];
    let listen = aegis::config::Config::default().listen.to_string();
    assert_eq!(strs(&authz["cluster_endpoints"]), [listen.as_str()]);
    assert_eq!(authz["cluster_type"], "STATIC");
    assert_eq!(authz["cluster_http2"], true);
    assert_eq!(authz["failure_mode_allow"], false);
    assert_eq!(authz["transport_api_version"], "V3");
    assert_eq!(authz["status_on_error"], 503);
    assert_eq!(authz["with_request_body"]["max_request_bytes"], 65536);
    assert!(strs(&authz["metadata_context_namespaces"]).contains(&"mcp_proxy"));
    assert_eq!(r["envoy"]["ext_authz_unpacked_inside_hcm"], true);
    let any_types: Vec<&str> = r["envoy"]["any_resolved"]
        .as_array()
        .expect("any_resolved")
        .iter()
        .map(|a| a["type"].as_str().expect("type"))
        .collect();
    // Every typed_config of the file: HCM, the early header mutation, MCP, ext_authz,
    // router, the tracer, two routes' ExtAuthzPerRoute, a URI template matcher, two
    // HttpProtocolOptions and the upstream TLS context.
    assert_eq!(any_types.len(), 12, "{any_types:?}");
    assert_eq!(
        authz["with_request_body"]["allow_partial_message"],
        serde_json::Value::Null,
        "false (protobuf JSON omits it): a body over the limit is refused by Envoy"
    );
    assert_eq!(authz["with_request_body"]["pack_as_bytes"], true);
    // The trust model: paths normalized and the agent's labels stripped before ext_authz,
    // and the example routes labelled.
    let paths = &r["envoy"]["path_handling"];
    assert_eq!(paths["normalize_path"], true);
    assert_eq!(paths["merge_slashes"], true);
    assert_eq!(paths["path_with_escaped_slashes_action"], "REJECT_REQUEST");
    assert_eq!(
        strs(&r["envoy"]["stripped_before_ext_authz"]),
        [
            "x-aegis-action",
            "x-aegis-resource",
            "x-aegis-tool",
            "x-http-method",
            "x-http-method-override",
            "x-method-override"
        ]
    );
    let routes = r["envoy"]["routes"].as_array().expect("routes");
    let labels = |name: &str| {
        routes
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| r["labels"].clone())
            .unwrap_or_default()
    };
    assert_eq!(labels("mcp")["aegis.protocol"], "mcp");
    assert_eq!(labels("invoices-read")["aegis.tool"], "invoices");
    assert_eq!(labels("catalogue"), serde_json::json!({}));
    assert_eq!(r["envoy"]["tracing"]["name"], "envoy.tracers.opentelemetry");
    assert_eq!(
        strs(&r["envoy"]["listener"]["http_filters"]),
        [
            "envoy.filters.http.mcp",
            "envoy.filters.http.ext_authz",
            "envoy.filters.http.router"
        ]
    );

    // Kubernetes: every rendered object passed the strict schema; every container was
    // checked; the ConfigMaps carry deploy/envoy.yaml and policies/.
    let k = &r["k8s"];
    assert_eq!(
        k["schema_validated"].as_array().map(Vec::len),
        k["objects"].as_array().map(Vec::len)
    );
    assert_eq!(k["objects"].as_array().map(Vec::len), Some(9), "{k:#}");
    assert_eq!(k["containers_checked"].as_array().map(Vec::len), Some(4));
    assert_eq!(k["aegis_sidecars"].as_array().map(Vec::len), Some(1));
    assert_eq!(k["aegis_control_planes"].as_array().map(Vec::len), Some(1));
    assert!(
        k["envoy_configmap_equals"]
            .as_str()
            .is_some_and(|p| p.ends_with("deploy/envoy.yaml"))
    );
    assert!(k["bundle_configmap_equals"].is_string());
    assert_eq!(
        k["network_policy_coverage"].as_array().map(Vec::len),
        Some(1)
    );

    // Dockerfile (a text check, see the script).
    assert_eq!(r["dockerfile"]["final_user"], "65532:65532");
}

/// The bundle the sidecars mount loads with Aegis's own loader, and is the default
/// bundle: the same revision, modules and data as `policies/` read as a directory. (Not
/// the same digest: a bundle signed as the README's step 2 does adds `.signatures.json`
/// and re-serializes `.manifest`.)
#[test]
fn the_kustomization_bundle_is_the_default_bundle() {
    let archive = root().join("deploy/k8s/bundle.tar.gz");
    let from_archive = BundleFiles::read(&BundleSource::from_path(&archive))
        .expect("read bundle.tar.gz")
        .parse()
        .expect("parse bundle.tar.gz");
    let from_dir = BundleFiles::read(&BundleSource::Dir(root().join("policies")))
        .expect("read policies/")
        .parse()
        .expect("parse policies/");
    assert_eq!(from_archive.revision, from_dir.revision);
    assert_eq!(from_archive.rego_v0, from_dir.rego_v0);
    let sorted = |mut v: Vec<(String, String)>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(from_archive.modules.clone()),
        sorted(from_dir.modules.clone())
    );
    assert!(!from_archive.modules.is_empty());
    let data = |data: &[(Vec<String>, regorus::Value)]| {
        let mut d: Vec<String> = data
            .iter()
            .map(|(path, v)| format!("{path:?}={v}"))
            .collect();
        d.sort();
        d
    };
    assert_eq!(data(&from_archive.data), data(&from_dir.data));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

/// Writes `file` (relative to the repository) with `edit` applied into `dir`; panics if
/// the edit changed nothing, so a test cannot pass on an unedited copy.
fn edited(dir: &Path, file: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let text = std::fs::read_to_string(root().join(file)).expect("read");
    let new = edit(&text);
    assert_ne!(new, text, "the edit of {file} changed nothing");
    let path = dir.join(Path::new(file).file_name().expect("name"));
    std::fs::write(&path, new).expect("write");
    path
}

#[test]
fn an_unknown_field_inside_the_ext_authz_config_is_rejected_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = edited(dir.path(), "deploy/envoy.yaml", |t| {
        t.replacen(
            "              include_peer_certificate: true\n",
            "              include_peer_certificate: true\n              failure_mode_alow: true\n",
            1,
        )
    });
    let (ok, r) = validate(&["--only", "envoy", "--envoy", bad.to_str().expect("utf-8")]);
    assert!(!ok, "accepted: {r:#}");
    let e = errors(&r);
    assert!(e.contains("failure_mode_alow"), "{e}");
    assert!(e.contains("ExtAuthz"), "{e}");
}

#[test]
fn an_unknown_type_url_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = edited(dir.path(), "deploy/envoy.yaml", |t| {
        t.replace("router.v3.Router", "router.v3.NoSuchRouter")
    });
    let (ok, r) = validate(&["--only", "envoy", "--envoy", bad.to_str().expect("utf-8")]);
    assert!(!ok, "accepted: {r:#}");
    assert!(errors(&r).contains("NoSuchRouter"), "{}", errors(&r));
}

/// A copy of deploy/k8s with one file edited; validated against the real envoy.yaml.
fn validate_k8s_with(file: &str, edit: impl Fn(&str) -> String) -> (bool, Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let k8s = dir.path().join("k8s");
    copy_dir(&root().join("deploy/k8s"), &k8s);
    edited(&k8s, &format!("deploy/k8s/{file}"), edit);
    validate(&["--only", "k8s", "--k8s", k8s.to_str().expect("utf-8")])
}

#[test]
fn an_unknown_field_in_a_deployment_is_rejected_by_the_kubernetes_schema() {
    let (ok, r) = validate_k8s_with("agent.yaml", |t| {
        t.replacen(
            "spec:\n  replicas: 1\n",
            "spec:\n  replicas: 1\n  replica: 2\n",
            1,
        )
    });
    assert!(!ok, "accepted: {r:#}");
    let e = errors(&r);
    assert!(
        e.contains("Deployment/aegis/example-agent") && e.contains("'replica'"),
        "{e}"
    );
}

#[test]
fn a_container_without_a_read_only_root_filesystem_is_rejected() {
    // The Envoy container's line (the second of the file) is dropped.
    let (ok, r) = validate_k8s_with("agent.yaml", |t| {
        let line = "          readOnlyRootFilesystem: true\n";
        let first = t.find(line).expect("first") + line.len();
        let second = first + t[first..].find(line).expect("second");
        format!("{}{}", &t[..second], &t[second + line.len()..])
    });
    assert!(!ok, "accepted: {r:#}");
    let e = errors(&r);
    assert!(
        e.contains("container envoy: readOnlyRootFilesystem is not true"),
        "{e}"
    );
}

#[test]
fn an_envoy_configmap_that_drifted_from_deploy_envoy_yaml_is_rejected() {
    let (ok, r) = validate_k8s_with("envoy.yaml", |t| t.replace("timeout: 30s", "timeout: 31s"));
    assert!(!ok, "accepted: {r:#}");
    assert!(errors(&r).contains("not byte-identical"), "{}", errors(&r));
}

/// The README's subsection on the HA variant, the last of its "Deployment" section.
const HA_HEADING: &str = "\n### High availability: control-plane replicas on PostgreSQL";

/// The names of what the `kubectl -n aegis create {kind} ...` lines of `text` create.
fn readme_creates(text: &str, kind: &str) -> std::collections::BTreeSet<String> {
    let marker = format!("create {kind} ");
    text.lines()
        .filter(|l| l.contains("kubectl -n aegis create") && !l.contains("--dry-run"))
        .filter_map(|l| {
            let rest = &l[l.find(&marker)? + marker.len()..];
            let rest = rest.strip_prefix("generic ").unwrap_or(rest);
            rest.split_whitespace().next().map(str::to_owned)
        })
        .collect()
}

/// The README's deployment steps create exactly the Secrets and ConfigMaps the manifests
/// reference and the kustomization does not generate: a newcomer following them gets
/// pods that start, and a name changed on one side fails here.
#[test]
fn the_readme_creates_what_the_manifests_reference() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    let start = readme.find("## Deployment").expect("a Deployment section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    // The base's steps: the HA variant's subsection, at the end, creates one Secret more
    // (checked against deploy/k8s-ha below).
    let section = &section[..section.find(HA_HEADING).unwrap_or(section.len())];
    let created = |kind: &str| readme_creates(section, kind);
    let (ok, r) = validate(&[]);
    assert!(ok, "{}", errors(&r));
    let names = |key: &str| -> std::collections::BTreeSet<String> {
        r["k8s"][key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in the report: {r:#}"))
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(created("secret"), names("secrets_referenced"));
    assert_eq!(created("configmap"), names("configmaps_external"));
    assert!(!created("secret").is_empty());
}

// === The HA variant (deploy/k8s-ha, an overlay of deploy/k8s) ===

/// A copy of deploy/k8s and deploy/k8s-ha side by side (the overlay names its base
/// `../k8s`), with one file of either edited (`file` relative to deploy/, e.g.
/// `k8s-ha/control-plane.yaml`); the overlay validated.
fn validate_k8s_ha_with(file: &str, edit: impl Fn(&str) -> String) -> (bool, Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&root().join("deploy/k8s"), &dir.path().join("k8s"));
    let ha = dir.path().join("k8s-ha");
    copy_dir(&root().join("deploy/k8s-ha"), &ha);
    let edited_dir = dir
        .path()
        .join(Path::new(file).parent().expect("a directory"));
    edited(&edited_dir, &format!("deploy/{file}"), edit);
    validate(&["--only", "k8s-ha", "--k8s-ha", ha.to_str().expect("utf-8")])
}

#[test]
fn the_ha_variant_passes_the_schemas_and_the_ha_checks() {
    let (ok, r) = validate(&["--only", "k8s-ha"]);
    assert!(ok, "validator failed: {r:#}");
    let k = &r["k8s_ha"];
    // The base's objects, its control plane (Deployment and PVC) replaced by a
    // StatefulSet, a PodDisruptionBudget and a headless Service; all schema-validated.
    let objects = strs(&k["objects"]);
    assert_eq!(objects.len(), 10, "{objects:?}");
    assert_eq!(
        k["schema_validated"].as_array().map(Vec::len),
        Some(objects.len())
    );
    assert!(objects.contains(&"apps/v1/StatefulSet/aegis/aegis-control"));
    assert!(objects.contains(&"policy/v1/PodDisruptionBudget/aegis/aegis-control"));
    assert!(!objects.contains(&"apps/v1/Deployment/aegis/aegis-control"));
    assert!(!objects.contains(&"v1/PersistentVolumeClaim/aegis/aegis-control-data"));
    if k["kustomize_crosscheck"]["ran"] == true {
        assert_eq!(k["kustomize_crosscheck"]["agreed"], true, "{k:#}");
    }
    // The base's checks ran on every container, the sidecar's included.
    assert_eq!(k["containers_checked"].as_array().map(Vec::len), Some(4));
    assert_eq!(k["aegis_sidecars"].as_array().map(Vec::len), Some(1));
    assert!(k["bundle_configmap_equals"].is_string());

    let planes = k["ha_control_planes"]
        .as_array()
        .expect("ha_control_planes");
    assert_eq!(planes.len(), 1, "{k:#}");
    let cp = &planes[0];
    assert!(cp["replicas"].as_u64().is_some_and(|n| n >= 2), "{cp:#}");
    assert_eq!(
        cp["database_url_secret"],
        serde_json::json!({"name": "aegis-control-database", "key": "url"})
    );
    assert_eq!(cp["signing_key_secret"], "aegis-control-signing-key");
    assert_eq!(cp["data_volume_claim"], "data");
    assert_eq!(cp["anti_affinity"], "required");
    assert_eq!(
        strs(&cp["pod_disruption_budgets"]),
        ["policy/v1/PodDisruptionBudget/aegis/aegis-control"]
    );
    assert_eq!(strs(&cp["services"]), ["v1/Service/aegis/aegis-control"]);
    let follow = k["sidecars_follow"].as_array().expect("sidecars_follow");
    assert_eq!(follow.len(), 1, "{k:#}");
    assert_eq!(follow[0]["service"], "v1/Service/aegis/aegis-control");
}

#[test]
fn a_sidecar_pinned_to_one_replica_is_refused() {
    // One replica's own name, through the headless Service: its sidecars could not move.
    let (ok, r) = validate_k8s_ha_with("k8s/agent.yaml", |t| {
        t.replacen(
            "https://aegis-control.aegis.svc:9193",
            "https://aegis-control-0.aegis-control-replicas.aegis.svc:9193",
            1,
        )
    });
    assert!(!ok, "accepted: {r:#}");
    assert!(
        errors(&r).contains("is not a Service in front of the control-plane replicas"),
        "{}",
        errors(&r)
    );
}

#[test]
fn an_ha_control_plane_of_one_replica_is_refused() {
    let (ok, r) = validate_k8s_ha_with("k8s-ha/control-plane.yaml", |t| {
        t.replacen("  replicas: 2\n", "  replicas: 1\n", 1)
    });
    assert!(!ok, "accepted: {r:#}");
    let e = errors(&r);
    assert!(
        e.contains("HA needs at least 2 control-plane replicas, has 1"),
        "{e}"
    );
    assert!(e.contains("k8s-ha"), "{e}");
}

#[test]
fn a_database_url_written_in_the_manifest_is_refused() {
    let (ok, r) = validate_k8s_ha_with("k8s-ha/control-plane.yaml", |t| {
        t.replacen(
            "          valueFrom:\n            secretKeyRef:\n              name: aegis-control-database\n              key: url\n",
            "          value: postgres://aegis:hunter2@postgres.aegis.svc:5432/aegis\n",
            1,
        )
    });
    assert!(!ok, "accepted: {r:#}");
    let e = errors(&r);
    assert!(
        e.contains("AEGIS_CONTROL_DATABASE_URL is not from a Secret"),
        "{e}"
    );
}

#[test]
fn an_ha_variant_without_a_pod_disruption_budget_is_refused() {
    let (ok, r) = validate_k8s_ha_with("k8s-ha/control-plane.yaml", |t| {
        let start = t.find("apiVersion: policy/v1\n").expect("the PDB");
        let end = start + t[start..].find("\n---\n").expect("the document's end") + 5;
        let doc_start = t[..start].rfind("\n---\n").expect("the document's start") + 5;
        format!("{}{}", &t[..doc_start], &t[end..])
    });
    assert!(!ok, "accepted: {r:#}");
    let e = errors(&r);
    assert!(
        e.contains("no PodDisruptionBudget selects the control-plane pods"),
        "{e}"
    );
}

#[test]
fn an_ha_variant_without_anti_affinity_is_refused() {
    let (ok, r) = validate_k8s_ha_with("k8s-ha/control-plane.yaml", |t| {
        t.replacen(
            "          - topologyKey: kubernetes.io/hostname\n",
            "          - topologyKey: topology.kubernetes.io/zone\n",
            1,
        )
    });
    assert!(!ok, "accepted: {r:#}");
    assert!(
        errors(&r).contains("no pod anti-affinity on kubernetes.io/hostname"),
        "{}",
        errors(&r)
    );
}

#[test]
fn replicas_sharing_one_data_volume_are_refused() {
    // A Deployment of the same pods: every replica would mount one claim.
    let (ok, r) = validate_k8s_ha_with("k8s-ha/control-plane.yaml", |t| {
        let start = t.find("  # One volume per replica").expect("the templates");
        let end = start + t[start..].find("\n---\n").expect("the document's end");
        let t = format!("{}{}", &t[..start], &t[end + 1..]);
        t.replacen("kind: StatefulSet", "kind: Deployment", 1)
            .replacen("  serviceName: aegis-control-replicas\n", "", 1)
            .replacen("  podManagementPolicy: Parallel\n", "", 1)
            .replacen("  updateStrategy:\n", "  strategy:\n", 1)
            .replacen(
                "      volumes:\n",
                "      volumes:\n      - name: data\n        persistentVolumeClaim:\n          claimName: aegis-control-data\n",
                1,
            )
    });
    assert!(!ok, "accepted: {r:#}");
    assert!(
        errors(&r).contains("is not on a volumeClaimTemplate of a StatefulSet"),
        "{}",
        errors(&r)
    );
}

/// The base's steps plus the HA subsection create exactly the Secrets and ConfigMaps the
/// HA variant references: an operator following them gets replicas that start.
#[test]
fn the_readme_creates_what_the_ha_variant_references() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    let start = readme.find("## Deployment").expect("a Deployment section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let ha = section
        .find(HA_HEADING)
        .expect("the HA subsection in Deployment");
    let (base, ha) = section.split_at(ha);
    let (ok, r) = validate(&["--only", "k8s-ha"]);
    assert!(ok, "{}", errors(&r));
    let names = |key: &str| -> std::collections::BTreeSet<String> {
        r["k8s_ha"][key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in the report: {r:#}"))
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let created = |kind: &str| -> std::collections::BTreeSet<String> {
        let mut all = readme_creates(base, kind);
        all.extend(readme_creates(ha, kind));
        all
    };
    assert_eq!(created("secret"), names("secrets_referenced"));
    assert_eq!(created("configmap"), names("configmaps_external"));
    assert!(readme_creates(ha, "secret").contains("aegis-control-database"));
}
