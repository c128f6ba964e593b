//! A load generator for Redis Streams, the peer `benches/compare` measures Sluice against
//! at a fixed rate (`redis-benchmark` cannot pace): pipelines `XADD` commands over RESP
//! with a window of commands awaiting their replies, and prints records/s and reply
//! latency percentiles in the same shape as `nats-load`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use clap::Parser;
use sluice_client::Schedule;
use sluice_peer_load::{peer_payloads, share, LoadArgs, Summary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

#[derive(Parser)]
#[command(about = "Append to a Redis stream with XADD and report throughput")]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:6379")]
    addr: String,
    /// Stream key (deleted first).
    #[arg(long, default_value = "bench")]
    stream: String,
    #[command(flatten)]
    load: LoadArgs,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Commands written in one go when not paced, as `redis-benchmark -P 1000` pipelines.
const FLAT_OUT_GROUP: usize = 1000;

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
        for i in from..to {
            let value = &self.pool[(i % self.pool.len() as u64) as usize];
            encode_xadd(&mut self.out, &self.stream, value);
        }
        self.sent
            .send((from..to).map(due).collect())
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
    let mut socket = TcpStream::connect(addr).await?;
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        bulk(&mut out, a);
    }
    socket.write_all(&out).await?;
    let mut buf = BytesMut::new();
    loop {
        if socket.read_buf(&mut buf).await? == 0 {
            return Err("the server closed the connection".into());
        }
        // DEL answers with an integer; anything else whole is taken as it comes.
        if let Some(reply) = take_reply(&mut buf)? {
            return match reply {
                None => Ok(()),
                Some(e) => Err(e.into()),
            };
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Arc::new(Args::parse());
    args.load.check()?;
    command(&args.addr, &[b"DEL", args.stream.as_bytes()]).await?;
    let pool = Arc::new(peer_payloads(args.load.record_size, 1024));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..args.load.producers {
        let n = share(args.load.records, args.load.producers, p);
        tasks.push(tokio::spawn(produce(
            Arc::clone(&args),
            Arc::clone(&pool),
            n,
            args.load.producer_rate(),
        )));
    }
    let mut latencies = Vec::with_capacity(args.load.records as usize);
    for t in tasks {
        latencies.extend(t.await??);
    }
    Summary::of(args.load.records, started, &mut latencies)
        .print_sent(args.load.record_size, args.load.json);
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
}
