//! Waking waiting calls: each replica listens on its own channel (sharded pub/sub in a
//! Cluster), and whoever decides a shake's outcome sends its state key there.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use redis::{PushKind, aio::ConnectionManager};
use tokio::{sync::Notify, task::JoinHandle};

use super::super::{StoreError, Target};
use super::RedisShake;

impl RedisShake {
    /// Wakes the replicas (space-separated) waiting on `state`, but for this one.
    pub(super) fn wake_others(&self, replicas: &str, state: &str) {
        let others: Vec<&str> = replicas
            .split(' ')
            .filter(|r| !r.is_empty() && *r != self.replica)
            .collect();
        self.wake_all(&others.join(" "), state);
    }

    /// Wakes the replicas (space-separated) waiting on `state`.
    pub(super) fn wake_all(&self, replicas: &str, state: &str) {
        let conn = self.conn.clone();
        let publish = if conn.clustered() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let cmds: Vec<redis::Cmd> = replicas
            .split(' ')
            .filter(|r| !r.is_empty())
            .map(|r| redis::cmd(publish).arg(channel(r)).arg(state).clone())
            .collect();
        if cmds.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for cmd in cmds {
                let _ = conn.query::<i64>(&cmd).await;
            }
        });
    }
}

/// A replica's wake channel (a sharded channel in a Cluster).
pub(super) fn channel(replica: &str) -> String {
    format!("gm1:w:{{{replica}}}")
}

/// The calls of this replica waiting on each shake state, woken by its channel.
#[derive(Debug, Default)]
pub(super) struct Wakes {
    pub(super) map: Mutex<HashMap<String, (Arc<Notify>, usize)>>,
}

/// One call's registration in [`Wakes`].
#[derive(Debug)]
pub(super) struct Waker {
    pub(super) wakes: Arc<Wakes>,
    pub(super) state: String,
    pub(super) notify: Arc<Notify>,
}

impl Wakes {
    pub(super) fn register(self: &Arc<Self>, state: &str) -> Waker {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = map
            .entry(state.to_owned())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        Waker {
            wakes: self.clone(),
            state: state.to_owned(),
            notify: entry.0.clone(),
        }
    }

    pub(super) fn wake(&self, state: &str) {
        let map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((n, _)) = map.get(state) {
            n.notify_waiters();
        }
    }

    /// After a reconnect messages may have been lost: every call reads its state again.
    pub(super) fn wake_everyone(&self) {
        let map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (n, _) in map.values() {
            n.notify_waiters();
        }
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        let mut map = self
            .wakes
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&self.state) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.state);
            }
        }
    }
}

/// This replica's subscription to its wake channel, on a connection of its own (RESP3,
/// resubscribed by the client after a reconnect).
pub(super) struct Subscription {
    pub(super) task: JoinHandle<()>,
    pub(super) _link: SubLink,
}

#[allow(dead_code)]
pub(super) enum SubLink {
    Server(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscription")
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscription {
    pub(super) async fn open(
        target: &Target,
        timeout: Duration,
        channel: &str,
        wakes: Arc<Wakes>,
    ) -> std::result::Result<Self, StoreError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
        let fail = |e: redis::RedisError| StoreError::Unreachable(format!("subscribing: {e}"));
        let made = async {
            match target {
                Target::Server(url) => {
                    let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                        .map_err(fail)?;
                    let settings = info
                        .redis_settings()
                        .clone()
                        .set_protocol(redis::ProtocolVersion::RESP3);
                    let client =
                        redis::Client::open(info.set_redis_settings(settings)).map_err(fail)?;
                    let config = super::super::manager_config(timeout)
                        .set_push_sender(tx)
                        .set_automatic_resubscription();
                    let mut c = ConnectionManager::new_with_config(client, config)
                        .await
                        .map_err(fail)?;
                    c.subscribe(channel).await.map_err(fail)?;
                    Ok::<_, StoreError>(SubLink::Server(c))
                }
                Target::Cluster(nodes) => {
                    let client = super::super::cluster_builder(nodes, timeout)
                        .use_protocol(redis::ProtocolVersion::RESP3)
                        .push_sender(tx)
                        .build()
                        .map_err(fail)?;
                    let mut c = client.get_async_connection().await.map_err(fail)?;
                    c.ssubscribe(channel).await.map_err(fail)?;
                    Ok(SubLink::Cluster(c))
                }
            }
        };
        let link = tokio::time::timeout(timeout, made).await.map_err(|_| {
            StoreError::Unreachable(format!("no subscription within {timeout:?}"))
        })??;
        let task = tokio::spawn(async move {
            while let Some(push) = rx.recv().await {
                match push.kind {
                    PushKind::Message | PushKind::SMessage => {
                        if let Some(redis::Value::BulkString(b)) = push.data.get(1)
                            && let Ok(state) = std::str::from_utf8(b)
                        {
                            wakes.wake(state);
                        }
                    }
                    // Messages may have been lost while the link was down.
                    PushKind::Disconnection | PushKind::Subscribe | PushKind::SSubscribe => {
                        wakes.wake_everyone();
                    }
                    _ => {}
                }
            }
        });
        Ok(Self { task, _link: link })
    }
}
