//! A fleet across real processes on loopback: one `aegis serve --mode control-plane`,
//! sidecars started with `--control-plane URL`, every action taken through `aegis ctl`,
//! every effect observed as the Checks a sidecar answers.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use serde_json::json;
use tonic::transport::Channel;

struct Fleet {
    _dir: tempfile::TempDir,
    cp_data: PathBuf,
    cp: ChildServer,
    root: String,
    sidecar_token: PathBuf,
    sidecars: Vec<(ChildServer, AuthorizationClient<Channel>)>,
}

impl Fleet {
    async fn start(sidecars: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let cp_data = dir.path().join("cp");
        let cp = spawn_control_plane(&cp_data, "127.0.0.1:0", &[]);
        let root = operator_cmd(&cp_data, "root", "admin", "*");
        let sidecar_token = dir.path().join("sidecar.token");
        aegis::files::write_secret(
            &sidecar_token,
            &operator_cmd(&cp_data, "fleet", "sidecar", "acme"),
        )
        .expect("write");
        let mut fleet = Self {
            _dir: dir,
            cp_data,
            cp,
            root,
            sidecar_token,
            sidecars: Vec::new(),
        };
        for i in 0..sidecars {
            fleet.add_sidecar(i).await;
        }
        fleet
    }

    async fn add_sidecar(&mut self, i: usize) {
        let data = self.cp_data.with_file_name(format!("sidecar-{i}"));
        let url = format!("http://{}", self.cp.addr);
        let child = spawn_sidecar(
            &data,
            &url,
            &self.sidecar_token,
            &self.cp_data.join("signing.pub"),
            &format!("sidecar-{i}"),
        );
        let client = client(child.addr).await;
        self.sidecars.push((child, client));
    }

    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        ctl(self.cp.addr, &self.root, args)
    }

    /// `aegis ctl` that must succeed: its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.ctl(args);
        assert_eq!(code, 0, "aegis ctl {args:?}: {err}");
        out
    }

    /// A token of acme's `agent` with `invoices:read`.
    fn read_token(&self, agent: &str) -> String {
        self.ok(&[
            "tokens",
            "issue",
            "--agent",
            agent,
            "--tenant",
            "acme",
            "--scopes",
            "invoices:read",
        ])
        .trim()
        .to_owned()
    }

    /// Revokes the first token of acme's `agent` listed by the control plane: its jti.
    fn revoke_first_token(&self, agent: &str) -> String {
        let tokens: serde_json::Value = serde_json::from_str(&self.ok(&[
            "tokens", "list", "--agent", agent, "--tenant", "acme", "--json",
        ]))
        .expect("json");
        let jti = tokens["tokens"][0]["jti"].as_str().expect("jti").to_owned();
        self.ok(&[
            "tokens", "revoke", &jti, "--tenant", "acme", "--reason", "leaked",
        ]);
        jti
    }

    /// A backup, as an operator takes one: the control plane stopped (SIGKILL), its data
    /// dir copied, started again on the same address. Returns the copy.
    fn back_up_control_plane(&mut self) -> std::path::PathBuf {
        let backup = self.cp_data.with_file_name("cp-backup");
        self.restart_control_plane(|data| copy_dir(data, &backup));
        backup
    }

    /// The restore of `backup`: the control plane stopped, the copy put back in place of
    /// its data dir, started again on the same address.
    fn restore_control_plane(&mut self, backup: &std::path::Path) {
        self.restart_control_plane(|data| {
            std::fs::remove_dir_all(data).expect("rm");
            copy_dir(backup, data);
        });
    }

    fn restart_control_plane(&mut self, while_stopped: impl FnOnce(&std::path::Path)) {
        let control = self.cp.addr;
        self.cp.child.kill().expect("SIGKILL");
        let _ = self.cp.child.wait();
        while_stopped(&self.cp_data);
        self.cp = spawn_control_plane(&self.cp_data, &control.to_string(), &[]);
    }
}

/// What an agent sees: "allow", the deny reason, or the gRPC error.
async fn seen(client: &AuthorizationClient<Channel>, req: CheckRequest) -> String {
    outcome(client.clone().check(req).await)
}

