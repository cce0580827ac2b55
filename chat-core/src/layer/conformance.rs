//! The conformance suite every [`ChannelLayer`] backend must pass (cargo feature `testing`).
//!
//! Each check is an async function that takes a factory, `Fn(LayerConfig) -> impl Future<Output =
//! Arc<dyn ChannelLayer>>`, builds the layers it needs with the settings it needs, and panics on a
//! broken contract. A factory for a shared server (Redis, say) must give each layer its own key
//! prefix so that checks running in parallel do not see each other.
//!
//! Checks use wall-clock time with wide margins (expiries of a few hundred milliseconds, waits of
//! several times that), because a network backend expires messages on its own clock; they never
//! assert how fast anything is.
//!
//! The [`layer_conformance_tests!`](crate::layer_conformance_tests) macro expands to one
//! `#[tokio::test]` per check, so a backend's test file is one line (the calling crate needs
//! `tokio` with the `macros` and `rt-multi-thread` features):
//!
//! ```ignore
//! chat_core::layer_conformance_tests!(|config| async move {
//!     std::sync::Arc::new(chat_core::layer::InMemoryChannelLayer::new(config))
//!         as std::sync::Arc<dyn chat_core::layer::ChannelLayer>
//! });
//! ```

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{ChannelLayer, LayerConfig, LayerError, Subscription};

/// How long a check waits for a message that must arrive before calling it lost.
const ARRIVAL: Duration = Duration::from_secs(5);
/// How long a check watches for a message that must not arrive.
const QUIET: Duration = Duration::from_millis(300);

async fn expect_message(sub: &mut Subscription) -> Bytes {
    match tokio::time::timeout(ARRIVAL, sub.recv()).await {
        Ok(Some(message)) => message,
        Ok(None) => panic!("subscription {} ended", sub.name()),
        Err(_) => panic!("no message reached {} within {ARRIVAL:?}", sub.name()),
    }
}

/// Nothing arrives for a moment, and the subscription is still open.
async fn expect_nothing(sub: &mut Subscription) {
    match tokio::time::timeout(QUIET, sub.recv()).await {
        Err(_) => {}
        Ok(Some(message)) => panic!("{} received {message:?}, expected nothing", sub.name()),
        Ok(None) => panic!(
            "{}: the subscription ended, expected it open and quiet",
            sub.name()
        ),
    }
}

fn msg(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

/// A message sent to a channel arrives, byte for byte.
pub async fn send_and_receive<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let layer = factory(LayerConfig::default()).await;
    let mut sub = layer.new_channel("conn").await.unwrap();
    layer.send(sub.name(), msg("hello")).await.unwrap();
    assert_eq!(expect_message(&mut sub).await, msg("hello"));
    expect_nothing(&mut sub).await;
}

/// `new_channel` names are unique, carry the prefix and are valid channel names.
pub async fn new_channel_names<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let layer = factory(LayerConfig::default()).await;
    let mut subs = Vec::new();
    for _ in 0..200 {
        subs.push(layer.new_channel("conn-x_1").await.unwrap());
    }
    let names: HashSet<&str> = subs.iter().map(Subscription::name).collect();
    assert_eq!(names.len(), subs.len(), "duplicate channel names");
    for name in names {
        assert!(name.starts_with("conn-x_1."), "{name} lacks its prefix");
        super::validate_channel_name(name).unwrap();
    }
}

/// Messages from one sender to one channel arrive in the order they were sent.
pub async fn order_per_sender<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let layer = factory(LayerConfig::default()).await;
    let mut sub = layer.new_channel("conn").await.unwrap();
    for i in 0..100 {
        layer.send(sub.name(), msg(&i.to_string())).await.unwrap();
    }
    for i in 0..100 {
        assert_eq!(expect_message(&mut sub).await, msg(&i.to_string()));
    }
}

/// A channel nobody holds is `NoSuchChannel`, not a silent drop.
pub async fn send_to_unknown_channel<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let layer = factory(LayerConfig::default()).await;
    let err = layer.send("conn.nobody", msg("x")).await.unwrap_err();
    assert_eq!(err, LayerError::NoSuchChannel("conn.nobody".into()));
}

/// `group_send` reaches every member exactly once and reports how many.
pub async fn group_send_reaches_every_member<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let layer = factory(LayerConfig::default()).await;
    let mut members = Vec::new();
    for _ in 0..5 {
        let sub = layer.new_channel("conn").await.unwrap();
        layer.group_add("room.a", sub.name()).await.unwrap();
        members.push(sub);
    }
    let mut outsider = layer.new_channel("conn").await.unwrap();
    layer.group_add("room.b", outsider.name()).await.unwrap();

    let report = layer.group_send("room.a", msg("hi all")).await.unwrap();
    assert_eq!(report.delivered, 5);
    assert_eq!(report.dropped_full, 0);
    for sub in &mut members {
        assert_eq!(expect_message(sub).await, msg("hi all"));
    }
    for sub in &mut members {
        expect_nothing(sub).await;
    }
    expect_nothing(&mut outsider).await;

    let empty = layer.group_send("room.nobody", msg("x")).await.unwrap();
    assert_eq!(empty.delivered, 0);
}

