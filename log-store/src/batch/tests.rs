use super::*;

fn sample(compression: Compression, n: u32) -> Bytes {
    let mut b = RecordBatchBuilder::new(compression);
    for i in 0..n {
        let key = format!("key-{i}");
        let value = format!("value-{i}-{}", "x".repeat(i as usize % 50));
        let headers = if i % 3 == 0 {
            vec![Header {
                key: "trace".into(),
                value: Some(Bytes::from(format!("t{i}"))),
            }]
        } else {
            vec![]
        };
        let key = if i % 5 == 0 {
            None
        } else {
            Some(key.as_bytes())
        };
        b.append(1_000 + i64::from(i), key, Some(value.as_bytes()), &headers);
    }
    b.build().expect("build")
}

/// Rewrites a header field and fixes the CRC, making a batch that is consistent in its
/// checksum but lies in its content.
fn rewrite(batch: &Bytes, at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut v = batch.to_vec();
    v[at..at + bytes.len()].copy_from_slice(bytes);
    let crc = checksum(&v[ATTRIBUTES_POS..]);
    v[CRC_POS..CRC_POS + 4].copy_from_slice(&crc.to_be_bytes());
    v
}

#[test]
fn builds_and_reads_back_every_codec() {
    for c in [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ] {
        let bytes = sample(c, 100);
        let header = validate(&bytes, &ValidateOptions::default()).expect("valid");
        assert_eq!(header.record_count, 100);
        assert_eq!(header.compression().ok(), Some(c));
        assert_eq!(header.first_timestamp, 1_000);
        assert_eq!(header.max_timestamp, 1_099);
        let batch = RecordBatch::new(bytes).expect("batch");
        let records = batch.records().expect("records");
        assert_eq!(records.len(), 100);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.offset, i as u64);
            assert_eq!(r.timestamp, 1_000 + i as i64);
            if i % 5 == 0 {
                assert_eq!(r.key, None);
            } else {
                assert_eq!(r.key.as_deref(), Some(format!("key-{i}").as_bytes()));
            }
            assert_eq!(r.headers.len(), usize::from(i % 3 == 0));
        }
    }
}

#[test]
fn compression_shrinks_repetitive_records() {
    let plain = sample(Compression::None, 500);
    let zstd = sample(Compression::Zstd, 500);
    let lz4 = sample(Compression::Lz4, 500);
    assert!(
        zstd.len() < plain.len() / 2,
        "{} vs {}",
        zstd.len(),
        plain.len()
    );
    assert!(
        lz4.len() < plain.len() / 2,
        "{} vs {}",
        lz4.len(),
        plain.len()
    );
}

#[test]
fn absent_key_value_and_tombstones_round_trip() {
    let mut b = RecordBatchBuilder::new(Compression::None);
    b.append(5, None, None, &[]);
    b.append(4, Some(b""), Some(b""), &[]);
    let bytes = b.build().expect("build");
    let header = validate(&bytes, &ValidateOptions::default()).expect("valid");
    assert_eq!(header.max_timestamp, 5);
    let records = RecordBatch::new(bytes)
        .expect("batch")
        .records()
        .expect("records");
    assert_eq!(records[0].key, None);
    assert_eq!(records[0].value, None);
    assert_eq!(records[1].key.as_deref(), Some(&b""[..]));
    assert_eq!(records[1].timestamp, 4);
}

#[test]
fn stamping_offset_and_epoch_keeps_crc() {
    let bytes = sample(Compression::None, 10);
    let mut v = bytes.to_vec();
    set_base_offset(&mut v, 1234);
    set_partition_leader_epoch(&mut v, 7);
    let header = validate(&v, &ValidateOptions::default()).expect("still valid");
    assert_eq!(header.base_offset, 1234);
    assert_eq!(header.last_offset(), 1243);
    assert_eq!(header.partition_leader_epoch, 7);
    let records = RecordBatch::new(Bytes::from(v))
        .expect("batch")
        .records()
        .expect("records");
    assert_eq!(records[3].offset, 1237);
}

#[test]
fn log_append_time_overrides_record_timestamps() {
    let bytes = sample(Compression::None, 3);
    let mut v = bytes.to_vec();
    set_log_append_time(&mut v, 99_999);
    let header = validate(&v, &ValidateOptions::default()).expect("valid after restamp");
    assert_eq!(header.timestamp_type(), TimestampType::LogAppendTime);
    let records = RecordBatch::new(Bytes::from(v))
        .expect("batch")
        .records()
        .expect("records");
    assert!(records.iter().all(|r| r.timestamp == 99_999));
}

#[test]
fn flipped_bit_is_a_crc_mismatch() {
    let bytes = sample(Compression::None, 10);
    for pos in [ATTRIBUTES_POS, HEADER_LEN + 3, bytes.len() - 1] {
        let mut v = bytes.to_vec();
        v[pos] ^= 0x10;
        let err = validate(&v, &ValidateOptions::default()).expect_err("must fail");
        assert!(matches!(err, Error::CrcMismatch { .. }), "{pos}: {err}");
        assert!(err.is_corrupt_batch());
    }
}

#[test]
fn length_disagreeing_with_bytes_is_rejected() {
    let bytes = sample(Compression::None, 10);
    let short = &bytes[..bytes.len() - 1];
    assert!(matches!(
        validate(short, &ValidateOptions::default()),
        Err(Error::LengthMismatch { .. })
    ));
    let mut long = bytes.to_vec();
    long.push(0);
    assert!(matches!(
        validate(&long, &ValidateOptions::default()),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        validate(&bytes[..20], &ValidateOptions::default()),
        Err(Error::LengthMismatch { .. })
    ));
}

