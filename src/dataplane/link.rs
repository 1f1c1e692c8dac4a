//! The data plane's gRPC way to a remote control plane: [`Remote`] implements
//! [`ControlPlane`] with the sidecar's credential, each call bounded by
//! `control.request_timeout_ms`. In the all-in-one server the control core implements the
//! same trait in-process ([`crate::control::core::InProcessControl`]).

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use super::follow::ControlChannel;

use crate::control::ControlError;
use crate::control::pb::{self, control_plane_client::ControlPlaneClient};
use crate::seam::ControlPlane;

/// A gRPC client of the control plane with the sidecar's credential.
#[derive(Debug, Clone)]
pub struct Remote {
    channel: ControlChannel,
    credential: MetadataValue<tonic::metadata::Ascii>,
    timeout: Duration,
}

impl Remote {
    /// A client on `channel` sending `credential` as its bearer token. A call the control
    /// plane could not serve (`UNAVAILABLE`, or no answer in time) renews the channel, so
    /// the next call connects anew: behind a Service, perhaps to another replica.
    pub fn new(
        channel: ControlChannel,
        credential: &str,
        timeout: Duration,
    ) -> Result<Self, ControlError> {
        let credential = format!("Bearer {credential}")
            .parse()
            .map_err(|_| ControlError::invalid("the control-plane credential is not ASCII"))?;
        Ok(Remote {
            channel,
            credential,
            timeout,
        })
    }

    fn client(&self) -> ControlPlaneClient<Channel> {
        ControlPlaneClient::new(self.channel.get())
    }

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
            Ok(Err(status)) => {
                if status.code() == tonic::Code::Unavailable {
                    self.channel.renew();
                }
                Err(ControlError::Unavailable(format!(
                    "{:?}: {}",
                    status.code(),
                    status.message()
                )))
            }
            Err(_) => {
                self.channel.renew();
                Err(ControlError::Unavailable(format!(
                    "no answer within {:?} (control.request_timeout_ms)",
                    self.timeout
                )))
            }
        }
    }
}

#[async_trait::async_trait]
impl ControlPlane for Remote {
    async fn request_approval(
        &self,
        req: pb::RequestApprovalRequest,
    ) -> Result<pb::RequestApprovalResponse, ControlError> {
        let mut client = self.client();
        self.call(req, |req| async move { client.request_approval(req).await })
            .await
    }

    async fn report_incident(
        &self,
        req: pb::ReportIncidentRequest,
    ) -> Result<pb::Incident, ControlError> {
        let mut client = self.client();
        self.call(req, |req| async move { client.report_incident(req).await })
            .await
    }

    async fn redeem_override(
        &self,
        req: pb::RedeemOverrideRequest,
    ) -> Result<pb::RedeemOverrideResponse, ControlError> {
        let mut client = self.client();
        self.call(req, |req| async move { client.redeem_override(req).await })
            .await
    }
}
