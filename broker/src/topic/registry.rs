//! Topic metadata on disk: `topics.json` in the data directory, replaced atomically.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the broker remembers of a topic across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMeta {
    /// Topic name.
    pub name: String,
    /// Number of partitions.
    pub partitions: u32,
    /// Replicas per partition.
    pub replication_factor: u32,
    /// Config keys set on this topic (the rest come from the broker's defaults).
    pub configs: BTreeMap<String, String>,
    /// Creation time, ms since the epoch.
    pub created_ms: i64,
    /// The cluster's id for this topic, telling it from an older topic of the same
    /// name (0: created on this broker alone).
    #[serde(default)]
    pub topic_id: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct TopicsFile {
    version: u32,
    topics: Vec<TopicMeta>,
}

const FILE: &str = "topics.json";
const VERSION: u32 = 1;

/// The path of the metadata file in a data directory.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// Loads topic metadata; an absent file means no topics.
pub fn load(data_dir: &Path) -> Result<BTreeMap<String, TopicMeta>, String> {
    let p = path(data_dir);
    let text = match fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(format!("reading {}: {e}", p.display())),
    };
    let file: TopicsFile =
        serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", p.display()))?;
    if file.version != VERSION {
        return Err(format!(
            "{} has version {}, this broker reads version {VERSION}",
            p.display(),
            file.version
        ));
    }
    Ok(file
        .topics
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect())
}

/// Writes topic metadata: to a temporary file, synced, renamed over the old one, and the
/// directory synced, so a crash leaves either the old or the new file whole.
pub fn store(data_dir: &Path, topics: &BTreeMap<String, TopicMeta>) -> std::io::Result<()> {
    let file = TopicsFile {
        version: VERSION,
        topics: topics.values().cloned().collect(),
    };
    let text = serde_json::to_string_pretty(&file).map_err(std::io::Error::other)?;
    let tmp = data_dir.join(format!("{FILE}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path(data_dir))?;
    fs::File::open(data_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_and_load_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(load(dir.path()).expect("empty").is_empty());
        let mut topics = BTreeMap::new();
        topics.insert(
            "orders".to_string(),
            TopicMeta {
                name: "orders".into(),
                partitions: 3,
                replication_factor: 1,
                configs: [("retention.ms".to_string(), "1000".to_string())].into(),
                created_ms: 5,
                topic_id: 7,
            },
        );
        store(dir.path(), &topics).expect("store");
        assert_eq!(load(dir.path()).expect("load"), topics);
    }

    #[test]
    fn garbage_is_an_error_not_an_empty_cluster() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(path(dir.path()), "{not json").expect("write");
        assert!(load(dir.path()).is_err());
    }
}
