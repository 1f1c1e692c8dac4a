//! The JWT attack corpus: every forged, tampered, confused or out-of-bounds agent token
//! is refused, with the reason a client would see in `x-aegis-reason`. Tokens are built
//! here from a fresh key, each case named by the attack it makes.
// Test helpers are not #[test] fns: they may unwrap, panic and index, as the tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use aegis::identity::{Audience, Claims, Identifier, KeyRing, Revocations, TokenPolicy, mint};
use aegis::keys::Signer;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use sha2::{Digest, Sha256};

/// The corpus's verification time and claims are the fuzz corpus's (`aegis::fuzzing`).
const NOW: i64 = aegis::fuzzing::TOKEN_NOW;

fn claims() -> Claims {
    aegis::fuzzing::corpus_claims()
}

fn identifier(signer: &Signer) -> Identifier {
    let mut keys = KeyRing::default();
    keys.insert(signer.verifying_key());
    let policy = TokenPolicy {
        issuer: "aegis".into(),
        audience: "aegis-sidecar".into(),
        leeway_secs: 0,
        max_bytes: 8192,
        max_lifetime_secs: 3600,
    };
    Identifier::new(keys, policy, Arc::new(Revocations::default()), 1024)
}

/// `header.payload` from raw JSON texts (so duplicated keys survive), signed by `signer`.
fn signed_raw(signer: &Signer, header: &str, payload: &str) -> String {
    let mut t = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let sig = signer.sign(t.as_bytes());
    t.push('.');
    t.push_str(&B64.encode(sig));
    t
}

