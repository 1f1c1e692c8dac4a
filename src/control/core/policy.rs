//! Policy revisions: activate, list, roll back, fetch a bundle, reconcile at start-up.

use super::*;
use crate::control::records::Revision;
use crate::control::wire;

impl ControlCore {
    // --- policy ---

    /// Compiles and activates a bundle pushed by an operator.
    pub async fn activate_policy(
        &self,
        op: &Operator,
        req: pb::ActivatePolicyRequest,
    ) -> Result<pb::PolicyRevision, ControlError> {
        op.require(Need::Global, "")?;
        required_reason(&req.reason, "policy.activate")?;
        let bundle = req
            .bundle
            .ok_or_else(|| ControlError::invalid("no bundle in the request"))?;
        let files = BundleFiles::from(bundle);
        let compiled = self.compile(files.clone()).await?;
        self.install(compiled, &files, "push", &op.actor(), &req.reason)
            .await
    }

    /// The policy activations, newest first.
    pub async fn list_policy_revisions(
        &self,
        op: &Operator,
        req: pb::ListPolicyRevisionsRequest,
    ) -> Result<Vec<pb::PolicyRevision>, ControlError> {
        op.require(Need::Read, "")?;
        let limit = if req.limit == 0 { 50 } else { req.limit };
        let history = self.run(move |tx| rules::policy_history(tx, limit)).await?;
        Ok(history
            .into_iter()
            .enumerate()
            .map(|(i, r)| wire::revision(r, i == 0))
            .collect())
    }

    /// Reactivates an earlier revision.
    pub async fn rollback_policy(
        &self,
        op: &Operator,
        req: pb::RollbackPolicyRequest,
    ) -> Result<pb::PolicyRevision, ControlError> {
        op.require(Need::Global, "")?;
        required_reason(&req.reason, "policy.rollback")?;
        let history = self
            .run(move |tx| rules::policy_history(tx, 10_000))
            .await?;
        let current = history
            .first()
            .ok_or_else(|| ControlError::precondition("no policy revision has been activated"))?;
        let target = if req.to.is_empty() {
            history.iter().find(|r| r.digest != current.digest)
        } else {
            history
                .iter()
                .find(|r| r.id.to_string() == req.to)
                .or_else(|| {
                    history
                        .iter()
                        .find(|r| r.revision == req.to || r.digest == req.to)
                })
        };
        let target = target.ok_or_else(|| {
            if req.to.is_empty() {
                ControlError::precondition("no earlier revision to roll back to")
            } else {
                ControlError::not_found(format!("no policy revision {:?} in the history", req.to))
            }
        })?;
        if target.digest == current.digest {
            return Err(ControlError::precondition(format!(
                "revision {} ({}) is already active",
                target.revision, target.digest
            )));
        }
        let files = self.stored_bundle(&target.digest).await?;
        let compiled = self.compile(files.clone()).await?;
        self.install(compiled, &files, "rollback", &op.actor(), &req.reason)
            .await
    }

    /// A stored bundle by digest (a data plane's fetch).
    pub async fn bundle(&self, op: &Operator, digest: &str) -> Result<pb::Bundle, ControlError> {
        op.require(Need::Fleet, "")?;
        let files = self.stored_bundle(digest).await?;
        Ok(pb::Bundle::from(&files))
    }

    async fn stored_bundle(&self, digest: &str) -> Result<BundleFiles, ControlError> {
        let d = digest.to_owned();
        let bytes = self
            .run(move |tx| tx.bundle(&d))
            .await?
            .ok_or_else(|| ControlError::not_found(format!("no stored bundle {digest}")))?;
        let bundle = pb::Bundle::decode(bytes.as_slice()).map_err(|e| {
            ControlError::Store(format!("stored bundle {digest} is unreadable: {e}"))
        })?;
        Ok(BundleFiles::from(bundle))
    }

    async fn compile(&self, files: BundleFiles) -> Result<CompiledBundle, ControlError> {
        let opts = self.policy_opts.clone();
        tokio::task::spawn_blocking(move || {
            opts.verify(&files)?;
            files
                .parse()
                .and_then(|parsed| CompiledBundle::compile(parsed, &opts))
        })
        .await
        .map_err(join_err)?
        .map_err(|e| ControlError::invalid(format!("policy bundle refused: {e}")))
    }

