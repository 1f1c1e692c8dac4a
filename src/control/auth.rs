//! Operator credentials and what each role may do.
//!
//! An operator credential is an EdDSA JWT signed by the control plane's key (minted by
//! `aegis operator issue`), with its own audience (`aegis-control`) so an agent token can
//! never pass for one and the other way round. It names the operator, a role and a tenant
//! (`*`: all tenants).
//!
//! A sidecar credential names the tenants its data plane serves (`--tenant acme --tenant
//! globex`, carried as `acme,globex`), never `*`: every agent pod holds its sidecar's
//! credential, so a credential for every tenant would let any compromised pod watch every
//! tenant's state and raise approvals and incidents (freezes, kills) against any of them.
//! A `*` sidecar credential minted before this rule is refused with the way out (issue one
//! per tenant). The only all-tenant data plane is the all-in-one server's own, in process,
//! which holds no credential. There is deliberately no opt-in for a fleet-wide sidecar: a
//! gateway shared by several tenants lists them, so serving one more is a deliberate re-issue.
//!
//! | role | may |
//! |---|---|
//! | viewer | read everything of its tenant |
//! | approver | + approve and deny approvals |
//! | operator | + agents, tokens, kills, budgets |
//! | admin | + tenant settings; with `*`: policy activation and rollback, kill of everything |
//! | sidecar | only the fleet calls (watch, bundles, approvals raised, overrides redeemed, incidents reported), for its own tenants |

use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataMap;

use super::ControlError;
use crate::identity::{KeyRing, TokenError, mint, parse_and_verify};
use crate::keys::Signer;

/// The audience of operator credentials.
pub const OPERATOR_AUDIENCE: &str = "aegis-control";

/// The tenant value that means every tenant.
pub const ALL_TENANTS: &str = "*";

/// What separates the tenants of a sidecar credential's `tenant` claim (never part of a
/// tenant id, see [`super::valid_id`]).
pub const TENANT_SEPARATOR: char = ',';

/// An operator's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Role {
    /// Reads the tenant's state.
    Viewer,
    /// A viewer who also answers approvals.
    Approver,
    /// An approver who also changes agents, tokens, kills and budgets.
    Operator,
    /// An operator who also changes tenant settings (with `*`: policy and kill of everything).
    Admin,
    /// A fleet sidecar: not an operator rank, only the fleet calls.
    Sidecar,
}

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Read the tenant's state.
    Read,
    /// Approve or deny approvals.
    Approve,
    /// Change agents, tokens, kills and budgets.
    Operate,
    /// Change tenant settings.
    Administer,
    /// Change what every tenant shares (policy, kill of everything): admin of `*`.
    Global,
    /// The fleet calls: sidecar credentials only.
    Fleet,
}

/// The claims of an operator credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorClaims {
    /// The control plane that issued the credential.
    pub iss: String,
    /// Always [`OPERATOR_AUDIENCE`].
    pub aud: String,
    /// The operator's name.
    pub sub: String,
    /// The role's name ([`Role::as_str`]).
    pub role: String,
    /// A tenant, or `*`; a sidecar's tenants, comma-separated.
    pub tenant: String,
    /// The credential's id, unique per issue.
    pub jti: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expiry, Unix seconds.
    pub exp: i64,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// The operator's name (the credential's `sub`), as the audit log records it.
    pub name: String,
    /// What the operator may do.
    pub role: Role,
    /// A tenant or `*`; for a sidecar, its tenants comma-separated (see [`Self::tenants`]).
    pub tenant: String,
    /// When the credential expires, Unix seconds.
    pub expires_at: i64,
}

/// Verifies operator credentials.
#[derive(Debug, Clone)]
pub struct Authenticator {
    keys: KeyRing,
    issuer: String,
    leeway_secs: i64,
}

// === impl Role ===

