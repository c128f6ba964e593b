//! A load generator for Redis Streams, the peer `benches/compare` measures Sluice against
//! at a fixed rate (`redis-benchmark` cannot pace): pipelines `XADD` commands over RESP
//! with a window of commands awaiting their replies, and prints records/s and reply
//! latency percentiles in the same shape as `nats-load`. With `--consume` it then reads
//! the stream back with one connection (`XRANGE` in large batches), and with
//! `--consume-only` it only does that, on a stream `redis-benchmark` filled, so that
//! Redis's consumer is measured the same way whoever wrote the stream. With
//! `--end-to-end` a second connection follows the stream with `XREAD BLOCK` while it is
//! written and times each entry from when it was due to its arrival.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use clap::Parser;
use sluice_client::pace::put_stamped;
use sluice_client::Schedule;
use sluice_peer_load::{
    peer_payloads, print_consumed, share, within, Arrivals, LoadArgs, Summary, READ_BACK_WAIT,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

#[derive(Parser)]
#[command(about = "Append to a Redis stream with XADD (and read it back) and report throughput")]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:6379")]
    addr: String,
    /// Stream key (deleted first, unless --consume-only).
    #[arg(long, default_value = "bench")]
    stream: String,
    /// Send nothing and keep the stream: only read back the first --records entries
    /// already in it (written by `redis-benchmark`, say) and print the consumer's line.
    #[arg(long, conflicts_with = "consume")]
    consume_only: bool,
    #[command(flatten)]
    load: LoadArgs,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Commands written in one go when not paced, as `redis-benchmark -P 1000` pipelines.
const FLAT_OUT_GROUP: usize = 1000;

/// Entries asked for by each `XRANGE` of the read-back: enough that round trips do not
/// count (a reply of 100-byte records is about 1.3 MB), not so many that Redis buffers a
/// huge reply before the client sees its end. Reading 2 M such entries from Redis 7.0 on
/// a shared 2-CPU machine, 1,000 to 30,000 went at the same rate within the noise (in a
/// quiet spell, medians of 1.83–2.08 M records/s), 100,000 clearly slower (1.42 M).
const CONSUME_BATCH: u64 = 10_000;

/// Appends `XADD <stream> * v <value>` in RESP to `out`.
fn encode_xadd(out: &mut Vec<u8>, stream: &[u8], value: &[u8]) {
    out.extend_from_slice(b"*5\r\n$4\r\nXADD\r\n");
    bulk(out, stream);
    out.extend_from_slice(b"$1\r\n*\r\n$1\r\nv\r\n");
    bulk(out, value);
}

fn bulk(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'$');
    out.extend_from_slice(s.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(s);
    out.extend_from_slice(b"\r\n");
}

/// One reply taken off the front of `buf`: `Ok(Some(None))` for a success,
/// `Ok(Some(Some(message)))` for an error reply, `Ok(None)` when the reply is not
/// whole yet. XADD answers with a bulk string (the new entry's id) or an error.
fn take_reply(buf: &mut BytesMut) -> Result<Option<Option<String>>, BoxError> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[..eol];
    match line.first() {
        Some(b'$') => {
            let len: i64 = std::str::from_utf8(&line[1..])?.parse()?;
            // `$-1` is a null reply: nothing follows the line.
            let whole = eol + 2 + usize::try_from(len).map_or(0, |n| n + 2);
            if buf.len() < whole {
                return Ok(None);
            }
            buf.advance(whole);
            Ok(Some(None))
        }
        Some(b'+' | b':') => {
            buf.advance(eol + 2);
            Ok(Some(None))
        }
        Some(b'-') => {
            let message = String::from_utf8_lossy(&line[1..]).into_owned();
            buf.advance(eol + 2);
            Ok(Some(Some(message)))
        }
        _ => Err(format!("unexpected reply: {:?}", String::from_utf8_lossy(line)).into()),
    }
}