async fn all_see(fleet: &Fleet, req: impl Fn() -> CheckRequest, want: &str) -> bool {
    eventually_async(Duration::from_secs(10), || async {
        for (_, c) in &fleet.sidecars {
            if seen(c, req()).await != want {
                return false;
            }
        }
        true
    })
    .await
}

fn payment(token: &str, amount: u64, ovr: Option<&str>) -> CheckRequest {
    let r = Req::mcp("payments.create", json!({"amount": amount, "to": "acct-9"})).token(token);
    match ovr {
        Some(o) => r.header("x-aegis-override", o),
        None => r,
    }
    .build()
}

#[tokio::test]
async fn sidecars_follow_freezes_rotations_approvals_and_rollbacks() {
    let fleet = Fleet::start(2).await;
    fleet.ok(&["agents", "register", "billing-bot", "--tenant", "acme"]);
    let token = fleet
        .ok(&[
            "tokens",
            "issue",
            "--agent",
            "billing-bot",
            "--tenant",
            "acme",
            "--scopes",
            "invoices:read,payments:create",
        ])
        .trim()
        .to_owned();
    let read = || Req::read_invoices(&token);
    assert!(all_see(&fleet, read, "allow").await, "every sidecar allows");

    // Freeze: denied at every sidecar.
    fleet.ok(&[
        "agents",
        "freeze",
        "billing-bot",
        "--tenant",
        "acme",
        "--reason",
        "deny storm - investigating",
    ]);
    for (_, c) in &fleet.sidecars {
        // Pushed, not polled: by the time ctl has printed, the sidecars have it or are
        // about to. The wait is generous for a loaded machine; the push itself is
        // measured in the README's fleet table.
        assert!(
            eventually_async(Duration::from_secs(10), || async {
                seen(c, read()).await == "agent_frozen"
            })
            .await
        );
    }
    let got: serde_json::Value = serde_json::from_str(&fleet.ok(&[
        "agents",
        "get",
        "billing-bot",
        "--tenant",
        "acme",
        "--json",
    ]))
    .expect("json");
    assert_eq!(
        (got["status"].as_str(), got["updated_by"].as_str()),
        (Some("frozen"), Some("admin:root"))
    );
    fleet.ok(&[
        "agents",
        "unfreeze",
        "billing-bot",
        "--tenant",
        "acme",
        "--reason",
        "cleared",
    ]);
    assert!(all_see(&fleet, read, "allow").await);

    // Approval raised at one sidecar, redeemed at another, refused on replay anywhere.
    let (_, first) = &fleet.sidecars[0];
    let r = first
        .clone()
        .check(payment(&token, 5000, None))
        .await
        .expect("decided")
        .into_inner();
    assert_eq!(reason(&r), Some("payment_above_threshold"));
    let id = header(&denied(&r).headers, "x-aegis-approval-id")
        .expect("approval id")
        .to_owned();
    let pending = fleet.ok(&["approvals", "list", "--tenant", "acme"]);
    assert!(
        pending.contains(&id) && pending.contains("payments.create"),
        "{pending}"
    );
    let ovr = fleet
        .ok(&[
            "approvals",
            "approve",
            &id,
            "--tenant",
            "acme",
            "--reason",
            "confirmed by phone",
        ])
        .trim()
        .to_owned();
    let (_, second) = &fleet.sidecars[1];
    assert_eq!(
        seen(second, payment(&token, 5000, Some(&ovr))).await,
        "allow"
    );
    assert_eq!(
        seen(first, payment(&token, 5000, Some(&ovr))).await,
        "override_used"
    );

    // Rotation: the old token is refused everywhere, the new one accepted.
    let tokens: serde_json::Value = serde_json::from_str(&fleet.ok(&[
        "tokens",
        "list",
        "--agent",
        "billing-bot",
        "--tenant",
        "acme",
        "--json",
    ]))
    .expect("json");
    let jti = tokens["tokens"][0]["jti"].as_str().expect("jti").to_owned();
    let fresh = fleet
        .ok(&[
            "tokens",
            "rotate",
            &jti,
            "--tenant",
            "acme",
            "--reason",
            "exposed in a log",
        ])
        .trim()
        .to_owned();
    assert!(all_see(&fleet, read, "token_revoked").await);
    assert!(all_see(&fleet, || Req::read_invoices(&fresh), "allow").await);

    // Policy: a pushed revision reaches every sidecar, and a rollback brings the old one back.
    let bundle = fleet.cp_data.with_file_name("bundle");
    copy_default_bundle(&bundle);
    std::fs::write(
        bundle.join(".manifest"),
        r#"{"revision": "fleet-2", "roots": ["aegis"]}"#,
    )
    .expect("manifest");
    fleet.ok(&[
        "policy",
        "push",
        &bundle.to_string_lossy(),
        "--reason",
        "new revision",
    ]);
    let version = |c: AuthorizationClient<Channel>, t: String| async move {
        let mut c = c;
        policy_version(
            &c.check(Req::read_invoices(&t))
                .await
                .expect("decided")
                .into_inner(),
        )
    };
    for (_, c) in &fleet.sidecars {
        assert!(
            eventually_async(Duration::from_secs(10), || version(
                c.clone(),
                fresh.clone()
            )
            .then_eq("fleet-2"))
            .await
        );
    }
    fleet.ok(&["policy", "rollback", "--reason", "back out"]);
    for (_, c) in &fleet.sidecars {
        assert!(
            eventually_async(Duration::from_secs(10), || version(
                c.clone(),
                fresh.clone()
            )
            .then_eq("default-2026.12.1"))
            .await
        );
    }
    let history = fleet.ok(&["policy", "history"]);
    assert!(
        history.contains("rollback") && history.contains("fleet-2"),
        "{history}"
    );
}

