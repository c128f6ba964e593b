//! A data directory of many partition logs, one `TOPIC-PARTITION/` folder each.

use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::config::LogConfig;
use crate::error::{Error, Result};
use crate::log::Log;
use crate::segment::sync_dir;

/// Suffix of a folder whose deletion is under way.
const DELETE_SUFFIX: &str = "-delete";
const LOCK_FILE: &str = ".lock";

/// A topic name and partition number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
}

impl TopicPartition {
    /// A topic-partition.
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }

    /// The folder name, `TOPIC-PARTITION`.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.topic, self.partition)
    }

    /// Parses a folder name; the partition follows the last `-`, as topic names may
    /// contain dashes.
    pub fn parse_dir_name(name: &str) -> Option<Self> {
        let (topic, partition) = name.rsplit_once('-')?;
        if !is_valid_topic_name(topic) || partition.is_empty() || partition.starts_with('+') {
            return None;
        }
        Some(TopicPartition::new(topic, partition.parse().ok()?))
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.topic, self.partition)
    }
}

/// Kafka's rule for topic names: 1 to 249 of `[a-zA-Z0-9._-]`, and not `.` or `..`.
pub fn is_valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Owns a data directory: creates, opens and deletes the partition logs in it, and
/// holds a lock so that two processes never share it.
#[derive(Debug)]
pub struct LogManager {
    dir: PathBuf,
    /// Folders the owner keeps other things in, skipped without a warning.
    others: Vec<String>,
    _lock: File,
}

impl LogManager {
    /// Opens (creating if needed) and locks a data directory, and finishes any deletion
    /// a crash interrupted.
    pub fn open(data_dir: &Path) -> Result<Self> {
        fs::create_dir_all(data_dir).map_err(|e| Error::io(data_dir, e))?;
        let lock_path = data_dir.join(LOCK_FILE);
        let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::Locked {
                    path: data_dir.to_path_buf(),
                })
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
        }
        for entry in fs::read_dir(data_dir).map_err(|e| Error::io(data_dir, e))? {
            let entry = entry.map_err(|e| Error::io(data_dir, e))?;
            if entry.file_name().to_string_lossy().ends_with(DELETE_SUFFIX) {
                // Left by a crash, or being removed by the remover's thread right now
                // (then it may be gone already).
                let path = entry.path();
                match fs::remove_dir_all(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(&path, e)),
                }
            }
        }
        Ok(LogManager {
            dir: data_dir.to_path_buf(),
            others: Vec::new(),
            _lock: lock,
        })
    }

    /// Marks a folder of the data directory as the owner's, not a partition's.
    pub fn with_other_folder(mut self, name: &str) -> Self {
        self.others.push(name.to_string());
        self
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The folder of a partition.
    pub fn partition_dir(&self, tp: &TopicPartition) -> PathBuf {
        self.dir.join(tp.dir_name())
    }

    /// The partitions that have a folder, sorted.
    pub fn partitions(&self) -> Result<Vec<TopicPartition>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))? {
            let entry = entry.map_err(|e| Error::io(&self.dir, e))?;
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !is_dir || name.ends_with(DELETE_SUFFIX) || self.others.iter().any(|o| *o == name) {
                continue;
            }
            match TopicPartition::parse_dir_name(&name) {
                Some(tp) => out.push(tp),
                None => {
                    tracing::warn!(folder = %name, "ignoring a folder that is not TOPIC-PARTITION")
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Opens every partition log at start-up, each with the config `config_for` gives.
    pub fn open_all(
        &self,
        mut config_for: impl FnMut(&TopicPartition) -> LogConfig,
    ) -> Result<Vec<(TopicPartition, Log)>> {
        let mut out = Vec::new();
        for tp in self.partitions()? {
            let config = config_for(&tp);
            let log = Log::open(&self.partition_dir(&tp), config)?;
            out.push((tp, log));
        }
        Ok(out)
    }

    /// Creates a new, empty partition log.
    pub fn create(&self, tp: &TopicPartition, config: LogConfig) -> Result<Log> {
        if !is_valid_topic_name(&tp.topic) {
            return Err(Error::InvalidTopicName(tp.topic.clone()));
        }
        let dir = self.partition_dir(tp);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(Error::PartitionExists(tp.to_string()))
            }
            Err(e) => return Err(Error::io(&dir, e)),
        }
        sync_dir(&self.dir)?;
        Log::open(&dir, config)
    }

    /// Opens an existing partition log.
    pub fn open_log(&self, tp: &TopicPartition, config: LogConfig) -> Result<Log> {
        let dir = self.partition_dir(tp);
        if !dir.is_dir() {
            return Err(Error::UnknownPartition(tp.to_string()));
        }
        Log::open(&dir, config)
    }

    /// Deletes a partition log: the folder is first renamed aside (so a crash midway
    /// never leaves a half-deleted log under its real name), then removed by the
    /// remover's thread; a reopen of the data folder removes any a crash left.
    pub fn delete(&self, log: Log) -> Result<()> {
        let dir = log.dir().to_path_buf();
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let aside = self.dir.join(format!("{name}.{nanos}{DELETE_SUFFIX}"));
        fs::rename(&dir, &aside).map_err(|e| Error::io(&dir, e))?;
        sync_dir(&self.dir)?;
        // The log is closed there too: unmapping the pages its readers touched takes
        // milliseconds per segment.
        crate::remover::remove(Box::new(move || {
            drop(log);
            if let Err(e) = fs::remove_dir_all(&aside) {
                tracing::warn!(folder = %aside.display(), error = %e, "could not remove a deleted log's folder");
            }
        }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka() {
        for ok in ["a", "orders", "my.topic_v2-x", &"x".repeat(249)] {
            assert!(is_valid_topic_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ü", &"x".repeat(250)] {
            assert!(!is_valid_topic_name(bad), "{bad}");
        }
    }

    #[test]
    fn dir_names_round_trip_with_dashes() {
        let tp = TopicPartition::new("my-topic-1", 12);
        assert_eq!(TopicPartition::parse_dir_name(&tp.dir_name()), Some(tp));
        assert_eq!(TopicPartition::parse_dir_name("nodash"), None);
        assert_eq!(TopicPartition::parse_dir_name("t-x"), None);
    }
}