/// Reads replies in order, timing each from the send time queued for it (the clock is
/// read once per read from the socket: every reply in it had arrived by then).
async fn read_replies(
    mut socket: OwnedReadHalf,
    mut sent: mpsc::UnboundedReceiver<Vec<Instant>>,
    window: Arc<Semaphore>,
    records: u64,
) -> Result<Vec<u32>, BoxError> {
    let mut latencies = Vec::with_capacity(records as usize);
    let mut due: VecDeque<Instant> = VecDeque::new();
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut answered = 0u64;
    let mut first_error = None;
    let mut errors = 0u64;
    while answered < records {
        if socket.read_buf(&mut buf).await? == 0 {
            return Err(
                format!("the server closed the connection after {answered} replies").into(),
            );
        }
        let now = Instant::now();
        while let Some(reply) = take_reply(&mut buf)? {
            while due.is_empty() {
                // The sender queues a command's time before writing it, so one is there.
                let times = sent.recv().await.ok_or("a reply came for nothing sent")?;
                due.extend(times);
            }
            let Some(at) = due.pop_front() else { continue };
            answered += 1;
            window.add_permits(1);
            match reply {
                None => latencies.push(
                    now.saturating_duration_since(at)
                        .as_micros()
                        .min(u128::from(u32::MAX)) as u32,
                ),
                Some(message) => {
                    errors += 1;
                    first_error.get_or_insert(message);
                }
            }
        }
    }
    match first_error {
        Some(e) => Err(format!("{errors} XADDs failed; first error: {e}").into()),
        None => Ok(latencies),
    }
}

/// One producer's sending side.
struct Sender {
    socket: OwnedWriteHalf,
    stream: Vec<u8>,
    pool: Arc<Vec<Vec<u8>>>,
    window: Arc<Semaphore>,
    sent: mpsc::UnboundedSender<Vec<Instant>>,
    out: Vec<u8>,
    /// Under `--end-to-end`, when the run started: each value is stamped with its due
    /// time since then.
    stamp_from: Option<Instant>,
    /// The stamped value being encoded, kept so no record allocates one.
    stamped: Vec<u8>,
}

impl Sender {
    /// Writes records `from..to` in one write, each to be timed from `due(i)`, once the
    /// window has room for them all.
    async fn send(
        &mut self,
        from: u64,
        to: u64,
        due: impl Fn(u64) -> Instant,
    ) -> Result<(), BoxError> {
        let n = u32::try_from(to - from)?;
        self.window.acquire_many(n).await?.forget();
        self.out.clear();
        let times: Vec<Instant> = (from..to).map(due).collect();
        for (i, at) in (from..to).zip(&times) {
            let value = &self.pool[(i % self.pool.len() as u64) as usize];
            match self.stamp_from {
                Some(started) => {
                    self.stamped.clear();
                    put_stamped(
                        &mut self.stamped,
                        value,
                        at.saturating_duration_since(started),
                    );
                    encode_xadd(&mut self.out, &self.stream, &self.stamped);
                }
                None => encode_xadd(&mut self.out, &self.stream, value),
            }
        }
        self.sent
            .send(times)
            .map_err(|_| "the reply reader stopped")?;
        self.socket.write_all(&self.out).await?;
        Ok(())
    }
}

async fn produce(
    args: Arc<Args>,
    pool: Arc<Vec<Vec<u8>>>,
    records: u64,
    rate: Option<f64>,
    stamp_from: Option<Instant>,
) -> Result<Vec<u32>, BoxError> {
    let socket = TcpStream::connect(&args.addr).await?;
    socket.set_nodelay(true)?;
    let (read, write) = socket.into_split();
    // Each write asks for at most the window's size (see below), so it always fits.
    let window = Arc::new(Semaphore::new(args.load.window));
    let (sent_tx, sent_rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(read_replies(read, sent_rx, Arc::clone(&window), records));
    let mut sender = Sender {
        socket: write,
        stream: args.stream.as_bytes().to_vec(),
        pool,
        window: Arc::clone(&window),
        sent: sent_tx,
        out: Vec::new(),
        stamp_from,
        stamped: Vec::new(),
    };
    let window_len = args.load.window as u64;
    match rate {
        None => {
            let mut i = 0;
            while i < records {
                let end = (i + (FLAT_OUT_GROUP as u64).min(window_len)).min(records);
                sender.send(i, end, |_| Instant::now()).await?;
                i = end;
            }
        }
        Some(per_second) => {
            let runtime = tokio::runtime::Handle::current();
            let gap = args.load.wake_gap();
            tokio::task::spawn_blocking(move || {
                let schedule = Schedule::new(per_second).with_wake_gap(gap);
                let mut i = 0;
                while i < records {
                    // A wake sends no more than the window holds.
                    let end = schedule.wait_due(i, records).min(i + window_len);
                    runtime.block_on(sender.send(i, end, |k| schedule.due(k)))?;
                    i = end;
                }
                Ok::<_, BoxError>(())
            })
            .await??;
        }
    }
    reader.await?
}

/// Sends one command and reads its whole reply (the stream's deletion before a run).
async fn command(addr: &str, args: &[&[u8]]) -> Result<(), BoxError> {
    match Requester::connect(addr)
        .await?
        .request("a command", args)
        .await?
    {
        Value::Error(e) => Err(e.into()),
        _ => Ok(()),
    }
}

/// A RESP (version 2) value, as the read-back needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    /// `$-1` or `*-1`.
    Null,
    /// `+...`.
    Simple(Bytes),
    /// `:...`.
    Integer(i64),
    /// `$<len>` and its bytes.
    Bulk(Bytes),
    /// `*<len>` and its elements.
    Array(Vec<Value>),
    /// `-...`: kept as a value (an element of an array may be one), turned into an
    /// error by whoever expected something else.
    Error(String),
}