    /// Records the activation, installs it locally (all-in-one) and publishes it.
    async fn install(
        &self,
        compiled: CompiledBundle,
        files: &BundleFiles,
        action: &'static str,
        actor: &str,
        reason: &str,
    ) -> Result<pb::PolicyRevision, ControlError> {
        let rev = Revision {
            id: 0,
            revision: compiled.revision().to_owned(),
            digest: compiled.digest().to_owned(),
            action: action.into(),
            actor: actor.to_owned(),
            reason: reason.to_owned(),
            activated_at: now_secs(),
        };
        let reads = compiled.reads().describe();
        let bytes = pb::Bundle::from(files).encode_to_vec();
        let revision = {
            let _guard = self.publish.lock().await;
            let r = rev.clone();
            let change = self
                .run(move |tx| rules::activate_policy(tx, &r, &bytes))
                .await?;
            if let Some(local) = &self.local
                && local.policy_digest() != compiled.digest()
            {
                local.install_policy(compiled);
            }
            self.pump().await?;
            change.value
        };
        let mut act = Act::new(actor, "policy.activate", "");
        act.target = format!(
            "policy:{} {} ({action})",
            revision.revision, revision.digest
        );
        act.reason = reason;
        act.revision = &revision.revision;
        self.record(act, None).await?;
        crate::log!(
            info,
            "policy revision {} ({}) activated by {actor} ({action}), reads {reads}",
            revision.revision,
            revision.digest
        );
        Ok(wire::revision(revision, true))
    }

    /// Start-up: reconciles the configured bundle with the stored history
    /// ([`rules::reconcile_policy`]): a bundle the history never saw is activated
    /// (`startup`); one activated before and superseded since (a push, a rollback, another
    /// replica's newer configuration) yields to the active revision, which is installed
    /// here. Going back to an earlier bundle is `aegis ctl policy rollback`.
    pub async fn reconcile_policy(
        &self,
        configured: Arc<CompiledBundle>,
        files: &BundleFiles,
    ) -> Result<(), ControlError> {
        let rev = Revision {
            id: 0,
            revision: configured.revision().to_owned(),
            digest: configured.digest().to_owned(),
            action: "startup".into(),
            actor: "system:startup".into(),
            reason: "startup: configured bundle".into(),
            activated_at: now_secs(),
        };
        let bytes = pb::Bundle::from(files).encode_to_vec();
        let outcome = {
            let _guard = self.publish.lock().await;
            let r = rev.clone();
            let outcome = self
                .run(move |tx| rules::reconcile_policy(tx, &r, &bytes))
                .await?;
            if let rules::Reconciled::Activated(_) = &outcome {
                self.pump().await?;
            }
            outcome
        };
        match outcome {
            rules::Reconciled::Active => Ok(()),
            rules::Reconciled::Activated(change) => {
                let revision = change.value;
                let mut act = Act::new("system:startup", "policy.activate", "");
                act.target = format!("policy:{} {} (startup)", revision.revision, revision.digest);
                act.reason = &revision.reason;
                act.revision = &revision.revision;
                self.record(act, None).await
            }
            rules::Reconciled::Superseded(active) => {
                crate::log!(
                    warn,
                    "policy: the configured bundle {} ({}) was activated before and superseded \
                     by revision {} ({}, {} by {}); running that. To go back to the configured \
                     one: aegis ctl policy rollback --to {}",
                    rev.revision,
                    rev.digest,
                    active.revision,
                    active.digest,
                    active.action,
                    active.actor,
                    rev.digest
                );
                let stored = self.stored_bundle(&active.digest).await?;
                let compiled = self.compile(stored).await?;
                if let Some(local) = &self.local {
                    local.install_policy(compiled);
                }
                Ok(())
            }
        }
    }

    /// Records a bundle the data plane has already installed (start-up, file watch).
    pub async fn record_activation(
        &self,
        compiled: Arc<CompiledBundle>,
        files: &BundleFiles,
        action: &'static str,
        actor: &str,
    ) -> Result<pb::PolicyRevision, ControlError> {
        let bytes = pb::Bundle::from(files).encode_to_vec();
        let rev = Revision {
            id: 0,
            revision: compiled.revision().to_owned(),
            digest: compiled.digest().to_owned(),
            action: action.into(),
            actor: actor.to_owned(),
            reason: format!("{action}: configured bundle"),
            activated_at: now_secs(),
        };
        let revision = self
            .publish(move |tx| rules::activate_policy(tx, &rev, &bytes))
            .await?;
        let mut act = Act::new(actor, "policy.activate", "");
        act.target = format!(
            "policy:{} {} ({action})",
            revision.revision, revision.digest
        );
        act.reason = &revision.reason;
        act.revision = &revision.revision;
        self.record(act, None).await?;
        Ok(wire::revision(revision, true))
    }
}
