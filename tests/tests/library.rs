//! End to end through the client library against real brokers over gRPC on 127.0.0.1.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_client::{
    Acks, Admin, ClientError, Consumer, ConsumerConfig, ErrorReason, NewTopic, OffsetReset,
    Producer, ProducerConfig, ProducerRecord,
};
use sluice_log_store::{Compression, RecordBatchBuilder};
use sluice_proto::v1::fetch_service_client::FetchServiceClient;
use sluice_proto::v1::produce_service_client::ProduceServiceClient;
use sluice_proto::v1::{
    produce_stream_response, Acks as WireAcks, FetchPartition, FetchRequest, ProduceRequest,
    ProduceStreamRequest,
};
use sluice_tests::broker::InProcessBroker;
use tonic::Code;

fn producer_config(addr: &str) -> ProducerConfig {
    ProducerConfig {
        brokers: addr.to_string(),
        ..ProducerConfig::default()
    }
}

fn consumer_config(addr: &str) -> ConsumerConfig {
    ConsumerConfig {
        brokers: addr.to_string(),
        auto_offset_reset: OffsetReset::Earliest,
        ..ConsumerConfig::default()
    }
}

async fn consume_n(consumer: &mut Consumer, n: usize) -> Vec<sluice_client::ConsumerRecord> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} records arrived",
            out.len()
        );
        out.extend(
            consumer
                .poll(Duration::from_millis(500))
                .await
                .expect("poll"),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_round_trip_in_per_key_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("orders", 3))
        .await
        .expect("create");

    let producer = Producer::connect(producer_config(&addr))
        .await
        .expect("producer");
    let mut deliveries = Vec::new();
    for i in 0..5000u32 {
        let key = format!("customer-{}", i % 50);
        let value = format!("{key}:{i}");
        let d = producer
            .send(ProducerRecord::new("orders", value).key(key.clone()))
            .await
            .expect("send");
        deliveries.push((key, d));
    }
    producer.flush().await.expect("flush");
    let mut partition_of_key: HashMap<String, u32> = HashMap::new();
    for (key, d) in deliveries {
        let meta = d.await.expect("delivered");
        assert!(meta.offset.is_some());
        let p = *partition_of_key.entry(key).or_insert(meta.partition);
        assert_eq!(p, meta.partition, "one key, one partition");
    }
    let used: std::collections::HashSet<_> = partition_of_key.values().collect();
    assert!(used.len() > 1, "keys spread over partitions");

    let mut consumer = Consumer::connect(consumer_config(&addr))
        .await
        .expect("consumer");
    consumer.assign_topic("orders").await.expect("assign");
    let records = consume_n(&mut consumer, 5000).await;
    assert_eq!(records.len(), 5000);
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    for r in &records {
        let value = String::from_utf8(r.value.clone().expect("value").to_vec()).expect("utf8");
        let (key, seq) = value.split_once(':').expect("key:seq");
        assert_eq!(r.key.as_deref(), Some(key.as_bytes()));
        assert_eq!(partition_of_key[key], r.partition);
        let seq: i64 = seq.parse().expect("seq");
        let prev = last_seq.insert(key.to_string(), seq).unwrap_or(-1);
        assert!(seq > prev, "per-key order: {key} saw {seq} after {prev}");
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_on_new_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    Admin::connect(&addr)
        .await
        .expect("admin")
        .create_topic(NewTopic::new("wake", 1))
        .await
        .expect("create");
    let mut consumer = Consumer::connect(ConsumerConfig {
        fetch_max_wait: Duration::from_secs(20),
        ..consumer_config(&addr)
    })
    .await
    .expect("consumer");
    consumer.assign([("wake".to_string(), 0)]);
    consumer.seek_to_end().await.expect("seek");
    let started = Instant::now();
    let poll = tokio::spawn(async move {
        let r = consumer.poll(Duration::from_secs(20)).await;
        (r, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let producer = Producer::connect(producer_config(&addr))
        .await
        .expect("producer");
    producer
        .send(ProducerRecord::new("wake", "ping"))
        .await
        .expect("send")
        .await
        .expect("delivered");
    let (records, waited) = tokio::time::timeout(Duration::from_secs(25), poll)
        .await
        .expect("poll returns")
        .expect("join");
    let records = records.expect("poll ok");
    assert_eq!(records.len(), 1);
    assert!(
        waited >= Duration::from_millis(250),
        "it really waited: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "woke on data, not the timeout: {waited:?}"
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_long_poll_waits_its_time_and_returns_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    Admin::connect(&addr)
        .await
        .expect("admin")
        .create_topic(NewTopic::new("idle", 1))
        .await
        .expect("create");
    let mut fetch = FetchServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let started = Instant::now();
    let resp = fetch
        .fetch(FetchRequest {
            partitions: vec![FetchPartition {
                topic: "idle".into(),
                partition: 0,
                fetch_offset: 0,
                partition_max_bytes: 0,
            }],
            max_wait_ms: 700,
            min_bytes: 1,
            max_bytes: 0,
            member: None,
            request_id: 0,
        })
        .await
        .expect("fetch")
        .into_inner();
    let waited = started.elapsed();
    assert!(resp.partitions[0].records.is_empty());
    assert!(waited >= Duration::from_millis(650), "{waited:?}");
    broker.stop().await;
}

fn expect_reason(err: ClientError, reason: ErrorReason, code: Code) -> ClientError {
    match &err {
        ClientError::Broker {
            reason: r, code: c, ..
        } => {
            assert_eq!((*r, *c), (reason, code), "{err}");
        }
        other => panic!("expected {reason:?}, got {other:?}"),
    }
    err
}

fn batch(n: u32, value_size: usize) -> Bytes {
    let mut b = RecordBatchBuilder::new(Compression::None);
    let v = vec![b'x'; value_size];
    for _ in 0..n {
        b.append(1, None, Some(&v), &[]);
    }
    b.build().expect("build")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_reason_comes_from_a_real_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("t", 1).config("max.message.bytes", "2048"))
        .await
        .expect("create");

    let err = admin
        .create_topic(NewTopic::new("t", 1))
        .await
        .expect_err("exists");
    expect_reason(err, ErrorReason::TopicExists, Code::AlreadyExists);
    let err = admin
        .create_topic(NewTopic::new("bad/name", 1))
        .await
        .expect_err("name");
    expect_reason(err, ErrorReason::InvalidTopic, Code::InvalidArgument);
    let err = admin
        .create_topic(NewTopic::new("cfg", 1).config("retention.ms", "soon"))
        .await
        .expect_err("config");
    expect_reason(err, ErrorReason::InvalidConfig, Code::InvalidArgument);
    let err = admin
        .create_topic(NewTopic {
            replication_factor: 3,
            ..NewTopic::new("rf", 1)
        })
        .await
        .expect_err("rf");
    expect_reason(
        err,
        ErrorReason::InvalidReplicationFactor,
        Code::InvalidArgument,
    );
    let err = admin.create_partitions("t", 1).await.expect_err("shrink");
    expect_reason(err, ErrorReason::InvalidPartitions, Code::InvalidArgument);
    let err = admin.describe_topic("nope").await.expect_err("unknown");
    expect_reason(err, ErrorReason::UnknownTopicOrPartition, Code::NotFound);

    let mut produce = ProduceServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let req = |topic: &str, partition: i32, records: Bytes| ProduceRequest {
        topic: topic.into(),
        partition,
        records,
        acks: 0,
        timeout_ms: 0,
    };
    let err = produce
        .produce(req("nope", 0, batch(1, 10)))
        .await
        .expect_err("unknown topic");
    expect_reason(
        err.into(),
        ErrorReason::UnknownTopicOrPartition,
        Code::NotFound,
    );
    let err = produce
        .produce(req("t", 7, batch(1, 10)))
        .await
        .expect_err("unknown partition");
    expect_reason(
        err.into(),
        ErrorReason::UnknownTopicOrPartition,
        Code::NotFound,
    );
    let err = produce
        .produce(req("t", 0, batch(10, 500)))
        .await
        .expect_err("too large");
    let err = expect_reason(
        err.into(),
        ErrorReason::MessageTooLarge,
        Code::InvalidArgument,
    );
    assert_eq!(err.metadata_u64("max_message_bytes"), Some(2048));
    let mut corrupt = batch(3, 10).to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    let err = produce
        .produce(req("t", 0, Bytes::from(corrupt)))
        .await
        .expect_err("corrupt");
    expect_reason(
        err.into(),
        ErrorReason::CorruptMessage,
        Code::InvalidArgument,
    );
    let err = produce
        .produce(req("t", 0, Bytes::from_static(b"not a batch")))
        .await
        .expect_err("garbage");
    expect_reason(
        err.into(),
        ErrorReason::CorruptMessage,
        Code::InvalidArgument,
    );

    // Nothing above reached the log.
    let ok = produce
        .produce(req("t", 0, batch(4, 10)))
        .await
        .expect("good batch")
        .into_inner();
    assert_eq!((ok.base_offset, ok.last_offset), (0, 3));

    let mut fetch = FetchServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let resp = fetch
        .fetch(FetchRequest {
            partitions: vec![FetchPartition {
                topic: "t".into(),
                partition: 0,
                fetch_offset: 99,
                partition_max_bytes: 0,
            }],
            max_wait_ms: 0,
            min_bytes: 1,
            max_bytes: 0,
            member: None,
            request_id: 0,
        })
        .await
        .expect("fetch")
        .into_inner();
    let err = ClientError::from(resp.partitions[0].error.as_ref().expect("error"));
    let err = expect_reason(err, ErrorReason::OffsetOutOfRange, Code::OutOfRange);
    assert_eq!(err.metadata_u64("log_start_offset"), Some(0));
    assert_eq!(err.metadata_u64("high_watermark"), Some(4));

    // min.insync.replicas above what one node can give: acks=all is refused, nothing written.
    admin
        .create_topic(NewTopic::new("strict", 1).config("min.insync.replicas", "2"))
        .await
        .expect("create strict");
    let mut all = req("strict", 0, batch(2, 10));
    all.acks = sluice_proto::v1::Acks::All as i32;
    let err = produce.produce(all).await.expect_err("not enough replicas");
    expect_reason(
        err.into(),
        ErrorReason::NotEnoughReplicas,
        Code::Unavailable,
    );
    let d = admin.describe_topic("strict").await.expect("describe");
    assert_eq!(d.partitions[0].log_end_offset, 0, "nothing half-written");
    broker.stop().await;
}

/// The next answer on a fetch stream, within 10 s.
async fn next_answer(
    answers: &mut tonic::Streaming<sluice_proto::v1::FetchResponse>,
    what: &str,
) -> sluice_proto::v1::FetchResponse {
    tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .unwrap_or_else(|_| panic!("{what}: an answer within 10 s"))
        .expect("the stream stays up")
        .unwrap_or_else(|| panic!("{what}: the stream ended"))
}

/// `FetchStream` goes on from where each answer ended without being asked again, a
/// new request replaces the positions (its answers name it), an error stops the
/// answers until the client asks anew, and the call ends cleanly when the client does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_stream_answers_as_records_arrive_and_follows_the_latest_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("live", 1))
        .await
        .expect("create");
    let mut produce = ProduceServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let produce_batch = |n: u32| ProduceRequest {
        topic: "live".into(),
        partition: 0,
        records: batch(n, 10),
        acks: WireAcks::Leader as i32,
        timeout_ms: 0,
    };
    let ask = |id: u64, offset: i64| FetchRequest {
        partitions: vec![FetchPartition {
            topic: "live".into(),
            partition: 0,
            fetch_offset: offset,
            partition_max_bytes: 0,
        }],
        max_wait_ms: 200,
        min_bytes: 1,
        max_bytes: 0,
        member: None,
        request_id: id,
    };
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    let outbound = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut fetch = FetchServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    requests.send(ask(1, 0)).await.expect("ask");
    let mut answers = fetch
        .fetch_stream(outbound)
        .await
        .expect("stream opens")
        .into_inner();
    // The base offsets of the batches an answer holds.
    let first_offset = |r: &sluice_proto::v1::FetchResponse| -> Vec<u64> {
        sluice_log_store::BatchIter::new(r.partitions[0].records.clone())
            .map(|b| b.expect("a whole batch").header().base_offset)
            .collect()
    };

    // Nothing yet: the call waits (empty answers are not sent) until records arrive,
    // then each answer goes on from the last without another request.
    for (n, base) in [(3, 0), (2, 3), (4, 5)] {
        produce.produce(produce_batch(n)).await.expect("produce");
        let answer = next_answer(&mut answers, "after a produce").await;
        assert_eq!(answer.request_id, 1);
        assert_eq!(first_offset(&answer), vec![base], "no gap and no repeat");
        assert!(answer.partitions[0].error.is_none());
    }

    // A new request replaces the positions; its answers carry its id.
    requests.send(ask(2, 3)).await.expect("ask again");
    let answer = next_answer(&mut answers, "after a new request").await;
    assert_eq!(answer.request_id, 2);
    assert_eq!(first_offset(&answer), vec![3, 5]);

    // An error is answered, and then nothing more until the client asks anew.
    requests.send(ask(3, 99)).await.expect("ask out of range");
    let answer = next_answer(&mut answers, "out of range").await;
    assert_eq!(answer.request_id, 3);
    let error = answer.partitions[0].error.clone().expect("an error");
    assert_eq!(
        ClientError::from(&error).reason(),
        Some(ErrorReason::OffsetOutOfRange)
    );
    produce.produce(produce_batch(1)).await.expect("produce");
    assert!(
        tokio::time::timeout(Duration::from_millis(600), answers.message())
            .await
            .is_err(),
        "no answer after an error until asked"
    );
    requests.send(ask(4, 9)).await.expect("ask from the end");
    let answer = next_answer(&mut answers, "after the error").await;
    assert_eq!(answer.request_id, 4);
    assert_eq!(first_offset(&answer), vec![9]);

    // The client is done asking: the call ends with an OK status.
    drop(requests);
    let end = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("the end within 10 s");
    assert!(matches!(end, Ok(None)), "a clean end, got {end:?}");
}

/// Under a `max_bytes` smaller than the partitions have to give, a fetch stream serves
/// them in turn (each answer starts after the last partition the one before served, as
/// Kafka's fetch sessions do) rather than the first until it is read to the end, no
/// answer passes `max_bytes` with a second partition's batch, and every batch still
/// arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_stream_under_a_small_max_bytes_serves_partitions_in_turn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("turns", 3))
        .await
        .expect("create");
    let mut produce = ProduceServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    const BATCHES: u64 = 6;
    let batch_len = batch(10, 100).len();
    for partition in 0..3 {
        for _ in 0..BATCHES {
            produce
                .produce(ProduceRequest {
                    topic: "turns".into(),
                    partition,
                    records: batch(10, 100),
                    acks: WireAcks::Leader as i32,
                    timeout_ms: 0,
                })
                .await
                .expect("produce");
        }
    }
    // Room for two batches and a half: two from one partition, then no room for the
    // next partition's first.
    let max_bytes = batch_len * 5 / 2;
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    let outbound = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut fetch = FetchServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    requests
        .send(FetchRequest {
            partitions: (0..3)
                .map(|partition| FetchPartition {
                    topic: "turns".into(),
                    partition,
                    fetch_offset: 0,
                    partition_max_bytes: 0,
                })
                .collect(),
            max_wait_ms: 200,
            min_bytes: 1,
            max_bytes: max_bytes as u32,
            member: None,
            request_id: 1,
        })
        .await
        .expect("ask");
    let mut answers = fetch
        .fetch_stream(outbound)
        .await
        .expect("stream opens")
        .into_inner();

    let mut served = Vec::new();
    let mut next_base = [0u64; 3];
    while next_base.iter().any(|&b| b < BATCHES * 10) {
        let answer = next_answer(&mut answers, "while records remain").await;
        let total: usize = answer.partitions.iter().map(|p| p.records.len()).sum();
        assert!(
            total <= max_bytes,
            "{total} bytes in an answer of at most {max_bytes}"
        );
        let mut partitions = Vec::new();
        for p in &answer.partitions {
            assert!(p.error.is_none(), "{:?}", p.error);
            let i = p.partition as usize;
            for b in sluice_log_store::BatchIter::new(p.records.clone()) {
                let base = b.expect("a whole batch").header().base_offset;
                assert_eq!(base, next_base[i], "partition {i}: no gap and no repeat");
                next_base[i] += 10;
            }
            if !p.records.is_empty() {
                partitions.push(i);
            }
        }
        assert_eq!(partitions.len(), 1, "one partition's batches per answer");
        served.push(partitions[0]);
        assert!(served.len() <= 9, "answers: {served:?}");
    }
    assert_eq!(
        served,
        vec![0, 1, 2, 0, 1, 2, 0, 1, 2],
        "partitions served in turn"
    );
}

/// The broker reads produce streams from the HTTP/2 frames itself; a stock gRPC client
/// (one frame per message, unlike Sluice's producer) must get the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_grpc_client_streams_batches_and_gets_every_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("s", 1))
        .await
        .expect("create");
    let mut produce = ProduceServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let item = |id: u64, records: Bytes| ProduceStreamRequest {
        correlation_id: id,
        request: Some(ProduceRequest {
            topic: "s".into(),
            partition: 0,
            records,
            acks: WireAcks::Leader as i32,
            timeout_ms: 0,
        }),
    };
    let mut corrupt = batch(2, 10).to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 1;
    let items = vec![
        item(1, batch(3, 10)),
        item(2, Bytes::from(corrupt)),
        ProduceStreamRequest {
            correlation_id: 3,
            request: None,
        },
        // Larger than HTTP/2's default frame, so the server's frame size matters.
        item(4, batch(2, 100_000)),
    ];
    let mut answers = produce
        .produce_stream(tonic::codegen::tokio_stream::iter(items))
        .await
        .expect("stream opens")
        .into_inner();
    let mut got = HashMap::new();
    while got.len() < 4 {
        let answer = tokio::time::timeout(Duration::from_secs(30), answers.message())
            .await
            .expect("an answer within 30 s")
            .expect("stream stays up")
            .unwrap_or_else(|| panic!("four answers, got {got:?}"));
        got.insert(answer.correlation_id, answer.result.expect("a result"));
    }
    let offsets = |id: u64| match &got[&id] {
        produce_stream_response::Result::Response(r) => (r.base_offset, r.last_offset),
        other => panic!("item {id}: {other:?}"),
    };
    let reason = |id: u64| match &got[&id] {
        produce_stream_response::Result::Error(e) => ClientError::from(e).reason(),
        other => panic!("item {id}: {other:?}"),
    };
    assert_eq!(offsets(1), (0, 2));
    assert_eq!(reason(2), Some(ErrorReason::CorruptMessage));
    assert_eq!(reason(3), Some(ErrorReason::InvalidRequest));
    assert_eq!(offsets(4), (3, 4), "the bad items took no offsets");

    // Compressed messages are refused as a whole, before any is read.
    let mut compressed = tonic::Request::new(tonic::codegen::tokio_stream::iter(vec![item(
        5,
        batch(1, 10),
    )]));
    compressed
        .metadata_mut()
        .insert("grpc-encoding", "gzip".parse().expect("ascii"));
    let err = produce
        .produce_stream(compressed)
        .await
        .expect_err("gzip is not accepted");
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_and_records_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("keep", 2).config("retention.ms", "3d"))
        .await
        .expect("create");
    let producer = Producer::connect(ProducerConfig {
        acks: Acks::All,
        ..producer_config(&addr)
    })
    .await
    .expect("producer");
    for i in 0..100 {
        producer
            .send(ProducerRecord::new("keep", format!("v{i}")).partition(i % 2))
            .await
            .expect("send");
    }
    producer.flush().await.expect("flush");
    drop(producer);
    broker.stop().await;

    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    let d = admin.describe_topic("keep").await.expect("describe");
    assert_eq!(d.partitions.len(), 2);
    assert_eq!(d.configs["retention.ms"], "259200000");
    assert_eq!(
        d.partitions.iter().map(|p| p.high_watermark).sum::<i64>(),
        100
    );
    let mut consumer = Consumer::connect(consumer_config(&addr))
        .await
        .expect("consumer");
    consumer.assign_topic("keep").await.expect("assign");
    assert_eq!(consume_n(&mut consumer, 100).await.len(), 100);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_create_topics_only_where_the_broker_allows_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let strict = InProcessBroker::start(&dir.path().join("strict"), |_| {}).await;
    let producer = Producer::connect(producer_config(&strict.address()))
        .await
        .expect("producer");
    let err = producer
        .send(ProducerRecord::new("nowhere", "x"))
        .await
        .expect_err("unknown topic");
    expect_reason(err, ErrorReason::UnknownTopicOrPartition, Code::NotFound);
    let admin = Admin::connect(&strict.address()).await.expect("admin");
    let listed = admin.list_topics().await.expect("list");
    assert!(
        listed.iter().all(|t| t.internal),
        "only internal topics exist: {listed:?}"
    );
    strict.stop().await;

    let open = InProcessBroker::start(&dir.path().join("open"), |c| {
        c.auto_create_topics = true;
        c.default_partitions = 2;
    })
    .await;
    let producer = Producer::connect(producer_config(&open.address()))
        .await
        .expect("producer");
    let meta = producer
        .send(ProducerRecord::new("made-on-demand", "x").key("k"))
        .await
        .expect("send")
        .await
        .expect("acked");
    assert_eq!(meta.offset, Some(0));
    let admin = Admin::connect(&open.address()).await.expect("admin");
    let d = admin
        .describe_topic("made-on-demand")
        .await
        .expect("exists");
    assert_eq!(d.partitions.len(), 2);
    open.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seek_discards_the_answers_sent_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("replay", 1))
        .await
        .expect("create");
    let producer = Producer::connect(ProducerConfig {
        acks: Acks::Leader,
        batch_size: 1024,
        ..producer_config(&addr)
    })
    .await
    .expect("producer");
    for i in 0..2000 {
        let _ = producer
            .send(ProducerRecord::new("replay", format!("v{i}")))
            .await
            .expect("send");
    }
    producer.flush().await.expect("flush");
    let mut consumer = Consumer::connect(ConsumerConfig {
        // Small fetches: the first poll cannot reach the end, so the broker is still
        // streaming answers from there when the seek comes.
        max_partition_fetch_bytes: 4096,
        ..consumer_config(&addr)
    })
    .await
    .expect("consumer");
    consumer.assign([("replay".to_string(), 0)]);
    let first = consume_n(&mut consumer, 1).await;
    assert_eq!(first[0].offset, 0);
    let reached = first.last().expect("records").offset;
    assert!(reached < 1999, "one small fetch read everything");
    consumer.seek(&("replay".to_string(), 0), 5).expect("seek");
    let again = consume_n(&mut consumer, 1).await;
    assert_eq!(
        again[0].offset, 5,
        "records after the seek start where it said"
    );
    let mut next = again.last().expect("records").offset + 1;
    let mut rest = again;
    while next < 2000 {
        let more = consume_n(&mut consumer, 1).await;
        for r in &more {
            assert_eq!(r.offset, next, "no gap and no repeat after the seek");
            next += 1;
        }
        rest.extend(more);
    }
    assert_eq!(rest.len(), 1995);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_many_keeps_order_and_fails_only_the_records_it_cannot_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("many", 2))
        .await
        .expect("create");
    // A buffer of a few batches: the run has to wait for room part way through.
    let producer = Producer::connect(ProducerConfig {
        batch_size: 4096,
        buffer_memory: 16 * 1024,
        ..producer_config(&addr)
    })
    .await
    .expect("producer");
    let n = 3000u32;
    let (bad_partition, unknown_topic) = (1500, 2000);
    let records = (0..n).map(|i| {
        let topic = if i == unknown_topic { "ghost" } else { "many" };
        let partition = if i == bad_partition { 7 } else { 0 };
        ProducerRecord::new(topic, format!("value-{i}")).partition(partition)
    });
    let deliveries = tokio::time::timeout(Duration::from_secs(30), producer.send_many(records))
        .await
        .expect("send_many returned");
    assert_eq!(deliveries.len(), n as usize);
    let mut next_offset = 0;
    for (i, d) in deliveries.into_iter().enumerate() {
        let outcome = tokio::time::timeout(Duration::from_secs(30), d)
            .await
            .expect("resolved");
        match i as u32 {
            i if i == bad_partition => {
                let err = outcome.expect_err("partition 7 of 2");
                assert!(matches!(err, ClientError::InvalidArgument(_)), "{err:?}");
            }
            i if i == unknown_topic => {
                expect_reason(
                    outcome.expect_err("no such topic"),
                    ErrorReason::UnknownTopicOrPartition,
                    Code::NotFound,
                );
            }
            _ => {
                let meta = outcome.expect("delivered");
                assert_eq!((meta.partition, meta.offset), (0, Some(next_offset)));
                next_offset += 1;
            }
        }
    }
    assert_eq!(next_offset, u64::from(n) - 2);

    let mut consumer = Consumer::connect(consumer_config(&addr))
        .await
        .expect("consumer");
    consumer.assign_topic("many").await.expect("assign");
    let records = consume_n(&mut consumer, n as usize - 2).await;
    let expected: Vec<String> = (0..n)
        .filter(|i| *i != bad_partition && *i != unknown_topic)
        .map(|i| format!("value-{i}"))
        .collect();
    let got: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(got, expected);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_callbacks_run_once_each_with_their_record_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("called", 1))
        .await
        .expect("create");
    let producer = Producer::connect(ProducerConfig {
        acks: Acks::Leader,
        linger: Duration::ZERO,
        batch_size: 2048,
        ..producer_config(&addr)
    })
    .await
    .expect("producer");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let n = 2000u64;
    let ghost = 1000;
    let mut late = Vec::new();
    let records = (0..n).map(|i| {
        let topic = if i == ghost { "ghost" } else { "called" };
        ProducerRecord::new(topic, format!("value-{i}"))
    });
    // A record that cannot be queued gets a future holding its error, so the
    // unknown topic's callback runs too.
    let deliveries = producer.send_many(records).await;
    for (i, d) in (0..n).zip(deliveries) {
        if i % 2 == 0 {
            let tx = tx.clone();
            d.on_delivery(move |outcome| {
                let _ = tx.send((i, outcome));
            });
        } else {
            late.push((i, d));
        }
    }
    tokio::time::timeout(Duration::from_secs(30), producer.flush())
        .await
        .expect("flushed in time")
        .expect("flush");
    // Outcomes known already: these callbacks run at once.
    for (i, d) in late {
        let tx = tx.clone();
        d.on_delivery(move |outcome| {
            let _ = tx.send((i, outcome));
        });
    }
    drop(tx);
    let mut outcomes = HashMap::new();
    while let Some((i, outcome)) = rx.recv().await {
        assert!(
            outcomes.insert(i, outcome).is_none(),
            "record {i} called back twice"
        );
    }
    assert_eq!(outcomes.len(), n as usize, "every record called back");
    for (i, outcome) in outcomes {
        if i == ghost {
            expect_reason(
                outcome.expect_err("no such topic"),
                ErrorReason::UnknownTopicOrPartition,
                Code::NotFound,
            );
            continue;
        }
        // Offsets follow send order, one record short after the one that failed.
        let want = if i < ghost { i } else { i - 1 };
        let meta = outcome.expect("delivered");
        assert_eq!(
            (&*meta.topic, meta.offset),
            ("called", Some(want)),
            "record {i}"
        );
    }
    broker.stop().await;
}

