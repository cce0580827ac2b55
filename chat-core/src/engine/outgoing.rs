//! A connection's outgoing frames, bounded by **bytes the client has not taken yet**.
//!
//! Frames wait here from the moment the engine routes them until the socket has accepted them
//! (the writer's flush returned): so the count is what the client fails to read, not how far the
//! server itself is behind. An overloaded server routes and writes more slowly, but a client
//! that reads keeps this near empty; only a client that stops reading fills it, and a push over
//! the budget tells the connection to close it (1008). Memory per connection is bounded by the
//! budget either way.
//!
//! The writer takes frames in batches, several per flush. Clones of the handle (for acks sent
//! later by the outbox) push into the same queue; once the connection is gone they are refused.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::Notify;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The budget is spent: the client is not reading.
    Full,
    /// The connection is closed.
    Closed,
}

/// See the module documentation.
pub(crate) struct Outgoing {
    budget: usize,
    state: Mutex<State>,
    ready: Notify,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Bytes>,
    /// Bytes queued plus bytes taken by the writer and not yet flushed.
    pending: usize,
    closed: bool,
}

impl Outgoing {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            budget: budget.max(1),
            state: Mutex::default(),
            ready: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame. A frame larger than the whole budget is still taken when nothing is
    /// pending, so a big `history` page reaches a client that reads.
    pub(crate) fn push(&self, frame: Bytes) -> Result<(), PushError> {
        let mut state = self.state();
        if state.closed {
            return Err(PushError::Closed);
        }
        if state.pending > 0 && state.pending + frame.len() > self.budget {
            return Err(PushError::Full);
        }
        state.pending += frame.len();
        state.frames.push_back(frame);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// Bytes the client has not taken yet.
    pub(crate) fn pending(&self) -> usize {
        self.state().pending
    }

    /// Waits for frames and moves up to about `max_bytes` of them (at least one) into `batch`;
    /// returns their size, to be passed to [`Outgoing::written`] once they are flushed.
    pub(crate) async fn take(&self, batch: &mut Vec<Bytes>, max_bytes: usize) -> usize {
        loop {
            {
                let mut state = self.state();
                let mut taken = 0;
                while let Some(frame) = state.frames.front() {
                    if taken > 0 && taken + frame.len() > max_bytes {
                        break;
                    }
                    taken += frame.len();
                    if let Some(frame) = state.frames.pop_front() {
                        batch.push(frame);
                    }
                }
                if !batch.is_empty() {
                    if state.frames.is_empty() && state.frames.capacity() > 64 {
                        // A burst is over: give its memory back.
                        state.frames.shrink_to(16);
                    }
                    return taken;
                }
            }
            self.ready.notified().await;
        }
    }

    /// The client took `bytes` (a batch from [`Outgoing::take`] was flushed).
    pub(crate) fn written(&self, bytes: usize) {
        let mut state = self.state();
        state.pending = state.pending.saturating_sub(bytes);
    }

    /// Refuses every later push and forgets what is queued.
    pub(crate) fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.frames = VecDeque::new();
        state.pending = 0;
    }

    /// Takes what is queued now, without waiting (for the last frames before a close).
    pub(crate) fn drain(&self) -> Vec<Bytes> {
        let mut state = self.state();
        state.pending = 0;
        state.frames.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame(len: usize) -> Bytes {
        Bytes::from(vec![b'x'; len])
    }

    #[test]
    fn the_budget_counts_bytes_until_they_are_written() {
        let out = Outgoing::new(100);
        assert_eq!(out.push(frame(60)), Ok(()));
        assert_eq!(out.push(frame(50)), Err(PushError::Full));
        assert_eq!(out.push(frame(40)), Ok(()));
        let mut batch = Vec::new();
        let taken = futures::executor::block_on(out.take(&mut batch, 1_000));
        assert_eq!((taken, batch.len()), (100, 2));
        // Taken but not flushed: still the client's to take.
        assert_eq!(out.push(frame(1)), Err(PushError::Full));
        out.written(taken);
        assert_eq!(out.pending(), 0);
        assert_eq!(out.push(frame(1)), Ok(()));
    }

    #[test]
    fn an_oversized_frame_passes_alone() {
        let out = Outgoing::new(10);
        assert_eq!(out.push(frame(50)), Ok(()));
        assert_eq!(out.push(frame(1)), Err(PushError::Full));
    }

    #[test]
    fn a_batch_stops_at_its_size_but_takes_at_least_one() {
        let out = Outgoing::new(1_000);
        for _ in 0..5 {
            out.push(frame(30)).unwrap();
        }
        let mut batch = Vec::new();
        assert_eq!(futures::executor::block_on(out.take(&mut batch, 70)), 60);
        batch.clear();
        assert_eq!(futures::executor::block_on(out.take(&mut batch, 10)), 30);
    }

    #[test]
    fn a_closed_queue_refuses() {
        let out = Outgoing::new(10);
        out.close();
        assert_eq!(out.push(frame(1)), Err(PushError::Closed));
    }
}