impl Role {
    /// The role's name in credentials and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Approver => "approver",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Sidecar => "sidecar",
        }
    }

    /// The role named `s`; `None` for an unknown name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "viewer" => Role::Viewer,
            "approver" => Role::Approver,
            "operator" => Role::Operator,
            "admin" => Role::Admin,
            "sidecar" => Role::Sidecar,
            _ => return None,
        })
    }

    fn allows(self, need: Need) -> bool {
        match (self, need) {
            (Role::Sidecar, Need::Fleet) => true,
            (Role::Sidecar, _) | (_, Need::Fleet) => false,
            (_, Need::Read) => true,
            (r, Need::Approve) => r >= Role::Approver,
            (r, Need::Operate) => r >= Role::Operator,
            (r, Need::Administer | Need::Global) => r == Role::Admin,
        }
    }
}

// === impl Operator ===

impl Operator {
    /// `role:name`, as audit rows record the actor.
    pub fn actor(&self) -> String {
        format!("{}:{}", self.role.as_str(), self.name)
    }

    /// Whether this operator may see `tenant` at all.
    pub fn sees(&self, tenant: &str) -> bool {
        self.tenant == ALL_TENANTS || self.tenants().any(|t| t == tenant)
    }

    /// The tenants the credential names (one, except for a sidecar serving several).
    pub fn tenants(&self) -> impl Iterator<Item = &str> {
        self.tenant.split(TENANT_SEPARATOR)
    }

    /// The tenants whose state this caller may follow (`None`: every tenant).
    pub fn scope(&self) -> Option<Vec<String>> {
        (self.tenant != ALL_TENANTS).then(|| self.tenants().map(str::to_owned).collect())
    }

    /// The tenant a list call covers: the one asked for, else the operator's own (`None`:
    /// every tenant).
    pub fn list_scope(&self, asked: &str) -> Result<Option<String>, ControlError> {
        if asked.is_empty() {
            return Ok((self.tenant != ALL_TENANTS).then(|| self.tenant.clone()));
        }
        self.require(Need::Read, asked)?;
        Ok(Some(asked.to_owned()))
    }

    /// The tenant an action on one tenant's object applies to: the one asked for, else the
    /// operator's own; an all-tenant operator must name one.
    pub fn tenant_for(&self, asked: &str) -> Result<String, ControlError> {
        match (asked.is_empty(), self.tenant == ALL_TENANTS) {
            (false, _) => Ok(asked.to_owned()),
            (true, false) => Ok(self.tenant.clone()),
            (true, true) => Err(ControlError::invalid(
                "name a tenant: this credential covers every tenant",
            )),
        }
    }

    /// Refuses unless the role allows `need` on `tenant` (`""` for calls on no tenant).
    pub fn require(&self, need: Need, tenant: &str) -> Result<(), ControlError> {
        if !self.role.allows(need) {
            let what = match need {
                Need::Read => "read control-plane state",
                Need::Approve => "approve or deny approvals",
                Need::Operate => "change agents, tokens, kills or budgets",
                Need::Administer => "change tenant settings",
                Need::Global => "change what every tenant shares",
                Need::Fleet => "make the fleet calls",
            };
            return Err(ControlError::permission_denied(format!(
                "{} ({}) may not {what}",
                self.name,
                self.role.as_str()
            )));
        }
        if need == Need::Global && self.tenant != ALL_TENANTS {
            return Err(ControlError::permission_denied(format!(
                "{} is scoped to tenant {}: this needs an admin of every tenant",
                self.name, self.tenant
            )));
        }
        if !tenant.is_empty() && !self.sees(tenant) {
            let whose = if self.role == Role::Sidecar {
                "sidecar credential serves tenant(s)"
            } else {
                "is scoped to tenant"
            };
            return Err(ControlError::permission_denied(format!(
                "{} {whose} {}, not {tenant}",
                self.name, self.tenant
            )));
        }
        Ok(())
    }
}

// === impl Authenticator ===

impl Authenticator {
    /// An authenticator trusting `keys`, expecting `issuer`, allowing `leeway_secs` of clock skew.
    pub fn new(keys: KeyRing, issuer: String, leeway_secs: i64) -> Self {
        Self {
            keys,
            issuer,
            leeway_secs,
        }
    }

