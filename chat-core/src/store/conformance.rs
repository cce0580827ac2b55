//! The conformance suite every [`HistoryStore`] backend must pass (cargo feature `testing`).
//!
//! Each check is an async function that takes a factory, `Fn(StoreConfig) -> impl Future<Output =
//! Arc<dyn HistoryStore>>`, and panics on a broken contract. Every store a factory returns must be
//! empty and separate from the others (a shared server: its own key prefix, schema or database),
//! because checks run in parallel.
//!
//! The de-duplication window is measured on the messages' `ts`, which the checks set, so no check
//! waits for a clock.
//!
//! The [`store_conformance_tests!`](crate::store_conformance_tests) macro expands to one
//! `#[tokio::test]` per check (the calling crate needs `tokio` with the `macros` and
//! `rt-multi-thread` features):
//!
//! ```ignore
//! chat_core::store_conformance_tests!(|config| async move {
//!     std::sync::Arc::new(chat_core::store::InMemoryHistoryStore::with_config(config))
//!         as std::sync::Arc<dyn chat_core::store::HistoryStore>
//! });
//! ```

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{Conversation, HistoryStore, NewMessage, Page, StoreConfig};

fn room_message<'a>(from: &'a str, body: &'a str, ts: u64) -> NewMessage<'a> {
    NewMessage {
        from,
        to: None,
        body,
        ts,
        reference: None,
    }
}

fn direct<'a>(from: &'a str, to: &'a str, body: &'a str, ts: u64) -> NewMessage<'a> {
    NewMessage {
        from,
        to: Some(to),
        body,
        ts,
        reference: None,
    }
}

fn ids(page: &Page) -> Vec<u64> {
    page.messages.iter().map(|m| m.id).collect()
}

/// Each conversation's ids are 1, 2, 3, …, independently of every other conversation, and a
/// stored message reads back as it was written.
pub async fn ids_are_dense_per_conversation<F, Fut>(factory: &F)
where
    F: Fn(StoreConfig) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    let store = factory(StoreConfig::default()).await;
    let a = Conversation::room("a");
    let b = Conversation::room("b");
    let ab = Conversation::direct("alice", "bob");
    for i in 1..=20u64 {
        let stored = store
            .append(&a, room_message("alice", "x", 1000 + i))
            .await
            .unwrap();
        assert_eq!(stored.message.id, i);
        assert!(!stored.duplicate);
        if i % 5 == 0 {
            let other = store.append(&b, room_message("bob", "y", i)).await.unwrap();
            assert_eq!(other.message.id, i / 5);
        }
    }
    let first = store
        .append(&ab, direct("bob", "alice", "psst", 7))
        .await
        .unwrap()
        .message;
    assert_eq!(first.id, 1);
    let page = store.after(&ab, 0, 10).await.unwrap();
    assert_eq!(page.messages, std::slice::from_ref(&first));
    assert_eq!(
        (
            first.from.as_str(),
            first.to.as_deref(),
            first.body.as_str(),
            first.ts
        ),
        ("bob", Some("alice"), "psst", 7)
    );
    assert_eq!(store.after(&a, 0, 100).await.unwrap().last_id, 20);
    assert_eq!(store.after(&b, 0, 100).await.unwrap().last_id, 4);
}

/// A direct conversation is one whichever side is named first, and holds only its own pair's
/// messages.
pub async fn direct_conversations_are_private<F, Fut>(factory: &F)
where
    F: Fn(StoreConfig) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    let store = factory(StoreConfig::default()).await;
    store
        .append(
            &Conversation::direct("alice", "bob"),
            direct("alice", "bob", "for bob", 1),
        )
        .await
        .unwrap();
    store
        .append(
            &Conversation::direct("carol", "alice"),
            direct("carol", "alice", "for alice from carol", 2),
        )
        .await
        .unwrap();
    store
        .append(
            &Conversation::direct("bob", "alice"),
            direct("bob", "alice", "for alice", 3),
        )
        .await
        .unwrap();
    let page = store
        .before(&Conversation::direct("bob", "alice"), None, 10)
        .await
        .unwrap();
    let bodies: Vec<&str> = page.messages.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["for bob", "for alice"]);
    assert_eq!(ids(&page), [1, 2]);
    let carol = store
        .after(&Conversation::direct("alice", "carol"), 0, 10)
        .await
        .unwrap();
    assert_eq!(carol.messages.len(), 1);
    assert!(store
        .after(&Conversation::direct("bob", "carol"), 0, 10)
        .await
        .unwrap()
        .messages
        .is_empty());
}

