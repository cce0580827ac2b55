//! The store and the layer as the engine calls them: each call timed into the
//! `chat_store_seconds` and `chat_layer_seconds` histograms ([`crate::metrics`]), then passed
//! through unchanged.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use metrics::Histogram;

use crate::layer::{ChannelLayer, GroupSendReport, LayerError, LayerStats, Subscription};
use crate::metrics::{timed, LAYER_OPS, LAYER_SECONDS, STORE_OPS, STORE_SECONDS};
use crate::store::{
    Appended, Conversation, HistoryStore, InboxEntry, NewMessage, Page, StoreError,
};

/// A [`HistoryStore`] whose calls are timed.
pub(crate) struct MeteredStore {
    inner: Arc<dyn HistoryStore>,
    seconds: [Histogram; STORE_OPS.len()],
}

impl MeteredStore {
    pub(crate) fn new(inner: Arc<dyn HistoryStore>) -> Self {
        Self {
            inner,
            seconds: STORE_OPS.map(|op| metrics::histogram!(STORE_SECONDS, "op" => op)),
        }
    }
}

#[async_trait]
impl HistoryStore for MeteredStore {
    async fn append(
        &self,
        conversation: &Conversation,
        message: NewMessage<'_>,
    ) -> Result<Appended, StoreError> {
        timed(&self.seconds[0], self.inner.append(conversation, message)).await
    }

    async fn before(
        &self,
        conversation: &Conversation,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page, StoreError> {
        timed(
            &self.seconds[1],
            self.inner.before(conversation, before, limit),
        )
        .await
    }

    async fn after(
        &self,
        conversation: &Conversation,
        after: u64,
        limit: usize,
    ) -> Result<Page, StoreError> {
        timed(
            &self.seconds[2],
            self.inner.after(conversation, after, limit),
        )
        .await
    }

    async fn mark_read(
        &self,
        user: &str,
        conversation: &Conversation,
        id: u64,
    ) -> Result<u64, StoreError> {
        timed(
            &self.seconds[3],
            self.inner.mark_read(user, conversation, id),
        )
        .await
    }

    async fn inbox(&self, user: &str) -> Result<Vec<InboxEntry>, StoreError> {
        timed(&self.seconds[4], self.inner.inbox(user)).await
    }

    async fn direct_heads(&self, user: &str) -> Result<Vec<(String, u64)>, StoreError> {
        timed(&self.seconds[5], self.inner.direct_heads(user)).await
    }

    async fn epoch(&self) -> Result<String, StoreError> {
        timed(&self.seconds[6], self.inner.epoch()).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

/// A [`ChannelLayer`] whose calls are timed.
pub(crate) struct MeteredLayer {
    inner: Arc<dyn ChannelLayer>,
    seconds: [Histogram; LAYER_OPS.len()],
}

impl MeteredLayer {
    pub(crate) fn new(inner: Arc<dyn ChannelLayer>) -> Self {
        Self {
            inner,
            seconds: LAYER_OPS.map(|op| metrics::histogram!(LAYER_SECONDS, "op" => op)),
        }
    }
}

#[async_trait]
impl ChannelLayer for MeteredLayer {
    async fn new_channel(&self, prefix: &str) -> Result<Subscription, LayerError> {
        timed(&self.seconds[0], self.inner.new_channel(prefix)).await
    }

    async fn send(&self, channel: &str, message: Bytes) -> Result<(), LayerError> {
        timed(&self.seconds[1], self.inner.send(channel, message)).await
    }

    async fn group_add(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        timed(&self.seconds[2], self.inner.group_add(group, channel)).await
    }

    async fn group_discard(&self, group: &str, channel: &str) -> Result<(), LayerError> {
        timed(&self.seconds[3], self.inner.group_discard(group, channel)).await
    }

    async fn group_send(&self, group: &str, message: Bytes) -> Result<GroupSendReport, LayerError> {
        timed(&self.seconds[4], self.inner.group_send(group, message)).await
    }

    async fn flush(&self) -> Result<(), LayerError> {
        self.inner.flush().await
    }

    fn stats(&self) -> LayerStats {
        self.inner.stats()
    }

    async fn ping(&self) -> Result<(), LayerError> {
        self.inner.ping().await
    }
}