/// What `take_token` takes off the front of a buffer: a whole value with no elements,
/// or the header of an array whose elements follow.
enum Token {
    Value(Value),
    Array(usize),
}

/// Elements reserved at most for an array before they come, whatever its header says.
const MAX_PREALLOCATED: usize = 4096;

/// The length in a `$` or `*` header: `None` for the null (-1).
fn header_len(digits: &[u8]) -> Result<Option<usize>, BoxError> {
    let len: i64 = std::str::from_utf8(digits)?.parse()?;
    match len {
        -1 => Ok(None),
        _ => Ok(Some(
            usize::try_from(len).map_err(|_| format!("bad length {len}"))?,
        )),
    }
}

/// One token off the front of `buf`, or `None` (and `buf` untouched) when it is not
/// whole yet.
fn take_token(buf: &mut BytesMut) -> Result<Option<Token>, BoxError> {
    // Everything before the token has been taken, so a newline is this token's.
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    if nl < 2 || buf[nl - 1] != b'\r' {
        return Err(format!(
            "a malformed reply line: {:?}",
            String::from_utf8_lossy(&buf[..=nl])
        )
        .into());
    }
    let line = &buf[1..nl - 1];
    let token = match buf[0] {
        b'$' => match header_len(line)? {
            None => Token::Value(Value::Null),
            Some(len) => {
                let end = (nl + 3)
                    .checked_add(len)
                    .ok_or_else(|| format!("bad length {len}"))?;
                if buf.len() < end {
                    return Ok(None);
                }
                if &buf[end - 2..end] != b"\r\n" {
                    return Err("a bulk string not ended by CRLF".into());
                }
                buf.advance(nl + 1);
                let data = buf.split_to(len).freeze();
                buf.advance(2);
                return Ok(Some(Token::Value(Value::Bulk(data))));
            }
        },
        b'*' => match header_len(line)? {
            None => Token::Value(Value::Null),
            Some(0) => Token::Value(Value::Array(Vec::new())),
            Some(len) => Token::Array(len),
        },
        b'+' => Token::Value(Value::Simple(Bytes::copy_from_slice(line))),
        b':' => Token::Value(Value::Integer(std::str::from_utf8(line)?.parse()?)),
        b'-' => Token::Value(Value::Error(String::from_utf8_lossy(line).into_owned())),
        _ => {
            return Err(format!(
                "unexpected reply: {:?}",
                String::from_utf8_lossy(&buf[..nl])
            )
            .into())
        }
    };
    buf.advance(nl + 1);
    Ok(Some(token))
}

/// Takes whole replies off a buffer that fills a read at a time. What it has parsed of a
/// reply cut short stays here (not in the buffer), so each byte is looked at once however
/// many reads a large reply takes.
#[derive(Default)]
struct RespParser {
    /// The arrays open, outermost first: their elements so far and how many they hold.
    open: Vec<(Vec<Value>, usize)>,
}

impl RespParser {
    /// The next whole reply, or `None` when `buf` ends before it does.
    fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Value>, BoxError> {
        'tokens: loop {
            let mut value = match take_token(buf)? {
                None => return Ok(None),
                Some(Token::Array(len)) => {
                    self.open
                        .push((Vec::with_capacity(len.min(MAX_PREALLOCATED)), len));
                    continue;
                }
                Some(Token::Value(value)) => value,
            };
            // Close every array this value completes.
            while let Some((mut items, len)) = self.open.pop() {
                items.push(value);
                if items.len() < len {
                    self.open.push((items, len));
                    continue 'tokens;
                }
                value = Value::Array(items);
            }
            return Ok(Some(value));
        }
    }
}