/// Adding a channel twice makes one membership, not two deliveries.
pub async fn group_add_is_idempotent<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let layer = factory(LayerConfig::default()).await;
    let mut sub = layer.new_channel("conn").await.unwrap();
    layer.group_add("room", sub.name()).await.unwrap();
    layer.group_add("room", sub.name()).await.unwrap();
    let report = layer.group_send("room", msg("once")).await.unwrap();
    assert_eq!(report.delivered, 1);
    assert_eq!(expect_message(&mut sub).await, msg("once"));
    expect_nothing(&mut sub).await;
}

/// A discarded channel gets no more group messages; discarding a non-member is fine.
pub async fn group_discard<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let layer = factory(LayerConfig::default()).await;
    let mut stays = layer.new_channel("conn").await.unwrap();
    let mut goes = layer.new_channel("conn").await.unwrap();
    layer.group_add("room", stays.name()).await.unwrap();
    layer.group_add("room", goes.name()).await.unwrap();
    layer.group_discard("room", goes.name()).await.unwrap();
    layer.group_discard("room", goes.name()).await.unwrap();
    layer.group_discard("other", stays.name()).await.unwrap();

    let report = layer.group_send("room", msg("after")).await.unwrap();
    assert_eq!(report.delivered, 1);
    assert_eq!(expect_message(&mut stays).await, msg("after"));
    expect_nothing(&mut goes).await;
}

/// A channel holds at most `capacity` pending messages; `send` beyond is `ChannelFull`, and
/// reading makes room again.
pub async fn capacity_and_channel_full<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let layer = factory(LayerConfig::default().with_capacity(3)).await;
    let mut sub = layer.new_channel("conn").await.unwrap();
    for i in 0..3 {
        layer.send(sub.name(), msg(&i.to_string())).await.unwrap();
    }
    let err = layer.send(sub.name(), msg("overflow")).await.unwrap_err();
    assert_eq!(err, LayerError::ChannelFull(sub.name().to_owned()));

    assert_eq!(expect_message(&mut sub).await, msg("0"));
    layer.send(sub.name(), msg("3")).await.unwrap();
    for i in 1..4 {
        assert_eq!(expect_message(&mut sub).await, msg(&i.to_string()));
    }
    expect_nothing(&mut sub).await;
}

/// `channel_capacity` patterns override the default capacity for the channels they match.
pub async fn capacity_per_pattern<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let config = LayerConfig::default()
        .with_capacity(5)
        .with_channel_capacity("small.*", 1);
    let layer = factory(config).await;
    let small = layer.new_channel("small").await.unwrap();
    let big = layer.new_channel("big").await.unwrap();
    layer.send(small.name(), msg("a")).await.unwrap();
    assert!(matches!(
        layer.send(small.name(), msg("b")).await,
        Err(LayerError::ChannelFull(_))
    ));
    for _ in 0..5 {
        layer.send(big.name(), msg("a")).await.unwrap();
    }
    assert!(matches!(
        layer.send(big.name(), msg("b")).await,
        Err(LayerError::ChannelFull(_))
    ));
}

/// `group_send` never waits on a full member: it skips it, delivers to the rest, and the drop is
/// counted in the report and in the layer's stats.
pub async fn group_send_skips_full_members<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let layer = factory(LayerConfig::default().with_capacity(2)).await;
    let mut stuck = layer.new_channel("conn").await.unwrap();
    let mut healthy = layer.new_channel("conn").await.unwrap();
    layer.group_add("room", stuck.name()).await.unwrap();
    layer.group_add("room", healthy.name()).await.unwrap();
    layer.send(stuck.name(), msg("old1")).await.unwrap();
    layer.send(stuck.name(), msg("old2")).await.unwrap();

    let report = tokio::time::timeout(ARRIVAL, layer.group_send("room", msg("new")))
        .await
        .expect("group_send waited on a full member")
        .unwrap();
    assert_eq!(report.delivered, 1);
    assert_eq!(report.dropped_full, 1);
    assert_eq!(layer.stats().group_send_dropped, 1);
    assert_eq!(
        stuck.missed(),
        1,
        "the skipped member can tell it missed a message"
    );
    assert_eq!(healthy.missed(), 0);
    assert_eq!(expect_message(&mut healthy).await, msg("new"));
    assert_eq!(expect_message(&mut stuck).await, msg("old1"));
    assert_eq!(expect_message(&mut stuck).await, msg("old2"));
    expect_nothing(&mut stuck).await;
}

