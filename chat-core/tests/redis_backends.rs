//! The store, registry and layer conformance suites against a real Redis (cargo feature
//! `redis`). The server comes from `CHAT_TEST_REDIS_URL`, which `scripts/test.sh` sets after
//! starting a throwaway `redis-server`; every backend instance gets a key prefix of its own, so
//! the checks run in parallel and never touch data they did not create.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

mod redis_support;

mod store {
    use std::sync::Arc;

    use chat_core::store::{HistoryStore, RedisHistoryStore};

    use super::redis_support::{prefix, url};

    chat_core::store_conformance_tests!(|config| async move {
        let store = RedisHistoryStore::connect(&url(), &prefix(), config)
            .await
            .unwrap();
        Arc::new(store) as Arc<dyn HistoryStore>
    });
}

mod registry {
    use std::sync::Arc;

    use chat_core::registry::{RedisRegistry, Registry};

    use super::redis_support::{prefix, url};

    chat_core::registry_conformance_tests!(|| async {
        let registry = RedisRegistry::connect(&url(), &prefix()).await.unwrap();
        Arc::new(registry) as Arc<dyn Registry>
    });
}

mod layer {
    use std::sync::Arc;

    use chat_core::layer::{ChannelLayer, RedisChannelLayer};

    use super::redis_support::{prefix, url};

    chat_core::layer_conformance_tests!(|config| async move {
        let layer = RedisChannelLayer::connect(&[url()], &prefix(), config)
            .await
            .unwrap();
        Arc::new(layer) as Arc<dyn ChannelLayer>
    });
}

/// Two layer instances on one prefix are two nodes of one layer.
mod layer_across_nodes {
    use std::time::Duration;

    use bytes::Bytes;
    use chat_core::layer::{ChannelLayer, LayerConfig, LayerError, RedisChannelLayer};

    use super::redis_support::{prefix, url};

    async fn nodes(config: LayerConfig) -> (RedisChannelLayer, RedisChannelLayer) {
        let prefix = prefix();
        let a = RedisChannelLayer::connect(&[url()], &prefix, config.clone())
            .await
            .unwrap();
        let b = RedisChannelLayer::connect(&[url()], &prefix, config)
            .await
            .unwrap();
        assert_ne!(a.node(), b.node());
        (a, b)
    }

    async fn next(sub: &mut chat_core::layer::Subscription) -> Bytes {
        tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("nothing arrived")
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_message_is_published_once_per_node_and_fanned_out_there() {
        let (a, b) = nodes(LayerConfig::default()).await;
        let mut on_a = a.new_channel("conn").await.unwrap();
        a.group_add("room", on_a.name()).await.unwrap();
        let mut on_b = Vec::new();
        for _ in 0..3 {
            let sub = b.new_channel("conn").await.unwrap();
            b.group_add("room", sub.name()).await.unwrap();
            on_b.push(sub);
        }
        let report = a
            .group_send("room", Bytes::from_static(b"hi"))
            .await
            .unwrap();
        assert_eq!((report.delivered, report.forwarded), (1, 1), "{report:?}");
        assert_eq!(next(&mut on_a).await, "hi");
        for sub in &mut on_b {
            assert_eq!(next(sub).await, "hi");
        }
        // And the other way round.
        let report = b
            .group_send("room", Bytes::from_static(b"back"))
            .await
            .unwrap();
        assert_eq!((report.delivered, report.forwarded), (3, 1));
        assert_eq!(next(&mut on_a).await, "back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn send_to_another_nodes_channel_keeps_capacity_and_existence() {
        let (a, b) = nodes(LayerConfig::default().with_capacity(2)).await;
        let mut on_b = b.new_channel("conn").await.unwrap();
        let name = on_b.name().to_owned();
        a.send(&name, Bytes::from_static(b"1")).await.unwrap();
        a.send(&name, Bytes::from_static(b"2")).await.unwrap();
        assert_eq!(
            a.send(&name, Bytes::from_static(b"3")).await,
            Err(LayerError::ChannelFull(name.clone()))
        );
        assert_eq!(next(&mut on_b).await, "1");
        assert_eq!(next(&mut on_b).await, "2");
        drop(on_b);
        assert_eq!(
            a.send(&name, Bytes::from_static(b"x")).await,
            Err(LayerError::NoSuchChannel(name.clone()))
        );
        // A node that is gone altogether answers nothing: no such channel either.
        drop(b);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            a.send(&name, Bytes::from_static(b"x")).await,
            Err(LayerError::NoSuchChannel(name))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_without_members_is_no_longer_published_to() {
        let (a, b) = nodes(LayerConfig::default()).await;
        let on_b = b.new_channel("conn").await.unwrap();
        b.group_add("room", on_b.name()).await.unwrap();
        let report = a
            .group_send("room", Bytes::from_static(b"1"))
            .await
            .unwrap();
        assert_eq!(report.forwarded, 1);
        drop(on_b);
        // The dropped subscription's node leaves the group in Redis by itself.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let report = a
                .group_send("room", Bytes::from_static(b"2"))
                .await
                .unwrap();
            if report.forwarded == 0 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "b is still listed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A discard does the same at once.
        let on_b = b.new_channel("conn").await.unwrap();
        b.group_add("room", on_b.name()).await.unwrap();
        b.group_discard("room", on_b.name()).await.unwrap();
        let report = a
            .group_send("room", Bytes::from_static(b"3"))
            .await
            .unwrap();
        assert_eq!(report.forwarded, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_node_is_taken_out_of_its_groups_by_the_first_publisher() {
        let (a, b) = nodes(LayerConfig::default()).await;
        let on_b = b.new_channel("conn").await.unwrap();
        b.group_add("room", on_b.name()).await.unwrap();
        // The process dies: its subscription is gone, its channel never dropped politely.
        std::mem::forget(on_b);
        drop(b);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let first = a
            .group_send("room", Bytes::from_static(b"1"))
            .await
            .unwrap();
        assert_eq!(first.forwarded, 0, "nobody listened");
        let second = a
            .group_send("room", Bytes::from_static(b"2"))
            .await
            .unwrap();
        assert_eq!(second.forwarded, 0);
    }
}
