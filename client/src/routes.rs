//! Where partition leaders are: learned from NOT_LEADER answers, which name the
//! leader, with a default broker for partitions whose leader is not known yet.

use std::collections::HashMap;

use tonic::transport::Channel;

use crate::connection::{addresses, endpoint};
use crate::error::{ClientError, Result};

/// A topic-partition.
type Key = (String, u32);

/// Partition leaders and one channel per broker.
#[derive(Debug)]
pub(crate) struct Routes {
    bootstrap: Vec<String>,
    default: String,
    leaders: HashMap<Key, String>,
    channels: HashMap<String, Channel>,
}

impl Routes {
    /// Routes that send everything to `first` (a broker that answered) until told
    /// otherwise.
    pub fn new(brokers: &str, first_addr: String, first: Channel) -> Routes {
        let mut channels = HashMap::new();
        channels.insert(first_addr.clone(), first);
        Routes {
            bootstrap: addresses(brokers),
            default: first_addr,
            leaders: HashMap::new(),
            channels,
        }
    }

    /// The broker believed to lead `tp`.
    pub fn address(&self, tp: &Key) -> &str {
        self.leaders.get(tp).unwrap_or(&self.default)
    }

    /// A channel to `addr`, made once.
    pub fn channel(&mut self, addr: &str) -> Result<Channel> {
        if let Some(c) = self.channels.get(addr) {
            return Ok(c.clone());
        }
        let c = endpoint(addr)
            .map_err(|message| ClientError::Connect {
                brokers: addr.to_string(),
                message,
            })?
            .connect_lazy();
        self.channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// A NOT_LEADER answer for `tp`, naming the leader or not (during an election).
    pub fn learn(&mut self, tp: Key, leader: Option<&str>) {
        match leader {
            Some(a) => {
                self.leaders.insert(tp, a.to_string());
            }
            None => {
                self.leaders.remove(&tp);
            }
        }
    }

    /// `addr` could not be reached: forget it as a leader, and move the default on to
    /// the next bootstrap broker if it was the default.
    pub fn down(&mut self, addr: &str) {
        self.leaders.retain(|_, a| a != addr);
        self.channels.remove(addr);
        if self.default == addr && !self.bootstrap.is_empty() {
            let i = self
                .bootstrap
                .iter()
                .position(|a| a == addr)
                .map_or(0, |i| (i + 1) % self.bootstrap.len());
            self.default = self.bootstrap[i].clone();
        }
    }
}
