//! One controller's Raft node, on a thread of its own that owns its `RawNode`: it
//! ticks, steps messages from peers, takes proposals (only while leader), persists and
//! sends what each Ready holds, and applies committed commands to its state machine in
//! order. Every `snapshot_after` applied entries the state machine is snapshotted and
//! the log compacted; a follower too far behind is sent the snapshot.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use raft::prelude::{EntryType, Message, Snapshot};
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot};

use super::store::RaftStore;
use crate::error::{BrokerError, Result};

/// What the replicated log drives.
pub trait StateMachine: Send + 'static {
    /// Applies one committed command; the answer goes to its proposer.
    fn apply(&mut self, command: &[u8]) -> Vec<u8>;
    /// The whole state, for a snapshot.
    fn snapshot(&self) -> Vec<u8>;
    /// Replaces the state with a snapshot's.
    fn restore(&mut self, data: &[u8]) -> Result<()>;
}

/// Carries Raft messages to peers. Best effort: Raft retries what is lost.
pub trait Transport: Send + Sync + 'static {
    /// Sends each message to `message.to`.
    fn send(&self, messages: Vec<Message>);
}

/// A node's settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (non-zero).
    pub id: u64,
    /// Every voter's id, this node's included.
    pub voters: Vec<u64>,
    /// Where the Raft log lives.
    pub dir: PathBuf,
    /// One Raft tick.
    pub tick: Duration,
    /// Ticks without a leader before an election (randomised up to twice this).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots.
    pub snapshot_after: u64,
}

/// Where a node stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// This node.
    pub id: u64,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Its current term.
    pub term: u64,
    /// Highest committed index.
    pub commit: u64,
    /// Highest applied index.
    pub applied: u64,
    /// First index still in its log (entries before it are in the snapshot).
    pub first_index: u64,
}

impl NodeStatus {
    /// Whether this node leads.
    pub fn is_leader(&self) -> bool {
        self.leader == Some(self.id)
    }
}

enum Input {
    Propose {
        data: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>>>,
    },
    Step(Box<Message>),
    Status(oneshot::Sender<NodeStatus>),
    Stop(oneshot::Sender<()>),
}

/// Reaches a running node; cheap to clone.
#[derive(Debug, Clone)]
pub struct RaftHandle {
    id: u64,
    tx: mpsc::Sender<Input>,
}

impl RaftHandle {
    /// This node's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Proposes a command and waits until it is committed and applied here; only the
    /// leader accepts proposals. If leadership is lost first the answer is an error,
    /// though the command may still commit later.
    pub async fn propose(&self, data: Vec<u8>) -> Result<Vec<u8>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Propose { data, reply })
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        rx.await.map_err(|_| BrokerError::ShuttingDown)?
    }

    /// Hands the node a message from a peer; dropped if the node is swamped (Raft
    /// retries).
    pub fn step(&self, message: Message) {
        let _ = self.tx.try_send(Input::Step(Box::new(message)));
    }

    /// The node's status.
    pub async fn status(&self) -> Result<NodeStatus> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Status(reply))
            .await
            .map_err(|_| BrokerError::ShuttingDown)?;
        rx.await.map_err(|_| BrokerError::ShuttingDown)
    }

    /// Stops the node; its log stays on disk.
    pub async fn stop(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Input::Stop(reply)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Forwards raft-rs's slog records to `tracing`.
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        _values: &slog::OwnedKVList,
    ) -> std::result::Result<(), slog::Never> {
        let msg = record.msg().to_string();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{msg}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}"),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}"),
            slog::Level::Debug => tracing::debug!(target: "raft", "{msg}"),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}"),
        }
        Ok(())
    }
}

fn raft_err(e: raft::Error) -> BrokerError {
    BrokerError::Internal(format!("raft: {e}"))
}

