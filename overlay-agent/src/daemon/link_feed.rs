//! The link changes the fast path follows (`netlink::events`), kept
//! subscribed. The rtnetlink stream can end (its socket fails, e.g. after
//! `ENOBUFS`); a `select!` arm on the bare receiver would then never fire
//! again and new pods would silently keep the host's path. [`LinkFeed`]
//! logs the end once and subscribes again on a bounded schedule; after a
//! new subscription it reports a change, since events were missed meanwhile.
//! While it has no subscription, and after it gives up, the periodic
//! recheck still syncs the pod veths.

use std::{io, time::Duration};

use tokio::{sync::mpsc, time::Instant};

/// The delays before each new attempt to subscribe, after the stream ended
/// or a subscription failed: about two and a half minutes in all, then it
/// gives up (netlink is broken for good; the recheck goes on).
pub const RESUBSCRIBE: [Duration; 8] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(15),
    Duration::from_secs(30),
    Duration::from_secs(30),
    Duration::from_secs(60),
];

/// Link-change notifications that survive the end of their stream.
pub struct LinkFeed<S> {
    subscribe: S,
    rx: Option<mpsc::Receiver<()>>,
    schedule: &'static [Duration],
    /// Entries of `schedule` used since the stream ended (or since start).
    retries: usize,
    /// Subscriptions that failed since then.
    failed: usize,
    /// When the next attempt is due. Kept here, not in the future that
    /// waits for it: [`LinkFeed::changed`] is dropped whenever another arm
    /// of the daemon's `select!` fires first, and a wait restarted each
    /// time would never end.
    retry_at: Option<Instant>,
}

