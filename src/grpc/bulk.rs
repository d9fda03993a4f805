//! `UpdateLocations`: a stream's items applied one by one into one summary.
//!
//! In memory a ping is a few µs of CPU, and the items are applied one after another
//! ([`in_order`]). Over Redis / Valkey a ping waits for its store round trips, so one
//! stream applied in order is bound by their latency (a few thousand pings a second);
//! there [`overlapped`] keeps several items under way at once, but never two of the same
//! user: each user's pings are applied in stream order, as in memory, and the travel
//! check sees them in that order. Either way the summary counts every item and reports the
//! first [`MAX_REPORTED_REJECTIONS`] rejections in stream order.
//!
//! A stream holds one admission slot (`--max-concurrent-requests`) however many of its
//! items are under way, so the items of all streams together are bounded here, by
//! [`ITEMS_UNDER_WAY`]. An item once started is applied to the end (each store call is
//! bounded by `--store-timeout`), also when the caller goes away: a ping stopped halfway
//! could leave a second copy of its user in the old cell.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
};

use opentelemetry::context::FutureExt as _;
use tokio_stream::{Stream, StreamExt as _};
use tonic::Status;
use tracing::Instrument as _;

use super::pb;
use crate::{error::Error, nearby::Placement};

/// Rejections an `UpdateLocations` summary reports in detail (all are counted).
pub(super) const MAX_REPORTED_REJECTIONS: usize = 16;

/// Most items of all overlapped streams under way at once, process-wide.
pub(super) const ITEMS_UNDER_WAY: usize = 256;

/// The permits for [`ITEMS_UNDER_WAY`].
static UNDER_WAY_PERMITS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(ITEMS_UNDER_WAY);

/// A summary as it is counted.
#[derive(Default)]
struct Tally(pb::UpdateLocationsSummary);

impl Tally {
    /// Counts item `index`'s outcome, whatever order the outcomes come in.
    fn count(&mut self, index: u64, outcome: Result<Placement, Error>) {
        let e = match outcome {
            Ok(_) => {
                self.0.accepted += 1;
                return;
            }
            Err(e) => e,
        };
        self.0.rejected += 1;
        let rejections = &mut self.0.rejections;
        if rejections.len() == MAX_REPORTED_REJECTIONS
            && rejections.last().is_some_and(|r| r.index < index)
        {
            return;
        }
        let at = rejections.partition_point(|r| r.index < index);
        rejections.insert(
            at,
            pb::Rejection {
                index,
                field: e.field().unwrap_or_default().to_string(),
                reason: e.reason(),
            },
        );
        rejections.truncate(MAX_REPORTED_REJECTIONS);
    }
}

/// Applies `items` one after another. A transport or decoding error ends the call; the
/// items before it stay applied.
pub(super) async fn in_order<T, Fut>(
    mut items: impl Stream<Item = Result<T, Status>> + Unpin,
    apply: impl Fn(T) -> Fut,
) -> Result<pb::UpdateLocationsSummary, Status>
where
    Fut: Future<Output = Result<Placement, Error>>,
{
    let mut tally = Tally::default();
    let mut index = 0u64;
    while let Some(item) = items.next().await {
        tally.count(index, apply(item?).await);
        index += 1;
    }
    Ok(tally.0)
}

/// Applies `items` with up to `in_flight` of them under way at once, never two with the
/// same `key` (the user). A transport or decoding error ends the call once the items
/// before it are applied.
pub(super) async fn overlapped<T, Fut>(
    mut items: impl Stream<Item = Result<T, Status>> + Unpin,
    in_flight: usize,
    key: impl Fn(&T) -> String,
    apply: impl Fn(T) -> Fut,
) -> Result<pb::UpdateLocationsSummary, Status>
where
    Fut: Future<Output = Result<Placement, Error>> + Send + 'static,
{
    let mut under_way = UnderWay::default();
    let mut index = 0u64;
    let ended = loop {
        let item = match items.next().await {
            Some(Ok(item)) => item,
            None => break Ok(()),
            Some(Err(status)) => break Err(status),
        };
        let user = key(&item);
        while under_way.running.len() >= in_flight.max(1) || under_way.busy.contains(&user) {
            if !under_way.finish_one().await {
                break;
            }
        }
        // The process-wide bound; the semaphore is never closed.
        let permit = UNDER_WAY_PERMITS.acquire().await.ok();
        let applying = apply(item);
        under_way.start(index, user, async move {
            let outcome = applying.await;
            drop(permit);
            outcome
        });
        index += 1;
    };
    while under_way.finish_one().await {}
    ended.map(|()| std::mem::take(&mut under_way.tally.0))
}

