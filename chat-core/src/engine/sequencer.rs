//! One connection's delivery order for one conversation.
//!
//! The store gives each conversation dense ids (1, 2, 3, …), and once anyone has seen id `n`
//! every id below it is readable (see [`HistoryStore`](crate::store::HistoryStore)). Live
//! messages, though, reach a connection by whatever path the channel layer took, and two senders
//! (on one node or two) race between storing and publishing, so id 8 can arrive before id 7.
//!
//! A [`Sequencer`] turns that into the protocol's promise: frames leave in id order, each once.
//! It remembers the highest id it handed out (`delivered`). The next id goes straight out, and so
//! does whatever was waiting behind it; an older id is a repeat and is dropped; a newer one waits
//! (up to a bound) while the gap is open. A gap that does not close by itself within a grace
//! period means the missing message was lost on its way (a publish that failed, a node that died
//! between storing and publishing, a layer that dropped it): the connection then reads the gap
//! from the store and [`fill`](Sequencer::fill)s it.
//!
//! When the channel layer says delivery was interrupted, messages may be missing that no later
//! arrival points to; [`suspect`](Sequencer::suspect) then makes the store be read after
//! `delivered` once, up to its newest id.
//!
//! It is pure bookkeeping with no I/O, so every arrival order can be tested.

use std::collections::BTreeMap;

use bytes::Bytes;
use tokio::time::Instant;

/// How far past `delivered` one read of a suspected conversation looks (a read returns fewer
/// when the store holds fewer; the probe goes on until the store says there is no more).
const PROBE_SPAN: u64 = 100;

/// A frame for the client, or `None` for a message this connection must count but not receive
/// (its own direct message, answered with an `ack` instead).
pub(crate) type Frame = Option<Bytes>;

/// Delivery order for one conversation of one connection.
#[derive(Debug)]
pub(crate) struct Sequencer {
    /// The highest id handed to the client (or deliberately skipped).
    delivered: u64,
    /// The highest id known to exist.
    seen: u64,
    /// Early arrivals, waiting for the gap below them to close.
    pending: BTreeMap<u64, Frame>,
    /// Most early arrivals kept; more are dropped and read from the store instead.
    capacity: usize,
    /// Since when the id after `delivered` has been missing.
    gap_since: Option<Instant>,
    /// The store may hold messages after `delivered` that never arrived.
    probe: bool,
}

impl Sequencer {
    /// Delivery starts after `delivered`: the client has every id up to it (from history).
    pub(crate) fn new(delivered: u64, capacity: usize) -> Self {
        Self {
            delivered,
            seen: delivered,
            pending: BTreeMap::new(),
            capacity,
            gap_since: None,
            probe: false,
        }
    }

    /// The highest id handed out.
    pub(crate) fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Since when a message has been missing, if one is.
    pub(crate) fn gap_since(&self) -> Option<Instant> {
        self.gap_since
    }

    /// The ids to read from the store to close the gap: those after `delivered` up to the
    /// highest seen (or a span past it, when suspected), or `None` when nothing is missing.
    pub(crate) fn missing(&self) -> Option<(u64, u64)> {
        if self.seen > self.delivered {
            Some((self.delivered, self.seen))
        } else if self.probe {
            Some((self.delivered, self.delivered.saturating_add(PROBE_SPAN)))
        } else {
            None
        }
    }

    /// Delivery was interrupted: messages may be missing that no arrival will point to. The
    /// next repair reads the store after `delivered`, without waiting for a grace period if
    /// `since` is already that long ago.
    pub(crate) fn suspect(&mut self, since: Instant) {
        self.probe = true;
        self.gap_since = Some(self.gap_since.map_or(since, |at| at.min(since)));
    }

    /// A live message arrived. Whatever can now go out in order goes to `emit`. Returns `true`
    /// when a gap has just opened (the caller arms a timer for it).
    pub(crate) fn offer<E>(
        &mut self,
        id: u64,
        frame: Frame,
        now: Instant,
        emit: &mut impl FnMut(Bytes) -> Result<(), E>,
    ) -> Result<bool, E> {
        if id <= self.delivered {
            return Ok(false);
        }
        self.seen = self.seen.max(id);
        if id == self.delivered + 1 {
            self.advance(id, frame, emit)?;
            self.drain(emit)?;
            return Ok(self.restart_gap_clock(now));
        }
        if self.pending.len() < self.capacity {
            self.pending.entry(id).or_insert(frame);
        }
        if self.gap_since.is_none() {
            self.gap_since = Some(now);
            return Ok(true);
        }
        Ok(false)
    }