/// `fut.then_eq(x)`: whether the future's output equals `x`.
trait ThenEq: std::future::Future<Output = String> + Sized {
    async fn then_eq(self, want: &str) -> bool {
        self.await == want
    }
}
impl<F: std::future::Future<Output = String>> ThenEq for F {}

async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

#[tokio::test]
async fn a_sidecar_keeps_deciding_without_its_control_plane_and_resyncs() {
    let mut fleet = Fleet::start(1).await;
    for a in ["alpha", "beta"] {
        fleet.ok(&["agents", "register", a, "--tenant", "acme"]);
    }
    let issue = |a: &str| {
        fleet
            .ok(&[
                "tokens",
                "issue",
                "--agent",
                a,
                "--tenant",
                "acme",
                "--scopes",
                "invoices:read,payments:create",
            ])
            .trim()
            .to_owned()
    };
    let (alpha, beta) = (issue("alpha"), issue("beta"));
    fleet.ok(&[
        "agents", "freeze", "beta", "--tenant", "acme", "--reason", "contain",
    ]);
    assert!(all_see(&fleet, || Req::read_invoices(&beta), "agent_frozen").await);
    let control = fleet.cp.addr;
    let admin = fleet.sidecars[0]
        .0
        .lines
        .iter()
        .find_map(|l| {
            l.split("admin ")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<SocketAddr>()
                .ok()
        })
        .expect("sidecar admin address");

    // The control plane dies: the sidecar goes on deciding from its last state.
    fleet.cp.child.kill().expect("SIGKILL");
    let _ = fleet.cp.child.wait();
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            scrape(admin).await.contains("aegis_control_connected 0")
        })
        .await,
        "the sidecar notices"
    );
    let (_, sc) = &fleet.sidecars[0];
    for _ in 0..20 {
        assert_eq!(seen(sc, Req::read_invoices(&alpha)).await, "allow");
        assert_eq!(seen(sc, Req::read_invoices(&beta)).await, "agent_frozen");
    }
    // What needs the control plane itself (raising an approval) cannot happen: the
    // policy's answer stands, a deny (503), never an error Envoy could fail open on.
    let (_, c) = &fleet.sidecars[0];
    let r = c
        .clone()
        .check(payment(&alpha, 5000, None))
        .await
        .expect("decided")
        .into_inner();
    assert_eq!(reason(&r), Some("approval_unavailable"));
    assert_eq!(denied(&r).status.as_ref().map(|s| s.code), Some(503));

    // It comes back on the same address with the same state; the sidecar reconnects and
    // follows what happens next.
    fleet.cp = spawn_control_plane(&fleet.cp_data, &control.to_string(), &[]);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            scrape(admin).await.contains("aegis_control_connected 1")
        })
        .await,
        "the sidecar reconnects"
    );
    fleet.ok(&[
        "agents", "unfreeze", "beta", "--tenant", "acme", "--reason", "cleared",
    ]);
    fleet.ok(&[
        "agents",
        "freeze",
        "alpha",
        "--tenant",
        "acme",
        "--reason",
        "next incident",
    ]);
    assert!(all_see(&fleet, || Req::read_invoices(&beta), "allow").await);
    assert!(all_see(&fleet, || Req::read_invoices(&alpha), "agent_frozen").await);
    let metrics = scrape(admin).await;
    assert!(
        metrics.contains("aegis_control_connects_total 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_sidecar_that_never_reached_its_control_plane_fails_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    // A sidecar credential for acme (minted with a key of its own: nothing checks it here).
    let token = dir.path().join("t");
    let other = aegis::keys::Signer::generate().expect("rng");
    let credential = aegis::control::auth::mint_operator(
        &other,
        "aegis",
        "fleet",
        aegis::control::auth::Role::Sidecar,
        "acme",
        3600,
    )
    .expect("mint");
    aegis::files::write_secret(&token, &credential).expect("write");
    let data = dir.path().join("data");
    let sidecar = spawn_serve(&[
        "--data-dir",
        &data.to_string_lossy(),
        "--control-plane",
        &format!("http://127.0.0.1:{port}"),
        "--control-plane-token-file",
        &token.to_string_lossy(),
    ]);
    let signer = aegis::keys::Signer::load(&data).expect("key");
    let t = mint(&signer, claims("acme", "bot", &["invoices:read"]));
    let e = client(sidecar.addr)
        .await
        .check(Req::read_invoices(&t))
        .await
        .expect_err("no state, no decision");
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("no control-plane state"), "{e:?}");

    // A credential that is not a sidecar's naming its tenants: it does not even start.
    // One for every tenant, minted before the rule (its claims written directly).
    let now = now();
    let everyone = aegis::identity::mint(
        &other,
        &aegis::control::auth::OperatorClaims {
            iss: "aegis".into(),
            aud: aegis::control::auth::OPERATOR_AUDIENCE.into(),
            sub: "old".into(),
            role: "sidecar".into(),
            tenant: "*".into(),
            jti: "op-old".into(),
            iat: now,
            exp: now + 3600,
        },
    )
    .expect("mint");
    for (bad, why) in [
        ("not-even-a-credential", "not a JWT"),
        (
            operator_cmd(&data, "root", "admin", "*").trim(),
            "not sidecar",
        ),
        (everyone.as_str(), "no longer accepted"),
    ] {
        aegis::files::write_secret(&token, bad).expect("write");
        let err = serve_refuses(&[
            std::ffi::OsStr::new("--data-dir"),
            data.as_os_str(),
            std::ffi::OsStr::new("--control-plane"),
            std::ffi::OsStr::new("http://127.0.0.1:1"),
            std::ffi::OsStr::new("--control-plane-token-file"),
            token.as_os_str(),
        ]);
        assert!(err.contains(why), "{err}");
    }

    // Without a credential it does not even start.
    let err = serve_refuses(&[
        std::ffi::OsStr::new("--data-dir"),
        data.as_os_str(),
        std::ffi::OsStr::new("--control-plane"),
        std::ffi::OsStr::new("http://127.0.0.1:1"),
    ]);
    assert!(err.contains("control.token_file"), "{err}");
}

