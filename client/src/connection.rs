//! Connecting to brokers: the first reachable address of a comma-separated list.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::error::{ClientError, Result};

/// The default broker address.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9292";

pub use sluice_proto::{MAX_FRAME_BYTES, MAX_MESSAGE_BYTES};

/// A broker address, `host:port` or a URI, as a URI (`http://` when none is given).
pub(crate) fn broker_uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// The endpoint of one broker, `host:port` or a URI, with the client's settings.
pub fn endpoint(addr: &str) -> std::result::Result<Endpoint, String> {
    let endpoint = Endpoint::from_shared(broker_uri(addr)).map_err(|e| format!("{addr}: {e}"))?;
    Ok(endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20))
        .max_frame_size(MAX_FRAME_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(30)))
}

/// The addresses of a `host:port,host:port` list.
pub fn addresses(brokers: &str) -> Vec<String> {
    brokers
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}

/// Opens a channel to the first broker in `brokers` (`host:port,host:port`) that answers.
pub async fn connect(brokers: &str) -> Result<Channel> {
    connect_first(brokers).await.map(|(_, c)| c)
}

/// Like [`connect`], also naming the broker that answered.
pub async fn connect_first(brokers: &str) -> Result<(String, Channel)> {
    let mut last = String::from("no broker address given");
    for addr in addresses(brokers) {
        let endpoint = match endpoint(&addr) {
            Ok(e) => e,
            Err(e) => {
                last = e;
                continue;
            }
        };
        match endpoint.connect().await {
            Ok(channel) => return Ok((addr, channel)),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(ClientError::Connect {
        brokers: brokers.to_string(),
        message: last,
    })
}
