//! The Redis / Valkey store: one server (`--store redis`) or a Cluster
//! (`--store redis-cluster`), holding People Nearby for any number of geomatch replicas.
//!
//! Layout (schema `gm1`), the in-memory design's shape kept in Redis. Every key of a
//! privacy cell carries the hash tag of its coarse cell's resolution-5 ancestor `T`, so
//! the keys that one atomic step touches share a slot, and the cells near each other share
//! a few slots:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `gm1:{T}:b:<cell>` | STRING | the cell's members back to back, in the in-memory bucket encoding, in any order (readers sort); a member's flags byte also carries, in its top five bits, the epoch of the user's record when that record names this cell (see `nearby.rs`, [`RECORD_EPOCH`]) |
//! | `gm1:{T}:o:<coarse>` | SET | the occupied privacy cells of a coarse (resolution 7) cell |
//! | `gm1:{T}:x` | ZSET | `coarse/cell` → when the sweep looks at the cell (unix ms): never after the earliest expiry of its members, earlier when they pinged again since (the sweep then moves it on). One entry per occupied cell, not per user (a store written by an earlier build may still hold `coarse/cell|user` entries; the sweep reads both) |
//! | `gm1:u:{<user>}` | HASH | `c`: the user's privacy cell, `t`: last seen of the ping that wrote it (later pings to the same cell may be newer), `p`: the cell the user was in before this one (kept across pings from the same cell: a clear also empties it, and a retried call answers with it); expires two record epochs after that ping. After a clear, for 10 s and for a retried clear, only `f` (the forgotten cell) with `p` and `t` |
//! | `gm1:tags` | SET | the tags that hold data, for the sweep |
//! | `gm1:meta` | HASH | `schema`, and the page-token key every replica shares |
//! | `gm1:sweep-lease` | STRING | the replica that sweeps now (expires unless renewed) |
//! | `gm1:r:{<user>}:<call>` | HASH | the user's token bucket for a rate-limited call (expires once full) |
//! | `gm1:sh:{<user>}:p` | STRING | the user's current shake id |
//! | `gm1:sh:{<user>}:s:<id>` | HASH | one shake's state and outcome (kept for retries; see `geomatch.lua`) |
//! | `gm1:sh:{<user>}:s:<id>:a:<match>` | STRING | a claim that may no longer land (a settled reservation) |
//! | `gm1:{T}:sw:<bucket>` | ZSET | the shakes waiting in a bucket (resolution 7): listing → deadline |
//! | `gm1:{sh-any}:pool` | ZSET | the ANYWHERE pool: listing → deadline |
//! | channel `gm1:w:{<replica>}` | (sharded) pub/sub | wakes a replica's calls when their shake's outcome is decided |
//! | channel `gm1:c:{T}` | (sharded) pub/sub | every change of a member in tag `T` (`P`/`D`, cell, member), for WatchNearby |
//!
//! Atomic steps are Redis Functions (`geomatch.lua`, library `geomatch_v1`), loaded at
//! start with `FUNCTION LOAD REPLACE`: functions are replicated and survive a failover,
//! which the `EVAL` script cache does not. What a call run twice does (the Cluster
//! client retries one whose connection dropped) is set out at the top of `geomatch.lua`.

mod direct;
mod fetched;
mod nearby;
mod pubsub;
mod shake;
mod watch;
mod wire;

use std::time::Duration;

use h3o::{CellIndex, Resolution};
use redis::{
    FromRedisValue, Pipeline,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};
use thiserror::Error;

pub use direct::routed_calls;
pub use nearby::{RECORD_EPOCH, RedisNearby};
pub use shake::RedisShake;
pub use watch::TagLease;
pub use wire::written_together;

use crate::{error::Error, telemetry::trace};

/// The functions library, loaded at start.
const LIBRARY: &str = include_str!("geomatch.lua");
/// The schema this build reads and writes; a store holding another refuses to start.
const SCHEMA: &str = "gm1";
/// Resolution of the hash-tag cells: a fair trade between hot slots and searches that
/// cross a tag (a 10 km search touches a handful).
const TAG_RESOLUTION: Resolution = Resolution::Five;

/// Where the store is, and who geomatch is to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One Redis or Valkey server, e.g. `redis://127.0.0.1:6379` (a user name and password
    /// in the URL are used unless the credentials give them).
    Server(String, Credentials),
    /// Seed nodes of a Redis or Valkey Cluster, as `host:port`; every node, and every
    /// node the Cluster names later, is authenticated with the same credentials.
    Cluster(Vec<String>, Credentials),
}