fn header(signer: &Signer) -> String {
    format!(r#"{{"alg":"EdDSA","typ":"JWT","kid":"{}"}}"#, signer.kid())
}

fn payload() -> String {
    serde_json::to_string(&claims()).expect("claims")
}

/// HMAC-SHA256 (RFC 2104), for the HS256 key-confusion forgery.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    k[..key.len().min(64)].copy_from_slice(&key[..key.len().min(64)]);
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

fn replace_part(token: &str, i: usize, part: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[i] = part.to_owned();
    parts.join(".")
}

/// S + L: the same signature with a non-canonical scalar (signature malleability).
fn non_canonical(sig: &[u8]) -> Vec<u8> {
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut out = sig.to_vec();
    let mut carry = 0u16;
    for i in 0..32 {
        let v = u16::from(out[32 + i]) + u16::from(L[i]) + carry;
        out[32 + i] = v as u8;
        carry = v >> 8;
    }
    out
}

#[test]
fn the_attack_corpus_is_refused_in_full() {
    let signer = Signer::generate().expect("key");
    let other = Signer::generate().expect("key");
    let id = identifier(&signer);
    let good = mint(&signer, &claims()).expect("mint");
    assert!(id.identify(&good, NOW).is_ok(), "the control token passes");
    let kid = signer.kid().to_owned();
    let unsigned = |h: &str| format!("{}.{}.", B64.encode(h), B64.encode(payload()));
    let hs256 = {
        let h = format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{kid}"}}"#);
        let input = format!("{}.{}", B64.encode(&h), B64.encode(payload()));
        let mac = hmac_sha256(signer.verifying_key().as_bytes(), input.as_bytes());
        format!("{input}.{}", B64.encode(mac))
    };
    let with_claims = |c: Claims| mint(&signer, &c).expect("mint");
    let good_sig = B64
        .decode(good.split('.').nth(2).expect("sig"))
        .expect("b64");

    // (attack, token, the reason it must be refused with)
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "alg none, empty signature",
            unsigned(r#"{"alg":"none","typ":"JWT"}"#),
            "token_bad_algorithm",
        ),
        (
            "alg none with our kid",
            unsigned(&format!(r#"{{"alg":"none","kid":"{kid}"}}"#)),
            "token_bad_algorithm",
        ),
        (
            "alg None (case)",
            unsigned(r#"{"alg":"None"}"#),
            "token_bad_algorithm",
        ),
        (
            "alg eddsa (case)",
            signed_raw(
                &signer,
                &format!(r#"{{"alg":"eddsa","kid":"{kid}"}}"#),
                &payload(),
            ),
            "token_bad_algorithm",
        ),
        (
            "HS256 keyed with the public key",
            hs256,
            "token_bad_algorithm",
        ),
        (
            "RS256",
            signed_raw(
                &signer,
                &format!(r#"{{"alg":"RS256","kid":"{kid}"}}"#),
                &payload(),
            ),
            "token_bad_algorithm",
        ),
        (
            "kid path traversal",
            signed_raw(
                &signer,
                r#"{"alg":"EdDSA","kid":"../../../../etc/passwd"}"#,
                &payload(),
            ),
            "token_unknown_key",
        ),
        (
            "kid SQL injection",
            signed_raw(
                &signer,
                r#"{"alg":"EdDSA","kid":"x' OR '1'='1"}"#,
                &payload(),
            ),
            "token_unknown_key",
        ),
        (
            "kid empty",
            signed_raw(&signer, r#"{"alg":"EdDSA","kid":""}"#, &payload()),
            "token_unknown_key",
        ),
        (
            "kid missing",
            signed_raw(&signer, r#"{"alg":"EdDSA"}"#, &payload()),
            "token_malformed",
        ),
        (
            "kid not a string",
            signed_raw(&signer, r#"{"alg":"EdDSA","kid":7}"#, &payload()),
            "token_malformed",
        ),
        (
            "crit header",
            signed_raw(
                &signer,
                &format!(r#"{{"alg":"EdDSA","kid":"{kid}","crit":["exp"]}}"#),
                &payload(),
            ),
            "token_malformed",
        ),
        (
            "jku header (key URL)",
            signed_raw(
                &signer,
                &format!(r#"{{"alg":"EdDSA","kid":"{kid}","jku":"https://evil/keys"}}"#),
                &payload(),
            ),
            "token_malformed",
        ),
        (
            "embedded jwk header",
            signed_raw(
                &signer,
                &format!(r#"{{"alg":"EdDSA","kid":"{kid}","jwk":{{"kty":"OKP"}}}}"#),
                &payload(),
            ),
            "token_malformed",
        ),
        (
            "duplicated alg header",
            signed_raw(
                &signer,
                &format!(r#"{{"alg":"none","alg":"EdDSA","kid":"{kid}"}}"#),
                &payload(),
            ),
            "token_malformed",
        ),
        (
            "duplicated sub claim (signed)",
            signed_raw(
                &signer,
                &header(&signer),
                &payload().replacen('{', r#"{"sub":"admin","#, 1),
            ),
            "token_malformed",
        ),
        (
            "duplicated tenant claim (signed)",
            signed_raw(
                &signer,
                &header(&signer),
                &payload().replacen('{', r#"{"tenant":"other","#, 1),
            ),
            "token_malformed",
        ),
        (
            "unknown claim (signed)",
            signed_raw(
                &signer,
                &header(&signer),
                &payload().replacen('{', r#"{"admin":true,"#, 1),
            ),
            "token_malformed",
        ),
        (
            "exp as a string (signed)",
            signed_raw(
                &signer,
                &header(&signer),
                &payload().replace(&format!(r#""exp":{}"#, NOW + 600), r#""exp":"9999999999""#),
            ),
            "token_malformed",
        ),
        (
            "claims not an object (signed)",
            signed_raw(&signer, &header(&signer), "[1,2,3]"),
            "token_malformed",
        ),
        (
            "huge token",
            format!("{good}{}", "A".repeat(100_000)),
            "token_too_large",
        ),
        (
            "huge header",
            signed_raw(
                &signer,
                &format!(
                    r#"{{"alg":"EdDSA","kid":"{kid}","x":"{}"}}"#,
                    "a".repeat(9000)
                ),
                &payload(),
            ),
            "token_too_large",
        ),
        (
            "two parts",
            good.rsplit_once('.').expect("head").0.to_owned(),
            "token_malformed",
        ),
        ("four parts", format!("{good}.x"), "token_malformed"),
        ("empty parts", "..".to_owned(), "token_malformed"),
        (
            "header not base64",
            replace_part(&good, 0, "!!!!"),
            "token_malformed",
        ),
        // The signature is checked before the payload is decoded: nothing unsigned is parsed.
        (
            "payload not base64",
            replace_part(&good, 1, "!!!!"),
            "token_bad_signature",
        ),
        (
            "signature truncated",
            replace_part(&good, 2, &B64.encode(&good_sig[..63])),
            "token_malformed",
        ),
        (
            "signature empty",
            replace_part(&good, 2, ""),
            "token_malformed",
        ),
        (
            "signature of S + L (malleated)",
            replace_part(&good, 2, &B64.encode(non_canonical(&good_sig))),
            "token_bad_signature",
        ),
        (
            "payload swapped for another agent",
            replace_part(
                &good,
                1,
                &B64.encode(payload().replace("billing-bot", "admin-bot")),
            ),
            "token_bad_signature",
        ),
        (
            "another Aegis key claiming our kid",
            signed_raw(&other, &header(&signer), &payload()),
            "token_bad_signature",
        ),
        (
            "another Aegis key, its own kid",
            mint(&other, &claims()).expect("mint"),
            "token_unknown_key",
        ),
        (
            "expired",
            with_claims(Claims {
                exp: NOW - 1,
                ..claims()
            }),
            "token_expired",
        ),
        (
            "expired at this very second",
            with_claims(Claims {
                exp: NOW,
                ..claims()
            }),
            "token_expired",
        ),
        (
            "nbf in the future",
            with_claims(Claims {
                nbf: NOW + 60,
                ..claims()
            }),
            "token_not_yet_valid",
        ),
        (
            "wrong aud",
            with_claims(Claims {
                aud: Audience::One("other".into()),
                ..claims()
            }),
            "token_wrong_audience",
        ),
        (
            "aud list without ours",
            with_claims(Claims {
                aud: Audience::Many(vec!["a".into(), "b".into()]),
                ..claims()
            }),
            "token_wrong_audience",
        ),
        (
            "wrong iss",
            with_claims(Claims {
                iss: "evil".into(),
                ..claims()
            }),
            "token_wrong_issuer",
        ),
        // Claim sanity (defence in depth: these need the signing key).
        (
            "iat a day in the future (outlives kill marks set before it)",
            with_claims(Claims {
                iat: NOW + 86_400,
                exp: NOW + 86_400 + 60,
                ..claims()
            }),
            "token_issued_in_future",
        ),
        (
            "exp = i64::MAX",
            with_claims(Claims {
                exp: i64::MAX,
                ..claims()
            }),
            "token_lifetime_too_long",
        ),
        (
            "lifetime one second over the limit",
            with_claims(Claims {
                exp: claims().iat + 3601,
                ..claims()
            }),
            "token_lifetime_too_long",
        ),
        (
            "iat = i64::MIN (a lifetime that overflows)",
            with_claims(Claims {
                iat: i64::MIN,
                ..claims()
            }),
            "token_lifetime_too_long",
        ),
        (
            "tenant with a trailing space (another tenant byte for byte)",
            with_claims(Claims {
                tenant: "acme ".into(),
                ..claims()
            }),
            "token_bad_claim",
        ),
        (
            "agent id with a newline (log injection)",
            with_claims(Claims {
                sub: "billing-bot\nallow".into(),
                ..claims()
            }),
            "token_bad_claim",
        ),
        (
            "session with a control character",
            with_claims(Claims {
                sid: "s1\u{7}".into(),
                ..claims()
            }),
            "token_bad_claim",
        ),
        (
            "token id with a tab",
            with_claims(Claims {
                jti: "j\t1".into(),
                ..claims()
            }),
            "token_bad_claim",
        ),
        (
            "empty agent id",
            with_claims(Claims {
                sub: String::new(),
                ..claims()
            }),
            "token_bad_claim",
        ),
        (
            "a no-break space in the tenant",
            with_claims(Claims {
                tenant: "ac\u{a0}me".into(),
                ..claims()
            }),
            "token_bad_claim",
        ),
        (
            "a scope with a space (two scopes in one)",
            with_claims(Claims {
                scopes: vec!["invoices:read payments:create".into()],
                ..claims()
            }),
            "token_bad_claim",
        ),
        (
            "a 300-byte agent id",
            with_claims(Claims {
                sub: "a".repeat(300),
                ..claims()
            }),
            "token_bad_claim",
        ),
    ];
    let mut failures = Vec::new();
    for (attack, token, want) in &cases {
        match id.identify(token, NOW) {
            Ok(c) => failures.push(format!("{attack}: ACCEPTED as {}", c.sub)),
            Err(r) if r.error.reason() != *want => failures.push(format!(
                "{attack}: refused as {} ({}), want {want}",
                r.error.reason(),
                r.error
            )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The good token still passes after the corpus (no state was poisoned by it).
    assert!(id.identify(&good, NOW).is_ok());
}

#[test]
fn every_single_bit_flip_of_a_signature_or_payload_is_refused() {
    let signer = Signer::generate().expect("key");
    let id = identifier(&signer);
    let good = mint(&signer, &claims()).expect("mint");
    let sig = B64
        .decode(good.split('.').nth(2).expect("sig"))
        .expect("b64");
    for bit in 0..sig.len() * 8 {
        let mut s = sig.clone();
        s[bit / 8] ^= 1 << (bit % 8);
        let t = replace_part(&good, 2, &B64.encode(&s));
        let r = id.identify(&t, NOW).expect_err("flipped signature bit");
        assert!(
            matches!(r.error.reason(), "token_bad_signature" | "token_malformed"),
            "bit {bit}: {}",
            r.error
        );
    }
    let body = payload();
    for bit in 0..body.len() * 8 {
        let mut p = body.clone().into_bytes();
        p[bit / 8] ^= 1 << (bit % 8);
        let t = replace_part(&good, 1, &B64.encode(&p));
        let r = id.identify(&t, NOW).expect_err("flipped payload bit");
        assert_eq!(r.error.reason(), "token_bad_signature", "payload bit {bit}");
    }
}