/// One connection's side of a request: writes the command `args` and reads until its
/// whole reply has come, each step bounded by `READ_BACK_WAIT` (`within`).
struct Requester {
    socket: TcpStream,
    parser: RespParser,
    buf: BytesMut,
    out: Vec<u8>,
}

impl Requester {
    async fn connect(addr: &str) -> Result<Self, BoxError> {
        let socket = within("connecting", TcpStream::connect(addr)).await?;
        socket.set_nodelay(true)?;
        Ok(Requester {
            socket,
            parser: RespParser::default(),
            buf: BytesMut::with_capacity(256 << 10),
            out: Vec::new(),
        })
    }

    /// Sends `args` (named `what` in errors) and returns the whole reply.
    async fn request(&mut self, what: &str, args: &[&[u8]]) -> Result<Value, BoxError> {
        self.out.clear();
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            bulk(&mut self.out, arg);
        }
        within(what, self.socket.write_all(&self.out)).await?;
        loop {
            if let Some(reply) = self.parser.next(&mut self.buf)? {
                return Ok(reply);
            }
            // Room for a large read: `read_buf` alone would grow a full buffer 64 bytes at
            // a time.
            self.buf.reserve(64 << 10);
            if within(what, self.socket.read_buf(&mut self.buf)).await? == 0 {
                return Err(format!("{what}: the server closed the connection").into());
            }
        }
    }
}

/// Counts the entries of one `XRANGE` reply (each `[id, [field, value, ...]]`), noting
/// the last one's id in `last` and handing each field's value to `value`.
fn take_entries(
    reply: Value,
    last: &mut Vec<u8>,
    mut value: impl FnMut(&[u8]),
) -> Result<u64, BoxError> {
    let entries = match reply {
        Value::Array(entries) => entries,
        Value::Error(e) => return Err(format!("XRANGE failed: {e}").into()),
        other => return Err(format!("XRANGE answered {other:?}").into()),
    };
    let count = entries.len() as u64;
    for entry in entries {
        let Value::Array(parts) = entry else {
            return Err(format!("an XRANGE entry is not an array: {entry:?}").into());
        };
        let [Value::Bulk(id), Value::Array(fields)] = &parts[..] else {
            return Err(format!("an XRANGE entry is not [id, fields]: {parts:?}").into());
        };
        for (i, field) in fields.iter().enumerate() {
            match field {
                Value::Bulk(v) if i % 2 == 1 => value(v),
                Value::Bulk(_) => {}
                other => return Err(format!("an entry's field is {other:?}").into()),
            }
        }
        last.clear();
        last.extend_from_slice(id);
    }
    Ok(count)
}

/// Reads the first `records` entries of the stream back with one connection, a batch of
/// `XRANGE` at a time, each starting just after the last id received (`(id`, Redis 6.2
/// on): Redis has no push consumer for a backlog, so this is as fast as one client reads.
/// Returns the seconds it took, from the first request to the last entry parsed.
async fn consume(args: &Args) -> Result<f64, BoxError> {
    let records = args.load.records;
    let mut conn = Requester::connect(&args.addr).await?;
    let mut last: Vec<u8> = Vec::new();
    let mut start = b"-".to_vec();
    let mut value_bytes = 0u64;
    let mut read = 0u64;
    let started = Instant::now();
    while read < records {
        let count = CONSUME_BATCH.min(records - read).to_string();
        let xrange: [&[u8]; 6] = [
            b"XRANGE",
            args.stream.as_bytes(),
            &start,
            b"+",
            b"COUNT",
            count.as_bytes(),
        ];
        let reply = conn.request("XRANGE", &xrange).await?;
        let n = take_entries(reply, &mut last, |v| value_bytes += v.len() as u64)?;
        if n == 0 {
            return Err(format!(
                "the stream {:?} ended after {read} entries, {records} expected",
                args.stream
            )
            .into());
        }
        read += n;
        start.clear();
        start.push(b'(');
        start.extend_from_slice(&last);
    }
    let secs = started.elapsed().as_secs_f64();
    if !conn.buf.is_empty() {
        return Err("bytes after the last XRANGE reply".into());
    }
    if value_bytes != read * args.load.record_size as u64 {
        // The rate in bytes is computed from --record-size: say when that is not it.
        eprintln!(
            "note: the entries read hold {:.1} value bytes each on average, not --record-size {}",
            value_bytes as f64 / read as f64,
            args.load.record_size
        );
    }
    Ok(secs)
}