/// Sends one record and waits, at most `within`, for it to be acknowledged.
async fn deliver(
    producer: &Producer,
    topic: &str,
    value: &str,
    within: Duration,
) -> sluice_client::RecordMetadata {
    let d = producer
        .send(ProducerRecord::new(topic, value.to_string()))
        .await
        .expect("queued");
    tokio::time::timeout(within, d)
        .await
        .expect("answered in time")
        .expect("delivered")
}

/// Established connections from this process to `port` on 127.0.0.1, from the kernel's
/// table of IPv4 TCP sockets.
fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("the kernel's TCP table");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields
                .get(2)
                .and_then(|a| a.split(':').nth(1))
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // State 01 is ESTABLISHED.
            remote_port == Some(port) && fields.get(3) == Some(&"01")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_producer_closes_its_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    let port: u16 = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("closing", 1))
        .await
        .expect("create");
    let before = connections_to(port);
    let producer = Producer::connect(ProducerConfig {
        acks: Acks::Leader,
        ..producer_config(&addr)
    })
    .await
    .expect("producer");
    let meta = deliver(&producer, "closing", "x", Duration::from_secs(30)).await;
    assert_eq!(meta.offset, Some(0));
    assert!(
        connections_to(port) > before,
        "the producer has connections open while it sends"
    );
    drop(producer);
    // The sender notices within its 200 ms idle wait, then its streams end.
    let deadline = Instant::now() + Duration::from_secs(10);
    while connections_to(port) > before {
        assert!(
            Instant::now() < deadline,
            "{} connections left open after the producer was dropped ({before} before it)",
            connections_to(port)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_is_given_up_after_the_request_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = sluice_tests::broker::BrokerProcess::start(dir.path(), &[]);
    let addr = broker.address().to_string();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(NewTopic::new("stuck", 1))
        .await
        .expect("create");
    let producer = Producer::connect(ProducerConfig {
        acks: Acks::Leader,
        linger: Duration::ZERO,
        retries: 0,
        request_timeout: Duration::from_secs(1),
        ..producer_config(&addr)
    })
    .await
    .expect("producer");
    let meta = deliver(&producer, "stuck", "before", Duration::from_secs(10)).await;
    assert_eq!(meta.offset, Some(0));
    // Stopped, the broker keeps its socket open and answers nothing, not even pings.
    broker.stop();
    let sent = Instant::now();
    let stuck = producer
        .send(ProducerRecord::new("stuck", "while stopped"))
        .await
        .expect("queued");
    let outcome = tokio::time::timeout(Duration::from_secs(20), stuck).await;
    broker.signal(libc::SIGCONT);
    let err = outcome
        .expect("an outcome while the broker is stopped, long before a keep-alive fails")
        .expect_err("no answer came");
    assert!(matches!(err, ClientError::Timeout(_)), "{err:?}");
    assert!(
        sent.elapsed() >= Duration::from_secs(1),
        "not given up before the request timeout"
    );
    broker.sigkill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_cache_window_every_record_reads_back_from_the_start() {
    // On the disk of the build, not a tmpfs, whose pages are the files themselves.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let broker = InProcessBroker::start(dir.path(), |_| {}).await;
    let addr = broker.address();
    let admin = Admin::connect(&addr).await.expect("admin");
    admin
        .create_topic(
            NewTopic::new("windowed", 1)
                .config("cache.window.bytes", "8MiB")
                .config("segment.bytes", "16MiB")
                .config("flush.policy", "os"),
        )
        .await
        .expect("create");
    let d = admin.describe_topic("windowed").await.expect("describe");
    assert_eq!(d.configs["cache.window.bytes"], (8u64 << 20).to_string());
    let value = |i: usize| format!("{i:07}|").repeat(128);
    // About 40 MiB: five times the window, across two segment rolls, with a consumer
    // reading along at the tail as the older bytes are dropped behind it.
    let n = 40_000;
    let producer = Producer::connect(producer_config(&addr))
        .await
        .expect("producer");
    let mut tail = Consumer::connect(consumer_config(&addr))
        .await
        .expect("consumer");
    tail.assign_topic("windowed").await.expect("assign");
    let mut followed = 0;
    for chunk in 0..n / 1000 {
        for i in chunk * 1000..(chunk + 1) * 1000 {
            producer
                .send(ProducerRecord::new("windowed", value(i)))
                .await
                .expect("send");
        }
        producer.flush().await.expect("flush");
        let due = (chunk + 1) * 1000 - followed;
        followed += consume_n(&mut tail, due).await.len();
    }
    assert!(followed >= n, "the tail consumer read {followed}");
    // The broker dropped the first segment from the page cache (its releases run in the
    // background: give them a moment)...
    let first = dir.path().join("windowed-0").join(format!("{:020}.log", 0));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (cached, pages) = sluice_log_store::memory::cached_pages(&first).expect("mincore");
        if cached * 10 < pages {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{cached} of the first segment's {pages} pages still cached"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and what it dropped comes back from the disk, each record as it was sent.
    let mut consumer = Consumer::connect(consumer_config(&addr))
        .await
        .expect("consumer");
    consumer.assign_topic("windowed").await.expect("assign");
    let records = consume_n(&mut consumer, n).await;
    for (i, r) in records.iter().take(n).enumerate() {
        assert_eq!(r.offset, i as u64);
        assert_eq!(r.value.as_deref(), Some(value(i).as_bytes()), "record {i}");
    }
    broker.stop().await;
}