/// The items of a stream under way ([`overlapped`]).
#[derive(Default)]
struct UnderWay {
    running: tokio::task::JoinSet<Result<Placement, Error>>,
    /// Each running item's index in the stream and user.
    items: HashMap<tokio::task::Id, (u64, String)>,
    /// Users with an item running.
    busy: HashSet<String>,
    tally: Tally,
}

impl UnderWay {
    /// Starts item `index` of `user`.
    fn start(
        &mut self,
        index: u64,
        user: String,
        apply: impl Future<Output = Result<Placement, Error>> + Send + 'static,
    ) {
        // In the call's log span and trace, so its store calls join them.
        let task = self.running.spawn(
            apply
                .in_current_span()
                .with_context(opentelemetry::Context::current()),
        );
        self.busy.insert(user.clone());
        self.items.insert(task.id(), (index, user));
    }

    /// Waits for one running item and counts it; `false` when none was running.
    async fn finish_one(&mut self) -> bool {
        let Some(done) = self.running.join_next_with_id().await else {
            return false;
        };
        let (id, outcome) = match done {
            Ok((id, outcome)) => (id, outcome),
            // Its task panicked: the item may be half applied, and retrying it is safe.
            Err(e) => (
                e.id(),
                Err(Error::Unavailable("the item was not applied".into())),
            ),
        };
        if let Some((index, user)) = self.items.remove(&id) {
            self.busy.remove(&user);
            self.tally.count(index, outcome);
        }
        true
    }
}