/// How long each `XREAD` of the end-to-end reader blocks for new entries.
const FOLLOW_BLOCK_MS: &[u8] = b"100";

/// Follows the stream from its start while it is written, `XREAD BLOCK` after `XREAD
/// BLOCK` on a connection of its own, until `records` entries have arrived, timing each
/// from its stamp (the end-to-end workload); gives up when nothing new arrives for
/// `READ_BACK_WAIT`.
async fn follow(args: Arc<Args>, started: Instant) -> Result<Arrivals, BoxError> {
    let records = args.load.records;
    let mut arrivals = Arrivals::new(started, records);
    let mut conn = Requester::connect(&args.addr).await?;
    let mut last: Vec<u8> = b"0-0".to_vec();
    let count = CONSUME_BATCH.to_string();
    let mut last_new = Instant::now();
    while arrivals.read < records {
        let xread: [&[u8]; 8] = [
            b"XREAD",
            b"COUNT",
            count.as_bytes(),
            b"BLOCK",
            FOLLOW_BLOCK_MS,
            b"STREAMS",
            args.stream.as_bytes(),
            &last,
        ];
        let reply = conn.request("XREAD", &xread).await?;
        let now = Instant::now();
        let entries = match reply {
            // The block ran out with nothing new.
            Value::Null => {
                if last_new.elapsed() > READ_BACK_WAIT {
                    return Err(format!(
                        "no entry for {} s after {} of {records}",
                        READ_BACK_WAIT.as_secs(),
                        arrivals.read
                    )
                    .into());
                }
                continue;
            }
            // One stream asked for: `[[name, entries]]`.
            Value::Array(mut streams) if streams.len() == 1 => match streams.pop() {
                Some(Value::Array(mut pair)) if pair.len() == 2 => pair.pop(),
                other => return Err(format!("XREAD answered {other:?}").into()),
            },
            Value::Error(e) => return Err(format!("XREAD failed: {e}").into()),
            other => return Err(format!("XREAD answered {other:?}").into()),
        };
        let Some(entries) = entries else {
            return Err("XREAD answered a stream without entries".into());
        };
        let n = take_entries(entries, &mut last, |v| arrivals.arrived(v, now))?;
        if n > 0 {
            last_new = now;
        }
    }
    Ok(arrivals)
}