impl<S> LinkFeed<S>
where
    S: FnMut() -> io::Result<mpsc::Receiver<()>>,
{
    /// Subscribes with `subscribe`; if that fails, the first retry is
    /// scheduled.
    pub fn start(subscribe: S, schedule: &'static [Duration]) -> Self {
        let mut feed = LinkFeed {
            subscribe,
            rx: None,
            schedule,
            retries: 0,
            failed: 0,
            retry_at: None,
        };
        match (feed.subscribe)() {
            Ok(rx) => feed.rx = Some(rx),
            Err(e) => {
                log::warn!(
                    "cannot follow link changes ({e}): trying again; until then pod veths are synced at every recheck"
                );
                feed.failed = 1;
                feed.schedule_retry(&e);
            }
        }
        feed
    }

    /// Waits for a link change: one per burst, or one after a new
    /// subscription (events may have been missed). Cancel-safe. Never
    /// returns once it has given up.
    pub async fn changed(&mut self) {
        loop {
            if let Some(rx) = &mut self.rx {
                if rx.recv().await.is_some() {
                    return;
                }
                self.rx = None;
                log::warn!(
                    "the stream of link changes ended: subscribing again; until then pod veths are synced at every recheck"
                );
                self.retries = 1;
                self.failed = 0;
                self.retry_at = self.schedule.first().map(|d| Instant::now() + *d);
                continue;
            }
            let Some(at) = self.retry_at else {
                return std::future::pending().await;
            };
            tokio::time::sleep_until(at).await;
            match (self.subscribe)() {
                Ok(rx) => {
                    log::info!("following link changes again");
                    self.rx = Some(rx);
                    self.retry_at = None;
                    return;
                }
                Err(e) => {
                    self.failed += 1;
                    self.schedule_retry(&e);
                }
            }
        }
    }

    /// The next attempt after a failed one, or none: then it has given up,
    /// which the log says.
    fn schedule_retry(&mut self, e: &io::Error) {
        let next = self.schedule.get(self.retries);
        self.retries += 1;
        self.retry_at = match next {
            Some(delay) => {
                log::debug!("subscribing to link changes: {e}; retrying in {delay:?}");
                Some(Instant::now() + *delay)
            }
            None => {
                log::warn!(
                    "cannot follow link changes ({e}) after {} attempts: giving up; pod veths are synced at every recheck only",
                    self.failed
                );
                None
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::VecDeque, rc::Rc};

    use super::*;

    const FAST: [Duration; 3] = [Duration::from_millis(5); 3];

    /// A `subscribe` that hands out the queued results in turn (then
    /// fails), and counts its calls.
    fn subscriptions(
        queue: Vec<io::Result<mpsc::Receiver<()>>>,
    ) -> (
        impl FnMut() -> io::Result<mpsc::Receiver<()>>,
        Rc<RefCell<usize>>,
    ) {
        let calls = Rc::new(RefCell::new(0));
        let counted = calls.clone();
        let mut queue = VecDeque::from(queue);
        let subscribe = move || {
            *counted.borrow_mut() += 1;
            queue
                .pop_front()
                .unwrap_or_else(|| Err(io::Error::other("no more")))
        };
        (subscribe, calls)
    }

    async fn fires(feed: &mut LinkFeed<impl FnMut() -> io::Result<mpsc::Receiver<()>>>) -> bool {
        tokio::time::timeout(Duration::from_millis(500), feed.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn an_ended_stream_is_subscribed_again_and_reports_a_change() {
        let (tx1, rx1) = mpsc::channel(1);
        let (tx2, rx2) = mpsc::channel(1);
        let (subscribe, calls) = subscriptions(vec![Ok(rx1), Ok(rx2)]);
        let mut feed = LinkFeed::start(subscribe, &FAST);
        tx1.send(()).await.unwrap();
        assert!(fires(&mut feed).await);
        assert_eq!(*calls.borrow(), 1);
        // The stream ends: a new subscription, and a change to re-read.
        drop(tx1);
        assert!(fires(&mut feed).await);
        assert_eq!(*calls.borrow(), 2);
        // Quiet until the new stream says something.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), feed.changed())
                .await
                .is_err()
        );
        tx2.send(()).await.unwrap();
        assert!(fires(&mut feed).await);
        assert_eq!(*calls.borrow(), 2);
    }

    #[tokio::test]
    async fn failed_subscriptions_are_retried_on_the_schedule_then_given_up() {
        let (subscribe, calls) = subscriptions(vec![]);
        let mut feed = LinkFeed::start(subscribe, &FAST);
        assert!(!fires(&mut feed).await, "a change without a subscription");
        // The first attempt, then one per entry of the schedule.
        assert_eq!(*calls.borrow(), 1 + FAST.len());
        assert!(feed.retry_at.is_none());
    }

    #[tokio::test]
    async fn a_failed_start_is_retried_and_then_followed() {
        let (tx, rx) = mpsc::channel(1);
        let (subscribe, calls) = subscriptions(vec![Err(io::Error::other("ENOBUFS")), Ok(rx)]);
        let mut feed = LinkFeed::start(subscribe, &FAST);
        assert!(fires(&mut feed).await);
        assert_eq!(*calls.borrow(), 2);
        tx.send(()).await.unwrap();
        assert!(fires(&mut feed).await);
    }

    #[tokio::test]
    async fn a_wait_cut_short_by_other_events_keeps_its_deadline() {
        static SLOW: [Duration; 1] = [Duration::from_millis(60)];
        let (_tx, rx) = mpsc::channel(1);
        let (subscribe, calls) = subscriptions(vec![Err(io::Error::other("down")), Ok(rx)]);
        let mut feed = LinkFeed::start(subscribe, &SLOW);
        // As in the daemon's loop: other arms win every 10 ms, dropping the
        // wait; the retry still happens once its delay has passed.
        let mut resubscribed = false;
        for _ in 0..30 {
            if tokio::time::timeout(Duration::from_millis(10), feed.changed())
                .await
                .is_ok()
            {
                resubscribed = true;
                break;
            }
        }
        assert!(resubscribed, "the retry never came");
        assert_eq!(*calls.borrow(), 2);
    }
}
