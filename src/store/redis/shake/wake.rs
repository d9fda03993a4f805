//! Waking waiting calls: each replica listens on its own channel (sharded pub/sub in a
//! Cluster), and whoever decides a shake's outcome sends its state key there.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::Notify, task::JoinHandle};

use super::super::{
    StoreError, Target,
    pubsub::{Subscription, maybe_lost, message},
};
use super::RedisShake;

impl RedisShake {
    /// Wakes the replicas (space-separated) waiting on `state`, but for this one.
    pub(super) fn wake_others(&self, replicas: &str, state: &str) {
        self.publish(replicas.split(' ').filter(|r| *r != self.replica), state);
    }

    /// Wakes the replicas (space-separated) waiting on `state`.
    pub(super) fn wake_all(&self, replicas: &str, state: &str) {
        self.publish(replicas.split(' '), state);
    }

    /// Sends `state` to each replica's wake channel, in the background.
    fn publish<'a>(&self, replicas: impl Iterator<Item = &'a str>, state: &str) {
        let conn = self.conn.clone();
        let publish = if conn.clustered() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let cmds: Vec<redis::Cmd> = replicas
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

/// Listens on this replica's wake channel: wakes the calls of each shake named.
///
/// # Errors
/// [`StoreError::Unreachable`] when the subscription cannot be made.
pub(super) async fn listen(
    target: &Target,
    timeout: Duration,
    channel: &str,
    wakes: Arc<Wakes>,
) -> std::result::Result<Listener, StoreError> {
    let (sub, mut rx) = Subscription::open(target, timeout).await?;
    sub.subscribe(channel).await?;
    let task = tokio::spawn(async move {
        while let Some(push) = rx.recv().await {
            if let Some((_, state)) = message(&push) {
                if let Ok(state) = std::str::from_utf8(state) {
                    wakes.wake(state);
                }
            } else if maybe_lost(&push) {
                // Messages may have been lost while the link was down.
                wakes.wake_everyone();
            }
        }
    });
    Ok(Listener { task, _sub: sub })
}

/// The wake subscription and its task (stopped when dropped).
#[derive(Debug)]
pub(super) struct Listener {
    task: JoinHandle<()>,
    _sub: Subscription,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}
