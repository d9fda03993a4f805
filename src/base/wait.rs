//! Waiting for a condition that changes under a tokio [`Notify`].

use tokio::sync::Notify;

/// Resolves once `done()` holds. Whoever changes what `done` reads must then call
/// `changed.notify_waiters()`; the waiter registers before each check, so no such
/// notification between the check and the wait is missed.
pub(crate) async fn until(changed: &Notify, done: impl Fn() -> bool) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}