/// A message nobody received within `expiry` is dropped, and frees its place.
pub async fn message_expiry<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let config = LayerConfig::default()
        .with_capacity(1)
        .with_expiry(Duration::from_millis(300));
    let layer = factory(config).await;
    let mut sub = layer.new_channel("conn").await.unwrap();
    layer.send(sub.name(), msg("stale")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    // The stale message no longer takes the channel's only place.
    layer.send(sub.name(), msg("fresh")).await.unwrap();
    assert_eq!(expect_message(&mut sub).await, msg("fresh"));
    expect_nothing(&mut sub).await;
}

/// A membership lapses `group_expiry` after its latest `group_add`; re-adding refreshes it.
pub async fn group_expiry<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let config = LayerConfig::default().with_group_expiry(Duration::from_millis(1_000));
    let layer = factory(config).await;
    let mut refreshed = layer.new_channel("conn").await.unwrap();
    let mut lapsing = layer.new_channel("conn").await.unwrap();
    layer.group_add("room", refreshed.name()).await.unwrap();
    layer.group_add("room", lapsing.name()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    layer.group_add("room", refreshed.name()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;

    // 1.2 s after the first add, 0.6 s after the refresh.
    let report = layer.group_send("room", msg("late")).await.unwrap();
    assert_eq!(report.delivered, 1);
    assert_eq!(expect_message(&mut refreshed).await, msg("late"));
    expect_nothing(&mut lapsing).await;

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let report = layer.group_send("room", msg("later")).await.unwrap();
    assert_eq!(report.delivered, 0);
    expect_nothing(&mut refreshed).await;
}

/// Bad channel, group and prefix names are typed errors, and nothing is sent.
pub async fn name_validation<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let layer = factory(LayerConfig::default()).await;
    let sub = layer.new_channel("conn").await.unwrap();
    let too_long = "a".repeat(100);
    for bad in ["", "has space", "sl/ash", "bang!", "ünï", too_long.as_str()] {
        let is_invalid =
            |r: Result<(), LayerError>| matches!(r, Err(LayerError::InvalidName { .. }));
        assert!(is_invalid(layer.send(bad, msg("x")).await), "send {bad:?}");
        assert!(
            is_invalid(layer.group_add(bad, sub.name()).await),
            "group {bad:?}"
        );
        assert!(
            is_invalid(layer.group_add("room", bad).await),
            "channel {bad:?}"
        );
        assert!(
            is_invalid(layer.group_discard(bad, sub.name()).await),
            "discard {bad:?}"
        );
        assert!(
            matches!(
                layer.group_send(bad, msg("x")).await,
                Err(LayerError::InvalidName { .. })
            ),
            "group_send {bad:?}"
        );
        assert!(
            matches!(
                layer.new_channel(bad).await,
                Err(LayerError::InvalidName { .. })
            ),
            "prefix {bad:?}"
        );
    }
    // The longest name that is still valid works.
    let longest = "g".repeat(99);
    layer.group_add(&longest, sub.name()).await.unwrap();
}

/// Dropping a subscription removes its channel and its memberships.
pub async fn cleanup_when_subscriber_drops<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let layer = factory(LayerConfig::default()).await;
    let gone = layer.new_channel("conn").await.unwrap();
    let mut stays = layer.new_channel("conn").await.unwrap();
    let gone_name = gone.name().to_owned();
    layer.group_add("room", &gone_name).await.unwrap();
    layer.group_add("room", stays.name()).await.unwrap();
    drop(gone);

    // Cleanup may be asynchronous on a network backend; give it a moment.
    let deadline = tokio::time::Instant::now() + ARRIVAL;
    loop {
        match layer.send(&gone_name, msg("x")).await {
            Err(LayerError::NoSuchChannel(name)) => {
                assert_eq!(name, gone_name);
                break;
            }
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "send to a dropped channel gave {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = layer.group_send("room", msg("still here")).await.unwrap();
    assert_eq!(report.delivered, 1);
    assert_eq!(expect_message(&mut stays).await, msg("still here"));
}

/// `flush` drops pending messages and memberships; subscriptions keep working.
pub async fn flush<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    let layer = factory(LayerConfig::default()).await;
    let mut sub = layer.new_channel("conn").await.unwrap();
    layer.group_add("room", sub.name()).await.unwrap();
    layer.send(sub.name(), msg("pending")).await.unwrap();
    layer.flush().await.unwrap();
    expect_nothing(&mut sub).await;
    assert_eq!(
        layer.group_send("room", msg("x")).await.unwrap().delivered,
        0
    );
    expect_nothing(&mut sub).await;
    layer.send(sub.name(), msg("after")).await.unwrap();
    assert_eq!(expect_message(&mut sub).await, msg("after"));
}