    /// The operator behind `authorization: Bearer <credential>`.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Operator, ControlError> {
        let value = metadata
            .get("authorization")
            .ok_or_else(|| {
                ControlError::unauthenticated(
                    "no operator credential: send authorization: Bearer <token> \
                     (aegis operator issue mints one)",
                )
            })?
            .to_str()
            .map_err(|_| ControlError::unauthenticated("authorization header is not ASCII"))?;
        let token = match value.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
            _ => {
                return Err(ControlError::unauthenticated(
                    "authorization header is not a Bearer credential",
                ));
            }
        };
        self.verify(token, super::now_secs())
    }

    /// Verifies an operator credential at `now`.
    pub fn verify(&self, token: &str, now: i64) -> Result<Operator, ControlError> {
        let bad = |e: TokenError| {
            ControlError::unauthenticated(format!(
                "operator credential refused: {}",
                e.to_string().replace("agent token", "credential")
            ))
        };
        if token.len() > 8192 {
            return Err(ControlError::unauthenticated(
                "operator credential refused: over 8192 bytes",
            ));
        }
        let c: OperatorClaims = parse_and_verify(token, &self.keys).map_err(bad)?;
        if c.aud != OPERATOR_AUDIENCE {
            return Err(ControlError::unauthenticated(format!(
                "operator credential refused: audience {:?} is not {OPERATOR_AUDIENCE:?} \
                 (an agent token is not an operator credential)",
                c.aud
            )));
        }
        if c.iss != self.issuer {
            return Err(ControlError::unauthenticated(format!(
                "operator credential refused: issuer {:?} is not {:?}",
                c.iss, self.issuer
            )));
        }
        if now >= c.exp.saturating_add(self.leeway_secs) {
            return Err(ControlError::unauthenticated(format!(
                "operator credential refused: expired at {}",
                c.exp
            )));
        }
        if now.saturating_add(self.leeway_secs) < c.iat {
            return Err(ControlError::unauthenticated(format!(
                "operator credential refused: issued at {}, in the future",
                c.iat
            )));
        }
        for (claim, value) in [("sub", &c.sub), ("jti", &c.jti)] {
            if let Some(why) = crate::identity::id_claim_problem(value) {
                return Err(ControlError::unauthenticated(format!(
                    "operator credential refused: claim {claim} {} is not an id: {why}",
                    super::shown(value)
                )));
            }
        }
        let role = Role::parse(&c.role).ok_or_else(|| {
            ControlError::unauthenticated(format!(
                "operator credential refused: unknown role {:?}",
                c.role
            ))
        })?;
        if role == Role::Sidecar {
            sidecar_tenants(&c.tenant).map_err(|e| {
                ControlError::unauthenticated(format!(
                    "operator credential refused: sidecar credential {:?}: {e}",
                    c.sub
                ))
            })?;
        } else if c.tenant != ALL_TENANTS {
            // One tenant (a list is a sidecar's only: `sees` would read "acme,globex" as
            // both), as `mint_operator` writes it.
            super::valid_id("tenant", &c.tenant).map_err(|e| {
                ControlError::unauthenticated(format!("operator credential refused: {e}"))
            })?;
        }
        Ok(Operator {
            name: c.sub,
            role,
            tenant: c.tenant,
            expires_at: c.exp,
        })
    }
}

/// Mints an operator credential.
pub fn mint_operator(
    signer: &Signer,
    issuer: &str,
    name: &str,
    role: Role,
    tenant: &str,
    ttl_secs: u64,
) -> Result<String, ControlError> {
    super::valid_id("operator name", name)?;
    let tenant = if role == Role::Sidecar {
        sidecar_tenants(tenant)?.join(",")
    } else {
        if tenant != ALL_TENANTS {
            super::valid_id("tenant", tenant)?;
        }
        tenant.to_owned()
    };
    let now = super::now_secs();
    let claims = OperatorClaims {
        iss: issuer.to_owned(),
        aud: OPERATOR_AUDIENCE.to_owned(),
        sub: name.to_owned(),
        role: role.as_str().to_owned(),
        tenant,
        jti: super::random_id("op-"),
        iat: now,
        exp: now.saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX)),
    };
    mint(signer, &claims).map_err(|e| ControlError::invalid(format!("mint: {e}")))
}

