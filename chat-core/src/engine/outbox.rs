//! Publishing that the channel layer refused, retried until it succeeds.
//!
//! A message is stored first and published second. When storing worked but the layer failed
//! (Redis went away between the two), the message exists: telling the sender `unavailable` would
//! be a lie that makes it send a duplicate, and acknowledging it would claim a delivery that did
//! not happen. So the publish goes to the outbox, a bounded queue worked by one task that retries
//! with backoff, and the sender's `ack` is sent when the publish succeeds. Connections that were
//! meant to get the message meanwhile fill the gap from the store as soon as any later message of
//! the conversation reaches them.
//!
//! While the outbox holds anything the layer is failing, and new sends are refused with
//! `unavailable` before anything is stored.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Inner, Outgoing};

/// The first retry's delay; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Where to send an `ack` once the publish succeeded.
pub(crate) struct AckTo {
    pub(crate) connection: Arc<Outgoing>,
    pub(crate) frame: Bytes,
}

/// The layer sends still to be made for one message, and who waits for it.
pub(crate) struct Job {
    pub(crate) sends: Vec<(String, Bytes)>,
    pub(crate) ack: Option<AckTo>,
}

pub(crate) struct Outbox {
    queue: mpsc::Sender<Job>,
    /// Taken by the worker when it starts.
    receiver: Mutex<Option<mpsc::Receiver<Job>>>,
    /// Jobs queued or being retried.
    backlog: Arc<AtomicUsize>,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Self {
        let (queue, receiver) = mpsc::channel(capacity.max(1));
        Self {
            queue,
            receiver: Mutex::new(Some(receiver)),
            backlog: Arc::default(),
        }
    }

    /// Whether publishes are failing right now.
    pub(crate) fn failing(&self) -> bool {
        self.backlog.load(Ordering::Acquire) > 0
    }

    /// Queues a job; `false` when the outbox is full (the job is dropped: its message is stored,
    /// and reaches clients through gap repair and resume).
    pub(crate) fn push(&self, job: Job) -> bool {
        self.backlog.fetch_add(1, Ordering::AcqRel);
        if self.queue.try_send(job).is_ok() {
            return true;
        }
        self.backlog.fetch_sub(1, Ordering::AcqRel);
        false
    }

    /// Starts the worker on the current runtime; it ends when the `Chat` is gone.
    pub(crate) fn start(&self, inner: Weak<Inner>) {
        let receiver = self
            .receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(receiver) = receiver {
            tokio::spawn(work(receiver, inner, Arc::clone(&self.backlog)));
        }
    }
}

async fn work(mut receiver: mpsc::Receiver<Job>, inner: Weak<Inner>, backlog: Arc<AtomicUsize>) {
    while let Some(mut job) = receiver.recv().await {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let Some(inner) = inner.upgrade() else { return };
            let mut failed = Vec::new();
            for (group, message) in job.sends.drain(..) {
                if let Err(error) = inner.layer.group_send(&group, message.clone()).await {
                    tracing::debug!(%error, group, "publish retry failed");
                    failed.push((group, message));
                }
            }
            drop(inner);
            if failed.is_empty() {
                break;
            }
            job.sends = failed;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        if let Some(ack) = job.ack {
            // A connection that went away or stopped reading will retry with the same ref.
            let _ = ack.connection.push(ack.frame);
        }
        backlog.fetch_sub(1, Ordering::AcqRel);
        tracing::debug!("a stored message that had failed to publish is delivered");
    }
}