/// `before` pages backwards and `after` forwards, oldest first, with `more` telling whether the
/// page was cut and `last_id` the conversation's newest id.
pub async fn pages_before_and_after<F, Fut>(factory: &F)
where
    F: Fn(StoreConfig) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    let store = factory(StoreConfig::default()).await;
    let room = Conversation::room("paging");
    for i in 0..10 {
        store
            .append(&room, room_message("x", "b", i))
            .await
            .unwrap();
    }
    let page = |page: Page| (ids(&page), page.more, page.last_id);
    assert_eq!(
        page(store.before(&room, None, 3).await.unwrap()),
        (vec![8, 9, 10], true, 10)
    );
    assert_eq!(
        page(store.before(&room, Some(8), 3).await.unwrap()),
        (vec![5, 6, 7], true, 10)
    );
    assert_eq!(
        page(store.before(&room, Some(3), 5).await.unwrap()),
        (vec![1, 2], false, 10)
    );
    assert_eq!(
        page(store.before(&room, Some(4), 2).await.unwrap()),
        (vec![2, 3], true, 10),
        "one older message left is more"
    );
    assert_eq!(
        page(store.after(&room, 0, 9).await.unwrap()),
        (vec![1, 2, 3, 4, 5, 6, 7, 8, 9], true, 10),
        "one newer message left is more"
    );
    assert_eq!(
        page(store.before(&room, None, 10).await.unwrap()),
        (vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10], false, 10)
    );
    assert_eq!(
        page(store.after(&room, 6, 3).await.unwrap()),
        (vec![7, 8, 9], true, 10)
    );
    assert_eq!(
        page(store.after(&room, 7, 3).await.unwrap()),
        (vec![8, 9, 10], false, 10)
    );
    assert_eq!(
        page(store.after(&room, 10, 3).await.unwrap()),
        (vec![], false, 10)
    );
    assert_eq!(
        page(
            store
                .before(&Conversation::room("none"), None, 3)
                .await
                .unwrap()
        ),
        (vec![], false, 0)
    );
    assert_eq!(
        page(
            store
                .after(&Conversation::room("none"), 0, 3)
                .await
                .unwrap()
        ),
        (vec![], false, 0)
    );
}

/// Appends racing from many tasks into one conversation get every id from 1 up exactly once,
/// and whoever has seen an id can read every id below it: the rule that lets a connection fill a
/// gap from the store.
pub async fn concurrent_appends_are_dense_and_visible_in_order<F, Fut>(factory: &F)
where
    F: Fn(StoreConfig) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    let store = factory(StoreConfig::default()).await;
    let room = Conversation::room("race");
    let (tasks, each) = (8u64, 25u64);
    let mut handles = Vec::new();
    for task in 0..tasks {
        let store = Arc::clone(&store);
        let room = room.clone();
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..each {
                let from = format!("u{task}");
                let body = format!("{task}-{i}");
                let stored = store
                    .append(&room, room_message(&from, &body, i))
                    .await
                    .unwrap()
                    .message;
                let seen = store.after(&room, 0, 1_000).await.unwrap();
                assert!(seen.last_id >= stored.id);
                let visible: Vec<u64> = ids(&seen);
                assert_eq!(
                    visible[..stored.id as usize],
                    (1..=stored.id).collect::<Vec<_>>()[..],
                    "id {} was returned before every id below it was readable",
                    stored.id
                );
                mine.push(stored.id);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for handle in handles {
        all.extend(handle.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=tasks * each).collect::<Vec<_>>());
}

/// A retry (same user, conversation and `ref` within the window) stores nothing and returns the
/// first message; another user, another conversation, or a retry after the window is new.
pub async fn retries_are_stored_once<F, Fut>(factory: &F)
where
    F: Fn(StoreConfig) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    let window = Duration::from_secs(600);
    let store = factory(StoreConfig {
        dedup_window: window,
        ..StoreConfig::default()
    })
    .await;
    let room = Conversation::room("retry");
    let other = Conversation::room("retry-other");
    let send = |from: &'static str, body: &'static str, ts: u64| NewMessage {
        from,
        to: None,
        body,
        ts,
        reference: Some("r1"),
    };
    let first = store
        .append(&room, send("alice", "hi", 1_000))
        .await
        .unwrap();
    assert!(!first.duplicate);
    let retry = store
        .append(&room, send("alice", "hi", 1_000 + 599_000))
        .await
        .unwrap();
    assert!(
        retry.duplicate,
        "a retry within the window was stored again"
    );
    assert_eq!(
        retry.message, first.message,
        "a retry gets the first message back"
    );
    let bob = store.append(&room, send("bob", "hi", 2_000)).await.unwrap();
    assert!(!bob.duplicate, "refs are per user");
    assert_eq!(bob.message.id, 2);
    let elsewhere = store
        .append(&other, send("alice", "hi", 2_000))
        .await
        .unwrap();
    assert!(!elsewhere.duplicate, "refs are per conversation");
    assert_eq!(elsewhere.message.id, 1);
    let unkeyed = store
        .append(&room, room_message("alice", "hi", 3_000))
        .await
        .unwrap();
    assert!(!unkeyed.duplicate);
    let late = store
        .append(&room, send("alice", "hi", 1_000 + 600_000))
        .await
        .unwrap();
    assert!(!late.duplicate, "a ref is forgotten once its window ended");
    assert_eq!(late.message.id, 4);
    assert_eq!(
        ids(&store.after(&room, 0, 100).await.unwrap()),
        [1, 2, 3, 4]
    );
}