#[tokio::test]
async fn ctl_exit_codes_and_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = spawn_serve(&["--data-dir", &data.to_string_lossy()]);
    let addr = server
        .announced(aegis::server::CONTROL_ANNOUNCE)
        .expect("control address");
    let root = operator_cmd(&data, "root", "admin", "*");
    let viewer = operator_cmd(&data, "val", "viewer", "acme");

    let (code, out, err) = ctl(
        addr,
        &root,
        &["agents", "register", "bot", "--tenant", "acme"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("acme/bot") && out.contains("active"), "{out}");
    let (code, out, _) = ctl(addr, &viewer, &["agents", "list"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("TENANT") && out.contains("bot"), "{out}");
    let (code, out, _) = ctl(addr, &viewer, &["whoami", "--json"]);
    assert_eq!(code, 0);
    let who: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (who["role"].as_str(), who["tenant"].as_str()),
        (Some("viewer"), Some("acme"))
    );

    let cases: &[(&str, &[&str], i32, &str)] = &[
        (
            "viewer changes",
            &["agents", "freeze", "bot", "--reason", "x"],
            3,
            "PermissionDenied",
        ),
        (
            "unknown agent",
            &["agents", "get", "nobody", "--tenant", "acme"],
            4,
            "NotFound",
        ),
        (
            "no reason",
            &[
                "agents", "freeze", "bot", "--tenant", "acme", "--reason", "",
            ],
            5,
            "reason",
        ),
        (
            "kill all unconfirmed",
            &["kill", "all", "--reason", "x"],
            5,
            "confirm",
        ),
    ];
    for (name, args, want, text) in cases {
        let who = if *name == "viewer changes" {
            &viewer
        } else {
            &root
        };
        let (code, _, err) = ctl(addr, who, args);
        assert_eq!(code, *want, "{name}: {err}");
        assert!(err.contains(text), "{name}: {err}");
    }
    let (code, _, err) = ctl(addr, "garbage", &["agents", "list"]);
    assert_eq!(code, 3, "{err}");
    let out = aegis_cmd(&[
        "ctl",
        "--server",
        &format!("http://{addr}"),
        "agents",
        "list",
    ]);
    assert_eq!(out.status.code(), Some(2), "no credential: {out:?}");
    drop(server);
    let (code, _, err) = ctl(addr, &root, &["agents", "list"]);
    assert_eq!(code, 6, "unreachable: {err}");
}

