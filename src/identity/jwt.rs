//! EdDSA-only JWT (RFC 7519 / RFC 8037) on ed25519-dalek: small, and nothing to configure
//! wrongly. Only `alg: EdDSA` with a trusted `kid` is accepted; `crit`, unknown header
//! fields, unknown or duplicated claims are refused. The signature is checked before the
//! claims are read.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::Signature;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{KeyRing, TokenError};
use crate::keys::Signer;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
}

/// Signs `claims` into a compact JWT with the signer's key id. Agent tokens, operator
/// credentials and approval override tokens are all minted here; each claim set has its own
/// audience and refuses unknown fields, so one kind never passes for another.
pub fn mint<C: Serialize>(signer: &Signer, claims: &C) -> Result<String, serde_json::Error> {
    let header = Header {
        alg: "EdDSA".into(),
        typ: Some("JWT".into()),
        kid: Some(signer.kid().into()),
    };
    let mut token = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?));
    let sig = signer.sign(token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(sig));
    Ok(token)
}

/// Checks the structure, algorithm, key and signature of `token` and returns its claims.
/// Time, issuer, audience and revocation are the caller's ([`super::Identifier`]).
pub fn parse_and_verify<C: DeserializeOwned>(token: &str, keys: &KeyRing) -> Result<C, TokenError> {
    let malformed = |what: &str| TokenError::Malformed(what.to_owned());
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("expected three dot-separated parts"));
    };
    let header_bytes = URL_SAFE_NO_PAD
        .decode(h64)
        .map_err(|_| malformed("header is not base64url"))?;
    let header: Header = serde_json::from_slice(&header_bytes)
        .map_err(|e| TokenError::Malformed(format!("header: {e}")))?;
    if header.alg != "EdDSA" {
        return Err(TokenError::Algorithm(header.alg));
    }
    let kid = header.kid.ok_or_else(|| malformed("header has no kid"))?;
    let key = keys.get(&kid).ok_or(TokenError::UnknownKey(kid))?;
    let sig_bytes = URL_SAFE_NO_PAD
        .decode(s64)
        .map_err(|_| malformed("signature is not base64url"))?;
    let sig = <[u8; 64]>::try_from(sig_bytes.as_slice())
        .map_err(|_| malformed("signature is not 64 bytes"))?;
    let signed_len = h64.len() + 1 + p64.len();
    let signed = token
        .get(..signed_len)
        .ok_or_else(|| malformed("truncated"))?;
    key.verify_strict(signed.as_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| TokenError::BadSignature)?;
    let payload = URL_SAFE_NO_PAD
        .decode(p64)
        .map_err(|_| malformed("payload is not base64url"))?;
    serde_json::from_slice(&payload).map_err(|e| TokenError::Malformed(format!("claims: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Audience, Claims};

    fn claims() -> Claims {
        Claims {
            iss: "aegis".into(),
            aud: Audience::One("aegis-sidecar".into()),
            sub: "billing-bot".into(),
            tenant: "acme".into(),
            scopes: vec!["invoices:read".into()],
            sid: "s1".into(),
            jti: "j1".into(),
            iat: 0,
            nbf: 0,
            exp: 10,
        }
    }

    #[test]
    fn round_trip_and_tamper() {
        let signer = Signer::generate().expect("rng");
        let mut ring = KeyRing::default();
        ring.insert(signer.verifying_key());
        let token = mint(&signer, &claims()).expect("mint");
        assert_eq!(parse_and_verify::<Claims>(&token, &ring), Ok(claims()));

        // Flip one bit of the signature.
        let mut bytes = token.clone().into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(bytes).expect("ascii");
        assert!(matches!(
            parse_and_verify::<Claims>(&flipped, &ring),
            Err(TokenError::BadSignature | TokenError::Malformed(_))
        ));

        // Another key's token.
        let other = Signer::generate().expect("rng");
        let foreign = mint(&other, &claims()).expect("mint");
        assert!(matches!(
            parse_and_verify::<Claims>(&foreign, &ring),
            Err(TokenError::UnknownKey(_))
        ));
    }
}
