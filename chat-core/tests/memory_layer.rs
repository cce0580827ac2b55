//! The channel-layer conformance suite, run against the in-memory backend, plus checks that only
//! the in-memory backend can make (paused time, memory bounds, stats).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use chat_core::layer::{ChannelLayer, InMemoryChannelLayer};

chat_core::layer_conformance_tests!(|config| async move {
    Arc::new(InMemoryChannelLayer::new(config)) as Arc<dyn ChannelLayer>
});

mod memory_only {
    use std::time::Duration;

    use bytes::Bytes;
    use chat_core::layer::{ChannelLayer, InMemoryChannelLayer, LayerConfig, LayerError};

    #[tokio::test(start_paused = true)]
    async fn expiry_follows_the_tokio_clock_and_is_counted() {
        let layer = InMemoryChannelLayer::new(
            LayerConfig::default()
                .with_expiry(Duration::from_secs(60))
                .with_capacity(10),
        );
        let mut sub = layer.new_channel("conn").await.unwrap();
        layer
            .send(sub.name(), Bytes::from_static(b"a"))
            .await
            .unwrap();
        layer
            .send(sub.name(), Bytes::from_static(b"b"))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        layer
            .send(sub.name(), Bytes::from_static(b"c"))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        // a and b are 61 s old, c is 2 s old.
        assert_eq!(sub.try_recv(), Some(Bytes::from_static(b"c")));
        assert_eq!(sub.try_recv(), None);
        assert_eq!(layer.stats().expired_messages, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn lapsed_memberships_are_counted_and_removed() {
        let layer = InMemoryChannelLayer::new(
            LayerConfig::default().with_group_expiry(Duration::from_secs(100)),
        );
        let sub = layer.new_channel("conn").await.unwrap();
        layer.group_add("g", sub.name()).await.unwrap();
        tokio::time::advance(Duration::from_secs(100)).await;
        let report = layer.group_send("g", Bytes::new()).await.unwrap();
        assert_eq!((report.delivered, report.expired_members), (0, 1));
        // Gone for good: the next send finds no member at all.
        let report = layer.group_send("g", Bytes::new()).await.unwrap();
        assert_eq!((report.delivered, report.expired_members), (0, 0));
        assert_eq!(layer.stats().expired_memberships, 1);
        // And adding again works.
        layer.group_add("g", sub.name()).await.unwrap();
        assert_eq!(
            layer.group_send("g", Bytes::new()).await.unwrap().delivered,
            1
        );
    }

    #[tokio::test]
    async fn memory_stays_bounded_when_nobody_reads() {
        let layer = InMemoryChannelLayer::new(LayerConfig::default().with_capacity(100));
        let sub = layer.new_channel("conn").await.unwrap();
        layer.group_add("g", sub.name()).await.unwrap();
        let mut full = 0;
        for _ in 0..10_000 {
            let report = layer
                .group_send("g", Bytes::from_static(b"x"))
                .await
                .unwrap();
            full += report.dropped_full;
        }
        assert_eq!(full, 10_000 - 100);
        assert_eq!(layer.stats().group_send_dropped, 9_900);
        assert!(matches!(
            layer.send(sub.name(), Bytes::new()).await,
            Err(LayerError::ChannelFull(_))
        ));
    }

    #[tokio::test]
    async fn dropping_the_layer_ends_subscriptions() {
        let layer = InMemoryChannelLayer::default();
        let mut sub = layer.new_channel("conn").await.unwrap();
        layer
            .send(sub.name(), Bytes::from_static(b"last"))
            .await
            .unwrap();
        drop(layer);
        // Queued messages die with the layer; the stream ends instead of hanging.
        assert_eq!(sub.recv().await, None);
    }

    #[tokio::test]
    async fn one_payload_is_shared_not_copied() {
        let layer = InMemoryChannelLayer::default();
        let mut subs = Vec::new();
        for _ in 0..3 {
            let sub = layer.new_channel("conn").await.unwrap();
            layer.group_add("g", sub.name()).await.unwrap();
            subs.push(sub);
        }
        let payload = Bytes::from(vec![7u8; 1024]);
        layer.group_send("g", payload.clone()).await.unwrap();
        for sub in &mut subs {
            let got = sub.try_recv().unwrap();
            assert_eq!(got.as_ptr(), payload.as_ptr(), "payload was copied");
        }
    }

    #[tokio::test]
    async fn membership_churn_during_sends_stays_consistent() {
        let layer = InMemoryChannelLayer::new(LayerConfig::default().with_capacity(10_000));
        let mut steady = layer.new_channel("conn").await.unwrap();
        layer.group_add("g", steady.name()).await.unwrap();
        let churn = {
            let layer = layer.clone();
            tokio::spawn(async move {
                for n in 0..500 {
                    let sub = layer.new_channel("conn").await.unwrap();
                    layer.group_add("g", sub.name()).await.unwrap();
                    if n % 2 == 0 {
                        layer.group_discard("g", sub.name()).await.unwrap();
                    }
                    tokio::task::yield_now().await;
                }
            })
        };
        for i in 0..500u32 {
            layer
                .group_send("g", Bytes::copy_from_slice(&i.to_be_bytes()))
                .await
                .unwrap();
            tokio::task::yield_now().await;
        }
        churn.await.unwrap();
        for i in 0..500u32 {
            assert_eq!(steady.try_recv().as_deref(), Some(&i.to_be_bytes()[..]));
        }
        // Every churned subscription was dropped: only the steady member is left.
        assert_eq!(
            layer.group_send("g", Bytes::new()).await.unwrap().delivered,
            1
        );
    }
}
