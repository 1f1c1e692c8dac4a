//! How a data plane reaches the control plane from a Check: to raise an approval and to
//! redeem an override token. In the all-in-one server the core is called in-process; a
//! fleet sidecar calls the control plane over gRPC with its sidecar credential, bounded by
//! `control.request_timeout_ms`. Only `approval_needed` decisions and calls carrying an
//! override token take this path; every other Check decides from local state alone.

use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::ControlError;
use super::auth::Operator;
use super::core::{ControlCore, data_plane_operator};
use super::pb::{self, control_plane_client::ControlPlaneClient};

/// The data plane's way to the control plane.
#[derive(Debug, Clone)]
pub enum ControlLink {
    /// The core in this process.
    Local(Arc<ControlCore>, Arc<Operator>),
    /// A remote control plane.
    Remote(Box<Remote>),
}

/// A gRPC client with the sidecar's credential.
#[derive(Debug, Clone)]
pub struct Remote {
    client: ControlPlaneClient<Channel>,
    credential: MetadataValue<tonic::metadata::Ascii>,
    timeout: Duration,
}

impl ControlLink {
    /// The control core in this process; calls are made as the data plane's own operator.
    pub fn local(core: Arc<ControlCore>) -> Self {
        ControlLink::Local(core, Arc::new(data_plane_operator()))
    }

    /// A remote control plane over `channel`, with the sidecar's `credential`, each call bounded by
    /// `timeout`.
    pub fn remote(
        channel: Channel,
        credential: &str,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        let credential = format!("Bearer {credential}")
            .parse()
            .map_err(|_| ControlError::invalid("the control-plane credential is not ASCII"))?;
        Ok(ControlLink::Remote(Box::new(Remote {
            client: ControlPlaneClient::new(channel),
            credential,
            timeout,
        })))
    }

    /// Raises an approval for a call the policy held (`approval_needed`).
    pub async fn request_approval(
        &self,
        req: pb::RequestApprovalRequest,
    ) -> Result<pb::RequestApprovalResponse, ControlError> {
        match self {
            ControlLink::Local(core, op) => core.request_approval(op, req).await,
            ControlLink::Remote(r) => {
                let mut client = r.client.clone();
                r.call(req, |req| async move { client.request_approval(req).await })
                    .await
            }
        }
    }

    /// Reports a correlation finding as an incident.
    pub async fn report_incident(
        &self,
        req: pb::ReportIncidentRequest,
    ) -> Result<pb::Incident, ControlError> {
        match self {
            ControlLink::Local(core, op) => core.report_incident(op, req).await,
            ControlLink::Remote(r) => {
                let mut client = r.client.clone();
                r.call(req, |req| async move { client.report_incident(req).await })
                    .await
            }
        }
    }

    /// Redeems an override token for the call it was minted for.
    pub async fn redeem_override(
        &self,
        req: pb::RedeemOverrideRequest,
    ) -> Result<pb::RedeemOverrideResponse, ControlError> {
        match self {
            ControlLink::Local(core, op) => core.redeem_override(op, req).await,
            ControlLink::Remote(r) => {
                let mut client = r.client.clone();
                r.call(req, |req| async move { client.redeem_override(req).await })
                    .await
            }
        }
    }
}

impl Remote {
    async fn call<Q, A, F, Fut>(&self, body: Q, f: F) -> Result<A, ControlError>
    where
        F: FnOnce(tonic::Request<Q>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<A>, tonic::Status>>,
    {
        let mut req = tonic::Request::new(body);
        req.set_timeout(self.timeout);
        req.metadata_mut()
            .insert("authorization", self.credential.clone());
        match tokio::time::timeout(self.timeout, f(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(ControlError::Unavailable(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
            Err(_) => Err(ControlError::Unavailable(format!(
                "no answer within {:?} (control.request_timeout_ms)",
                self.timeout
            ))),
        }
    }
}
