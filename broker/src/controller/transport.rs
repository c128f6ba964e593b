//! Raft messages over the internal `ControllerService`: one queue and one sending task
//! per peer, so a slow or dead peer never holds up the others.

use std::collections::HashMap;
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::Message;
use sluice_proto::v1::controller_service_client::ControllerServiceClient;
use sluice_proto::v1::RaftBatch;
use tokio::sync::mpsc;

use super::node::Transport;

/// Messages queued per peer before new ones are dropped (Raft resends).
const QUEUE: usize = 4096;
/// Messages sent in one call.
const BATCH: usize = 256;

/// Sends to the other quorum members.
#[derive(Debug)]
pub struct GrpcTransport {
    peers: HashMap<u64, mpsc::Sender<Message>>,
}

impl GrpcTransport {
    /// Starts a sender per peer (`id`, `host:port`), this node excluded.
    pub fn start(self_id: u64, peers: &[(u64, String)]) -> GrpcTransport {
        let mut out = HashMap::new();
        for (id, addr) in peers {
            if *id == self_id {
                continue;
            }
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(send_loop(self_id, *id, addr.clone(), rx));
            out.insert(*id, tx);
        }
        GrpcTransport { peers: out }
    }
}

impl Transport for GrpcTransport {
    fn send(&self, messages: Vec<Message>) {
        for m in messages {
            if let Some(q) = self.peers.get(&m.to) {
                let _ = q.try_send(m);
            }
        }
    }
}

async fn send_loop(self_id: u64, peer: u64, addr: String, mut rx: mpsc::Receiver<Message>) {
    let endpoint = match crate::peer_endpoint(&addr, Duration::from_secs(5)) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(peer, address = %addr, error = %e, "bad controller peer address");
            return;
        }
    };
    let mut client = ControllerServiceClient::new(endpoint.connect_lazy());
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let messages: Vec<bytes::Bytes> = batch
            .iter()
            .filter_map(|m| m.write_to_bytes().ok().map(Into::into))
            .collect();
        if let Err(status) = client
            .raft(RaftBatch {
                from: self_id,
                messages,
            })
            .await
        {
            // Lost messages are Raft's to resend; back off so a dead peer costs little.
            tracing::debug!(peer, error = %status, "raft messages not delivered");
            tokio::time::sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
        }
    }
}