#[test]
fn record_count_disagreeing_with_records_is_rejected() {
    for c in [Compression::None, Compression::Zstd] {
        let bytes = sample(c, 10);
        let mut v = rewrite(&bytes, RECORD_COUNT_POS, &11i32.to_be_bytes());
        v = rewrite(&Bytes::from(v), LAST_OFFSET_DELTA_POS, &10i32.to_be_bytes());
        let err = validate(&v, &ValidateOptions::default()).expect_err("must fail");
        assert!(
            matches!(
                err,
                Error::RecordCountMismatch {
                    declared: 11,
                    actual: 10
                }
            ),
            "{}: {err}",
            c.name()
        );
    }
}

#[test]
fn last_offset_delta_must_match_count() {
    let bytes = sample(Compression::None, 10);
    let v = rewrite(&bytes, LAST_OFFSET_DELTA_POS, &3i32.to_be_bytes());
    assert!(matches!(
        validate(&v, &ValidateOptions::default()),
        Err(Error::Malformed(_))
    ));
}

#[test]
fn oversized_batch_is_rejected() {
    let bytes = sample(Compression::None, 100);
    let opts = ValidateOptions {
        max_batch_bytes: bytes.len() - 1,
        ..ValidateOptions::default()
    };
    assert!(matches!(
        validate(&bytes, &opts),
        Err(Error::BatchTooLarge { .. })
    ));
}

#[test]
fn unknown_version_and_codec_are_rejected() {
    let bytes = sample(Compression::None, 2);
    let mut v = bytes.to_vec();
    v[MAGIC_POS] = 1;
    assert!(matches!(
        validate(&v, &ValidateOptions::default()),
        Err(Error::UnsupportedVersion(1))
    ));
    let v = rewrite(&bytes, ATTRIBUTES_POS, &7i16.to_be_bytes());
    assert!(matches!(
        validate(&v, &ValidateOptions::default()),
        Err(Error::UnknownCompression(7))
    ));
}

#[test]
fn empty_batch_is_rejected() {
    let bytes = RecordBatchBuilder::new(Compression::None)
        .build()
        .expect("build");
    assert!(validate(&bytes, &ValidateOptions::default()).is_err());
}

#[test]
fn garbage_records_are_rejected_not_panicked_on() {
    let bytes = sample(Compression::None, 4);
    for cut in 1..20 {
        let mut v = bytes.to_vec();
        for b in &mut v[HEADER_LEN..HEADER_LEN + cut] {
            *b = 0xff;
        }
        let crc = checksum(&v[ATTRIBUTES_POS..]);
        v[CRC_POS..CRC_POS + 4].copy_from_slice(&crc.to_be_bytes());
        assert!(
            validate(&v, &ValidateOptions::default()).is_err(),
            "cut {cut}"
        );
        let _ = RecordBatch::new(Bytes::from(v)).map(|b| b.records());
    }
}

#[test]
fn batch_iter_walks_back_to_back_batches() {
    let a = sample(Compression::None, 3);
    let b = sample(Compression::Lz4, 4);
    let mut all = a.to_vec();
    all.extend_from_slice(&b);
    let batches: Vec<_> = BatchIter::new(Bytes::from(all.clone()))
        .collect::<Result<_>>()
        .expect("iter");
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[1].header().record_count, 4);
    all.truncate(all.len() - 1);
    let res: Result<Vec<_>> = BatchIter::new(Bytes::from(all)).collect();
    assert!(res.is_err());
}

#[test]
fn end_offset_is_after_the_last_whole_batch() {
    let mut a = sample(Compression::None, 3).to_vec();
    set_base_offset(&mut a, 10);
    let mut b = sample(Compression::None, 4).to_vec();
    set_base_offset(&mut b, 13);
    let mut all = a.clone();
    all.extend_from_slice(&b);
    assert_eq!(BatchIter::end_offset(&Bytes::from(all.clone())), Some(17));
    // A cut-off batch after a whole one: the whole one's end.
    all.truncate(all.len() - 1);
    assert_eq!(BatchIter::end_offset(&Bytes::from(all)), Some(13));
    assert_eq!(BatchIter::end_offset(&Bytes::new()), None);
    assert_eq!(BatchIter::end_offset(&Bytes::from(a[..20].to_vec())), None);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_records_round_trip(
            recs in proptest::collection::vec(
                (any::<i32>(), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
                 proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200))),
                1..50),
            codec in 0u8..5,
        ) {
            let c = Compression::from_id(codec).expect("codec");
            let mut b = RecordBatchBuilder::new(c);
            for (ts, k, v) in &recs {
                b.append(i64::from(*ts), k.as_deref(), v.as_deref(), &[]);
            }
            let bytes = b.build().expect("build");
            prop_assert!(validate(&bytes, &ValidateOptions::default()).is_ok());
            let out = RecordBatch::new(bytes).expect("batch").records().expect("records");
            prop_assert_eq!(out.len(), recs.len());
            for (r, (ts, k, v)) in out.iter().zip(&recs) {
                prop_assert_eq!(r.timestamp, i64::from(*ts));
                prop_assert_eq!(r.key.as_deref(), k.as_deref());
                prop_assert_eq!(r.value.as_deref(), v.as_deref());
            }
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = validate(&data, &ValidateOptions::default());
            let _ = check_framing(&data);
            if let Ok(b) = RecordBatch::new(Bytes::from(data)) {
                let _ = b.records();
            }
        }
    }
}