/// Many tasks sending to one channel at once: nothing is lost, nothing duplicated, and each
/// sender's messages keep their order.
pub async fn many_concurrent_senders<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    const SENDERS: usize = 8;
    const EACH: usize = 200;
    let layer = factory(LayerConfig::default().with_capacity(SENDERS * EACH)).await;
    let mut sub = layer.new_channel("conn").await.unwrap();
    let mut tasks = Vec::new();
    for sender in 0..SENDERS {
        let layer = Arc::clone(&layer);
        let name = sub.name().to_owned();
        tasks.push(tokio::spawn(async move {
            for seq in 0..EACH {
                layer
                    .send(&name, msg(&format!("{sender}:{seq}")))
                    .await
                    .unwrap();
            }
        }));
    }
    let mut next = [0usize; SENDERS];
    for _ in 0..SENDERS * EACH {
        let message = expect_message(&mut sub).await;
        let text = std::str::from_utf8(&message).unwrap();
        let (sender, seq) = text.split_once(':').unwrap();
        let (sender, seq): (usize, usize) = (sender.parse().unwrap(), seq.parse().unwrap());
        assert_eq!(seq, next[sender], "sender {sender} out of order");
        next[sender] += 1;
    }
    for task in tasks {
        task.await.unwrap();
    }
    expect_nothing(&mut sub).await;
}

/// Many tasks sending to one group while members read: every member gets every message once.
pub async fn concurrent_group_sends<F, Fut>(factory: &F)
where
    F: Fn(LayerConfig) -> Fut,
    Fut: Future<Output = Arc<dyn ChannelLayer>>,
{
    const SENDERS: usize = 4;
    const EACH: usize = 100;
    const MEMBERS: usize = 6;
    let layer = factory(LayerConfig::default().with_capacity(SENDERS * EACH)).await;
    let mut readers = Vec::new();
    for _ in 0..MEMBERS {
        let mut sub = layer.new_channel("conn").await.unwrap();
        layer.group_add("room", sub.name()).await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut seen = HashSet::new();
            for _ in 0..SENDERS * EACH {
                let message = expect_message(&mut sub).await;
                assert!(seen.insert(message), "duplicate delivery");
            }
            expect_nothing(&mut sub).await;
            seen.len()
        }));
    }
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let layer = Arc::clone(&layer);
        senders.push(tokio::spawn(async move {
            for seq in 0..EACH {
                let report = layer
                    .group_send("room", msg(&format!("{sender}:{seq}")))
                    .await
                    .unwrap();
                assert_eq!(report.delivered, MEMBERS);
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    for reader in readers {
        assert_eq!(reader.await.unwrap(), SENDERS * EACH);
    }
}

/// Expands to one `#[tokio::test]` per conformance check, each calling the check with the given
/// layer factory (`Fn(LayerConfig) -> impl Future<Output = Arc<dyn ChannelLayer>>`).
#[macro_export]
macro_rules! layer_conformance_tests {
    ($factory:expr) => {
        $crate::layer_conformance_tests!(@each $factory;
            send_and_receive, new_channel_names, order_per_sender, send_to_unknown_channel,
            group_send_reaches_every_member, group_add_is_idempotent, group_discard,
            capacity_and_channel_full, capacity_per_pattern, group_send_skips_full_members,
            message_expiry, group_expiry, name_validation, cleanup_when_subscriber_drops, flush,
            many_concurrent_senders, concurrent_group_sends);
    };
    (@each $factory:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                $crate::layer::conformance::$check(&$factory).await;
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// The macro is the one list of checks. A check written here but left out of it would never
    /// run, and every backend would seem to pass it.
    #[test]
    fn the_macro_runs_every_check() {
        let source = include_str!("conformance.rs");
        let defined: BTreeSet<&str> = source
            .lines()
            .filter_map(|line| line.strip_prefix("pub async fn "))
            .filter_map(|rest| rest.split(['<', '(']).next())
            .collect();
        let list = source
            .split_once("(@each $factory;")
            .and_then(|(_, rest)| rest.split_once(");"))
            .map(|(list, _)| list)
            .unwrap();
        let run: BTreeSet<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .collect();
        assert!(defined.len() > 10, "the checks were not found: {defined:?}");
        assert_eq!(
            defined, run,
            "checks defined (left) and run by the macro (right)"
        );
    }
}
