//! Rotating the control plane's signing key, as the README's deployment section does it:
//! the key comes from a file (a mounted Secret, `signing_key_file`), the previous key's
//! public half stays trusted (`token.trusted_keys`) for the credentials and agent tokens
//! it signed until they expire, and a key file replaced under a running server makes it
//! unready until it is restarted.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use aegis::keys::Signer;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signing_key_rotates_with_the_old_one_trusted_until_it_is_dropped() {
    let keys = tempfile::tempdir().expect("tempdir");
    // `<name>.key` (the seed, as `aegis serve` reads it) and `<name>.key.pub`.
    let old = aegis::keys::write_keypair(&keys.path().join("old.key")).expect("old key");
    let new = aegis::keys::write_keypair(&keys.path().join("new.key")).expect("new key");
    let rogue = Signer::generate().expect("key");

    let mut s = start_with(|c| {
        c.signing_key_file = Some(keys.path().join("new.key"));
        c.token.trusted_keys = vec![keys.path().join("old.key.pub")];
    })
    .await;
    // The server signs with the file's key and created none in its data directory.
    assert!(!s.data_dir().join(aegis::keys::SIGNING_KEY_FILE).exists());
    assert_eq!(s.signer.kid(), new.kid());

    // Credentials minted by the previous key still work; by an unknown key, not.
    for (who, signer, ok) in [
        ("old", &old, true),
        ("new", &new, true),
        ("rogue", &rogue, false),
    ] {
        let credential =
            aegis::control::auth::mint_operator(signer, "aegis", who, Role::Admin, "*", 600)
                .expect("mint");
        let ctl = Ctl::connect(s.control_addr(), &credential).await;
        let answer = ctl.api().who_am_i(ctl.req(pb::WhoAmIRequest {})).await;
        assert_eq!(answer.is_ok(), ok, "{who}: {answer:?}");
        let agent_token = mint(signer, claims("acme", "billing-bot", &["invoices:read"]));
        let r = s.read_invoices(&agent_token).await;
        assert_eq!(code(&r) == 0, ok, "{who}'s agent token: {:?}", reason(&r));
    }

    // The audit log is signed by its own key, not the token key: rotating the token key
    // leaves it alone, and the token key's holder cannot pass for its signer.
    let data = s.data_dir().to_string_lossy().into_owned();
    let audit_pub = s
        .data_dir()
        .join(aegis::keys::AUDIT_PUBLIC_KEY_FILE)
        .to_string_lossy()
        .into_owned();
    let out = aegis_cmd(&[
        "audit",
        "verify",
        "--data-dir",
        &data,
        "--public-key",
        &audit_pub,
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let new_pub = keys
        .path()
        .join("new.key.pub")
        .to_string_lossy()
        .into_owned();
    let out = aegis_cmd(&[
        "audit",
        "verify",
        "--data-dir",
        &data,
        "--public-key",
        &new_pub,
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("signed by an untrusted key"),
        "{out:?}"
    );

    // The Secret is updated under the running server: it says it is not ready (a restart
    // would sign with another key) until it is restarted.
    let admin = s.running.as_ref().expect("running").admin_addr;
    assert!(http_get(admin, "/readyz").await.starts_with("HTTP/1.1 200"));
    std::fs::copy(keys.path().join("old.key"), keys.path().join("new.key")).expect("swap");
    let ready = http_get(admin, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(
        ready.contains("signing key") && ready.contains(old.kid()),
        "{ready}"
    );
    s.stop().await;
}
