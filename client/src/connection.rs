//! Connecting to brokers: the first reachable address of a comma-separated list.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::error::{ClientError, Result};

/// The default broker address.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9292";

/// Largest gRPC message the client sends or accepts.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Opens a channel to the first broker in `brokers` (`host:port,host:port`) that answers.
pub async fn connect(brokers: &str) -> Result<Channel> {
    let mut last = String::from("no broker address given");
    for addr in brokers.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let uri = if addr.contains("://") {
            addr.to_string()
        } else {
            format!("http://{addr}")
        };
        let endpoint = match Endpoint::from_shared(uri) {
            Ok(e) => e,
            Err(e) => {
                last = format!("{addr}: {e}");
                continue;
            }
        };
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .http2_keep_alive_interval(Duration::from_secs(30));
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(ClientError::Connect {
        brokers: brokers.to_string(),
        message: last,
    })
}
