//! A Cluster's calls sent straight to the master that holds their slot.
//!
//! The redis crate's Cluster client hands every command to its routing task, which hands
//! it to the node's connection: two task hand-offs per call. Measured on one node with 64
//! callers (`GET`), that is ~6 µs of client CPU per call against ~2.2 µs through a
//! multiplexed connection to the node itself, and 2.6× fewer calls per second. A ping
//! makes two store calls and a shake about a dozen, so the hop was most of what a replica
//! spent above its gRPC floor (BENCHMARKS.md, "Clustered update").
//!
//! [`Router`] keeps, for each of the 16 384 slots, a multiplexed connection to the master
//! that `CLUSTER SLOTS` names for it. A call whose keys all hash to one slot with a route
//! goes there. Everything else goes through the Cluster client, which follows redirects,
//! reconnects and retries as before:
//! - a command this module does not know the keys of (`PING` to every master,
//!   `FUNCTION LOAD`), or keys in more than one slot;
//! - a slot without a route (its master did not answer when the routes were read);
//! - a direct attempt the master refused without running it: a redirect (`MOVED`,
//!   `ASK`) after a resharding, `READONLY` from a master demoted by a failover,
//!   `TRYAGAIN`, `CLUSTERDOWN`, `LOADING`, or a connection it refused.
//!
//! A direct attempt that fails after it may have run (its connection dropped, no answer
//! in time) is not sent again: the call fails as UNAVAILABLE, as the Cluster client's own
//! call would without its retries. So this path never runs a call twice. A connection
//! that dropped is set aside at once (its slots go through the Cluster client, which
//! reconnects) until the routes are read again.
//!
//! The connection to each master is geomatch's own ([`Wire`], `wire.rs`): the calls bound
//! for one master at the same moment share one write, each still gets its own reply or
//! error, and a redirect of one of them sends only that one through the Cluster client.
//!
//! A slot without a route and every failed direct attempt ask for the routes to be read
//! again, in the background, at most once per [`REREAD_EVERY`]: after a failover or a
//! resharding the slots route directly again by themselves. The whole call, both
//! attempts, stays within the store timeout.

