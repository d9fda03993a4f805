//! A replica's subscriptions, on a connection of its own (RESP3 pushes; the client
//! subscribes again by itself after a reconnect): sharded channels in a Cluster, plain
//! ones on one server. Shake wakes and WatchNearby changes both arrive this way.

use std::time::Duration;

use redis::{PushInfo, aio::ConnectionManager, cluster_async::ClusterConnection};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::{StoreError, Target, cluster_builder, manager_config};

/// A subscription connection. Cheap to clone; its pushes arrive on the receiver
/// [`Subscription::open`] returned.
#[derive(Clone)]
pub(crate) enum Subscription {
    /// One server: SUBSCRIBE.
    Server(ConnectionManager),
    /// A Cluster: SSUBSCRIBE, routed to the node of each channel's slot.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscription")
    }
}

fn fail(e: redis::RedisError) -> StoreError {
    super::refused_credentials(&e)
        .unwrap_or_else(|| StoreError::Unreachable(format!("subscribing: {e}")))
}

impl Subscription {
    /// Connects to `target` for subscriptions, within `timeout`.
    ///
    /// # Errors
    /// [`StoreError::Unreachable`] when no connection is made in time.
    pub(crate) async fn open(
        target: &Target,
        timeout: Duration,
    ) -> Result<(Self, UnboundedReceiver<PushInfo>), StoreError> {
        let (tx, rx) = unbounded_channel::<PushInfo>();
        let made = async {
            match target {
                Target::Server(url, credentials) => {
                    let info = credentials.connection_info(url.as_str()).map_err(fail)?;
                    let settings = info
                        .redis_settings()
                        .clone()
                        .set_protocol(redis::ProtocolVersion::RESP3);
                    let client =
                        redis::Client::open(info.set_redis_settings(settings)).map_err(fail)?;
                    let config = manager_config(timeout)
                        .set_push_sender(tx)
                        .set_automatic_resubscription();
                    let c = ConnectionManager::new_with_config(client, config)
                        .await
                        .map_err(fail)?;
                    Ok::<_, StoreError>(Self::Server(c))
                }
                Target::Cluster(nodes, credentials) => {
                    let client = cluster_builder(nodes, credentials, timeout)
                        .use_protocol(redis::ProtocolVersion::RESP3)
                        .push_sender(tx)
                        .build()
                        .map_err(fail)?;
                    let c = client.get_async_connection().await.map_err(fail)?;
                    Ok(Self::Cluster(c))
                }
            }
        };
        let sub = tokio::time::timeout(timeout, made).await.map_err(|_| {
            StoreError::Unreachable(format!("no subscription within {timeout:?}"))
        })??;
        Ok((sub, rx))
    }

    /// Subscribes to `channel` (confirmed by the store when this returns).
    ///
    /// # Errors
    /// [`StoreError::Unreachable`] when the store does not confirm.
    pub(crate) async fn subscribe(&self, channel: &str) -> Result<(), StoreError> {
        match self.clone() {
            Self::Server(mut c) => c.subscribe(channel).await.map_err(fail),
            Self::Cluster(mut c) => c.ssubscribe(channel).await.map_err(fail),
        }
    }

    /// Unsubscribes from `channel`.
    ///
    /// # Errors
    /// [`StoreError::Unreachable`] when the store does not answer.
    pub(crate) async fn unsubscribe(&self, channel: &str) -> Result<(), StoreError> {
        match self.clone() {
            Self::Server(mut c) => c.unsubscribe(channel).await.map_err(fail),
            Self::Cluster(mut c) => c.sunsubscribe(channel).await.map_err(fail),
        }
    }
}

/// The channel and payload of a message push, if `push` is one.
pub(crate) fn message(push: &PushInfo) -> Option<(&[u8], &[u8])> {
    match push.kind {
        redis::PushKind::Message | redis::PushKind::SMessage => {
            match (push.data.first(), push.data.get(1)) {
                (Some(redis::Value::BulkString(c)), Some(redis::Value::BulkString(m))) => {
                    Some((c, m))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether `push` says messages may have been lost (a reconnect, or a resubscription
/// after one).
pub(crate) fn maybe_lost(push: &PushInfo) -> bool {
    matches!(
        push.kind,
        redis::PushKind::Disconnection | redis::PushKind::Subscribe | redis::PushKind::SSubscribe
    )
}