/// Opens the node's log, restores its state machine from the latest snapshot, and
/// starts its task.
pub fn start<S: StateMachine>(
    config: NodeConfig,
    mut sm: S,
    transport: Arc<dyn Transport>,
) -> Result<RaftHandle> {
    let store = RaftStore::open(&config.dir, &config.voters)?;
    let snap = store.latest_snapshot().clone();
    if !snap.get_data().is_empty() {
        sm.restore(snap.get_data())?;
    }
    let raft_config = raft::Config {
        id: config.id,
        election_tick: config.election_ticks,
        heartbeat_tick: config.heartbeat_ticks,
        applied: snap.get_metadata().index,
        pre_vote: true,
        check_quorum: true,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        ..raft::Config::default()
    };
    raft_config.validate().map_err(raft_err)?;
    let logger = slog::Logger::root(TracingDrain, slog::o!("raft_id" => config.id));
    let raw = RawNode::new(&raft_config, store, &logger).map_err(raft_err)?;
    let (tx, rx) = mpsc::channel(4096);
    let node = Node {
        raw,
        sm,
        transport,
        pending: HashMap::new(),
        // Proposal ids must not repeat across restarts of this node.
        next_id: (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64))
            << 8,
        applied: snap.get_metadata().index,
        snapshot_after: config.snapshot_after.max(1),
    };
    // Its own thread: every commit fsyncs the Raft log and the hard state, and on a busy
    // disk an fsync takes milliseconds, which would stall whatever else shares a runtime
    // worker with it (on a small machine, every produce request).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| BrokerError::Internal(format!("starting the controller runtime: {e}")))?;
    let tick = config.tick;
    std::thread::Builder::new()
        .name(format!("raft-{}", config.id))
        .spawn(move || runtime.block_on(node.run(rx, tick)))
        .map_err(|e| BrokerError::Internal(format!("starting the controller thread: {e}")))?;
    Ok(RaftHandle { id: config.id, tx })
}

struct Node<S> {
    raw: RawNode<RaftStore>,
    sm: S,
    transport: Arc<dyn Transport>,
    pending: HashMap<u64, oneshot::Sender<Result<Vec<u8>>>>,
    next_id: u64,
    applied: u64,
    snapshot_after: u64,
}