/// Retries racing each other, from many tasks, store the message exactly once and all get its id.
pub async fn concurrent_retries_store_once<F, Fut>(factory: &F)
where
    F: Fn(StoreConfig) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    let store = factory(StoreConfig::default()).await;
    let room = Conversation::room("retry-race");
    let attempts: Vec<_> = (0..16)
        .map(|_| {
            let store = Arc::clone(&store);
            let room = room.clone();
            tokio::spawn(async move {
                let message = NewMessage {
                    from: "alice",
                    to: None,
                    body: "once",
                    ts: 5_000,
                    reference: Some("same"),
                };
                store.append(&room, message).await.unwrap()
            })
        })
        .collect();
    let mut stored = 0;
    let mut seen = HashSet::new();
    for attempt in attempts {
        let appended = attempt.await.unwrap();
        stored += usize::from(!appended.duplicate);
        seen.insert(appended.message.id);
    }
    assert_eq!(stored, 1, "racing retries were stored {stored} times");
    assert_eq!(seen, HashSet::from([1]));
    assert_eq!(ids(&store.after(&room, 0, 100).await.unwrap()), [1]);

    // Without a window nothing is a retry, even racing in one batch.
    let store = factory(StoreConfig {
        dedup_window: Duration::ZERO,
        ..StoreConfig::default()
    })
    .await;
    let attempts: Vec<_> = (0..16)
        .map(|_| {
            let store = Arc::clone(&store);
            let room = room.clone();
            tokio::spawn(async move {
                let message = NewMessage {
                    from: "alice",
                    to: None,
                    body: "each",
                    ts: 5_000,
                    reference: Some("same"),
                };
                store.append(&room, message).await.unwrap()
            })
        })
        .collect();
    for attempt in attempts {
        assert!(!attempt.await.unwrap().duplicate, "no window, yet a retry");
    }
    assert_eq!(
        ids(&store.after(&room, 0, 100).await.unwrap()),
        (1..=16).collect::<Vec<_>>()
    );
}

/// Read positions only move forward, per user and conversation.
pub async fn read_positions_only_move_forward<F, Fut>(factory: &F)
where
    F: Fn(StoreConfig) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    let store = factory(StoreConfig::default()).await;
    let room = Conversation::room("reads");
    assert_eq!(store.mark_read("alice", &room, 5).await.unwrap(), 5);
    assert_eq!(store.mark_read("alice", &room, 3).await.unwrap(), 5);
    assert_eq!(store.mark_read("alice", &room, 9).await.unwrap(), 9);
    assert_eq!(store.mark_read("bob", &room, 2).await.unwrap(), 2);
    let other = Conversation::room("reads-other");
    assert_eq!(store.mark_read("alice", &other, 1).await.unwrap(), 1);
}