impl Drop for UnderWay {
    fn drop(&mut self) {
        // The caller went away: the items already started are applied to the end.
        self.running.detach_all();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc, Mutex,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use super::*;

    /// Item `i` of a test stream: its user, and whether it is refused.
    #[derive(Debug, Clone)]
    struct Item {
        index: u64,
        user: String,
        bad: bool,
    }

    fn placed() -> Result<Placement, Error> {
        Ok(Placement {
            cell: h3o::LatLng::new(31.2, 121.5)
                .map(|p| p.to_cell(h3o::Resolution::Nine))
                .map_err(|_| Error::Unavailable("no cell".into()))?,
            expires_at_ms: 0,
        })
    }

    fn refused(item: &Item) -> Result<Placement, Error> {
        Err(Error::InvalidArgument {
            field: "position",
            reason: format!("item {} refused", item.index),
        })
    }

    /// `n` items, each of its own user.
    fn one_each(n: u64) -> Vec<Result<Item, Status>> {
        (0..n)
            .map(|index| {
                Ok(Item {
                    index,
                    user: format!("u{index}"),
                    bad: false,
                })
            })
            .collect()
    }

    /// Items under way now, and the most there were at once.
    #[derive(Default)]
    struct UnderWayGauge {
        now: AtomicUsize,
        most: AtomicUsize,
    }

    impl UnderWayGauge {
        fn begin(&self) {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
        }

        fn end(&self) {
            self.now.fetch_sub(1, Ordering::SeqCst);
        }

        fn most(&self) -> usize {
            self.most.load(Ordering::SeqCst)
        }
    }

    /// 120 items of 5 users, every seventh refused.
    fn stream() -> Vec<Result<Item, Status>> {
        (0..120)
            .map(|index| {
                Ok(Item {
                    index,
                    user: format!("u{}", index % 5),
                    bad: index % 7 == 3,
                })
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn overlapped_items_of_one_user_are_applied_in_stream_order() {
        let applied: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
        let gauge = Arc::new(UnderWayGauge::default());
        let summary = overlapped(
            tokio_stream::iter(stream()),
            8,
            |item: &Item| item.user.clone(),
            |item: Item| {
                let (applied, gauge) = (applied.clone(), gauge.clone());
                async move {
                    gauge.begin();
                    // Later items take less time: left alone, they would finish first.
                    tokio::time::sleep(Duration::from_millis(200 - item.index)).await;
                    applied
                        .lock()
                        .unwrap()
                        .push((item.user.clone(), item.index));
                    gauge.end();
                    if item.bad { refused(&item) } else { placed() }
                }
            },
        )
        .await
        .unwrap();
        let applied = applied.lock().unwrap();
        assert_eq!(applied.len(), 120);
        for user in 0..5 {
            let order: Vec<u64> = applied
                .iter()
                .filter(|(u, _)| *u == format!("u{user}"))
                .map(|&(_, i)| i)
                .collect();
            assert!(order.is_sorted(), "u{user} applied out of order: {order:?}");
        }
        // One item per user at a time: five users, five under way.
        assert_eq!(gauge.most(), 5, "items overlapped");
        let bad: Vec<u64> = (0..120).filter(|i| i % 7 == 3).collect();
        assert_eq!(summary.rejected, bad.len() as u64);
        assert_eq!(summary.accepted, 120 - bad.len() as u64);
        let reported: Vec<u64> = summary.rejections.iter().map(|r| r.index).collect();
        assert_eq!(reported, bad[..MAX_REPORTED_REJECTIONS]);
        assert!(
            summary
                .rejections
                .iter()
                .all(|r| r.field == "position" && r.reason == format!("item {} refused", r.index))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn overlapped_keeps_to_its_bound_and_applies_items_before_a_stream_error() {
        let gauge = Arc::new(UnderWayGauge::default());
        let done = Arc::new(AtomicUsize::new(0));
        // 50 users, one item each, then a broken stream.
        let mut items = one_each(50);
        items.push(Err(Status::invalid_argument("undecodable")));
        let ended = overlapped(
            tokio_stream::iter(items),
            8,
            |item: &Item| item.user.clone(),
            |item: Item| {
                let (gauge, done) = (gauge.clone(), done.clone());
                async move {
                    gauge.begin();
                    tokio::time::sleep(Duration::from_millis(100 - item.index)).await;
                    gauge.end();
                    done.fetch_add(1, Ordering::SeqCst);
                    placed()
                }
            },
        )
        .await;
        assert_eq!(
            ended.map_err(|s| s.code()).err(),
            Some(tonic::Code::InvalidArgument)
        );
        assert_eq!(gauge.most(), 8, "at most 8 under way, and 8 were");
        assert_eq!(
            done.load(Ordering::SeqCst),
            50,
            "every item before the error applied"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn items_under_way_are_applied_to_the_end_when_the_caller_goes_away() {
        let (started, done) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let items = one_each(20);
        let call = {
            let (started, done) = (started.clone(), done.clone());
            tokio::spawn(async move {
                overlapped(
                    tokio_stream::iter(items),
                    8,
                    |item: &Item| item.user.clone(),
                    |_item: Item| {
                        let (started, done) = (started.clone(), done.clone());
                        async move {
                            started.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            done.fetch_add(1, Ordering::SeqCst);
                            placed()
                        }
                    },
                )
                .await
            })
        };
        while started.load(Ordering::SeqCst) < 8 {
            tokio::task::yield_now().await;
        }
        // The caller goes away with eight items under way.
        call.abort();
        assert!(call.await.is_err_and(|e| e.is_cancelled()));
        assert_eq!(done.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(started.load(Ordering::SeqCst), 8, "no item started after");
        assert_eq!(
            done.load(Ordering::SeqCst),
            8,
            "every item started was applied"
        );
    }

    #[tokio::test]
    async fn in_order_counts_every_item_and_reports_the_first_rejections() {
        let summary = in_order(tokio_stream::iter(stream()), |item: Item| async move {
            if item.bad { refused(&item) } else { placed() }
        })
        .await
        .unwrap();
        let bad: Vec<u64> = (0..120).filter(|i| i % 7 == 3).collect();
        assert_eq!(summary.rejected, bad.len() as u64);
        let reported: Vec<u64> = summary.rejections.iter().map(|r| r.index).collect();
        assert_eq!(reported, bad[..MAX_REPORTED_REJECTIONS]);
    }
}
