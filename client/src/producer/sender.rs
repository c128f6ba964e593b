//! The task that owns the produce stream: sends ready batches, matches answers, retries.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sluice_proto::v1::produce_service_client::ProduceServiceClient;
use sluice_proto::v1::{
    produce_stream_response, Acks as WireAcks, ProduceRequest, ProduceStreamRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::accumulator::{Accumulator, Acked, ReadyBatch};
use super::{Acks, ProducerConfig};
use crate::connection::MAX_MESSAGE_BYTES;
use crate::error::ClientError;

pub(crate) fn spawn(channel: Channel, acc: Arc<Accumulator>, config: ProducerConfig) {
    tokio::spawn(run(channel, acc, config));
}

fn wire_acks(a: Acks) -> i32 {
    match a {
        Acks::None => WireAcks::None as i32,
        Acks::Leader => WireAcks::Leader as i32,
        Acks::All => WireAcks::All as i32,
    }
}

fn backoff(config: &ProducerConfig, attempts: u32) -> Duration {
    let factor = 1u32 << attempts.min(4);
    (config.retry_backoff * factor).min(Duration::from_secs(1))
}

/// Retries `batch` if the error allows and time remains; otherwise fails it.
fn retry_or_fail(
    acc: &Accumulator,
    config: &ProducerConfig,
    mut batch: ReadyBatch,
    err: ClientError,
) {
    // NOT_LEADER is retriable for a client that re-routes to the new leader; this one
    // sends every batch to the broker it connected to, so retrying there only waits
    // out the delivery timeout. Fail at once and let the caller see which broker leads.
    let retriable = err.is_retriable()
        && err.reason() != Some(sluice_proto::ErrorReason::NotLeader)
        && batch.attempts < config.retries
        && batch.created.elapsed() < config.delivery_timeout;
    if retriable {
        batch.attempts += 1;
        tracing::debug!(topic = %batch.topic, partition = batch.partition, attempts = batch.attempts, error = %err, "retrying batch");
        let wait = backoff(config, batch.attempts);
        acc.requeue(batch, wait);
    } else {
        acc.complete(batch, Err(err));
    }
}

async fn run(channel: Channel, acc: Arc<Accumulator>, config: ProducerConfig) {
    let mut client = ProduceServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut next_id: u64 = 0;
    let mut in_flight: HashMap<u64, ReadyBatch> = HashMap::new();
    let timeout_ms = config.request_timeout.as_millis().min(u128::from(u32::MAX)) as u32;
    let mut reconnects = 0u32;
    loop {
        if Arc::strong_count(&acc) == 1 && acc.outstanding() == 0 {
            return;
        }
        let (req_tx, req_rx) = mpsc::channel::<ProduceStreamRequest>(config.max_in_flight.max(16));
        let mut responses = match client.produce_stream(ReceiverStream::new(req_rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let err = ClientError::from(status);
                tracing::warn!(error = %err, "cannot open the produce stream");
                // Nothing is in flight yet; fail or delay what is ready.
                let (ready, _) = acc.take_ready(usize::MAX);
                for b in ready {
                    retry_or_fail(&acc, &config, b, err.clone());
                }
                reconnects += 1;
                tokio::time::sleep(backoff(&config, reconnects)).await;
                continue;
            }
        };
        reconnects = 0;
        'stream: loop {
            let room = config.max_in_flight.saturating_sub(in_flight.len());
            let (ready, next_wake) = acc.take_ready(room);
            let mut ready = ready.into_iter();
            while let Some(b) = ready.next() {
                next_id += 1;
                let req = ProduceStreamRequest {
                    correlation_id: next_id,
                    request: Some(ProduceRequest {
                        topic: b.topic.to_string(),
                        partition: b.partition as i32,
                        records: b.bytes.clone(),
                        acks: wire_acks(config.acks),
                        timeout_ms,
                    }),
                };
                if req_tx.send(req).await.is_err() {
                    in_flight.insert(next_id, b);
                    for rest in ready {
                        acc.requeue(rest, Duration::ZERO);
                    }
                    break 'stream;
                }
                if config.acks == Acks::None {
                    acc.complete(
                        b,
                        Ok(Acked {
                            base_offset: None,
                            log_append_time: -1,
                        }),
                    );
                } else {
                    in_flight.insert(next_id, b);
                }
            }
            if in_flight.is_empty() && Arc::strong_count(&acc) == 1 && acc.outstanding() == 0 {
                return;
            }
            let sleep = tokio::time::sleep(
                next_wake
                    .map(|t| t.saturating_duration_since(tokio::time::Instant::now()))
                    .unwrap_or(Duration::from_millis(200)),
            );
            tokio::select! {
                _ = acc.wake.notified() => {}
                _ = sleep => {}
                msg = responses.next(), if !in_flight.is_empty() => match msg {
                    Some(Ok(resp)) => {
                        let Some(batch) = in_flight.remove(&resp.correlation_id) else { continue };
                        match resp.result {
                            Some(produce_stream_response::Result::Response(r)) => acc.complete(
                                batch,
                                Ok(Acked {
                                    base_offset: u64::try_from(r.base_offset).ok(),
                                    log_append_time: r.log_append_time,
                                }),
                            ),
                            Some(produce_stream_response::Result::Error(e)) => {
                                retry_or_fail(&acc, &config, batch, ClientError::from(&e));
                            }
                            None => acc.complete(
                                batch,
                                Err(ClientError::Batch("empty produce answer".into())),
                            ),
                        }
                    }
                    Some(Err(status)) => {
                        tracing::warn!(error = %status, "produce stream failed");
                        break 'stream;
                    }
                    None => break 'stream,
                },
            }
        }
        // The stream is gone: whatever was in flight may or may not have been written.
        for (_, b) in in_flight.drain() {
            let err = ClientError::Rpc {
                code: tonic::Code::Unavailable,
                message: "produce stream closed before the answer".into(),
            };
            retry_or_fail(&acc, &config, b, err);
        }
        reconnects += 1;
        tokio::time::sleep(backoff(&config, reconnects)).await;
    }
}
