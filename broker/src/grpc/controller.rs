//! `ControllerService`: Raft traffic between quorum members, and commands forwarded to
//! the active controller.

use protobuf::Message as _;
use raft::prelude::Message;
use sluice_proto::v1::controller_service_server::ControllerService;
use sluice_proto::v1::{ProposeRequest, ProposeResponse, RaftAck, RaftBatch};
use tonic::{Request, Response, Status};

use super::to_status;
use crate::controller::Controller;
use crate::error::BrokerError;

/// Serves `sluice.v1.ControllerService`.
#[derive(Debug, Clone)]
pub struct ControllerSvc {
    controller: Controller,
}

impl ControllerSvc {
    /// The service over this broker's controller.
    pub fn new(controller: Controller) -> Self {
        ControllerSvc { controller }
    }
}

#[tonic::async_trait]
impl ControllerService for ControllerSvc {
    async fn raft(&self, request: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let batch = request.into_inner();
        // raft-rs decodes with protobuf 2.x, which is not hardened against hostile
        // input: only configured quorum members are heard.
        if !self.controller.is_voter(batch.from) || batch.from == self.controller.id() {
            return Err(to_status(&BrokerError::InvalidRequest(format!(
                "node {} is not a member of this controller quorum",
                batch.from
            ))));
        }
        for bytes in &batch.messages {
            let Ok(m) = Message::parse_from_bytes(bytes) else {
                continue;
            };
            if m.from == batch.from && m.to == self.controller.id() {
                self.controller.node().step(m);
            }
        }
        Ok(Response::new(RaftAck {}))
    }

    async fn propose(
        &self,
        request: Request<ProposeRequest>,
    ) -> Result<Response<ProposeResponse>, Status> {
        let answer = self
            .controller
            .node()
            .propose(request.into_inner().command.to_vec())
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(ProposeResponse {
            answer: answer.into(),
        }))
    }
}