#[tokio::test]
async fn an_incident_found_at_one_sidecar_contains_the_agent_at_every_sidecar() {
    let fleet = Fleet::start(2).await;
    fleet.ok(&[
        "tenants",
        "set",
        "acme",
        "--autonomy",
        "L3",
        "--reason",
        "SOC runs containment",
    ]);
    fleet.ok(&["agents", "register", "triage-bot", "--tenant", "acme"]);
    let token = fleet
        .ok(&[
            "tokens",
            "issue",
            "--agent",
            "triage-bot",
            "--tenant",
            "acme",
            "--scopes",
            "invoices:read",
        ])
        .trim()
        .to_owned();
    let read = || Req::read_invoices(&token);
    assert!(all_see(&fleet, read, "allow").await);
    // A deny storm at sidecar 0 only.
    let (_, first) = &fleet.sidecars[0];
    for _ in 0..5 {
        let storm = Req::get("/invoices")
            .token(&token)
            .tool("invoices", "create")
            .build();
        assert_eq!(seen(first, storm).await, "missing_scope");
    }
    // Reported to the control plane, which freezes the agent for the whole fleet.
    assert!(
        all_see(&fleet, read, "agent_frozen").await,
        "the agent is frozen at every sidecar"
    );
    let out = fleet.ok(&["incidents", "list", "--tenant", "acme", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let incident = &v["incidents"][0];
    assert_eq!(incident["kind"], "deny_storm");
    assert_eq!(incident["reported_by"], "sidecar:fleet");
    assert_eq!(incident["decisions"].as_array().map(Vec::len), Some(5));
}

/// A sidecar serves only its credential's tenants: another tenant's token is denied there
/// (it is sent none of that tenant's freezes and kills, so it must not decide blind).
/// Its incident evidence carries the rows it signed, and `aegis audit check-evidence`
/// holds them to the sidecar's exported log and catches a forged row hash.
#[tokio::test]
async fn a_sidecar_serves_its_tenants_and_its_evidence_checks_against_its_log() {
    let fleet = Fleet::start(1).await;
    for tenant in ["acme", "globex"] {
        fleet.ok(&["agents", "register", "bot", "--tenant", tenant]);
    }
    let issue = |tenant: &str| {
        fleet
            .ok(&[
                "tokens",
                "issue",
                "--agent",
                "bot",
                "--tenant",
                tenant,
                "--scopes",
                "invoices:read",
            ])
            .trim()
            .to_owned()
    };
    let (acme, globex) = (issue("acme"), issue("globex"));
    assert!(all_see(&fleet, || Req::read_invoices(&acme), "allow").await);
    // globex's agent is frozen at the control plane; this sidecar never hears of it, and
    // denies globex's token whatever its state.
    fleet.ok(&[
        "agents", "freeze", "bot", "--tenant", "globex", "--reason", "contain",
    ]);
    let (_, c) = &fleet.sidecars[0];
    assert_eq!(
        seen(c, Req::read_invoices(&globex)).await,
        "tenant_not_served"
    );

    // A deny storm at the sidecar: reported over gRPC with each decision's row.
    for _ in 0..5 {
        let delete = Req::get("/invoices")
            .token(&acme)
            .tool("invoices", "create")
            .build();
        assert_eq!(seen(c, delete).await, "missing_scope");
    }
    let mut id = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            let out = fleet.ok(&["incidents", "list", "--tenant", "acme", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&out).expect("json");
            if let Some(i) = v["incidents"].as_array().and_then(|l| l.first()) {
                id = i["id"].as_str().unwrap_or_default().to_owned();
            }
            !id.is_empty()
        })
        .await,
        "the sidecar's incident reached the control plane"
    );
    let shown = fleet.ok(&["incidents", "show", &id, "--tenant", "acme", "--json"]);
    let incident: serde_json::Value = serde_json::from_str(&shown).expect("json");
    assert_eq!(incident["reported_by"], "sidecar:fleet");
    assert_eq!(incident["decisions"].as_array().map(Vec::len), Some(5));

    let dir = fleet.cp_data.with_file_name("evidence");
    std::fs::create_dir_all(&dir).expect("dir");
    let sidecar_data = fleet.cp_data.with_file_name("sidecar-0");
    let bundle = dir.join("bundle.json");
    let out = aegis_cmd(&[
        "audit",
        "export",
        "--data-dir",
        &sidecar_data.to_string_lossy(),
        "--tenant",
        "acme",
        "-o",
        &bundle.to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let key = sidecar_data.join("audit.pub");
    let check = |incident: &serde_json::Value| {
        let file = dir.join("incident.json");
        std::fs::write(&file, incident.to_string()).expect("write");
        aegis_cmd(&[
            "audit",
            "check-evidence",
            "--incident",
            &file.to_string_lossy(),
            "--bundle",
            &bundle.to_string_lossy(),
            "--public-key",
            &key.to_string_lossy(),
        ])
    };
    let out = check(&incident);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains("evidence holds"), "{stdout}");

    // A row hash the sidecar never signed (what a fabricated report would carry).
    let mut forged = incident.clone();
    forged["decisions"][0]["row_hash"] = format!("{:064x}", 7).into();
    let out = check(&forged);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout.contains("not the row the data plane signed"),
        "{stdout}"
    );
    // A decision id the log does not have at that row.
    let mut renamed = incident.clone();
    renamed["decisions"][1]["decision_id"] = "d-fake".into();
    let out = check(&renamed);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("d-fake"));
}