use std::sync::{
    Arc, Mutex, PoisonError,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use arc_swap::ArcSwapOption;
use redis::{Cmd, FromRedisValue, Value, cluster_async::ClusterConnection};
use tokio::time::{Duration, Instant};

use super::{Call, wire::Wire};

/// Slots of a Redis Cluster.
const SLOTS: usize = 16_384;
/// A slot without a route.
const NO_ROUTE: u16 = u16::MAX;
/// Least time between two readings of the routes.
pub(super) const REREAD_EVERY: Duration = Duration::from_millis(250);

/// Store calls sent straight to their slot's master, process-wide.
static DIRECT: AtomicU64 = AtomicU64::new(0);
/// Store calls that went through the Cluster client, process-wide.
static THROUGH_CLUSTER: AtomicU64 = AtomicU64::new(0);

/// Store calls made by this process so far over a Cluster: `(direct, through the Cluster
/// client)`.
pub fn routed_calls() -> (u64, u64) {
    (
        DIRECT.load(Ordering::Relaxed),
        THROUGH_CLUSTER.load(Ordering::Relaxed),
    )
}

/// Which master serves each slot, and a connection to each.
struct Routes {
    /// Index into `masters` per slot, or [`NO_ROUTE`].
    owner: Box<[u16]>,
    masters: Vec<Master>,
}

/// A connection to one master. It never reconnects: once it has dropped, its slots go
/// through the Cluster client until the routes are read again.
struct Master {
    conn: Wire,
    dropped: Arc<AtomicBool>,
}

/// The master that serves every key of `call`, by `owner` (a master index per slot): one
/// slot's, or, for a pipeline of reads gathered from several slots
/// ([`super::Conn::reads`]), the one master all their slots belong to. `None` when they
/// are not all known to one master.
fn master_of(owner: &[u16], call: Call<'_>) -> Option<u16> {
    the_one(call, |cmd| {
        let i = *owner.get(usize::from(cmd_slot(cmd)?))?;
        (i != NO_ROUTE).then_some(i)
    })
}

/// The one value `of` gives every command of `call`; `None` when it gives none for one
/// of them, or two different values.
fn the_one(call: Call<'_>, of: impl Fn(&Cmd) -> Option<u16>) -> Option<u16> {
    match call {
        Call::Cmd(cmd) => of(cmd),
        Call::Pipe(pipe) => {
            let mut one = None;
            for cmd in pipe.cmd_iter() {
                let v = of(cmd)?;
                if one.is_some_and(|known| known != v) {
                    return None;
                }
                one = Some(v);
            }
            one
        }
    }
}

/// Groups `pipes` (indexes into them) by the master that serves all keys of each, in
/// order of first appearance; a pipeline with no single known master is a group alone.
pub(super) fn by_master(router: &Router, pipes: &[redis::Pipeline]) -> Vec<Vec<usize>> {
    let routes = router.routes.load();
    let mut groups: Vec<(Option<u16>, Vec<usize>)> = Vec::new();
    for (i, pipe) in pipes.iter().enumerate() {
        let master = routes
            .as_ref()
            .and_then(|r| master_of(&r.owner, Call::Pipe(pipe)));
        match groups.iter_mut().find(|(m, _)| m.is_some() && *m == master) {
            Some((_, members)) => members.push(i),
            None => groups.push((master, vec![i])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

/// The connection a call goes straight to, and its master's mark of a dropped one.
struct Direct {
    conn: Wire,
    dropped: Arc<AtomicBool>,
}

impl Direct {
    /// Sends `call`. The calls bound for one master at the same moment share one write
    /// (`wire.rs`): on loopback a write costs its sender a few µs of kernel time, the
    /// receiver's TCP work included.
    async fn send<T: FromRedisValue>(&mut self, call: Call<'_>) -> redis::RedisResult<T> {
        call.query(&mut self.conn).await
    }
}

/// When the routes were last read, and whether a reading is under way.
#[derive(Default)]
struct Rereading {
    running: bool,
    last: Option<Instant>,
}

/// The slot routes of one Cluster connection (see the module docs).
pub(super) struct Router {
    routes: ArcSwapOption<Routes>,
    rereading: Mutex<Rereading>,
    /// Connection and response timeout of the connections to the masters.
    timeout: Duration,
    /// Who this replica is to the masters.
    credentials: super::Credentials,
}

impl Router {
    /// A router with no routes yet: every call goes through the Cluster client until the
    /// first reading (started now, in the background) has them.
    pub(super) fn open(
        cluster: &ClusterConnection,
        credentials: super::Credentials,
        timeout: Duration,
    ) -> Arc<Self> {
        let router = Arc::new(Self {
            routes: ArcSwapOption::empty(),
            rereading: Mutex::new(Rereading::default()),
            timeout,
            credentials,
        });
        router.reread(cluster);
        router
    }

    /// Sends `call` straight to the master of its slot: the answer when the master gave
    /// one or the call may have run; `None` when the call is to go through the Cluster
    /// client instead (no route, or refused without being run; see the module docs).
    pub(super) async fn attempt<T: FromRedisValue>(
        self: &Arc<Self>,
        call: Call<'_>,
        cluster: &ClusterConnection,
    ) -> Option<redis::RedisResult<T>> {
        let Some(mut master) = self.route(call, cluster) else {
            THROUGH_CLUSTER.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let answer = master.send(call).await;
        // A call's own error (a Function's, a reply of another type): the master ran it.
        if let Err(e) = &answer
            && !matches!(e.retry_method(), redis::RetryMethod::NoRetry)
        {
            if e.is_io_error() || e.is_connection_dropped() {
                // Set aside until the routes are read again.
                master.dropped.store(true, Ordering::Relaxed);
            }
            self.reread(cluster);
            if not_run(e) {
                tracing::debug!(error = %e, "store call refused by a slot's master; going through the Cluster client");
                THROUGH_CLUSTER.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        DIRECT.fetch_add(1, Ordering::Relaxed);
        Some(answer)
    }

    /// The connection to the master of `call`'s slot, when its keys share one slot and it
    /// has a route; otherwise `None`, and the routes are read again if the slot has none.
    fn route(self: &Arc<Self>, call: Call<'_>, cluster: &ClusterConnection) -> Option<Direct> {
        let routes = self.routes.load();
        let direct = routes.as_ref().and_then(|r| {
            let i = master_of(&r.owner, call)?;
            let master = r.masters.get(usize::from(i))?;
            (!master.dropped.load(Ordering::Relaxed)).then(|| Direct {
                conn: master.conn.clone(),
                dropped: master.dropped.clone(),
            })
        });
        if direct.is_none() {
            self.reread(cluster);
        }
        direct
    }

    /// Connections to the masters the routes name, those not set aside as dropped; `None`
    /// before the first reading of the routes.
    pub(super) fn masters(&self) -> Option<Vec<Wire>> {
        let routes = self.routes.load();
        routes.as_ref().map(|r| {
            r.masters
                .iter()
                .filter(|m| !m.dropped.load(Ordering::Relaxed))
                .map(|m| m.conn.clone())
                .collect()
        })
    }

    /// Reads the routes again in the background, unless a reading is under way or one
    /// started less than [`REREAD_EVERY`] ago. A reading that fails keeps the routes
    /// there were.
    pub(super) fn reread(self: &Arc<Self>, cluster: &ClusterConnection) {
        {
            let mut r = self
                .rereading
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if r.running || r.last.is_some_and(|t| t.elapsed() < REREAD_EVERY) {
                return;
            }
            r.running = true;
            r.last = Some(Instant::now());
        }
        let (this, cluster) = (self.clone(), cluster.clone());
        tokio::spawn(async move {
            // Cleared however the reading ends (a runtime shutting down drops it midway).
            let _done = ReadingDone(this.clone());
            match read_routes(cluster, &this.credentials, this.timeout).await {
                Ok(routes) => this.routes.store(Some(Arc::new(routes))),
                Err(e) => tracing::debug!(error = %e, "reading the Cluster's slots"),
            }
        });
    }
}

/// Marks a router's reading of the routes ended, when dropped.
struct ReadingDone(Arc<Router>);

impl Drop for ReadingDone {
    fn drop(&mut self) {
        self.0
            .rereading
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .running = false;
    }
}

/// Whether a failed direct attempt was refused by the master without being run, so the
/// call may go through the Cluster client instead: a redirect, a refusal to be retried
/// (`READONLY`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `LOADING`), or a refused
/// connection. A dropped connection or a reply that does not convert may come after the
/// call ran, so those are not sent again.
fn not_run(e: &redis::RedisError) -> bool {
    e.is_connection_refusal()
        || matches!(
            e.retry_method(),
            redis::RetryMethod::MovedRedirect
                | redis::RetryMethod::AskRedirect
                | redis::RetryMethod::WaitAndRetry
                | redis::RetryMethod::RefreshSlotsAndRetry
        )
}

/// The routes `CLUSTER SLOTS` gives: each slot range's master, one new connection per
/// master, made concurrently, each within `timeout`. A master that cannot be connected
/// to now leaves its slots without a route.
async fn read_routes(
    mut cluster: ClusterConnection,
    credentials: &super::Credentials,
    timeout: Duration,
) -> redis::RedisResult<Routes> {
    let slots: Value = tokio::time::timeout(
        timeout,
        redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut cluster),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let ranges = slot_ranges(&slots);
    let mut addrs: Vec<(String, u16)> = Vec::new();
    for (_, _, addr) in &ranges {
        if !addrs.contains(addr) {
            addrs.push(addr.clone());
        }
    }
    let mut connecting = tokio::task::JoinSet::new();
    for (i, (host, port)) in addrs.iter().cloned().enumerate() {
        let credentials = credentials.clone();
        connecting.spawn(async move {
            let connected = Wire::connect(&host, port, &credentials);
            (i, tokio::time::timeout(timeout, connected).await)
        });
    }
    // Each address's connection, by its index in `addrs`.
    let mut made: Vec<Option<Wire>> = vec![None; addrs.len()];
    while let Some(joined) = connecting.join_next().await {
        match joined {
            Ok((i, Ok(Ok(conn)))) => {
                if let Some(slot) = made.get_mut(i) {
                    *slot = Some(conn);
                }
            }
            Ok((_, Ok(Err(e)))) => tracing::debug!(error = %e, "connecting to a Cluster master"),
            Ok((_, Err(_))) => tracing::debug!("connecting to a Cluster master: no answer in time"),
            Err(e) => tracing::debug!(error = %e, "connecting to a Cluster master"),
        }
    }
    let mut owner = vec![NO_ROUTE; SLOTS].into_boxed_slice();
    let mut masters = Vec::new();
    // Index into `masters` of each address connected to.
    let mut index: Vec<Option<u16>> = vec![None; addrs.len()];
    for (i, conn) in made.into_iter().enumerate() {
        if let (Some(conn), Ok(at)) = (conn, u16::try_from(masters.len())) {
            index[i] = Some(at);
            masters.push(Master {
                conn,
                dropped: Arc::default(),
            });
        }
    }
    for (start, end, addr) in &ranges {
        let at = addrs
            .iter()
            .position(|a| a == addr)
            .and_then(|i| index.get(i).copied().flatten());
        if let Some(at) = at {
            owner[usize::from(*start)..=usize::from(*end)].fill(at);
        }
    }
    Ok(Routes { owner, masters })
}

/// The slot ranges of a `CLUSTER SLOTS` answer with their master's host and port; an
/// entry not in that shape (or a master without a known host) is left out.
fn slot_ranges(answer: &Value) -> Vec<(u16, u16, (String, u16))> {
    let Value::Array(ranges) = answer else {
        return Vec::new();
    };
    let int = |v: &Value| match v {
        Value::Int(n) => u16::try_from(*n).ok(),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    ranges
        .iter()
        .filter_map(|range| {
            let Value::Array(parts) = range else {
                return None;
            };
            let (start, end) = (int(parts.first()?)?, int(parts.get(1)?)?);
            let Value::Array(master) = parts.get(2)? else {
                return None;
            };
            let host = text(master.first()?)?;
            let port = int(master.get(1)?)?;
            (start <= end && usize::from(end) < SLOTS && !host.is_empty() && host != "?")
                .then_some((start, end, (host, port)))
        })
        .collect()
}

/// The one slot all keys of `call` hash to; `None` for a command whose keys this module
/// does not know, or keys in several slots.
#[cfg(test)]
fn slot_of(call: Call<'_>) -> Option<u16> {
    the_one(call, cmd_slot)
}

/// Commands whose one key is their first argument.
const ONE_KEY: &[&str] = &[
    "GET",
    "SET",
    "HGET",
    "HMGET",
    "HSET",
    "HSETNX",
    "HGETALL",
    "HDEL",
    "SADD",
    "SREM",
    "SMEMBERS",
    "ZADD",
    "ZREM",
    "ZRANGE",
    "ZRANGEBYSCORE",
    "ZSCORE",
    "PEXPIRE",
    "SPUBLISH",
];
/// Commands whose every argument is a key.
const ALL_KEYS: &[&str] = &["MGET", "DEL", "EXISTS", "UNLINK"];

/// `cmd`'s name and arguments as bytes (`None` for a cursor argument).
pub(super) fn args(cmd: &Cmd) -> impl Iterator<Item = Option<&[u8]>> {
    cmd.args_iter().map(|a| match a {
        redis::Arg::Simple(b) => Some(b),
        _ => None,
    })
}

fn cmd_slot(cmd: &Cmd) -> Option<u16> {
    let mut args = args(cmd);
    let name = std::str::from_utf8(args.next()??).ok()?;
    let keys: Vec<&[u8]> =
        if name.eq_ignore_ascii_case("FCALL") || name.eq_ignore_ascii_case("FCALL_RO") {
            let _function = args.next()??;
            let n: usize = std::str::from_utf8(args.next()??).ok()?.parse().ok()?;
            args.take(n).collect::<Option<_>>()?
        } else if ALL_KEYS.iter().any(|c| name.eq_ignore_ascii_case(c)) {
            args.collect::<Option<_>>()?
        } else if ONE_KEY.iter().any(|c| name.eq_ignore_ascii_case(c)) {
            vec![args.next()??]
        } else {
            return None;
        };
    let mut slots = keys.iter().map(|k| key_slot(k));
    let first = slots.next()?;
    slots.all(|s| s == first).then_some(first)
}

/// The Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the text between the first
/// `{` and the next `}`, when not empty) or of the whole key, modulo 16 384, as the
/// Cluster specification defines it.
pub(super) fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .map(|close| &rest[..close])
        })
        .filter(|tag| !tag.is_empty());
    // SLOTS is a power of two: the remainder is the low 14 bits.
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key)) & (SLOTS as u16 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_specification() {
        // The specification's own examples and CRC16/XMODEM's check value.
        assert_eq!(key_slot(b"foo"), 12_182);
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{user1000}.followers"), key_slot(b"user1000"));
        // An empty tag is no tag; only the first `{`…`}` counts.
        assert_eq!(key_slot(b"foo{}{bar}"), {
            crc16::State::<crc16::XMODEM>::calculate(b"foo{}{bar}") & 0x3FFF
        });
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
    }

    #[test]
    fn a_call_has_a_slot_only_when_every_key_shares_it() {
        let fcall = redis::cmd("FCALL")
            .arg("gm_put")
            .arg(2)
            .arg("gm1:{t}:b:1")
            .arg("gm1:{t}:o:2")
            .arg("not-a-key")
            .clone();
        assert_eq!(slot_of(Call::Cmd(&fcall)), Some(key_slot(b"t")));
        let split = redis::cmd("FCALL")
            .arg("gm_put")
            .arg(2)
            .arg("gm1:{t}:b:1")
            .arg("gm1:{u}:o:2")
            .clone();
        assert_eq!(slot_of(Call::Cmd(&split)), None);
        let keyless = redis::cmd("FCALL").arg("gm_x").arg(0).clone();
        assert_eq!(slot_of(Call::Cmd(&keyless)), None);
        assert_eq!(slot_of(Call::Cmd(&redis::cmd("PING"))), None);
        let load = redis::cmd("FUNCTION").arg("LOAD").arg("x").clone();
        assert_eq!(slot_of(Call::Cmd(&load)), None);
        let get = redis::cmd("hget").arg("gm1:u:{a}").arg("c").clone();
        assert_eq!(slot_of(Call::Cmd(&get)), Some(key_slot(b"a")));
        let mget = redis::cmd("MGET").arg("{a}1").arg("{a}2").clone();
        assert_eq!(slot_of(Call::Cmd(&mget)), Some(key_slot(b"a")));
        let mget = redis::cmd("MGET").arg("{a}1").arg("{b}2").clone();
        assert_eq!(slot_of(Call::Cmd(&mget)), None);
        let del = redis::cmd("DEL").arg("{a}1").arg("{b}2").clone();
        assert_eq!(slot_of(Call::Cmd(&del)), None);

        let mut one = redis::pipe();
        one.cmd("GET").arg("{a}1").cmd("SMEMBERS").arg("{a}2");
        assert_eq!(slot_of(Call::Pipe(&one)), Some(key_slot(b"a")));
        let mut two = redis::pipe();
        two.cmd("GET").arg("{a}1").cmd("GET").arg("{b}2");
        assert_eq!(slot_of(Call::Pipe(&two)), None);
        let mut unknown = redis::pipe();
        unknown.cmd("GET").arg("{a}1").cmd("PING");
        assert_eq!(slot_of(Call::Pipe(&unknown)), None);
        assert_eq!(slot_of(Call::Pipe(&redis::pipe())), None);
    }

    /// A pipeline goes to one master when every key's slot is that master's, whatever
    /// the slots; not when a slot is another master's or has no route.
    #[test]
    fn a_pipeline_of_several_slots_goes_to_their_one_master() {
        let (a, b, c) = (key_slot(b"a"), key_slot(b"b"), key_slot(b"c"));
        let mut owner = vec![NO_ROUTE; SLOTS];
        owner[usize::from(a)] = 0;
        owner[usize::from(b)] = 0;
        owner[usize::from(c)] = 1;
        let mut same = redis::pipe();
        same.cmd("GET")
            .arg("{a}1")
            .cmd("ZRANGE")
            .arg("{b}x")
            .arg(0)
            .arg(64);
        assert_eq!(master_of(&owner, Call::Pipe(&same)), Some(0));
        let mut split = redis::pipe();
        split.cmd("GET").arg("{a}1").cmd("GET").arg("{c}2");
        assert_eq!(master_of(&owner, Call::Pipe(&split)), None);
        let mut unrouted = redis::pipe();
        unrouted.cmd("GET").arg("{a}1").cmd("GET").arg("{d}2");
        assert_eq!(master_of(&owner, Call::Pipe(&unrouted)), None);
        assert_eq!(
            master_of(&owner, Call::Cmd(redis::cmd("GET").arg("{c}"))),
            Some(1)
        );
    }

    #[test]
    fn slot_ranges_are_read_from_a_cluster_slots_answer() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let answer = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
                node("127.0.0.1", 7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node("", 7001)]),
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(16383),
                node("::1", 7002),
            ]),
            Value::Array(vec![Value::Int(9), Value::Int(3), node("h", 1)]),
            Value::Int(3),
        ]);
        assert_eq!(
            slot_ranges(&answer),
            vec![
                (0, 5460, ("127.0.0.1".to_string(), 7000)),
                (10923, 16383, ("::1".to_string(), 7002)),
            ]
        );
        assert!(slot_ranges(&Value::Nil).is_empty());
    }
}