/// Reads the stream back (`consume`) and prints the consumer's line.
async fn read_back(args: &Args) -> Result<(), BoxError> {
    let secs = consume(args).await?;
    print_consumed(
        args.load.records,
        secs,
        args.load.record_size,
        args.load.json,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Arc::new(Args::parse());
    args.load.check()?;
    if args.consume_only {
        // The stream is someone else's: it is neither deleted nor written.
        read_back(&args).await?;
        return Ok(());
    }
    command(&args.addr, &[b"DEL", args.stream.as_bytes()]).await?;
    let pool = Arc::new(peer_payloads(args.load.record_size, 1024));
    let started = Instant::now();
    // The end-to-end reader is reading before the first record goes.
    let reader = args
        .load
        .end_to_end
        .then(|| tokio::spawn(follow(Arc::clone(&args), started)));
    let mut tasks = Vec::new();
    for p in 0..args.load.producers {
        let n = share(args.load.records, args.load.producers, p);
        tasks.push(tokio::spawn(produce(
            Arc::clone(&args),
            Arc::clone(&pool),
            n,
            args.load.producer_rate(),
            args.load.end_to_end.then_some(started),
        )));
    }
    let mut latencies = Vec::with_capacity(args.load.records as usize);
    for t in tasks {
        latencies.extend(t.await??);
    }
    let sent = Summary::of(args.load.records, started, &mut latencies);
    let e2e = match reader {
        Some(reader) => Some(reader.await??.summary()),
        None => None,
    };
    sent.print_sent(args.load.record_size, args.load.json, e2e.as_ref());
    if args.load.consume {
        read_back(&args).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_xadd_is_five_bulk_strings() {
        let mut out = Vec::new();
        encode_xadd(&mut out, b"s", b"ab\r\n");
        assert_eq!(
            out,
            b"*5\r\n$4\r\nXADD\r\n$1\r\ns\r\n$1\r\n*\r\n$1\r\nv\r\n$4\r\nab\r\n\r\n"
        );
    }

    #[test]
    fn replies_are_taken_whole_and_in_order() {
        let mut buf =
            BytesMut::from(&b"$15\r\n1700000000000-0\r\n-ERR no\r\n:1\r\n$15\r\n17000"[..]);
        assert_eq!(take_reply(&mut buf).expect("valid"), Some(None));
        assert_eq!(
            take_reply(&mut buf).expect("valid"),
            Some(Some("ERR no".to_string()))
        );
        assert_eq!(take_reply(&mut buf).expect("valid"), Some(None));
        // The last one is cut short: it waits for the rest.
        assert_eq!(take_reply(&mut buf).expect("valid"), None);
        buf.extend_from_slice(b"00000000-1\r\n");
        assert_eq!(take_reply(&mut buf).expect("valid"), Some(None));
        assert!(buf.is_empty());
        let mut junk = BytesMut::from(&b"?\r\n"[..]);
        assert!(take_reply(&mut junk).is_err());
    }

    fn bulk_value(s: &str) -> Value {
        Value::Bulk(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn an_xrange_reply_split_across_reads_is_parsed_whole() {
        let reply: &[u8] = b"*2\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nv\r\n$2\r\nab\r\n\
                             *2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nv\r\n$4\r\nc\r\nd\r\n";
        let entry = |id: &str, value: &str| {
            Value::Array(vec![
                bulk_value(id),
                Value::Array(vec![bulk_value("v"), bulk_value(value)]),
            ])
        };
        let whole = Value::Array(vec![entry("1-0", "ab"), entry("1-1", "c\r\nd")]);
        // Cut everywhere: in a header, in a bulk string, between its CR and LF, ...
        for cut in 0..reply.len() {
            let mut parser = RespParser::default();
            let mut buf = BytesMut::from(&reply[..cut]);
            assert_eq!(parser.next(&mut buf).expect("valid"), None, "cut at {cut}");
            buf.extend_from_slice(&reply[cut..]);
            assert_eq!(parser.next(&mut buf).expect("valid"), Some(whole.clone()));
            assert!(buf.is_empty());
        }
        let (mut last, mut values) = (Vec::new(), Vec::new());
        assert_eq!(
            take_entries(whole, &mut last, |v| values.push(v.to_vec())).expect("entries"),
            2
        );
        assert_eq!(&last[..], &b"1-1"[..]);
        assert_eq!(values, vec![b"ab".to_vec(), b"c\r\nd".to_vec()]);
    }

    #[test]
    fn nulls_errors_and_junk() {
        let mut parser = RespParser::default();
        let mut buf = BytesMut::from(
            &b"*-1\r\n$-1\r\n*0\r\n-ERR syntax error\r\n*3\r\n:7\r\n$-1\r\n+OK\r\n"[..],
        );
        assert_eq!(parser.next(&mut buf).expect("valid"), Some(Value::Null));
        assert_eq!(parser.next(&mut buf).expect("valid"), Some(Value::Null));
        assert_eq!(
            parser.next(&mut buf).expect("valid"),
            Some(Value::Array(Vec::new()))
        );
        let error = parser.next(&mut buf).expect("valid").expect("whole");
        assert_eq!(error, Value::Error("ERR syntax error".into()));
        let message = take_entries(error, &mut Vec::new(), |_| {})
            .expect_err("an error reply")
            .to_string();
        assert!(message.contains("ERR syntax error"), "{message}");
        assert_eq!(
            parser.next(&mut buf).expect("valid"),
            Some(Value::Array(vec![
                Value::Integer(7),
                Value::Null,
                Value::Simple(Bytes::from_static(b"OK")),
            ]))
        );
        assert!(buf.is_empty());
        for junk in [
            &b"?\r\n"[..],
            b"\r\n",
            b"$-2\r\n",
            b"$2\r\nabc\r\n",
            b"*x\r\n",
            b"+OK\n",
        ] {
            let mut buf = BytesMut::from(junk);
            assert!(RespParser::default().next(&mut buf).is_err(), "{junk:?}");
        }
    }
}