/// The inbox lists a user's direct conversations, most recent first (even within one
/// millisecond), with the newest id, the read position and the partner's unread messages; the
/// newest ids are also what `direct_heads` reports.
pub async fn inbox_counts_unread_from_the_partner<F, Fut>(factory: &F)
where
    F: Fn(StoreConfig) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    let store = factory(StoreConfig::default()).await;
    let ab = Conversation::direct("alice", "bob");
    let ac = Conversation::direct("carol", "alice");
    store
        .append(&ab, direct("bob", "alice", "1", 1))
        .await
        .unwrap();
    store
        .append(&ab, direct("alice", "bob", "2", 2))
        .await
        .unwrap();
    store
        .append(&ab, direct("bob", "alice", "3", 3))
        .await
        .unwrap();
    store
        .append(&ac, direct("carol", "alice", "1", 3))
        .await
        .unwrap();
    store
        .append(&Conversation::room("lobby"), room_message("bob", "x", 4))
        .await
        .unwrap();

    let view = |entries: Vec<super::InboxEntry>| {
        entries
            .into_iter()
            .map(|e| (e.with, e.last_id, e.read_id, e.unread))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        view(store.inbox("alice").await.unwrap()),
        [("carol".into(), 1, 0, 1), ("bob".into(), 3, 0, 2)]
    );
    store.mark_read("alice", &ab, 1).await.unwrap();
    assert_eq!(
        view(store.inbox("alice").await.unwrap()),
        [("carol".into(), 1, 0, 1), ("bob".into(), 3, 1, 1)]
    );
    assert_eq!(
        view(store.inbox("bob").await.unwrap()),
        [("alice".into(), 3, 0, 1)]
    );
    assert!(store.inbox("dave").await.unwrap().is_empty());

    let mut heads = store.direct_heads("alice").await.unwrap();
    heads.sort();
    assert_eq!(heads, [("bob".into(), 3), ("carol".into(), 1)]);
    assert!(store.direct_heads("dave").await.unwrap().is_empty());
}

/// Retention keeps the newest messages of each conversation and never gives an id out twice.
pub async fn retention_keeps_the_newest<F, Fut>(factory: &F)
where
    F: Fn(StoreConfig) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    let store = factory(StoreConfig {
        retention: 3,
        ..StoreConfig::default()
    })
    .await;
    let room = Conversation::room("kept");
    for i in 0..10 {
        store
            .append(&room, room_message("x", "b", i))
            .await
            .unwrap();
    }
    let newest = store.before(&room, None, 100).await.unwrap();
    assert_eq!(
        (ids(&newest), newest.more, newest.last_id),
        (vec![8, 9, 10], false, 10)
    );
    assert_eq!(ids(&store.after(&room, 0, 100).await.unwrap()), [8, 9, 10]);
    let next = store
        .append(&room, room_message("x", "b", 11))
        .await
        .unwrap();
    assert_eq!(next.message.id, 11);
    let other = Conversation::room("kept-other");
    store
        .append(&other, room_message("x", "b", 1))
        .await
        .unwrap();
    assert_eq!(
        ids(&store.after(&other, 0, 100).await.unwrap()),
        [1],
        "retention is per conversation"
    );
}

/// With a maximum age, messages older than it (by their `ts`) fall out of history and of the
/// unread counts; ids go on.
pub async fn retention_by_age<F, Fut>(factory: &F)
where
    F: Fn(StoreConfig) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    let store = factory(StoreConfig {
        max_age: Some(Duration::from_secs(3_600)),
        ..StoreConfig::default()
    })
    .await;
    let now = super::now_ms();
    let two_hours_ago = now - 7_200_000;
    let room = Conversation::room("aged");
    for ts in [two_hours_ago, two_hours_ago + 1, now] {
        store
            .append(&room, room_message("x", "b", ts))
            .await
            .unwrap();
    }
    let kept = store.before(&room, None, 100).await.unwrap();
    assert_eq!((ids(&kept), kept.more, kept.last_id), (vec![3], false, 3));
    assert_eq!(ids(&store.after(&room, 0, 100).await.unwrap()), [3]);
    let dm = Conversation::direct("alice", "bob");
    store
        .append(&dm, direct("bob", "alice", "old", two_hours_ago))
        .await
        .unwrap();
    store
        .append(&dm, direct("bob", "alice", "new", now))
        .await
        .unwrap();
    let inbox = store.inbox("alice").await.unwrap();
    assert_eq!(
        (inbox[0].last_id, inbox[0].unread),
        (2, 1),
        "only the kept message is unread"
    );
}