/// How geomatch authenticates to its store (`AUTH`): an ACL user name and its password,
/// or the password alone (the `default` user's, as `requirepass` sets it). Empty: no
/// `AUTH`. Its `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Credentials {
    /// The ACL user (`--redis-username`); `None`: the `default` user.
    pub username: Option<String>,
    /// The password (`--redis-password-file`).
    pub password: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

impl Credentials {
    /// `settings` with these credentials in place of theirs (each one given).
    fn apply(&self, settings: redis::RedisConnectionInfo) -> redis::RedisConnectionInfo {
        let settings = match &self.username {
            Some(user) => settings.set_username(user),
            None => settings,
        };
        match &self.password {
            Some(password) => settings.set_password(password),
            None => settings,
        }
    }

    /// The connection to `info`'s server with these credentials.
    fn connection_info(
        &self,
        info: impl redis::IntoConnectionInfo,
    ) -> redis::RedisResult<redis::ConnectionInfo> {
        let info = info.into_connection_info()?;
        let settings = self.apply(info.redis_settings().clone());
        Ok(info.set_redis_settings(settings))
    }
}

impl Target {
    /// The credentials for this store.
    pub fn credentials(&self) -> &Credentials {
        match self {
            Self::Server(_, c) | Self::Cluster(_, c) => c,
        }
    }
}

/// Why the store could not be used.
#[derive(Debug, Error)]
pub enum StoreError {
    /// It could not be reached, or did not answer within the store timeout.
    #[error("{0}")]
    Unreachable(String),
    /// It answered, but not as geomatch expects (another program's data, another schema,
    /// no Functions support).
    #[error("{0}")]
    Incompatible(String),
    /// It refused geomatch's credentials, or wants some and was given none.
    #[error("{0}")]
    Credentials(String),
}

/// What one health probe of the store found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The store answered in time.
    Answered,
    /// No answer within the store timeout: a store (or a replica) too busy to answer in
    /// time, or one that is gone without a word (a network partition).
    TimedOut,
    /// The store refused: no connection (to a master, when clustered), or an error
    /// answer.
    Failed,
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Unavailable(e.to_string())
    }
}

/// How a connection reaches the store.
#[derive(Clone)]
enum Link {
    /// One server, multiplexed, reconnecting by itself after the server comes back.
    Server(ConnectionManager),
    /// A Cluster: calls go straight to their slot's master when the router knows it,
    /// through the Cluster client (multiplexed per node) otherwise.
    Cluster(ClusterConnection, std::sync::Arc<direct::Router>),
}

/// A cloneable connection to the store, routed by slot in a Cluster; every call on it is
/// bounded by the store timeout it was opened with.
#[derive(Clone)]
pub(crate) struct Conn {
    link: Link,
    timeout: Duration,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.link {
            Link::Server(_) => "Conn::Server",
            Link::Cluster(..) => "Conn::Cluster",
        })
    }
}

/// One round trip: a command or a pipeline.
#[derive(Clone, Copy)]
pub(super) enum Call<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a Pipeline),
}

impl Call<'_> {
    /// Sends the call over `conn`.
    async fn query<T: FromRedisValue>(
        self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<T> {
        match self {
            Call::Cmd(cmd) => cmd.query_async(conn).await,
            Call::Pipe(p) => p.query_async(conn).await,
        }
    }
}

/// `pipe` with each `MGET` as one `GET` per key, and each command's reply count (`None`:
/// one reply, as sent; `Some(n)`: an `MGET` of `n` keys).
fn key_by_key(pipe: &Pipeline) -> (Pipeline, Vec<Option<usize>>) {
    let mut split = redis::pipe();
    let mut shape = Vec::new();
    for cmd in pipe.cmd_iter() {
        let mut args = direct::args(cmd);
        if args
            .next()
            .flatten()
            .is_some_and(|name| name.eq_ignore_ascii_case(b"MGET"))
        {
            let mut n = 0;
            for key in args.flatten() {
                split.cmd("GET").arg(key);
                n += 1;
            }
            shape.push(Some(n));
        } else {
            split.add_command(cmd.clone());
            shape.push(None);
        }
    }
    (split, shape)
}

