//! Agent identity: EdDSA JWTs minted by the control plane (or `aegis token issue`).
//!
//! [`Identifier::identify`] runs on every Check: a verified-token cache keyed by the whole
//! token string spares the Ed25519 verification for a token seen before, but the time
//! claims and the revocation set are checked on every call, cached or not.

mod jwt;
mod revocation;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

pub use jwt::{mint, parse_and_verify};
pub use revocation::{KillTarget, RevocationEntries, Revocations, RevokedBy};

/// The claims of an agent token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Issuer; must equal the configured issuer.
    pub iss: String,
    /// Audience; must contain the configured audience.
    pub aud: Audience,
    /// The agent id.
    pub sub: String,
    /// The agent's tenant.
    pub tenant: String,
    /// Granted scopes, e.g. `invoices:read`.
    pub scopes: Vec<String>,
    /// Session id.
    pub sid: String,
    /// Token id (revocable).
    pub jti: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Not before, Unix seconds.
    pub nbf: i64,
    /// Expiry, Unix seconds.
    pub exp: i64,
}

/// `aud` as a single string or a list, as RFC 7519 allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// One audience.
    One(String),
    /// Several audiences; the token is for each of them.
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::One(a) => a == aud,
            Audience::Many(list) => list.iter().any(|a| a == aud),
        }
    }
}

/// Why a token was refused. Each maps to a stable, machine-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The request carries no agent token.
    #[error("no agent token in the request")]
    Missing,
    /// The token's length and the limit it passed, in bytes.
    #[error("agent token is {0} bytes, over the {1}-byte limit")]
    TooLarge(usize, usize),
    /// The token is not a well-formed JWT (which part is wrong).
    #[error("agent token is malformed: {0}")]
    Malformed(String),
    /// The header's `alg`, which is not `EdDSA`.
    #[error("agent token algorithm {0:?} is not accepted (only EdDSA)")]
    Algorithm(String),
    /// The header's `kid`, which names no trusted key.
    #[error("agent token key id {0:?} is not trusted")]
    UnknownKey(String),
    /// The signature does not verify under the key `kid` names.
    #[error("agent token signature does not verify")]
    BadSignature,
    /// The token's `exp`, Unix seconds, past the leeway.
    #[error("agent token expired at {0}")]
    Expired(i64),
    /// The token's `nbf`, Unix seconds, still ahead past the leeway.
    #[error("agent token not valid before {0}")]
    NotYetValid(i64),
    /// The audience this data plane expects, which `aud` does not hold.
    #[error("agent token audience does not include {0:?}")]
    WrongAudience(String),
    /// The token's `iss` and the issuer expected.
    #[error("agent token issuer {0:?} is not {1:?}")]
    WrongIssuer(String, String),
    /// The token is revoked, or a kill covers it (which).
    #[error("agent token revoked ({0})")]
    Revoked(RevokedBy),
    /// The token's `iat`, Unix seconds, ahead of the clock past the leeway.
    #[error("agent token issued at {0}, in the future (past the clock-skew leeway)")]
    IssuedInFuture(i64),
    /// `exp - iat` is over the configured maximum lifetime.
    #[error("agent token lifetime of {lifetime} s is over the {max} s limit")]
    LifetimeTooLong {
        /// `exp - iat`, seconds.
        lifetime: i64,
        /// The configured maximum lifetime, seconds.
        max: i64,
    },
    /// A claim that must be an id (`sub`, `tenant`, `sid`, `jti`) is not one.
    #[error("agent token claim {claim} {value} is not an id: {why}")]
    BadClaim {
        /// The claim's name.
        claim: &'static str,
        /// The claim's value, as sent.
        value: String,
        /// What makes it not an id.
        why: &'static str,
    },
}

impl TokenError {
    /// The reason code returned in `x-aegis-reason` and recorded in the audit row.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "token_missing",
            TokenError::TooLarge(..) => "token_too_large",
            TokenError::Malformed(_) => "token_malformed",
            TokenError::Algorithm(_) => "token_bad_algorithm",
            TokenError::UnknownKey(_) => "token_unknown_key",
            TokenError::BadSignature => "token_bad_signature",
            TokenError::Expired(_) => "token_expired",
            TokenError::NotYetValid(_) => "token_not_yet_valid",
            TokenError::WrongAudience(_) => "token_wrong_audience",
            TokenError::WrongIssuer(..) => "token_wrong_issuer",
            TokenError::Revoked(_) => "token_revoked",
            TokenError::IssuedInFuture(_) => "token_issued_in_future",
            TokenError::LifetimeTooLong { .. } => "token_lifetime_too_long",
            TokenError::BadClaim { .. } => "token_bad_claim",
        }
    }
}

/// A refused token, with its claims when its signature did verify (an expired, revoked or
/// misaddressed token still names a real agent, and the audit row should say which).
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Why the token was refused.
    pub error: TokenError,
    /// The token's claims if its signature verified; `None` if it never did.
    pub verified: Option<Arc<Claims>>,
}

impl From<TokenError> for Refusal {
    fn from(error: TokenError) -> Self {
        Self {
            error,
            verified: None,
        }
    }
}