/// The epoch names the store and stays the same for as long as it lives.
pub async fn the_epoch_is_stable<F, Fut>(factory: &F)
where
    F: Fn(StoreConfig) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    let store = factory(StoreConfig::default()).await;
    let epoch = store.epoch().await.unwrap();
    assert!(!epoch.is_empty());
    store
        .append(&Conversation::room("e"), room_message("x", "b", 1))
        .await
        .unwrap();
    assert_eq!(store.epoch().await.unwrap(), epoch);
}

/// A live store answers a readiness ping, empty or not.
pub async fn a_live_store_answers_a_ping<F, Fut>(factory: &F)
where
    F: Fn(StoreConfig) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    let store = factory(StoreConfig::default()).await;
    store.ping().await.unwrap();
    store
        .append(&Conversation::room("p"), room_message("x", "b", 1))
        .await
        .unwrap();
    store.ping().await.unwrap();
}

/// Expands to one `#[tokio::test]` per check of the suite, each calling it with `$factory`.
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::store_conformance_tests!(@each $factory;
            ids_are_dense_per_conversation, direct_conversations_are_private,
            pages_before_and_after, concurrent_appends_are_dense_and_visible_in_order,
            retries_are_stored_once, concurrent_retries_store_once,
            read_positions_only_move_forward, inbox_counts_unread_from_the_partner,
            retention_keeps_the_newest, retention_by_age, the_epoch_is_stable,
            a_live_store_answers_a_ping);
    };
    (@each $factory:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                $crate::store::conformance::$check(&$factory).await;
            }
        )*
    };
}

/// For a durable store: what was acknowledged is there after the store is opened again, with the
/// same ids, the same epoch, and its refs still recognised.
///
/// `open` opens the store at one place each time it is called (the same file, the same
/// database schema); the first call finds it empty.
pub async fn survives_being_opened_again<F, Fut>(open: &F)
where
    F: Fn(StoreConfig) -> Fut,
    Fut: Future<Output = Arc<dyn HistoryStore>>,
{
    let room = Conversation::room("durable");
    let dm = Conversation::direct("alice", "bob");
    let (epoch, stored) = {
        let store = open(StoreConfig::default()).await;
        let mut stored = Vec::new();
        for i in 0..100u64 {
            let body = format!("m{i}");
            let reference = format!("r{i}");
            let message = NewMessage {
                from: "alice",
                to: None,
                body: &body,
                ts: 1_000 + i,
                reference: Some(&reference),
            };
            stored.push(store.append(&room, message).await.unwrap().message);
        }
        store
            .append(&dm, direct("bob", "alice", "while you were away", 5_000))
            .await
            .unwrap();
        store.mark_read("alice", &room, 40).await.unwrap();
        (store.epoch().await.unwrap(), stored)
    };
    let store = open(StoreConfig::default()).await;
    assert_eq!(store.epoch().await.unwrap(), epoch, "the epoch changed");
    let page = store.after(&room, 0, 1_000).await.unwrap();
    assert_eq!(page.messages, stored, "history changed");
    let retry = NewMessage {
        from: "alice",
        to: None,
        body: "m7",
        ts: 2_000,
        reference: Some("r7"),
    };
    let again = store.append(&room, retry).await.unwrap();
    assert!(again.duplicate, "a ref was forgotten");
    assert_eq!(again.message, stored[7]);
    let next = store
        .append(&room, room_message("alice", "after", 3_000))
        .await
        .unwrap();
    assert_eq!(next.message.id, 101, "ids started again");
    assert_eq!(store.mark_read("alice", &room, 1).await.unwrap(), 40);
    let inbox = store.inbox("alice").await.unwrap();
    assert_eq!(
        inbox
            .iter()
            .map(|e| (e.with.as_str(), e.last_id, e.unread))
            .collect::<Vec<_>>(),
        [("bob", 1, 1)]
    );
}

/// Expands to the durable-store check: `$open` is `Fn(StoreConfig) -> impl Future<Output =
/// Arc<dyn HistoryStore>>` opening one place, made afresh by `$place` for the test.
#[macro_export]
macro_rules! durable_store_conformance_tests {
    ($place:expr, $open:expr) => {
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn survives_being_opened_again() {
            let place = ($place)().await;
            let open = |config| ($open)(place.clone(), config);
            $crate::store::conformance::survives_being_opened_again(&open).await;
        }
    };
}