/// The replies of a [`key_by_key`] pipeline in the original pipeline's shape.
fn reshaped(values: Vec<redis::Value>, shape: &[Option<usize>]) -> Vec<redis::Value> {
    let mut values = values.into_iter();
    shape
        .iter()
        .filter_map(|n| match n {
            None => values.next(),
            Some(n) => Some(redis::Value::Array(values.by_ref().take(*n).collect())),
        })
        .collect()
}

/// A store call that failed.
fn unreachable(e: &redis::RedisError) -> StoreError {
    refused_credentials(e).unwrap_or_else(|| StoreError::Unreachable(e.to_string()))
}

/// [`StoreError::Credentials`] when `e` is the store refusing geomatch's credentials
/// (`WRONGPASS`), asking for some it was not given (`NOAUTH`; a large command on a
/// connection not authenticated yet is refused as "unauthenticated"), or refusing a
/// command to geomatch's ACL user (`NOPERM`).
pub(super) fn refused_credentials(e: &redis::RedisError) -> Option<StoreError> {
    let text = e.to_string();
    if text.contains("NOPERM") || text.contains("NoPerm") {
        return Some(StoreError::Credentials(format!(
            "the store's ACL user lacks a permission geomatch needs \
             (`+@all ~gm1:* &gm1:*` grants them all): {text}"
        )));
    }
    let refused = e.kind() == redis::ErrorKind::AuthenticationFailed
        || [
            "WRONGPASS",
            "NOAUTH",
            "unauthenticated",
            "AuthenticationFailed",
        ]
        .iter()
        .any(|code| text.contains(code));
    refused.then(|| {
        StoreError::Credentials(format!(
            "the store refused to authenticate geomatch: give its password with \
             --redis-password-file (and its ACL user with --redis-username), or check them \
             ({text})"
        ))
    })
}

/// How a connection to one server reconnects: a lost connection is re-made in the
/// background, a few quick tries at a time, so calls meanwhile fail fast (UNAVAILABLE)
/// and never hang.
fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(10))
        .set_max_delay(Duration::from_millis(200))
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
}

/// A Cluster client over seed `nodes`: a redirect or a lost connection is retried a couple
/// of times with short waits (the crate's defaults wait seconds, too long for a 2 s shake).
fn cluster_builder(
    nodes: &[String],
    credentials: &Credentials,
    timeout: Duration,
) -> redis::cluster::ClusterClientBuilder {
    let urls: Vec<String> = nodes.iter().map(|n| format!("redis://{n}")).collect();
    let builder = ClusterClient::builder(urls)
        .retries(2)
        .min_retry_wait(10)
        .max_retry_wait(100)
        .connection_timeout(timeout)
        .response_timeout(timeout);
    let builder = match &credentials.username {
        Some(user) => builder.username(user),
        None => builder,
    };
    match &credentials.password {
        Some(password) => builder.password(password),
        None => builder,
    }
}

impl Conn {
    /// Connects to `target`, each call bounded by `timeout`. Cluster clients retry a
    /// redirect or a lost connection a couple of times with short waits (the crate's
    /// defaults wait seconds, too long for a 2 s shake).
    ///
    /// # Errors
    /// [`StoreError::Unreachable`] when no connection is made within `timeout`.
    pub(crate) async fn open(target: &Target, timeout: Duration) -> Result<Self, StoreError> {
        let made = async {
            match target {
                Target::Server(url, credentials) => {
                    let client = credentials
                        .connection_info(url.as_str())
                        .and_then(redis::Client::open)
                        .map_err(|e| unreachable(&e))?;
                    // A lost connection is re-made in the background, a few quick tries at
                    // a time: calls meanwhile fail fast (UNAVAILABLE), never hang.
                    ConnectionManager::new_with_config(client, manager_config(timeout))
                        .await
                        .map(Link::Server)
                        .map_err(|e| unreachable(&e))
                }
                Target::Cluster(nodes, credentials) => {
                    let client = cluster_builder(nodes, credentials, timeout)
                        .build()
                        .map_err(|e| unreachable(&e))?;
                    let cluster = client
                        .get_async_connection()
                        .await
                        .map_err(|e| unreachable(&e))?;
                    let router = direct::Router::open(&cluster, credentials.clone(), timeout);
                    Ok(Link::Cluster(cluster, router))
                }
            }
        };
        let link = tokio::time::timeout(timeout, made)
            .await
            .map_err(|_| StoreError::Unreachable(format!("no connection within {timeout:?}")))??;
        Ok(Self { link, timeout })
    }

