//! Control-plane replicas sharing one control store, across real processes: two
//! `aegis serve --mode control-plane` on one SQLite file (`control.database_url`), a
//! sidecar following one of them, every action taken through `aegis ctl` at the other.
//! What one replica commits reaches the sidecars of every replica, from the store's
//! change feed; a replica that dies takes nothing with it.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::transport::Channel;

async fn seen(client: &AuthorizationClient<Channel>, req: CheckRequest) -> String {
    outcome(client.clone().check(req).await)
}

/// A control-plane replica on the shared store, signing with replica A's key (replicas
/// share their signing key as they share their store: each verifies the credentials and
/// tokens the others mint).
fn replica(data: &Path, store: &str, key_of: &Path) -> ChildServer {
    let key = key_of.join("signing.key").to_string_lossy().into_owned();
    let mut args = vec!["--control-database-url", store];
    if data != key_of {
        args.extend_from_slice(&["--signing-key-file", &key]);
    }
    spawn_control_plane(data, "127.0.0.1:0", &args)
}

fn ok(addr: std::net::SocketAddr, credential: &str, args: &[&str]) -> String {
    let (code, out, err) = ctl(addr, credential, args);
    assert_eq!(code, 0, "aegis ctl {args:?}: {err}");
    out
}

#[tokio::test]
async fn what_one_replica_commits_reaches_the_sidecars_of_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    let store = format!("sqlite:{}", shared.join("control.db").display());
    let a_data = dir.path().join("a");
    let b_data = dir.path().join("b");
    let mut a = replica(&a_data, &store, &a_data);
    let b = replica(&b_data, &store, &a_data);
    assert!(
        !b_data.join("control.db").exists(),
        "the replica uses the shared store"
    );

    let root = operator_cmd(&a_data, "root", "admin", "*");
    let sidecar_token = dir.path().join("sidecar.token");
    aegis::files::write_secret(
        &sidecar_token,
        &operator_cmd(&a_data, "fleet", "sidecar", "acme"),
    )
    .expect("write");
    // The sidecar follows replica B only.
    let sidecar_data = dir.path().join("sidecar");
    let b_url = format!("http://{}", b.addr);
    let sidecar = spawn_serve(&[
        "--data-dir",
        &sidecar_data.to_string_lossy(),
        "--control-plane",
        &b_url,
        "--control-plane-token-file",
        &sidecar_token.to_string_lossy(),
        "--trusted-key",
        &a_data.join("signing.pub").to_string_lossy(),
    ]);
    let client = client(sidecar.addr).await;

    // Registered and issued at replica A.
    ok(
        a.addr,
        &root,
        &["agents", "register", "billing-bot", "--tenant", "acme"],
    );
    let issue = |at| {
        ok(
            at,
            &root,
            &[
                "tokens",
                "issue",
                "--agent",
                "billing-bot",
                "--tenant",
                "acme",
                "--scopes",
                "invoices:read",
            ],
        )
        .trim()
        .to_owned()
    };
    let token = issue(a.addr);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            seen(&client, Req::read_invoices(&token)).await == "allow"
        })
        .await,
        "the sidecar of replica B knows the agent replica A registered"
    );

    // Frozen at replica A: denied at replica B's sidecar.
    ok(
        a.addr,
        &root,
        &[
            "agents",
            "freeze",
            "billing-bot",
            "--tenant",
            "acme",
            "--reason",
            "deny storm",
        ],
    );
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            seen(&client, Req::read_invoices(&token)).await == "agent_frozen"
        })
        .await,
        "a freeze at replica A reaches replica B's sidecar"
    );
    // Replica B answers with what replica A stored.
    let got: serde_json::Value = serde_json::from_str(&ok(
        b.addr,
        &root,
        &["agents", "get", "billing-bot", "--tenant", "acme", "--json"],
    ))
    .expect("json");
    assert_eq!(got["status"], "frozen", "{got}");

    // Replica A dies; B goes on: unfrozen and a token revoked at B reach its sidecar.
    a.child.kill().expect("kill replica A");
    let _ = a.child.wait();
    ok(
        b.addr,
        &root,
        &[
            "agents",
            "unfreeze",
            "billing-bot",
            "--tenant",
            "acme",
            "--reason",
            "cleared",
        ],
    );
    let second = issue(b.addr);
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            seen(&client, Req::read_invoices(&second)).await == "allow"
        })
        .await,
        "unfrozen at replica B"
    );
    let tokens: serde_json::Value = serde_json::from_str(&ok(
        b.addr,
        &root,
        &[
            "tokens",
            "list",
            "--agent",
            "billing-bot",
            "--tenant",
            "acme",
            "--json",
        ],
    ))
    .expect("json");
    let jtis: Vec<&str> = tokens["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(|t| t["jti"].as_str())
        .collect();
    assert_eq!(
        jtis.len(),
        2,
        "both replicas' tokens are in the one store: {tokens}"
    );
    for jti in &jtis {
        ok(
            b.addr,
            &root,
            &[
                "tokens", "revoke", jti, "--tenant", "acme", "--reason", "leaked",
            ],
        );
    }
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            seen(&client, Req::read_invoices(&token)).await == "token_revoked"
                && seen(&client, Req::read_invoices(&second)).await == "token_revoked"
        })
        .await,
        "revocations at replica B reach its sidecar, for the tokens of both replicas"
    );
}

#[tokio::test]
async fn an_unknown_control_store_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_string_lossy().into_owned();
    for (url, says) in [
        (
            "mysql://aegis:hunter2@db/aegis",
            "sqlite:PATH or postgres://",
        ),
        ("sqlite:", "needs a file path"),
        ("control.db", "expected sqlite:PATH or postgres://"),
    ] {
        let out = aegis_cmd(&[
            "serve",
            "--mode",
            "control-plane",
            "--data-dir",
            &data,
            "--control-database-url",
            url,
        ]);
        assert_ne!(out.status.code(), Some(0), "{url}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("control.database_url") && err.contains(says),
            "{url}: {err}"
        );
        assert!(
            !err.contains("hunter2"),
            "the password is never shown: {err}"
        );
    }
}