    /// Messages read from the store, ascending ids after [`missing`](Self::missing)'s start.
    /// `complete_through` is the conversation's newest id when the store was read, given when
    /// the read was not cut short: every id up to it that the store did not return is gone
    /// (retention dropped it) and is skipped rather than awaited forever. Ids above it (live
    /// arrivals during the read) stay awaited. Whatever comes in order goes to `emit`.
    pub(crate) fn fill<E>(
        &mut self,
        stored: impl IntoIterator<Item = (u64, Frame)>,
        complete_through: Option<u64>,
        now: Instant,
        emit: &mut impl FnMut(Bytes) -> Result<(), E>,
    ) -> Result<(), E> {
        for (id, frame) in stored {
            if id <= self.delivered {
                continue;
            }
            // Early live copies older than this one go first (their stored copies are gone).
            self.release_below(id, emit)?;
            // An early live copy knows better whether this connection is to get the frame.
            let frame = self.pending.remove(&id).unwrap_or(frame);
            self.advance(id, frame, emit)?;
            self.drain(emit)?;
        }
        if let Some(head) = complete_through {
            self.release_below(head.saturating_add(1), emit)?;
            self.delivered = self.delivered.max(head);
            self.drain(emit)?;
            self.probe = false;
        }
        self.seen = self.seen.max(self.delivered);
        // A gap still open after a repair is being worked through: the next read follows at
        // once (paced by the caller), not after another grace period.
        if self.seen > self.delivered || self.probe {
            self.gap_since.get_or_insert(now);
        } else {
            self.gap_since = None;
        }
        Ok(())
    }