    /// Runs `call`, bounded by the store timeout: the store's own answer, or `None` on
    /// time-out.
    async fn run<T: FromRedisValue>(&self, call: Call<'_>) -> Option<redis::RedisResult<T>> {
        self.run_routed(call, false).await
    }

    /// [`Self::run`]; with `direct_only`, a Cluster call the slot's master does not take
    /// (no route, or refused unrun) fails instead of going through the Cluster client.
    async fn run_routed<T: FromRedisValue>(
        &self,
        call: Call<'_>,
        direct_only: bool,
    ) -> Option<redis::RedisResult<T>> {
        // A client span per store call when the RPC is traced: the command (and Function)
        // name only, never a key or an argument (they hold ids and cells).
        let span = trace::child(trace::Kind::Client, || operation(&call).into());
        if let Some(span) = &span {
            span.attribute("db.system.name", "redis");
        }
        let run = async {
            match &self.link {
                Link::Server(c) => call.query(&mut c.clone()).await,
                // Straight to the slot's master when it has a route; through the Cluster
                // client when not, or when the master refused the call unrun (`direct`).
                // (The Cluster client is cloned only for a call that goes through it.)
                Link::Cluster(c, router) => match router.attempt(call, c).await {
                    Some(answer) => answer,
                    None if direct_only => Err(redis::RedisError::from((
                        redis::ErrorKind::Client,
                        "not taken by one master",
                    ))),
                    None => call.query(&mut c.clone()).await,
                },
            }
        };
        let answer = tokio::time::timeout(self.timeout, run).await.ok();
        if answer.is_none()
            && let Link::Cluster(c, router) = &self.link
        {
            // A master that stopped answering: its slots may have moved on.
            router.reread(c);
        }
        if let Some(span) = &span {
            match &answer {
                None => span.failed("store timeout"),
                Some(Err(_)) => span.failed("store error"),
                Some(Ok(_)) => {}
            }
        }
        answer
    }