impl<S: StateMachine> Node<S> {
    async fn run(mut self, mut rx: mpsc::Receiver<Input>, tick: Duration) {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.raw.tick();
                }
                input = rx.recv() => match input {
                    None => return,
                    Some(Input::Stop(reply)) => {
                        let _ = reply.send(());
                        return;
                    }
                    Some(input) => self.handle(input),
                },
            }
            if let Err(e) = self.on_ready() {
                // The log could not be written: stop rather than vote or lead on a
                // state that is not durable.
                tracing::error!(id = self.raw.raft.id, error = %e, "controller node stopped");
                self.fail_pending("the controller node stopped after a storage error");
                return;
            }
            if self.raw.raft.state != StateRole::Leader && !self.pending.is_empty() {
                self.fail_pending("leadership was lost before the proposal committed; retry");
            }
        }
    }

    fn status(&self) -> NodeStatus {
        let r = &self.raw.raft;
        NodeStatus {
            id: r.id,
            leader: (r.leader_id != 0).then_some(r.leader_id),
            term: r.term,
            commit: r.raft_log.committed,
            applied: self.applied,
            first_index: raft::Storage::first_index(self.raw.store()).unwrap_or(0),
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Propose { data, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let leader = self.raw.raft.leader_id;
                    let _ = reply.send(Err(BrokerError::NotController(
                        (leader != 0).then_some(leader),
                    )));
                    return;
                }
                self.next_id += 1;
                let id = self.next_id;
                let mut payload = id.to_be_bytes().to_vec();
                payload.extend_from_slice(&data);
                match self.raw.propose(Vec::new(), payload) {
                    Ok(()) => {
                        self.pending.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(raft_err(e)));
                    }
                }
            }
            Input::Step(m) => {
                // Messages from old terms or unknown peers are refused by raft itself.
                if let Err(e) = self.raw.step(*m) {
                    tracing::debug!(error = %e, "raft message refused");
                }
            }
            Input::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Input::Stop(_) => {}
        }
    }

    fn fail_pending(&mut self, why: &str) {
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(BrokerError::NotController(None)));
        }
        tracing::debug!(reason = why, "pending proposals failed");
    }

    fn on_ready(&mut self) -> Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        if *ready.snapshot() != Snapshot::default() {
            let snap = ready.snapshot().clone();
            self.raw.mut_store().apply_snapshot(&snap)?;
            self.sm.restore(snap.get_data())?;
            self.applied = snap.get_metadata().index;
        }
        self.apply(ready.take_committed_entries());
        if !ready.entries().is_empty() {
            self.raw.mut_store().append(ready.entries())?;
        }
        if let Some(hs) = ready.hs() {
            self.raw.mut_store().set_hard_state(hs)?;
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        let messages = light.take_messages();
        if !messages.is_empty() {
            self.transport.send(messages);
        }
        self.apply(light.take_committed_entries());
        self.raw.advance_apply();
        let snapshot_index = self.raw.store().latest_snapshot().get_metadata().index;
        if self.applied >= snapshot_index + self.snapshot_after {
            let data = self.sm.snapshot();
            self.raw.mut_store().compact(self.applied, data)?;
        }
        Ok(())
    }

    fn apply(&mut self, entries: Vec<raft::prelude::Entry>) {
        for e in entries {
            self.applied = e.index;
            // Empty entries are a new leader's no-op; membership is fixed by config.
            if e.get_data().is_empty() || e.get_entry_type() != EntryType::EntryNormal {
                continue;
            }
            let data = e.get_data();
            let Some((id, command)) = data.split_first_chunk::<8>() else {
                tracing::warn!(index = e.index, "skipping a malformed controller entry");
                continue;
            };
            let answer = self.sm.apply(command);
            if let Some(reply) = self.pending.remove(&u64::from_be_bytes(*id)) {
                let _ = reply.send(Ok(answer));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;

    /// A key-value state machine whose map the test can read.
    #[derive(Clone, Default)]
    struct Kv(Arc<Mutex<BTreeMap<String, String>>>);

    impl Kv {
        fn get(&self, k: &str) -> Option<String> {
            self.0.lock().ok()?.get(k).cloned()
        }
        fn len(&self) -> usize {
            self.0.lock().map_or(0, |m| m.len())
        }
    }

    impl StateMachine for Kv {
        fn apply(&mut self, command: &[u8]) -> Vec<u8> {
            let text = String::from_utf8_lossy(command);
            let Some((k, v)) = text.split_once('=') else {
                return b"bad".to_vec();
            };
            let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
            m.insert(k.to_string(), v.to_string())
                .unwrap_or_default()
                .into_bytes()
        }
        fn snapshot(&self) -> Vec<u8> {
            let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
            serde_json::to_vec(&*m).unwrap_or_default()
        }
        fn restore(&mut self, data: &[u8]) -> Result<()> {
            let restored: BTreeMap<String, String> =
                serde_json::from_slice(data).map_err(|e| BrokerError::Internal(e.to_string()))?;
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = restored;
            Ok(())
        }
    }

    /// Delivers messages between in-process nodes; a node marked down neither sends
    /// nor receives.
    #[derive(Default)]
    struct Router {
        nodes: Mutex<HashMap<u64, RaftHandle>>,
        down: Mutex<HashSet<u64>>,
    }

    impl Transport for Router {
        fn send(&self, messages: Vec<Message>) {
            let down = self.down.lock().map(|d| d.clone()).unwrap_or_default();
            let nodes = self.nodes.lock().map(|n| n.clone()).unwrap_or_default();
            for m in messages {
                if down.contains(&m.to) || down.contains(&m.from) {
                    continue;
                }
                if let Some(n) = nodes.get(&m.to) {
                    n.step(m);
                }
            }
        }
    }

    struct Cluster {
        dir: tempfile::TempDir,
        router: Arc<Router>,
        kvs: HashMap<u64, Kv>,
        snapshot_after: u64,
    }

    impl Cluster {
        fn new(snapshot_after: u64) -> Cluster {
            let mut c = Cluster {
                dir: tempfile::tempdir().expect("tempdir"),
                router: Arc::new(Router::default()),
                kvs: HashMap::new(),
                snapshot_after,
            };
            for id in 1..=3 {
                c.start(id);
            }
            c
        }

        fn start(&mut self, id: u64) {
            let kv = Kv::default();
            let config = NodeConfig {
                id,
                voters: vec![1, 2, 3],
                dir: self.dir.path().join(format!("node-{id}")),
                tick: Duration::from_millis(10),
                election_ticks: 10,
                heartbeat_ticks: 2,
                snapshot_after: self.snapshot_after,
            };
            let transport: Arc<dyn Transport> = self.router.clone();
            let h = start(config, kv.clone(), transport).expect("start node");
            self.router.nodes.lock().expect("nodes").insert(id, h);
            self.router.down.lock().expect("down").remove(&id);
            self.kvs.insert(id, kv);
        }

        async fn stop(&mut self, id: u64) {
            self.router.down.lock().expect("down").insert(id);
            let h = self.router.nodes.lock().expect("nodes").remove(&id);
            if let Some(h) = h {
                h.stop().await;
            }
        }

        fn handle(&self, id: u64) -> RaftHandle {
            self.router.nodes.lock().expect("nodes")[&id].clone()
        }

        async fn leader(&self, not: Option<u64>) -> RaftHandle {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let handles: Vec<RaftHandle> = self
                    .router
                    .nodes
                    .lock()
                    .expect("nodes")
                    .values()
                    .cloned()
                    .collect();
                for h in handles {
                    if Some(h.id()) == not {
                        continue;
                    }
                    if let Ok(s) = h.status().await {
                        if s.is_leader() {
                            return h;
                        }
                    }
                }
                assert!(Instant::now() < deadline, "no leader elected");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        async fn wait_until(&self, what: &str, check: impl Fn(&Cluster) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !check(self) {
                assert!(Instant::now() < deadline, "timed out: {what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    #[tokio::test]
    async fn three_nodes_elect_a_leader_and_apply_the_same_commands() {
        let c = Cluster::new(1000);
        let leader = c.leader(None).await;
        assert_eq!(leader.propose(b"a=1".to_vec()).await.expect("commit"), b"");
        assert_eq!(leader.propose(b"a=2".to_vec()).await.expect("commit"), b"1");
        c.wait_until("every node applied a=2", |c| {
            (1..=3).all(|id| c.kvs[&id].get("a").as_deref() == Some("2"))
        })
        .await;
        // A follower refuses proposals and names the leader.
        let follower = (1..=3).find(|&id| id != leader.id()).expect("a follower");
        match c.handle(follower).propose(b"x=1".to_vec()).await {
            Err(BrokerError::NotController(Some(l))) => assert_eq!(l, leader.id()),
            other => panic!("expected NotController, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_lost_leader_is_replaced_and_catches_up_when_it_returns() {
        let mut c = Cluster::new(1000);
        let old = c.leader(None).await;
        old.propose(b"a=1".to_vec()).await.expect("commit");
        c.stop(old.id()).await;
        let new = c.leader(Some(old.id())).await;
        assert_ne!(new.id(), old.id());
        new.propose(b"b=2".to_vec())
            .await
            .expect("commit under the new leader");
        // The old leader restarts from its own log and learns what it missed.
        c.start(old.id());
        c.wait_until("the returning node applied both commands", |c| {
            c.kvs[&old.id()].get("a").as_deref() == Some("1")
                && c.kvs[&old.id()].get("b").as_deref() == Some("2")
        })
        .await;
    }

    #[tokio::test]
    async fn a_node_behind_the_compacted_log_is_sent_a_snapshot() {
        let mut c = Cluster::new(5);
        let leader = c.leader(None).await;
        let behind = (1..=3).find(|&id| id != leader.id()).expect("a follower");
        c.stop(behind).await;
        for i in 0..30 {
            leader
                .propose(format!("k{i}={i}").into_bytes())
                .await
                .expect("commit with two of three");
        }
        let s = leader.status().await.expect("status");
        assert!(s.first_index > 10, "the leader compacted its log: {s:?}");
        c.start(behind);
        c.wait_until("the lagging node has all 30 keys", |c| {
            c.kvs[&behind].len() == 30
        })
        .await;
        // And its own log restarts after the snapshot it installed.
        let s = c.handle(behind).status().await.expect("status");
        assert!(s.first_index > 1, "{s:?}");
    }
}