    /// Hands out, in order, every early arrival below `bound`.
    fn release_below<E>(
        &mut self,
        bound: u64,
        emit: &mut impl FnMut(Bytes) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() >= bound {
                break;
            }
            let (id, frame) = entry.remove_entry();
            self.advance(id, frame, emit)?;
        }
        Ok(())
    }

    fn advance<E>(
        &mut self,
        id: u64,
        frame: Frame,
        emit: &mut impl FnMut(Bytes) -> Result<(), E>,
    ) -> Result<(), E> {
        self.delivered = id;
        match frame {
            Some(frame) => emit(frame),
            None => Ok(()),
        }
    }

    /// Hands out the early arrivals that are next in line.
    fn drain<E>(&mut self, emit: &mut impl FnMut(Bytes) -> Result<(), E>) -> Result<(), E> {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() != self.delivered + 1 {
                break;
            }
            let (id, frame) = entry.remove_entry();
            self.advance(id, frame, emit)?;
        }
        Ok(())
    }

    /// After progress, a remaining gap is a new wait: its clock starts now. `true` when a gap is
    /// open.
    fn restart_gap_clock(&mut self, now: Instant) -> bool {
        self.gap_since = (self.seen > self.delivered || self.probe).then_some(now);
        self.gap_since.is_some()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn frame(id: u64) -> Frame {
        Some(Bytes::from(id.to_string()))
    }

    fn collect(out: &mut Vec<u64>) -> impl FnMut(Bytes) -> Result<(), ()> + '_ {
        |bytes| {
            out.push(std::str::from_utf8(&bytes).unwrap().parse().unwrap());
            Ok(())
        }
    }

    #[test]
    fn in_order_arrivals_go_straight_out_and_repeats_are_dropped() {
        let now = Instant::now();
        let mut seq = Sequencer::new(3, 8);
        let mut out = Vec::new();
        for id in [4, 5, 5, 2, 6] {
            assert!(!seq
                .offer(id, frame(id), now, &mut collect(&mut out))
                .unwrap());
        }
        assert_eq!(out, [4, 5, 6]);
        assert_eq!(seq.missing(), None);
    }

    #[test]
    fn an_early_arrival_waits_for_the_gap_then_both_go_out_in_order() {
        let now = Instant::now();
        let mut seq = Sequencer::new(0, 8);
        let mut out = Vec::new();
        assert!(seq.offer(2, frame(2), now, &mut collect(&mut out)).unwrap());
        assert_eq!(out, [] as [u64; 0]);
        assert_eq!(seq.missing(), Some((0, 2)));
        assert!(seq.gap_since().is_some());
        assert!(!seq.offer(1, frame(1), now, &mut collect(&mut out)).unwrap());
        assert_eq!(out, [1, 2]);
        assert_eq!((seq.missing(), seq.gap_since()), (None, None));
    }

    #[test]
    fn a_lost_message_is_filled_from_the_store() {
        let now = Instant::now();
        let mut seq = Sequencer::new(0, 8);
        let mut out = Vec::new();
        seq.offer(1, frame(1), now, &mut collect(&mut out)).unwrap();
        seq.offer(3, frame(3), now, &mut collect(&mut out)).unwrap();
        seq.offer(4, None, now, &mut collect(&mut out)).unwrap();
        let stored = (2..=4).map(|id| (id, frame(id)));
        seq.fill(stored, Some(4), now, &mut collect(&mut out))
            .unwrap();
        assert_eq!(
            out,
            [1, 2, 3],
            "4 is this connection's own, counted but not sent"
        );
        assert_eq!(seq.delivered(), 4);
        assert_eq!(seq.gap_since(), None);
    }

    #[test]
    fn what_the_store_no_longer_holds_is_skipped_not_awaited() {
        let now = Instant::now();
        let mut seq = Sequencer::new(0, 8);
        let mut out = Vec::new();
        seq.offer(5, frame(5), now, &mut collect(&mut out)).unwrap();
        seq.fill([(4, frame(4))], Some(5), now, &mut collect(&mut out))
            .unwrap();
        assert_eq!(out, [4, 5]);
        assert_eq!(seq.missing(), None);
    }

    #[test]
    fn early_copies_of_messages_retention_dropped_keep_their_place() {
        let now = Instant::now();
        let mut seq = Sequencer::new(0, 8);
        let mut out = Vec::new();
        seq.offer(3, frame(3), now, &mut collect(&mut out)).unwrap();
        seq.offer(7, frame(7), now, &mut collect(&mut out)).unwrap();
        // The store kept only 6..=8.
        let stored = (6..=8).map(|id| (id, frame(id)));
        seq.fill(stored, Some(8), now, &mut collect(&mut out))
            .unwrap();
        assert_eq!(out, [3, 6, 7, 8]);
    }

    #[test]
    fn live_arrivals_during_a_read_stay_awaited() {
        let now = Instant::now();
        let mut seq = Sequencer::new(0, 8);
        let mut out = Vec::new();
        seq.offer(2, frame(2), now, &mut collect(&mut out)).unwrap();
        // While the store is read (its head was 2), id 4 arrives live.
        seq.offer(4, frame(4), now, &mut collect(&mut out)).unwrap();
        seq.fill(
            [(1, frame(1)), (2, frame(2))],
            Some(2),
            now,
            &mut collect(&mut out),
        )
        .unwrap();
        assert_eq!(out, [1, 2]);
        assert_eq!(seq.missing(), Some((2, 4)), "3 is still on its way");
        assert!(seq.gap_since().is_some());
    }

    #[test]
    fn a_partial_fill_keeps_the_gap_open() {
        let now = Instant::now();
        let mut seq = Sequencer::new(0, 2);
        let mut out = Vec::new();
        for id in 3..=10 {
            seq.offer(id, frame(id), now, &mut collect(&mut out))
                .unwrap();
        }
        assert_eq!(seq.pending.len(), 2, "early arrivals are bounded");
        seq.fill(
            [(1, frame(1)), (2, frame(2))],
            None,
            now,
            &mut collect(&mut out),
        )
        .unwrap();
        assert_eq!(out, [1, 2, 3, 4]);
        assert_eq!(seq.missing(), Some((4, 10)));
        seq.fill(
            (5..=10).map(|id| (id, frame(id))),
            Some(10),
            now,
            &mut collect(&mut out),
        )
        .unwrap();
        assert_eq!(out, (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn a_suspected_conversation_is_read_until_the_store_has_no_more() {
        let now = Instant::now();
        let mut seq = Sequencer::new(5, 8);
        let mut out = Vec::new();
        assert_eq!(seq.missing(), None);
        seq.suspect(now);
        assert_eq!(seq.gap_since(), Some(now));
        let (after, upto) = seq.missing().unwrap();
        assert_eq!((after, upto), (5, 5 + PROBE_SPAN));
        // The store had 6..=8 and nothing after.
        let stored = (6..=8).map(|id| (id, frame(id)));
        seq.fill(stored, Some(8), now, &mut collect(&mut out))
            .unwrap();
        assert_eq!(out, [6, 7, 8]);
        assert_eq!((seq.missing(), seq.gap_since()), (None, None));
        // A suspicion with nothing new clears on an empty, complete read.
        seq.suspect(now);
        seq.fill([], Some(8), now, &mut collect(&mut out)).unwrap();
        assert_eq!(seq.missing(), None);
    }

    #[test]
    fn a_repair_cut_short_goes_on_without_a_new_grace() {
        let start = Instant::now();
        let later = start + std::time::Duration::from_secs(1);
        let mut seq = Sequencer::new(0, 8);
        let mut out = Vec::new();
        seq.offer(10, frame(10), start, &mut collect(&mut out))
            .unwrap();
        seq.fill([(1, frame(1))], None, later, &mut collect(&mut out))
            .unwrap();
        assert_eq!(seq.gap_since(), Some(start), "the gap keeps its age");
    }

    proptest! {
        /// Whatever order live copies arrive in, with repeats and losses, and however the store
        /// pages are cut, the client gets every id exactly once, in increasing order.
        #[test]
        fn any_arrival_order_is_delivered_once_in_order(
            n in 1u64..60,
            shuffle in proptest::collection::vec(any::<u64>(), 0..60),
            lost in proptest::collection::vec(any::<bool>(), 60),
            repeats in proptest::collection::vec(1u64..60, 0..10),
            capacity in 1usize..8,
            page in 1usize..8,
        ) {
            let mut arrivals: Vec<u64> = (1..=n).filter(|id| !lost[*id as usize]).collect();
            for (i, key) in shuffle.iter().enumerate() {
                let len = arrivals.len();
                if len > 1 {
                    arrivals.swap(i % len, (*key as usize) % len);
                }
            }
            arrivals.extend(repeats.into_iter().filter(|id| *id <= n));
            let now = Instant::now();
            let mut seq = Sequencer::new(0, capacity);
            let mut out = Vec::new();
            for id in arrivals {
                seq.offer(id, frame(id), now, &mut collect(&mut out)).unwrap();
            }
            // Repair as the connection does: read pages after `delivered` until nothing is
            // missing, but only up to what was seen; then the newest message (always
            // published eventually) arrives and is repaired up to.
            let mut rounds = 0;
            while let Some((after, upto)) = seq.missing() {
                // The store holds all n; a read is cut at its page size.
                let stored: Vec<_> = (after + 1..=n).take(page.min((upto - after) as usize)).map(|id| (id, frame(id))).collect();
                let complete = stored.last().is_some_and(|(id, _)| *id == n).then_some(n);
                seq.fill(stored, complete, now, &mut collect(&mut out)).unwrap();
                rounds += 1;
                prop_assert!(rounds < 1_000);
            }
            if seq.delivered() < n {
                seq.offer(n, frame(n), now, &mut collect(&mut out)).unwrap();
                while let Some((after, upto)) = seq.missing() {
                    let stored: Vec<_> = (after + 1..=n).take(page.min((upto - after) as usize)).map(|id| (id, frame(id))).collect();
                    let complete = stored.last().is_some_and(|(id, _)| *id == n).then_some(n);
                    seq.fill(stored, complete, now, &mut collect(&mut out)).unwrap();
                }
            }
            prop_assert_eq!(out, (1..=n).collect::<Vec<_>>());
        }
    }
}
