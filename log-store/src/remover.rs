//! One thread, started with the first job, that removes files in order away from
//! whoever deleted them: unlinking a file evicts its pages from the page cache (about
//! 0.15 s for a 1 GiB segment, measured), which an appending thread should not wait
//! for.

use std::sync::mpsc::{channel, Sender};
use std::sync::OnceLock;

/// Work for the remover: closing and unlinking what was already renamed aside.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

static QUEUE: OnceLock<Option<Sender<Job>>> = OnceLock::new();

/// Runs `job` on the remover's thread, or here if that thread cannot be had.
pub(crate) fn remove(job: Job) {
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        std::thread::Builder::new()
            .name("log-remover".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .ok()
            .map(|_| tx)
    });
    let job = match queue {
        Some(tx) => match tx.send(job) {
            Ok(()) => return,
            Err(refused) => refused.0,
        },
        None => job,
    };
    job();
}
