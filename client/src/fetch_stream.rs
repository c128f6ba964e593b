//! A consumer's fetches as one `FetchStream` call per broker. The broker answers the
//! request that opened the call, then goes on from where each answer ended and sends
//! the next as soon as there is data, so a consumer that keeps up costs one message per
//! answer instead of a request and an answer, and no new call each time. A request sent
//! on the call later (after a seek, a new assignment or a new group epoch) replaces the
//! one before; answers name the request they follow, so one sent before the change is
//! dropped rather than read from the wrong place.

use std::collections::{BTreeMap, BTreeSet};

use sluice_log_store::BatchIter;
use sluice_proto::v1::fetch_service_client::FetchServiceClient;
use sluice_proto::v1::{FetchRequest, FetchResponse};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::Status;

use crate::connection::MAX_MESSAGE_BYTES;

/// Answers held for the consumer across its streams before their readers wait; with
/// HTTP/2's flow control this bounds what a consumer that stops polling keeps.
const AHEAD: usize = 2;
/// Requests queued on one call (a poll sends at most one).
const REQUESTS: usize = 4;

/// One broker's answer, or why its stream ended.
struct Answer {
    addr: String,
    stream: u64,
    result: Result<FetchResponse, Status>,
}

/// An open call to one broker.
struct Open {
    stream: u64,
    requests: mpsc::Sender<FetchRequest>,
    /// The last request sent; answers to any other are stale.
    id: u64,
    /// The request the broker goes on with after its last answer (request id aside):
    /// `None` after an answer with an error, which the broker waits to be asked again
    /// after.
    expect: Option<FetchRequest>,
    task: JoinHandle<()>,
}

/// The consumer's open calls, one per broker.
pub(crate) struct Streams {
    open: BTreeMap<String, Open>,
    next_id: u64,
    next_stream: u64,
    tx: mpsc::Sender<Answer>,
    rx: mpsc::Receiver<Answer>,
}

/// What an answer's request asked for, as the consumer's decoding wants it: each
/// partition with the offset asked for, in the request's (sorted) order.
pub(crate) type Asked = Vec<((String, u32), u64)>;

impl Streams {
    pub(crate) fn new() -> Self {
        let (tx, rx) = mpsc::channel(AHEAD);
        Streams {
            open: BTreeMap::new(),
            next_id: 0,
            next_stream: 0,
            tx,
            rx,
        }
    }

    /// Makes `request` the one `addr` answers: sent, unless the broker is already going
    /// on with the same one.
    pub(crate) fn ask(&mut self, addr: &str, channel: Channel, mut request: FetchRequest) {
        if let Some(open) = self.open.get(addr) {
            if open.expect.as_ref() == Some(&request) {
                return;
            }
        }
        self.next_id += 1;
        let id = self.next_id;
        let expect = request.clone();
        request.request_id = id;
        if let Some(open) = self.open.get_mut(addr) {
            if open.requests.try_send(request.clone()).is_ok() {
                open.id = id;
                open.expect = Some(expect);
                return;
            }
        }
        // No call yet, or one that can take no more: start afresh.
        self.close(addr);
        self.next_stream += 1;
        let stream = self.next_stream;
        let (requests, rx) = mpsc::channel(REQUESTS);
        let _ = requests.try_send(request);
        let task = tokio::spawn(pump(addr.to_string(), stream, channel, rx, self.tx.clone()));
        self.open.insert(
            addr.to_string(),
            Open {
                stream,
                requests,
                id,
                expect: Some(expect),
                task,
            },
        );
    }

    /// Ends the calls to brokers not in `keep`.
    pub(crate) fn retain(&mut self, keep: &BTreeSet<String>) {
        let gone: Vec<String> = self
            .open
            .keys()
            .filter(|a| !keep.contains(*a))
            .cloned()
            .collect();
        for addr in gone {
            self.close(&addr);
        }
    }

    /// Ends every call.
    pub(crate) fn clear(&mut self) {
        let all: Vec<String> = self.open.keys().cloned().collect();
        for addr in all {
            self.close(&addr);
        }
    }

    fn close(&mut self, addr: &str) {
        if let Some(open) = self.open.remove(addr) {
            open.task.abort();
        }
    }

    /// The next answer to a current request, waiting until `deadline`: the broker, and
    /// what it answered to what it was asked; an error ends that broker's call.
    pub(crate) async fn next(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Option<(String, Result<(FetchResponse, Asked), Status>)> {
        loop {
            let answer = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()??;
            let Some(open) = self.open.get_mut(&answer.addr) else {
                continue;
            };
            if open.stream != answer.stream {
                continue;
            }
            let response = match answer.result {
                Ok(r) => r,
                Err(status) => {
                    self.close(&answer.addr);
                    return Some((answer.addr, Err(status)));
                }
            };
            if response.request_id != open.id {
                continue;
            }
            let Some(asked) = open.expect.take() else {
                continue;
            };
            let want: Asked = asked
                .partitions
                .iter()
                .map(|p| {
                    (
                        (p.topic.clone(), p.partition.max(0) as u32),
                        p.fetch_offset.max(0) as u64,
                    )
                })
                .collect();
            if response.partitions.iter().all(|p| p.error.is_none()) {
                open.expect = Some(advanced(asked, &response));
            }
            return Some((answer.addr, Ok((response, want))));
        }
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.clear();
    }
}

/// `request` moved past the last batch `response` gave each partition, as the broker
/// moves it (the two list the same partitions in the same order).
fn advanced(mut request: FetchRequest, response: &FetchResponse) -> FetchRequest {
    for (asked, got) in request.partitions.iter_mut().zip(&response.partitions) {
        if let Some(end) = BatchIter::end_offset(&got.records) {
            let after = i64::try_from(end).unwrap_or(i64::MAX);
            asked.fetch_offset = asked.fetch_offset.max(after);
        }
    }
    request
}

/// Carries one call: the requests out, the answers to the consumer.
async fn pump(
    addr: String,
    stream: u64,
    channel: Channel,
    requests: mpsc::Receiver<FetchRequest>,
    out: mpsc::Sender<Answer>,
) {
    let mut client = FetchServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let outbound = futures_util::stream::unfold(requests, |mut rx| async move {
        rx.recv().await.map(|r| (r, rx))
    });
    let ended = match client.fetch_stream(outbound).await {
        Ok(answers) => {
            let mut answers = answers.into_inner();
            loop {
                match answers.message().await {
                    Ok(Some(response)) => {
                        let answer = Answer {
                            addr: addr.clone(),
                            stream,
                            result: Ok(response),
                        };
                        if out.send(answer).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break Status::unavailable("the broker ended the fetch stream"),
                    Err(status) => break status,
                }
            }
        }
        Err(status) => status,
    };
    let _ = out
        .send(Answer {
            addr,
            stream,
            result: Err(ended),
        })
        .await;
}
