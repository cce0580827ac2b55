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
//!
//! The connection's own reader and forwarder push with [`Outgoing::push_local`], which wakes
//! nobody: they run in the writer's task, which polls the writer after them in the same pass. A
//! wake from there would only make the task run again, at the back of the run queue, once per
//! delivery. Pushes from other tasks wake the writer.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

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
}

#[derive(Default)]
struct State {
    frames: VecDeque<Bytes>,
    /// Bytes queued plus bytes taken by the writer and not yet flushed.
    pending: usize,
    closed: bool,
    /// The writer, waiting in [`Outgoing::take`] for frames.
    writer: Option<Waker>,
}

impl Outgoing {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            budget: budget.max(1),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame and wakes the writer: for pushes from other tasks. A frame larger than the
    /// whole budget is still taken when nothing is pending, so a big `history` page reaches a
    /// client that reads.
    pub(crate) fn push(&self, frame: Bytes) -> Result<(), PushError> {
        let writer = {
            let mut state = self.state();
            self.queue(&mut state, frame)?;
            state.writer.take()
        };
        if let Some(writer) = writer {
            writer.wake();
        }
        Ok(())
    }

    /// Queues a frame from the writer's own task, which polls the writer later in the same pass:
    /// no wake-up.
    pub(crate) fn push_local(&self, frame: Bytes) -> Result<(), PushError> {
        self.queue(&mut self.state(), frame)
    }

    fn queue(&self, state: &mut State, frame: Bytes) -> Result<(), PushError> {
        if state.closed {
            return Err(PushError::Closed);
        }
        if state.pending > 0 && state.pending + frame.len() > self.budget {
            return Err(PushError::Full);
        }
        state.pending += frame.len();
        state.frames.push_back(frame);
        Ok(())
    }

    /// Bytes the client has not taken yet.
    pub(crate) fn pending(&self) -> usize {
        self.state().pending
    }

    /// Waits for frames and moves up to about `max_bytes` of them (at least one) into `batch`;
    /// returns their size, to be passed to [`Outgoing::written`] once they are flushed.
    pub(crate) async fn take(&self, batch: &mut Vec<Bytes>, max_bytes: usize) -> usize {
        std::future::poll_fn(|cx| self.poll_take(cx, batch, max_bytes)).await
    }

    /// Looks at the queue every time it is polled (so a local push needs no wake-up), and
    /// leaves the task's waker for pushes from elsewhere when there is nothing.
    fn poll_take(
        &self,
        cx: &mut Context<'_>,
        batch: &mut Vec<Bytes>,
        max_bytes: usize,
    ) -> Poll<usize> {
        let mut state = self.state();
        let taken = Self::take_queued(&mut state, batch, max_bytes);
        if taken > 0 {
            return Poll::Ready(taken);
        }
        match &mut state.writer {
            Some(writer) if writer.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Moves what is queued now, up to about `max_bytes`, into `batch`; waits for nothing.
    pub(crate) fn take_now(&self, batch: &mut Vec<Bytes>, max_bytes: usize) -> usize {
        Self::take_queued(&mut self.state(), batch, max_bytes)
    }

    fn take_queued(state: &mut State, batch: &mut Vec<Bytes>, max_bytes: usize) -> usize {
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
        if state.frames.is_empty() && state.frames.capacity() > 64 {
            // A burst is over: give its memory back.
            state.frames.shrink_to(16);
        }
        taken
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
        state.writer = None;
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

    struct Wakes(std::sync::atomic::AtomicUsize);

    impl futures::task::ArcWake for Wakes {
        fn wake_by_ref(this: &std::sync::Arc<Self>) {
            this.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn local_pushes_are_seen_without_a_wake_and_others_wake_the_writer() {
        let wakes = std::sync::Arc::new(Wakes(Default::default()));
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let count = || wakes.0.load(std::sync::atomic::Ordering::SeqCst);
        let out = Outgoing::new(1_000);
        let mut batch = Vec::new();
        assert_eq!(out.poll_take(&mut cx, &mut batch, 100), Poll::Pending);
        // From the writer's own task: no wake, and the next poll of the writer finds it.
        out.push_local(frame(10)).unwrap();
        assert_eq!(count(), 0);
        assert_eq!(out.poll_take(&mut cx, &mut batch, 100), Poll::Ready(10));
        batch.clear();
        assert_eq!(out.poll_take(&mut cx, &mut batch, 100), Poll::Pending);
        // From another task (the outbox's ack): the writer is woken, once.
        out.push(frame(5)).unwrap();
        out.push(frame(5)).unwrap();
        assert_eq!(count(), 1);
        assert_eq!(out.poll_take(&mut cx, &mut batch, 100), Poll::Ready(10));
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
