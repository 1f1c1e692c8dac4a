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
    /// The control plane that minted the token (the operator credentials' issuer).
    pub iss: String,
    /// Always [`OVERRIDE_AUDIENCE`].
    pub aud: String,
    /// The agent the override is for.
    pub sub: String,
    /// The agent's tenant.
    pub tenant: String,
    /// The approval id.
    pub apr: String,
    /// Hex SHA-256 of the approved call.
    pub call: String,
    /// The token's id, unique per mint.
    pub jti: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expiry, Unix seconds (`control.override_ttl_secs` after `iat`).
    pub exp: i64,
}

/// What an approval is bound to: the tool call, and the HTTP request that carries it.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The agent's tenant.
    pub tenant: &'a str,
    /// The agent making the call.
    pub agent: &'a str,
    /// The tool, from the route.
    pub tool: &'a str,
    /// The action, from the route.
    pub action: &'a str,
    /// The resource, from the route or the path.
    pub resource: &'a str,
    /// The tool call's arguments, as the policy saw them (`input.tool.arguments`).
    pub arguments: &'a serde_json::Value,
    /// The HTTP method, host, and path with its query string.
    pub method: &'a str,
    /// The request's `host` (`:authority`).
    pub host: &'a str,
    /// The request path with its query string.
    pub path: &'a str,
    /// The request body, except for an MCP `tools/call`, whose arguments are the call (its
    /// JSON-RPC `id` changes from one try to the next).
    pub body: &'a [u8],
}

/// Hex SHA-256 of a call: every part of [`Call`], each length-prefixed, the arguments as
/// canonical JSON (serde_json's map keeps keys sorted: the crate is built without
/// `preserve_order`, and a test holds that). Two calls hash alike only if every part is
/// equal: another amount, query string, path, host, method or body is another call.
pub fn call_hash(c: &Call<'_>) -> String {
    let mut h = Sha256::new();
    h.update(b"aegis-call/v2\n");
    let args = c.arguments.to_string();
    for part in [
        c.tenant.as_bytes(),
        c.agent.as_bytes(),
        c.tool.as_bytes(),
        c.action.as_bytes(),
        c.resource.as_bytes(),
        args.as_bytes(),
        c.method.as_bytes(),
        c.host.as_bytes(),
        c.path.as_bytes(),
        c.body,
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    crate::hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call<'a>(args: &'a serde_json::Value) -> Call<'a> {
        Call {
            tenant: "acme",
            agent: "bot",
            tool: "payments",
            action: "create",
            resource: "",
            arguments: args,
            method: "POST",
            host: "tools.internal",
            path: "/mcp",
            body: b"",
        }
    }

    #[test]
    fn the_hash_binds_every_part_and_ignores_key_order() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"amount": 5000, "to": "acct-9"}"#).expect("json");
        let b: serde_json::Value =
            serde_json::from_str(r#"{"to": "acct-9", "amount": 5000}"#).expect("json");
        assert_eq!(call_hash(&call(&a)), call_hash(&call(&b)));
        let other = json!({"amount": 5001, "to": "acct-9"});
        assert_ne!(call_hash(&call(&a)), call_hash(&call(&other)));
        let base = call_hash(&call(&a));
        let changed = [
            Call {
                action: "refund",
                ..call(&a)
            },
            Call {
                path: "/mcp?to=attacker",
                ..call(&a)
            },
            Call {
                host: "evil.example",
                ..call(&a)
            },
            Call {
                method: "PUT",
                ..call(&a)
            },
            Call {
                body: b"{\"amount\":500000}",
                ..call(&a)
            },
            Call {
                resource: "acct-1",
                ..call(&a)
            },
        ];
        for c in &changed {
            assert_ne!(call_hash(c), base, "{c:?}");
        }
        // Length prefixes: moving a character between parts changes the hash.
        assert_ne!(
            call_hash(&Call {
                tool: "ab",
                action: "c",
                ..call(&a)
            }),
            call_hash(&Call {
                tool: "a",
                action: "bc",
                ..call(&a)
            })
        );
    }
}