/// The tenants a sidecar's own credential names, read (not verified: the sidecar holds no
/// control-plane key) so that the sidecar decides only for them; the control plane
/// verifies it on every call. Refuses anything but a sidecar credential naming tenants.
pub fn own_sidecar_tenants(credential: &str) -> Result<Vec<String>, String> {
    use base64::Engine as _;
    let payload = credential
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .ok()
        })
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p).ok())
        .ok_or("the sidecar credential is not a JWT (aegis operator issue --role sidecar)")?;
    let text = |name: &str| {
        payload
            .get(name)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
    };
    let role = text("role");
    if role != Role::Sidecar.as_str() {
        return Err(format!(
            "the sidecar credential has role {role:?}, not sidecar \
             (aegis operator issue --role sidecar --tenant <tenant>)"
        ));
    }
    sidecar_tenants(text("tenant")).map_err(|e| e.to_string())
}

/// The tenants of a sidecar credential (`acme` or `acme,globex`): each a valid tenant id,
/// none repeated, never `*` (see the module docs).
pub fn sidecar_tenants(list: &str) -> Result<Vec<String>, ControlError> {
    let mut tenants: Vec<String> = Vec::new();
    for t in list.split(TENANT_SEPARATOR).map(str::trim) {
        if t == ALL_TENANTS {
            return Err(ControlError::invalid(
                "a sidecar credential for every tenant ('*') is no longer accepted: every \
                 agent pod holds its sidecar's credential. Issue one per tenant the sidecar \
                 serves: aegis operator issue --role sidecar --tenant <tenant> \
                 [--tenant <tenant> ...]",
            ));
        }
        super::valid_id("tenant", t)?;
        if !tenants.iter().any(|seen| seen == t) {
            tenants.push(t.to_owned());
        }
    }
    Ok(tenants)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(role: Role, tenant: &str) -> Operator {
        Operator {
            name: "alice".into(),
            role,
            tenant: tenant.into(),
            expires_at: i64::MAX,
        }
    }

    #[test]
    fn roles_and_tenants() {
        let viewer = op(Role::Viewer, "acme");
        assert!(viewer.require(Need::Read, "acme").is_ok());
        assert!(viewer.require(Need::Operate, "acme").is_err());
        assert!(viewer.require(Need::Read, "globex").is_err());
        let approver = op(Role::Approver, "acme");
        assert!(approver.require(Need::Approve, "acme").is_ok());
        assert!(approver.require(Need::Operate, "acme").is_err());
        let operator = op(Role::Operator, "acme");
        assert!(operator.require(Need::Operate, "acme").is_ok());
        assert!(operator.require(Need::Administer, "acme").is_err());
        let admin = op(Role::Admin, "acme");
        assert!(admin.require(Need::Administer, "acme").is_ok());
        assert!(admin.require(Need::Global, "").is_err());
        assert!(admin.require(Need::Fleet, "").is_err());
        let root = op(Role::Admin, ALL_TENANTS);
        assert!(root.require(Need::Global, "").is_ok());
        assert!(root.require(Need::Operate, "globex").is_ok());
        let sidecar = op(Role::Sidecar, "acme,globex");
        assert!(sidecar.require(Need::Fleet, "").is_ok());
        assert!(sidecar.require(Need::Fleet, "acme").is_ok());
        assert!(sidecar.require(Need::Fleet, "globex").is_ok());
        assert!(sidecar.require(Need::Fleet, "initech").is_err());
        assert!(sidecar.require(Need::Fleet, "acme,globex").is_err());
        assert!(sidecar.require(Need::Read, "acme").is_err());
        assert_eq!(sidecar.scope(), Some(vec!["acme".into(), "globex".into()]));
    }

    #[test]
    fn credentials_verify_and_refuse() {
        let signer = Signer::generate().expect("rng");
        let mut keys = KeyRing::default();
        keys.insert(signer.verifying_key());
        let auth = Authenticator::new(keys, "aegis".into(), 0);
        let t = mint_operator(&signer, "aegis", "alice", Role::Operator, "acme", 60).expect("mint");
        let o = auth.verify(&t, super::super::now_secs()).expect("valid");
        assert_eq!(
            (o.name.as_str(), o.role, o.tenant.as_str()),
            ("alice", Role::Operator, "acme")
        );
        assert!(auth.verify(&t, i64::MAX - 1).is_err(), "expired");
        let other = Signer::generate().expect("rng");
        let forged = mint_operator(&other, "aegis", "mallory", Role::Admin, "*", 60).expect("mint");
        assert!(matches!(
            auth.verify(&forged, 0),
            Err(ControlError::Unauthenticated(_))
        ));
        // Claims only a key holder could write, refused all the same (defence in depth):
        // an iat in the future, an operator name with a newline, a tenant with a space.
        let now = super::super::now_secs();
        let base = OperatorClaims {
            iss: "aegis".into(),
            aud: OPERATOR_AUDIENCE.into(),
            sub: "alice".into(),
            role: "operator".into(),
            tenant: "acme".into(),
            jti: "op-1".into(),
            iat: now,
            exp: now + 60,
        };
        let cases = [
            (
                OperatorClaims {
                    iat: now + 3600,
                    exp: now + 7200,
                    ..base.clone()
                },
                "in the future",
            ),
            (
                OperatorClaims {
                    sub: "alice\nadmin".into(),
                    ..base.clone()
                },
                "claim sub",
            ),
            (
                OperatorClaims {
                    tenant: "acme ".into(),
                    ..base.clone()
                },
                "tenant \"acme \"",
            ),
            (
                OperatorClaims {
                    tenant: "acme,globex".into(),
                    ..base.clone()
                },
                "tenant \"acme,globex\"",
            ),
        ];
        for (claims, want) in cases {
            let t = crate::identity::mint(&signer, &claims).expect("mint");
            let e = auth.verify(&t, now).expect_err(want);
            assert!(e.to_string().contains(want), "{e}");
        }
        let t = crate::identity::mint(&signer, &base).expect("mint");
        assert!(auth.verify(&t, now).is_ok());
    }

    #[test]
    fn sidecar_credentials_name_their_tenants() {
        let signer = Signer::generate().expect("rng");
        let mut keys = KeyRing::default();
        keys.insert(signer.verifying_key());
        let auth = Authenticator::new(keys, "aegis".into(), 0);
        let now = super::super::now_secs();
        let t = mint_operator(
            &signer,
            "aegis",
            "sc",
            Role::Sidecar,
            "acme,globex,acme",
            60,
        )
        .expect("mint");
        let o = auth.verify(&t, now).expect("valid");
        assert_eq!(o.tenant, "acme,globex");
        for bad in ["*", "acme,*", "", "acme,", "ac me"] {
            let e = mint_operator(&signer, "aegis", "sc", Role::Sidecar, bad, 60).expect_err(bad);
            assert!(matches!(e, ControlError::Invalid(_)), "{bad}: {e}");
        }
        // One minted before the rule (claims written by hand) is refused, naming the way out.
        let claims = OperatorClaims {
            iss: "aegis".into(),
            aud: OPERATOR_AUDIENCE.into(),
            sub: "old".into(),
            role: "sidecar".into(),
            tenant: ALL_TENANTS.into(),
            jti: "op-1".into(),
            iat: now,
            exp: now + 60,
        };
        let old = mint(&signer, &claims).expect("mint");
        let e = auth.verify(&old, now).expect_err("all-tenant sidecar");
        assert!(
            matches!(&e, ControlError::Unauthenticated(m) if m.contains("--role sidecar --tenant")),
            "{e}"
        );
    }
}