    /// A call's answer as a result: a time-out is [`StoreError::Unreachable`] too.
    fn answered<T>(&self, r: Option<redis::RedisResult<T>>) -> Result<T, StoreError> {
        match r {
            Some(r) => r.map_err(|e| unreachable(&e)),
            None => Err(StoreError::Unreachable(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// Runs `cmd`, bounded by the store timeout.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let r = self.run(Call::Cmd(cmd)).await;
        self.answered(r)
    }

    /// Runs `pipe` (every key of it in one slot when clustered), bounded by the store
    /// timeout.
    pub(crate) async fn pipe<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T, StoreError> {
        let r = self.run(Call::Pipe(pipe)).await;
        self.answered(r)
    }

    /// Read-only pipelines, each within one slot, answered in order, all sent at once.
    /// Over a Cluster those whose slots share a master go to it as one pipeline (one
    /// write, one reply to read); if it refuses that unrun (a redirect) or fails, they are
    /// sent again one by one, the usual way: reads may run twice.
    pub(crate) async fn reads(
        &self,
        pipes: &[Pipeline],
    ) -> Vec<Result<Vec<redis::Value>, StoreError>> {
        let Link::Cluster(_, router) = &self.link else {
            return futures_util::future::join_all(pipes.iter().map(|p| self.read_one(p))).await;
        };
        let groups = direct::by_master(router, pipes);
        let answers =
            futures_util::future::join_all(groups.into_iter().map(|members| async move {
                if let [one] = members[..] {
                    return vec![(one, self.read_one(&pipes[one]).await)];
                }
                let mut merged = redis::pipe();
                for &i in &members {
                    for cmd in pipes[i].cmd_iter() {
                        merged.add_command(cmd.clone());
                    }
                }
                let sent = self.run_routed::<Vec<redis::Value>>(Call::Pipe(&merged), true);
                if let Some(Ok(values)) = sent.await {
                    let mut values = values.into_iter();
                    return members
                        .iter()
                        .map(|&i| {
                            (
                                i,
                                Ok(values.by_ref().take(pipes[i].cmd_iter().count()).collect()),
                            )
                        })
                        .collect();
                }
                let mut one_by_one = Vec::with_capacity(members.len());
                for i in members {
                    one_by_one.push((i, self.read_one(&pipes[i]).await));
                }
                one_by_one
            }))
            .await;
        let mut out: Vec<Option<Result<Vec<redis::Value>, StoreError>>> =
            (0..pipes.len()).map(|_| None).collect();
        for (i, answer) in answers.into_iter().flatten() {
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(answer);
            }
        }
        out.into_iter()
            .map(|a| {
                a.unwrap_or_else(|| Err(StoreError::Unreachable("a read went unanswered".into())))
            })
            .collect()
    }

    /// One read-only pipeline. A slot being moved between masters refuses a multi-key
    /// read (`MGET`) whose keys are not all on one side yet (`TRYAGAIN`, for as long as
    /// the move takes), and the Cluster client does not follow a redirect (`ASK`) inside
    /// a pipeline: the pipeline's commands are then sent one by one, each `MGET` as one
    /// `GET` per key, and the replies put back in the pipeline's shape.
    async fn read_one(&self, pipe: &Pipeline) -> Result<Vec<redis::Value>, StoreError> {
        match self.run::<Vec<redis::Value>>(Call::Pipe(pipe)).await {
            Some(Err(e))
                if matches!(
                    e.kind(),
                    redis::ErrorKind::Server(
                        redis::ServerErrorKind::TryAgain | redis::ServerErrorKind::Ask
                    )
                ) =>
            {
                let (split, shape) = key_by_key(pipe);
                // One at a time: sent together, some came back with the redirect itself
                // (the Cluster client of redis 1.8 did not follow concurrent ASKs).
                let mut replies = Vec::new();
                for cmd in split.cmd_iter() {
                    let r = self.run::<redis::Value>(Call::Cmd(cmd)).await;
                    replies.push(self.answered(r));
                }
                let values: Result<Vec<redis::Value>, StoreError> = replies.into_iter().collect();
                values.map(|values| reshaped(values, &shape))
            }
            r => self.answered(r),
        }
    }

    /// How the Functions tell watching replicas about changes: sharded pub/sub in a
    /// Cluster (the channel shares its tag's slot), plain pub/sub on one server.
    pub(crate) fn tell_mode(&self) -> &'static str {
        if self.clustered() { "S" } else { "P" }
    }

    /// Whether pipelines must keep to one slot.
    pub(crate) fn clustered(&self) -> bool {
        matches!(self.link, Link::Cluster(..))
    }

    /// Whether the store answers a PING in time (over a Cluster, each master the routes
    /// name, straight: [`Self::probe_masters`]; through the Cluster client only before
    /// the routes are first read, or when no master has a route), and if not, whether
    /// it failed outright or only did not answer in time.
    pub(crate) async fn probe(&self) -> Probe {
        if let Link::Cluster(cluster, router) = &self.link
            && let Some(masters) = router.masters()
            && !masters.is_empty()
        {
            return self.probe_masters(cluster, router, masters).await;
        }
        match self.run::<String>(Call::Cmd(&redis::cmd("PING"))).await {
            Some(Ok(pong)) if pong == "PONG" => Probe::Answered,
            None => Probe::TimedOut,
            Some(Err(e)) if e.is_timeout() => Probe::TimedOut,
            Some(_) => Probe::Failed,
        }
    }

    /// The probe of a Cluster whose masters this replica routes to: a `PING` to each,
    /// straight, within the store timeout. Not through the Cluster client: the replica's
    /// calls all go straight, so nothing would make that client read the slot map again
    /// after a failover, and its `PING` (sent to every master it knows) would wait on a
    /// dead master's address for good, keeping the replica NOT_SERVING. The routes are
    /// read again after any failure, so a master that died drops out of them (its slots
    /// answered UNAVAILABLE until its replica takes over) and the one that replaced it
    /// comes in.
    async fn probe_masters(
        &self,
        cluster: &ClusterConnection,
        router: &std::sync::Arc<direct::Router>,
        masters: Vec<wire::Wire>,
    ) -> Probe {
        use redis::aio::ConnectionLike;
        let ping = redis::cmd("PING");
        let pings = masters.into_iter().map(|mut conn| {
            let ping = &ping;
            async move { conn.req_packed_command(ping).await }
        });
        let answers =
            tokio::time::timeout(self.timeout, futures_util::future::join_all(pings)).await;
        let Ok(answers) = answers else {
            router.reread(cluster);
            return Probe::TimedOut;
        };
        let pongs = answers
            .iter()
            .filter(|a| matches!(a, Ok(redis::Value::SimpleString(s)) if s == "PONG"))
            .count();
        if pongs < answers.len() {
            router.reread(cluster);
        }
        // Some masters answer while another's connection ended (it died, a failover is
        // under way): the store is reachable, and the routes are read again.
        if pongs > 0 {
            Probe::Answered
        } else {
            Probe::Failed
        }
    }

    /// Loads the functions library (on every master when clustered) and checks or sets
    /// the schema.
    ///
    /// # Errors
    /// [`StoreError::Incompatible`] when the store holds another schema or does not
    /// support Functions (Redis before 7); [`StoreError::Unreachable`] as [`Self::query`].
    pub(crate) async fn prepare(&self) -> Result<(), StoreError> {
        let load = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(LIBRARY)
            .clone();
        match self.run::<redis::Value>(Call::Cmd(&load)).await {
            None => return self.answered(None),
            Some(Err(e)) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                return Err(unreachable(&e));
            }
            Some(Err(e)) if refused_credentials(&e).is_some() => return Err(unreachable(&e)),
            // An error answer: the server does not know Functions (Redis before 7), or
            // refused the library.
            Some(Err(e)) => {
                return Err(StoreError::Incompatible(format!(
                    "loading the functions library: {e} (Redis 7, Valkey 7 or later is needed)"
                )));
            }
            Some(Ok(_)) => {}
        }
        let set: bool = self
            .query(redis::cmd("HSETNX").arg(META_KEY).arg("schema").arg(SCHEMA))
            .await?;
        if !set {
            let schema: Option<String> = self
                .query(redis::cmd("HGET").arg(META_KEY).arg("schema"))
                .await?;
            if schema.as_deref() != Some(SCHEMA) {
                return Err(StoreError::Incompatible(format!(
                    "the store holds geomatch schema {schema:?}, this build reads {SCHEMA:?}"
                )));
            }
        }
        Ok(())
    }
}

