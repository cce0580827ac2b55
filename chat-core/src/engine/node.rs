//! This process as a node of the deployment: its registry lease, and sweeping up after dead nodes.
//!
//! Every `node_lease / 3` the node renews its lease, sweeps the registry and tidies its edge
//! filter (forgets old edges, gives back a burst's memory). The sweep removes
//! the connections of nodes whose lease lapsed (they died without saying goodbye) and this node
//! announces the `leave` and `offline` events those removals crossed, so a dead node's users drop
//! out within the lease. Several nodes sweeping at once is fine: the registry reports each edge
//! to exactly one of them.
//!
//! If this node's own lease lapsed and another node swept it (a long pause, or the registry
//! unreachable for longer than the lease), its connections no longer exist in the registry. The
//! heartbeat notices (the lease had to be made anew) and every local connection is closed with
//! 1012, so its client reconnects and registers again, rather than lingering invisible.

use std::sync::Weak;

use crate::registry::Lease;

use super::Inner;

/// Renews the lease and sweeps until the `Chat` is gone.
pub(crate) async fn run(inner: Weak<Inner>, period: std::time::Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.tidy_edges(tokio::time::Instant::now());
        match inner
            .registry
            .heartbeat(&inner.node, inner.config.node_lease)
            .await
        {
            Ok(Lease::Renewed) => {}
            Ok(Lease::Created) => {
                tracing::warn!(
                    node = inner.node,
                    "this node's registry lease lapsed and was swept; closing its connections so they register again"
                );
                inner.lease_lost.send_modify(|generation| *generation += 1);
            }
            Err(error) => tracing::warn!(%error, "registry heartbeat failed"),
        }
        match inner.registry.sweep().await {
            Ok(departures) => {
                for departure in &departures {
                    inner.announce_departure(departure).await;
                }
                if !departures.is_empty() {
                    tracing::info!(
                        edges = departures.len(),
                        "swept the connections of nodes whose lease lapsed"
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "registry sweep failed"),
        }
    }
}