/// The admin address a server announced.
fn admin_of(server: &ChildServer) -> SocketAddr {
    server
        .lines
        .iter()
        .find_map(|l| {
            l.split("admin ")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<SocketAddr>()
                .ok()
        })
        .expect("admin address")
}

/// A copy of a directory tree (a backup, as `cp -a` would take it).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// The reported attack: a restored copy of the control plane's data dir must not undo a
/// revocation and a freeze. The sidecar refuses the older state (and says so), follows only
/// once an operator confirms the restore, and even then keeps denying the token it knew
/// was revoked.
#[tokio::test]
async fn a_restored_control_plane_backup_does_not_unrevoke_the_fleet() {
    let mut fleet = Fleet::start(1).await;
    for a in ["alpha", "beta"] {
        fleet.ok(&["agents", "register", a, "--tenant", "acme"]);
    }
    let (alpha, beta) = (fleet.read_token("alpha"), fleet.read_token("beta"));
    assert!(all_see(&fleet, || Req::read_invoices(&alpha), "allow").await);
    assert!(all_see(&fleet, || Req::read_invoices(&beta), "allow").await);
    let admin = admin_of(&fleet.sidecars[0].0);
    let control = fleet.cp.addr;

    // A backup: the control plane stopped, its data dir copied, started again.
    let backup = fleet.back_up_control_plane();

    // Containment after the backup: alpha's token revoked, beta frozen.
    let _ = fleet.revoke_first_token("alpha");
    fleet.ok(&[
        "agents", "freeze", "beta", "--tenant", "acme", "--reason", "contain",
    ]);
    assert!(all_see(&fleet, || Req::read_invoices(&alpha), "token_revoked").await);
    assert!(all_see(&fleet, || Req::read_invoices(&beta), "agent_frozen").await);
    let connects = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("aegis_control_connects_total "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = connects(&http_get(admin, "/metrics").await);

    // The restore: the control plane stopped, the copy put back, started again.
    fleet.restore_control_plane(&backup);
    assert!(
        eventually_async(Duration::from_secs(15), || async {
            connects(&http_get(admin, "/metrics").await) > before
        })
        .await,
        "the sidecar reaches the restored control plane"
    );
    // It keeps denying both, for as long as we look (3 s, polled).
    let (_, sc) = &fleet.sidecars[0];
    for _ in 0..30 {
        assert_eq!(seen(sc, Req::read_invoices(&alpha)).await, "token_revoked");
        assert_eq!(seen(sc, Req::read_invoices(&beta)).await, "agent_frozen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and says why: metrics, readiness (still serving, with the reason).
    let metrics = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains("aegis_control_rollback_refused 1")
            && metrics.contains("aegis_control_revoked_tokens 1")
            && metrics.contains("aegis_control_state_epoch 0"),
        "{metrics}"
    );
    let ready = http_get(admin, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 200")
            && ready.contains("rollback refused")
            && ready.contains("confirm-restore"),
        "{ready}"
    );
    // The control plane learns it is behind a sidecar, and `aegis ctl` says so.
    let shown = fleet.ok(&["state", "show"]);
    assert!(
        shown.contains("epoch:   0") && shown.contains("ahead of this control plane"),
        "{shown}"
    );
    let cp_metrics = http_get(admin_of(&fleet.cp), "/metrics").await;
    assert!(
        !cp_metrics.contains("aegis_control_sidecars_ahead_total 0")
            && cp_metrics.contains("aegis_control_sidecars_ahead_total"),
        "{cp_metrics}"
    );

    // The operator issues alpha a new token on the restored control plane, re-applies the
    // freeze the backup lacks (a restrictive change reaches the refusing sidecar at once),
    // and confirms the restore; a confirmation without a reason is refused.
    let fresh = fleet.read_token("alpha");
    fleet.ok(&[
        "agents",
        "freeze",
        "beta",
        "--tenant",
        "acme",
        "--reason",
        "re-applied",
    ]);
    let (code, _, err) = fleet.ctl(&["state", "confirm-restore", "--reason", ""]);
    assert_ne!(code, 0, "a confirmation needs a reason");
    assert!(err.contains("reason"), "{err}");
    // One tenant's admin cannot confirm for the whole fleet (exit 3: refused).
    let tenant_admin = operator_cmd(&fleet.cp_data, "acme-admin", "admin", "acme");
    let (code, _, err) = ctl(
        fleet.cp.addr,
        &tenant_admin,
        &["state", "confirm-restore", "--reason", "undo the kill"],
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("needs an admin of every tenant"), "{err}");
    let confirmed = fleet.ok(&[
        "state",
        "confirm-restore",
        "--reason",
        "restored last night's backup",
    ]);
    assert!(confirmed.contains("epoch:   1"), "{confirmed}");
    assert!(
        eventually_async(Duration::from_secs(15), || async {
            let m = http_get(admin, "/metrics").await;
            m.contains("aegis_control_state_epoch 1")
                && m.contains("aegis_control_rollback_refused 0")
        })
        .await,
        "the sidecar follows the confirmed epoch"
    );
    assert!(all_see(&fleet, || Req::read_invoices(&fresh), "allow").await);
    // The revocation the backup lacks is kept (a union) until the token expires.
    assert_eq!(seen(sc, Req::read_invoices(&alpha)).await, "token_revoked");
    assert_eq!(seen(sc, Req::read_invoices(&beta)).await, "agent_frozen");
    let ready = http_get(admin, "/readyz").await;
    assert!(ready.ends_with("ready\n"), "{ready}");
    // The confirmation, and the refused attempt, are in the control plane's audit of
    // operator actions.
    let audit = rusqlite::Connection::open(fleet.cp_data.join(aegis::audit::store::AUDIT_DB_FILE))
        .expect("audit db");
    let mut stmt = audit
        .prepare(
            "SELECT actor, decision, reason FROM audit_log \
             WHERE action = 'state.confirm_restore' ORDER BY seq",
        )
        .expect("prepare");
    let rows: Vec<(String, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows[0].0.contains("acme-admin") && rows[0].1 == "refused",
        "{rows:?}"
    );
    assert!(
        rows[1].0.contains("root")
            && rows[1].1 == "ok"
            && rows[1].2 == "restored last night's backup",
        "{rows:?}"
    );

    // The epoch is stored with the state: a restart keeps it.
    fleet.cp.child.kill().expect("SIGKILL");
    let _ = fleet.cp.child.wait();
    fleet.cp = spawn_control_plane(&fleet.cp_data, &control.to_string(), &[]);
    let shown = fleet.ok(&["state", "show"]);
    assert!(shown.contains("epoch:   1"), "{shown}");
}

/// The restore again, but the sidecar restarts while the restored control plane runs: it
/// remembers (its data dir) what it held, so it refuses the older state (failing closed,
/// having none of its own to decide from) instead of following it silently, and after the
/// operator's confirmation still denies the token it knew was revoked.
#[tokio::test]
async fn a_sidecar_restarted_after_the_restore_still_refuses_it() {
    let mut fleet = Fleet::start(1).await;
    fleet.ok(&["agents", "register", "alpha", "--tenant", "acme"]);
    let alpha = fleet.read_token("alpha");
    assert!(all_see(&fleet, || Req::read_invoices(&alpha), "allow").await);
    let backup = fleet.back_up_control_plane();
    let jti = fleet.revoke_first_token("alpha");
    assert!(all_see(&fleet, || Req::read_invoices(&alpha), "token_revoked").await);
    // The sidecar has written what it holds (after the event, off its Check path).
    let held = fleet
        .cp_data
        .with_file_name("sidecar-0")
        .join("control-state.json");
    assert!(
        eventually(Duration::from_secs(10), || {
            std::fs::read_to_string(&held).is_ok_and(|t| t.contains(&jti))
        })
        .await,
        "the sidecar remembers the revocation"
    );

    // The sidecar stops; the control plane is restored; the sidecar starts again.
    let (mut sidecar, _) = fleet.sidecars.remove(0);
    sidecar.child.kill().expect("SIGKILL");
    let _ = sidecar.child.wait();
    fleet.restore_control_plane(&backup);
    fleet.add_sidecar(0).await;
    let admin = admin_of(&fleet.sidecars[0].0);
    assert!(
        eventually_async(Duration::from_secs(15), || async {
            http_get(admin, "/metrics")
                .await
                .contains("aegis_control_connects_total 1")
        })
        .await,
        "the restarted sidecar reaches the restored control plane"
    );
    // It never lets the revoked token in (3 s, polled): no state of its own, it fails closed.
    let (_, sc) = &fleet.sidecars[0];
    for _ in 0..30 {
        assert_eq!(
            seen(sc, Req::read_invoices(&alpha)).await,
            "error:Unavailable"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains("aegis_control_rollback_refused 1"),
        "{metrics}"
    );
    let ready = http_get(admin, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("rollback refused"),
        "{ready}"
    );
    // The restarted sidecar told the control plane what it held before.
    let shown = fleet.ok(&["state", "show"]);
    assert!(shown.contains("ahead of this control plane"), "{shown}");

    fleet.ok(&[
        "state",
        "confirm-restore",
        "--reason",
        "restored last night's backup",
    ]);
    let fresh = fleet.read_token("alpha");
    assert!(all_see(&fleet, || Req::read_invoices(&fresh), "allow").await);
    assert_eq!(seen(sc, Req::read_invoices(&alpha)).await, "token_revoked");
}