/// The store's own metadata.
const META_KEY: &str = "gm1:meta";
/// The tags that hold data.
const TAGS_KEY: &str = "gm1:tags";

/// The hash tag of a coarse cell (and of every privacy cell filed under it).
fn tag_of_coarse(coarse: CellIndex) -> String {
    let mut tag = String::with_capacity(16);
    push_cell(&mut tag, coarse.parent(TAG_RESOLUTION).unwrap_or(coarse));
    tag
}

/// Appends `cell` in hex, as its `Display` writes it, without the formatting machinery
/// (a search formats a key for every cell it reads).
fn push_cell(out: &mut String, cell: CellIndex) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let v = u64::from(cell);
    let digits = (64 - v.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(char::from(HEX[((v >> (4 * i)) & 0xf) as usize]));
    }
}

/// The key of privacy cell `cell`'s members, under `tag`.
fn bucket_key(tag: &str, cell: CellIndex) -> String {
    let mut key = String::with_capacity(tag.len() + 26);
    key.push_str("gm1:{");
    key.push_str(tag);
    key.push_str("}:b:");
    push_cell(&mut key, cell);
    key
}

/// The keys of one privacy cell.
#[derive(Debug, Clone)]
struct CellKeys {
    tag: String,
    coarse: CellIndex,
    bucket: String,
    occupancy: String,
    expiry: String,
}

impl CellKeys {
    fn new(cell: CellIndex) -> Self {
        let coarse = crate::nearby::coarse_of(cell);
        let tag = tag_of_coarse(coarse);
        Self {
            bucket: bucket_key(&tag, cell),
            occupancy: occupancy_key(&tag, coarse),
            expiry: expiry_key(&tag),
            coarse,
            tag,
        }
    }
}

/// `cell` in hex, as its `Display` writes it (see [`push_cell`]).
fn cell_hex(cell: CellIndex) -> String {
    let mut hex = String::with_capacity(16);
    push_cell(&mut hex, cell);
    hex
}

/// `parts` joined; the keys of a ping are built on every call, without the formatting
/// machinery.
fn joined(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.push_str(part);
    }
    out
}

/// The channel that tells watching replicas about every change in a tag.
fn change_channel(tag: &str) -> String {
    joined(&["gm1:c:{", tag, "}"])
}

fn occupancy_key(tag: &str, coarse: CellIndex) -> String {
    let mut key = joined(&["gm1:{", tag, "}:o:"]);
    push_cell(&mut key, coarse);
    key
}

fn expiry_key(tag: &str) -> String {
    joined(&["gm1:{", tag, "}:x"])
}

fn user_key(user: &str) -> String {
    format!("gm1:u:{{{user}}}")
}

