//! The stages before enforcement: decode → identify → build → evaluate.
//!
//! Each takes the previous one's output and either hands on its own or ends the Check
//! with a [`Judged`]: Aegis's own answer (a refused request or token, or its failure), or
//! a contained agent, whose call the policy is not asked about. Nothing here does I/O;
//! the evaluation runs on the policy's evaluation threads.

use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::CheckRequest;

use super::enforce::{self, Evaluated, Judged};
use super::input::{self, Decoded, InputError};
use super::{Call, CheckError, Checker, TokenSource, http_of};
use crate::dataplane::state::AgentContext;
use crate::identity::{Claims, Refusal, TokenError};
use crate::policy::CompiledBundle;

/// What decode hands on: the token's verdict and the decoded request, each acted on later
/// (a refused token or a request that cannot be parsed is answered after identify).
struct Received<'r> {
    identity: Result<Arc<Claims>, Refusal>,
    decoded: Result<Decoded<'r>, InputError>,
    /// The bundle the request was decoded against (its route catalogue) and is decided by.
    bundle: Arc<CompiledBundle>,
}

/// A verified agent that is not contained, and its control state.
struct Subject {
    claims: Arc<Claims>,
    agent: AgentContext,
}

/// The policy's input document, with what the stages after evaluate need.
struct Input<'r> {
    doc: regorus::Value,
    decoded: Decoded<'r>,
    bundle: Arc<CompiledBundle>,
    subject: Subject,
}

// === impl Checker ===

impl Checker {
    /// decode → identify → build → evaluate: the policy's decision, or why the Check ended
    /// before the policy decided. Pure computation, no I/O; the evaluation runs on the
    /// policy's evaluation threads (see [`crate::policy::pool`]).
    pub(super) async fn judge<'r>(
        &self,
        req: &'r CheckRequest,
        call: &mut Call,
        now_ns: i64,
    ) -> Result<Evaluated<'r>, Judged> {
        let received = self.decode(req, call, now_ns)?;
        let subject = self.identify(received.identity, call)?;
        let input = self.build(req, received.decoded, received.bundle, subject, call)?;
        self.evaluate(input).await
    }

    /// Decode: the request's headers and body as its route says to read them. The token is
    /// read and verified here, while the headers are at hand (the body decode takes them);
    /// what a refusal means is identify's business, and a body that cannot be decoded is
    /// refused only after identify (a contained agent gets its containment reason).
    fn decode<'r>(
        &self,
        req: &'r CheckRequest,
        call: &mut Call,
        now_ns: i64,
    ) -> Result<Received<'r>, Judged> {
        if !self.control.state.synced() {
            // A fleet sidecar that has never had the control plane's state cannot know
            // which tokens are revoked or agents frozen: it fails closed.
            return Err(Judged::Refused(CheckError::ControlUnsynced));
        }
        let http = http_of(req).ok_or(Judged::Refused(CheckError::Input(InputError::NoHttp)))?;
        let headers = input::decode_headers(http, &self.limits)
            .map_err(|e| Judged::Refused(CheckError::from(e)))?;
        let identity = self
            .token(&headers)
            .map_err(Refusal::from)
            .and_then(|t| self.identifier.identify(t, now_ns / 1_000_000_000));
        let bundle = self.policy.current();
        let routes = input::RouteConfig::of(req, bundle.routes());
        let decoded = input::decode_with_headers(http, headers, routes, &self.limits);
        if let Ok(d) = &decoded {
            call.set_tool(d);
        }
        Ok(Received {
            identity,
            decoded,
            bundle,
        })
    }

    /// Identify: who calls, and the agent's control state. A refused token is denied (401),
    /// but a revoked token of a frozen or revoked agent gets the agent's status as its
    /// reason, the more telling one (an agent's revocation also kills its tokens). A
    /// contained agent goes no further: enforce's first step answers it.
    fn identify(
        &self,
        identity: Result<Arc<Claims>, Refusal>,
        call: &mut Call,
    ) -> Result<Subject, Judged> {
        let claims = match identity {
            Ok(c) => c,
            Err(refusal) => {
                let contained = match (&refusal.error, &refusal.verified) {
                    (TokenError::Revoked(_), Some(c)) => {
                        enforce::containment(self.control.state.agent(c).status)
                    }
                    _ => None,
                };
                call.claims = refusal.verified;
                return Err(match contained {
                    Some(reason) => Judged::Contained(reason),
                    None => Judged::Refused(CheckError::Token(refusal.error)),
                });
            }
        };
        call.claims = Some(claims.clone());
        let agent = self.control.state.agent(&claims);
        if let Some(reason) = enforce::containment(agent.status) {
            return Err(Judged::Contained(reason));
        }
        Ok(Subject { claims, agent })
    }

    /// Build: the policy's input document, for a request that decoded. A route whose
    /// labels are wrong fails the Check (the platform's fault: Envoy's `status_on_error`
    /// answers and the operator sees the cause); any other decode error is a denial.
    fn build<'r>(
        &self,
        req: &CheckRequest,
        decoded: Result<Decoded<'r>, InputError>,
        bundle: Arc<CompiledBundle>,
        subject: Subject,
        call: &mut Call,
    ) -> Result<Input<'r>, Judged> {
        let decoded = decoded.map_err(|e| Judged::Refused(CheckError::from(e)))?;
        call.policy_revision = bundle.revision().to_owned();
        // An override token and the agent's claims about its call never reach the tool,
        // whatever becomes of the call.
        call.strip_headers = std::iter::once(crate::control::approvals::OVERRIDE_HEADER)
            .chain(input::CLAIM_HEADERS)
            .filter(|h| decoded.header(h).is_some())
            .collect();
        // Only what the bundle can read: a policy cannot see a key it never names.
        let doc = input::build(
            req.attributes.as_ref(),
            &decoded,
            &subject.claims,
            &subject.agent,
            bundle.reads(),
        );
        Ok(Input {
            doc,
            decoded,
            bundle,
            subject,
        })
    }

    /// Evaluate: the policy's decision, on the policy's evaluation threads.
    async fn evaluate<'r>(&self, input: Input<'r>) -> Result<Evaluated<'r>, Judged> {
        let Input {
            doc,
            decoded,
            bundle,
            subject,
        } = input;
        let result = self.policy.evaluate(bundle.clone(), doc).await;
        self.policy.note_evaluation(result.is_ok());
        let decision = result.map_err(|e| Judged::Refused(CheckError::Policy(e)))?;
        Ok(Evaluated {
            decision,
            claims: subject.claims,
            agent: subject.agent,
            decoded,
            bundle,
        })
    }

    /// The agent token from the configured header.
    fn token<'h>(
        &self,
        headers: &'h std::collections::HashMap<String, String>,
    ) -> Result<&'h str, TokenError> {
        let value = headers
            .get(self.token_source.header())
            .map(|v| v.trim())
            .filter(|v| !v.is_empty());
        let value = value.ok_or(TokenError::Missing)?;
        match self.token_source {
            TokenSource::Header(_) => Ok(value),
            TokenSource::Bearer => match value.split_once(' ') {
                Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(token.trim()),
                _ => Err(TokenError::Malformed(
                    "authorization header is not a Bearer token".into(),
                )),
            },
        }
    }
}
