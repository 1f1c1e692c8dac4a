//! Approvals: the hash of the exact call an approval is bound to, and override tokens.
//!
//! An `approval_needed` decision raises a pending approval for the call's hash. When an
//! approver approves it, the control plane mints an override token (an EdDSA JWT with the
//! audience `aegis-override`) naming the approval, the agent and the call hash, with a
//! short lifetime. The agent retries the same call with the token in `x-aegis-override`;
//! the data plane recomputes the hash of *that* call and asks the control plane to redeem
//! the token, which succeeds once: another call, a second use or an expired token is
//! refused.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The audience of override tokens.
pub const OVERRIDE_AUDIENCE: &str = "aegis-override";

/// The request header carrying an override token.
pub const OVERRIDE_HEADER: &str = "x-aegis-override";

/// The claims of an override token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideClaims {
    pub iss: String,
    pub aud: String,
    /// The agent the override is for.
    pub sub: String,
    pub tenant: String,
    /// The approval id.
    pub apr: String,
    /// Hex SHA-256 of the approved call.
    pub call: String,
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
}

/// Hex SHA-256 of a call: tenant, agent, tool, action and resource (each length-prefixed)
/// and the arguments as canonical JSON (serde_json's map keeps keys sorted: the crate is
/// built without `preserve_order`, and a test holds that). Two calls hash alike only if
/// every one of these is equal.
pub fn call_hash(
    tenant: &str,
    agent: &str,
    tool: &str,
    action: &str,
    resource: &str,
    arguments: &serde_json::Value,
) -> String {
    let mut h = Sha256::new();
    h.update(b"aegis-call/v1\n");
    for part in [tenant, agent, tool, action, resource] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let args = arguments.to_string();
    h.update((args.len() as u64).to_be_bytes());
    h.update(args.as_bytes());
    crate::hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_hash_binds_every_part_and_ignores_key_order() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"amount": 5000, "to": "acct-9"}"#).expect("json");
        let b: serde_json::Value =
            serde_json::from_str(r#"{"to": "acct-9", "amount": 5000}"#).expect("json");
        let h = |args: &serde_json::Value| call_hash("acme", "bot", "payments", "create", "", args);
        assert_eq!(h(&a), h(&b));
        assert_ne!(h(&a), h(&json!({"amount": 5001, "to": "acct-9"})));
        assert_ne!(
            call_hash("acme", "bot", "payments", "create", "", &a),
            call_hash("acme", "bot", "payments", "refund", "", &a)
        );
        // Length prefixes: moving a character between parts changes the hash.
        assert_ne!(
            call_hash("acme", "bot", "ab", "c", "", &a),
            call_hash("acme", "bot", "a", "bc", "", &a)
        );
    }
}