/// Takes one call of `what` from `user`'s token bucket in the store, shared by every
/// replica (`cfg.burst` 0 disables it).
///
/// # Errors
/// [`Error::RateLimited`] with the time to wait; [`Error::Unavailable`] when the store
/// does not answer.
async fn take_token(
    conn: &Conn,
    what: &'static str,
    user: &crate::id::UserId,
    cfg: crate::guard::RateConfig,
    now_ms: i64,
) -> crate::error::Result<()> {
    if cfg.burst == 0 {
        return Ok(());
    }
    let take = redis::cmd("FCALL")
        .arg("gm_rate")
        .arg(1)
        .arg(format!("gm1:r:{{{}}}:{what}", user.as_str()))
        .arg(cfg.burst)
        .arg(cfg.per_minute)
        .arg(now_ms)
        .clone();
    let wait_ms: u64 = conn.query(&take).await?;
    if wait_ms == 0 {
        return Ok(());
    }
    Err(Error::RateLimited {
        what,
        retry_after: Duration::from_millis(wait_ms),
    })
}

/// A store call's name for its span: the command, with the Function's name for FCALL
/// (`FCALL gm_put`), or `pipeline` with its command count; no key and no argument.
fn operation(call: &Call<'_>) -> String {
    fn name(cmd: &redis::Cmd) -> String {
        let mut args = cmd.args_iter().filter_map(|a| match a {
            redis::Arg::Simple(b) => Some(String::from_utf8_lossy(b).to_ascii_uppercase()),
            _ => None,
        });
        let first = args.next().unwrap_or_default();
        match first.as_str() {
            "FCALL" | "FCALL_RO" => {
                let function = args.next().unwrap_or_default().to_ascii_lowercase();
                format!("{first} {function}")
            }
            _ => first,
        }
    }
    match call {
        Call::Cmd(cmd) => name(cmd),
        Call::Pipe(p) => format!("pipeline ({} commands)", p.cmd_iter().count()),
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    /// A pipeline read key by key answers in the shape of the one sent.
    #[test]
    fn an_mget_read_key_by_key_is_put_back_in_its_shape() {
        let mut pipe = redis::pipe();
        pipe.cmd("MGET").arg("{t}a").arg("{t}b").arg("{t}c");
        pipe.cmd("SMEMBERS").arg("{t}o");
        pipe.cmd("mget").arg("{t}d");
        let (split, shape) = key_by_key(&pipe);
        let names: Vec<Vec<u8>> = split
            .cmd_iter()
            .map(|c| match c.args_iter().next() {
                Some(redis::Arg::Simple(b)) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(
            names,
            [&b"GET"[..], b"GET", b"GET", b"SMEMBERS", b"GET"].map(<[u8]>::to_vec)
        );
        assert_eq!(shape, [Some(3), None, Some(1)]);
        let v = |i: i64| redis::Value::Int(i);
        let got = reshaped((1..=5).map(v).collect(), &shape);
        assert_eq!(
            got,
            [
                redis::Value::Array(vec![v(1), v(2), v(3)]),
                v(4),
                redis::Value::Array(vec![v(5)])
            ]
        );
    }

    /// Keys name cells exactly as `Display` does, so stores written before read the same.
    #[test]
    fn cells_are_written_as_their_display() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..2_000 {
            let at = h3o::LatLng::new(
                rng.random_range(-89.0..89.0),
                rng.random_range(-180.0..180.0),
            )
            .unwrap();
            for res in [
                Resolution::Zero,
                Resolution::Five,
                Resolution::Nine,
                Resolution::Fifteen,
            ] {
                let cell = at.to_cell(res);
                let mut s = String::new();
                push_cell(&mut s, cell);
                assert_eq!(s, cell.to_string());
                assert_eq!(cell_hex(cell), cell.to_string());
                assert_eq!(bucket_key("t", cell), format!("gm1:{{t}}:b:{cell}"));
                assert_eq!(occupancy_key("t", cell), format!("gm1:{{t}}:o:{cell}"));
            }
            assert_eq!(expiry_key("t"), "gm1:{t}:x");
            assert_eq!(change_channel("t"), "gm1:c:{t}");
            let coarse = at.to_cell(Resolution::Seven);
            assert_eq!(
                tag_of_coarse(coarse),
                coarse.parent(TAG_RESOLUTION).unwrap().to_string()
            );
        }
    }
}