/// What token verification checks against.
#[derive(Debug, Clone)]
pub struct TokenPolicy {
    /// Required `iss`.
    pub issuer: String,
    /// Required member of `aud`.
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: i64,
    /// Largest token accepted, in bytes.
    pub max_bytes: usize,
    /// Longest lifetime (`exp - iat`) accepted, in seconds (`control.max_token_ttl_secs`).
    pub max_lifetime_secs: i64,
}

/// The longest id claim accepted, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Why `value` cannot be an id claim (`sub`, `tenant`, `sid`, `jti`, a scope), if it
/// cannot: ids are compared byte for byte, so `"acme "` would be another tenant than
/// `"acme"`, and a control character would reach logs and audit rows. Tokens may come from
/// issuers other than Aegis (`token.trusted_keys`), so the rule is only what no id needs:
/// empty, over [`MAX_ID_BYTES`], whitespace or control characters.
pub fn id_claim_problem(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        Some("it is empty")
    } else if value.len() > MAX_ID_BYTES {
        Some("it is over 256 bytes")
    } else if value.chars().any(char::is_control) {
        Some("it contains a control character")
    } else if value.chars().any(char::is_whitespace) {
        Some("it contains whitespace")
    } else {
        None
    }
}

/// Trusted verification keys by key id.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: HashMap<String, VerifyingKey>,
}

impl KeyRing {
    /// Adds a key under its derived key id.
    pub fn insert(&mut self, key: VerifyingKey) {
        self.keys.insert(crate::keys::key_id(&key), key);
    }

    fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid)
    }
}

/// Verifies agent tokens, with a bounded verified-token cache and the revocation set.
#[derive(Debug)]
pub struct Identifier {
    keys: KeyRing,
    policy: TokenPolicy,
    revocations: Arc<Revocations>,
    cache: Mutex<HashMap<Box<str>, Arc<Claims>>>,
    cache_capacity: usize,
}

// === impl Identifier ===

impl Identifier {
    /// An identifier over `keys`, checking tokens against `policy` and `revocations`,
    /// caching up to `cache_capacity` verified tokens.
    pub fn new(
        keys: KeyRing,
        policy: TokenPolicy,
        revocations: Arc<Revocations>,
        cache_capacity: usize,
    ) -> Self {
        Self {
            keys,
            policy,
            revocations,
            cache: Mutex::new(HashMap::new()),
            cache_capacity,
        }
    }

    /// Verifies `token` at Unix time `now` and returns its claims.
    pub fn identify(&self, token: &str, now: i64) -> Result<Arc<Claims>, Refusal> {
        if token.len() > self.policy.max_bytes {
            return Err(TokenError::TooLarge(token.len(), self.policy.max_bytes).into());
        }
        let claims = match self.cached(token) {
            Some(claims) => claims,
            None => {
                let claims = Arc::new(parse_and_verify::<Claims>(token, &self.keys)?);
                self.remember(token, &claims);
                claims
            }
        };
        let refused = |error| Refusal {
            error,
            verified: Some(claims.clone()),
        };
        self.check_claims(&claims, now).map_err(refused)?;
        if let Some(by) = self.revocations.check(&claims) {
            return Err(refused(TokenError::Revoked(by)));
        }
        Ok(claims)
    }

    fn check_claims(&self, c: &Claims, now: i64) -> Result<(), TokenError> {
        let p = &self.policy;
        if c.iss != p.issuer {
            return Err(TokenError::WrongIssuer(c.iss.clone(), p.issuer.clone()));
        }
        if !c.aud.contains(&p.audience) {
            return Err(TokenError::WrongAudience(p.audience.clone()));
        }
        if now >= c.exp.saturating_add(p.leeway_secs) {
            return Err(TokenError::Expired(c.exp));
        }
        if now.saturating_add(p.leeway_secs) < c.nbf {
            return Err(TokenError::NotYetValid(c.nbf));
        }
        // A token "issued" later than now would outlive every kill mark set before its
        // iat (kill marks cover tokens issued before them).
        if now.saturating_add(p.leeway_secs) < c.iat {
            return Err(TokenError::IssuedInFuture(c.iat));
        }
        let lifetime = c.exp.saturating_sub(c.iat);
        if lifetime > p.max_lifetime_secs {
            return Err(TokenError::LifetimeTooLong {
                lifetime,
                max: p.max_lifetime_secs,
            });
        }
        let ids = [
            ("sub", &c.sub),
            ("tenant", &c.tenant),
            ("sid", &c.sid),
            ("jti", &c.jti),
        ];
        let scopes = c.scopes.iter().map(|s| ("scope", s));
        for (claim, value) in ids.into_iter().chain(scopes) {
            if let Some(why) = id_claim_problem(value) {
                return Err(TokenError::BadClaim {
                    claim,
                    value: crate::ids::shown(value),
                    why,
                });
            }
        }
        Ok(())
    }

    fn cached(&self, token: &str) -> Option<Arc<Claims>> {
        self.cache.lock().ok()?.get(token).cloned()
    }

    fn remember(&self, token: &str, claims: &Arc<Claims>) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= self.cache_capacity {
                // Bounded without bookkeeping: a full cache starts over. Tokens live minutes,
                // so the set of live tokens refills it at the cost of one verification each.
                cache.clear();
            }
            cache.insert(token.into(), claims.clone());
        }
    }
}
