//! A pipelined connection of geomatch's own to one Redis node: a Cluster master that
//! calls go to straight (`direct.rs`).
//!
//! The redis crate's multiplexed connection hands each call to its connection task over a
//! channel and each reply back over another, and the calls ready together were gathered
//! by one more task before that (to share a write): four task hand-offs per store call,
//! which a profile of a clustered ping put at about a third of the store client's CPU
//! (BENCHMARKS.md, "Where a clustered ping's CPU goes"). Here a caller appends its packed
//! command to the connection's buffer and its reply slot to the queue of replies awaited,
//! both under one lock, so that the two stay in the same order; a writer task writes the
//! buffer, after yielding once so that the calls ready at the same moment share the write;
//! a reader task parses the replies (RESP2: the connection never says `HELLO 3`) and hands
//! each caller its own. Two hand-offs per call.
//!
//! What a caller sees is what the multiplexed connection gave ([`redis::aio::ConnectionLike`]):
//! each command's own reply, an error reply among them as a value. A connection that ends
//! (the node closed it, a read or a write failed) fails every call awaiting a reply with
//! an I/O error: each may have run. A call made after the end is refused unrun
//! (`ConnectionRefused`). A transaction whose queued command the node refused (`EXEC`
//! then aborts it: nothing ran) fails with that refusal, where the redis crate reports
//! an aborted transaction: a redirect among them sends it through the Cluster client.
//! Nothing reconnects: the router sets the connection aside and
//! reads the routes again. A call has no timeout of its own here: every store call is
//! bounded by the store timeout around it, and a reply that comes after its caller gave up
//! is read and dropped. Dropping the last handle stops both tasks and closes the socket.

use std::{
    collections::VecDeque,
    io,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{Notify, oneshot},
    task::AbortHandle,
};

use super::Credentials;

/// Calls awaiting a reply on one connection beyond which new ones are refused: a node that
/// stopped answering must not grow the queue without bound while callers time out.
const MAX_AWAITING: usize = 65_536;
/// Bytes read at a time (more when a reply is larger).
const READ_CHUNK: usize = 16 * 1024;
/// Buffer kept after a burst larger than this.
const KEPT: usize = 64 * 1024;
/// Deepest nesting of arrays accepted in a reply.
const MAX_DEPTH: usize = 32;

/// Commands written to a node in one write with another caller's, process-wide.
static WRITTEN_TOGETHER: AtomicU64 = AtomicU64::new(0);

/// Store commands this process has written to a Cluster's masters in one write with at
/// least one other caller's, so far.
pub fn written_together() -> u64 {
    WRITTEN_TOGETHER.load(Ordering::Relaxed)
}

/// A connection to one node; clones share it.
#[derive(Clone)]
pub(super) struct Wire {
    handle: Arc<Handle>,
}

/// Owns the connection's two tasks: they stop when the last [`Wire`] is dropped.
struct Handle {
    shared: Arc<Shared>,
    tasks: [AbortHandle; 2],
}

impl Drop for Handle {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// What the callers, the writer and the reader share.
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer: there is something to write, or the connection ended.
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// Packed commands not written yet.
    out: Vec<u8>,
    /// Calls, and their commands, in `out`.
    calls_out: usize,
    commands_out: usize,
    /// The calls awaiting replies, in the order their commands were written.
    awaiting: VecDeque<Awaiting>,
    /// Why the connection ended, once it has.
    ended: Option<io::ErrorKind>,
}

/// One call's replies to come: `skip` to pass over (a transaction's `OK` and `QUEUED`s),
/// then `take` to hand over.
struct Awaiting {
    skip: usize,
    take: usize,
    /// An error among the skipped replies (a transaction's command refused when queued).
    refused: Option<Value>,
    values: Vec<Value>,
    reply: Reply,
}

enum Reply {
    One(oneshot::Sender<RedisResult<Value>>),
    Many(oneshot::Sender<RedisResult<Vec<Value>>>),
}

impl Awaiting {
    /// A call that awaits `skip` replies to pass over, then `take` to hand to `reply`.
    fn new(skip: usize, take: usize, reply: Reply) -> Self {
        Self {
            skip,
            take,
            refused: None,
            values: Vec::with_capacity(take),
            reply,
        }
    }

    /// Takes `value`; `true` once the call has every reply it awaits.
    fn give(&mut self, value: Value) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            if matches!(value, Value::ServerError(_)) && self.refused.is_none() {
                self.refused = Some(value);
            }
        } else {
            self.values.push(value);
        }
        self.skip == 0 && self.values.len() == self.take
    }

    /// Hands the caller its replies.
    fn answer(self) {
        let refused = self.refused.map(|v| v.extract_error());
        match self.reply {
            Reply::One(tx) => {
                let answer = match refused {
                    Some(Err(e)) => Err(e),
                    _ => self.values.into_iter().next().ok_or_else(short),
                };
                let _gone = tx.send(answer);
            }
            Reply::Many(tx) => {
                let answer = match refused {
                    Some(Err(e)) => Err(e),
                    _ => Ok(self.values),
                };
                let _gone = tx.send(answer);
            }
        }
    }

    /// Fails the call: the connection ended before its replies came.
    fn fail(self, kind: io::ErrorKind) {
        match self.reply {
            Reply::One(tx) => drop(tx.send(Err(ended(kind)))),
            Reply::Many(tx) => drop(tx.send(Err(ended(kind)))),
        }
    }
}

fn short() -> RedisError {
    RedisError::from((redis::ErrorKind::UnexpectedReturnType, "a reply came short"))
}

/// The error of a call whose connection ended while it awaited its reply: it may have run.
/// Always `ConnectionAborted`, whatever ended the connection: a socket error of an
/// established connection can be `ConnectionRefused` (an ICMP unreachable recorded on
/// it), which the router would take for a call refused unrun and send again.
fn ended(kind: io::ErrorKind) -> RedisError {
    RedisError::from(io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!("the store connection ended ({kind})"),
    ))
}

/// The error of a command without a name: a node answers `*0` with nothing, so it
/// would put every later reply out of step. Refused unsent, as the redis crate does.
fn empty() -> RedisError {
    RedisError::from((redis::ErrorKind::Client, "empty command"))
}

/// The error of a call not sent at all.
fn refused(why: &'static str) -> RedisError {
    RedisError::from(io::Error::new(io::ErrorKind::ConnectionRefused, why))
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Ends the connection (the first reason given stands) and fails the calls awaiting
    /// replies.
    fn end(&self, kind: io::ErrorKind) {
        let failed = {
            let mut s = self.lock();
            s.ended.get_or_insert(kind);
            s.out = Vec::new();
            std::mem::take(&mut s.awaiting)
        };
        self.wake.notify_one();
        for call in failed {
            call.fail(kind);
        }
    }

    /// Hands `values`, the replies just read in order, to the calls awaiting them.
    fn deliver(&self, values: &mut Vec<Value>) {
        let mut done = Vec::new();
        let mut unexpected = false;
        {
            let mut s = self.lock();
            for value in values.drain(..) {
                let Some(first) = s.awaiting.front_mut() else {
                    unexpected = true;
                    break;
                };
                if first.give(value)
                    && let Some(call) = s.awaiting.pop_front()
                {
                    done.push(call);
                }
            }
        }
        // Callers are woken outside the lock.
        for call in done {
            call.answer();
        }
        if unexpected {
            // A reply no call awaits: the stream is out of step, and no later reply can
            // be trusted to be its caller's.
            values.clear();
            self.end(io::ErrorKind::InvalidData);
        }
    }
}

impl Wire {
    /// Connects to `host:port`, authenticates with `credentials` (when they hold a
    /// password) and waits for a `PING`'s answer, so that a node that accepts connections
    /// but does not answer is not taken for one that serves. The caller bounds the time.
    ///
    /// # Errors
    /// The connection's failure, or the node's refusal of the credentials.
    pub(super) async fn connect(
        host: &str,
        port: u16,
        credentials: &Credentials,
    ) -> RedisResult<Self> {
        let stream = TcpStream::connect((host, port)).await?;
        stream.set_nodelay(true)?;
        let (mut read, mut write) = stream.into_split();
        let mut hello = Vec::new();
        let mut expected = 1;
        if let Some(password) = &credentials.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &credentials.username {
                auth.arg(user);
            }
            auth.arg(password).write_packed_command(&mut hello);
            expected += 1;
        }
        redis::cmd("PING").write_packed_command(&mut hello);
        write.write_all(&hello).await?;
        let mut buf = Vec::with_capacity(READ_CHUNK);
        let mut answers = Vec::new();
        while answers.len() < expected {
            if read.read_buf(&mut buf).await? == 0 {
                return Err(ended(io::ErrorKind::UnexpectedEof));
            }
            let used =
                parse_replies(&buf, &mut answers).map_err(|_| ended(io::ErrorKind::InvalidData))?;
            buf.drain(..used);
        }
        for answer in answers {
            answer.extract_error()?;
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        });
        let writer = tokio::spawn(write_calls(shared.clone(), write)).abort_handle();
        let reader = tokio::spawn(read_replies(shared.clone(), read, buf)).abort_handle();
        Ok(Self {
            handle: Arc::new(Handle {
                shared,
                tasks: [writer, reader],
            }),
        })
    }

    /// Queues one call: `pack` appends its commands (`commands` of them) to the buffer,
    /// and `awaiting` is where its replies go. Refused when the connection ended or too
    /// many calls await replies.
    fn submit(
        &self,
        pack: impl FnOnce(&mut Vec<u8>),
        commands: usize,
        awaiting: Awaiting,
    ) -> RedisResult<()> {
        let shared = &self.handle.shared;
        let first = {
            let mut s = shared.lock();
            if s.ended.is_some() {
                return Err(refused("the store connection ended"));
            }
            if s.awaiting.len() >= MAX_AWAITING {
                return Err(refused("too many calls await the store's replies"));
            }
            let first = s.out.is_empty();
            pack(&mut s.out);
            s.calls_out += 1;
            s.commands_out += commands;
            s.awaiting.push_back(awaiting);
            first
        };
        if first {
            shared.wake.notify_one();
        }
        Ok(())
    }
}

impl redis::aio::ConnectionLike for Wire {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            if cmd.args_iter().next().is_none() {
                return Err(empty());
            }
            let (tx, rx) = oneshot::channel();
            let awaiting = Awaiting::new(0, 1, Reply::One(tx));
            self.submit(|out| cmd.write_packed_command(out), 1, awaiting)?;
            rx.await
                .unwrap_or_else(|_| Err(ended(io::ErrorKind::ConnectionAborted)))
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            if offset + count == 0 {
                return Ok(Vec::new());
            }
            if pipe.cmd_iter().any(|cmd| cmd.args_iter().next().is_none()) {
                return Err(empty());
            }
            let (tx, rx) = oneshot::channel();
            let awaiting = Awaiting::new(offset, count, Reply::Many(tx));
            let pack = |out: &mut Vec<u8>| {
                if pipe.is_transaction() {
                    out.extend_from_slice(&pipe.get_packed_pipeline());
                } else {
                    for cmd in pipe.cmd_iter() {
                        cmd.write_packed_command(out);
                    }
                }
            };
            self.submit(pack, pipe.len(), awaiting)?;
            rx.await
                .unwrap_or_else(|_| Err(ended(io::ErrorKind::ConnectionAborted)))
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// Ends the connection when dropped: a task that stops any way at all (a runtime
/// shutting down drops it midway) fails the calls awaiting replies at once, rather than
/// leaving them to the store timeout and new calls queued for nobody.
struct EndOnDrop(Arc<Shared>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end(io::ErrorKind::ConnectionAborted);
    }
}

/// Writes what the callers queued, until the connection ends.
async fn write_calls(shared: Arc<Shared>, mut write: OwnedWriteHalf) {
    let _end = EndOnDrop(shared.clone());
    let mut buf = Vec::new();
    let why = loop {
        shared.wake.notified().await;
        // Let the other calls ready at this moment join this write.
        tokio::task::yield_now().await;
        {
            let mut s = shared.lock();
            if s.ended.is_some() {
                return;
            }
            std::mem::swap(&mut s.out, &mut buf);
            if s.calls_out > 1 {
                WRITTEN_TOGETHER.fetch_add(s.commands_out as u64, Ordering::Relaxed);
            }
            s.calls_out = 0;
            s.commands_out = 0;
        }
        if buf.is_empty() {
            continue;
        }
        if let Err(e) = write.write_all(&buf).await {
            break e.kind();
        }
        buf.clear();
        if buf.capacity() > KEPT {
            buf.shrink_to(READ_CHUNK);
        }
    };
    shared.end(why);
}

/// Reads replies and hands them to their callers, until the connection ends. `buf` holds
/// what was read already.
async fn read_replies(shared: Arc<Shared>, mut read: OwnedReadHalf, mut buf: Vec<u8>) {
    let _end = EndOnDrop(shared.clone());
    let mut values = Vec::new();
    let why = loop {
        if shared.lock().ended.is_some() {
            return; // the writer ended it: nothing read now has a caller
        }
        match parse_replies(&buf, &mut values) {
            Ok(used) => {
                buf.drain(..used);
            }
            Err(Malformed) => break io::ErrorKind::InvalidData,
        }
        if !values.is_empty() {
            shared.deliver(&mut values);
        }
        if buf.capacity() > KEPT && buf.len() < READ_CHUNK {
            buf.shrink_to(READ_CHUNK);
        }
        buf.reserve(READ_CHUNK);
        match read.read_buf(&mut buf).await {
            Ok(0) => break io::ErrorKind::UnexpectedEof,
            Ok(_) => {}
            Err(e) => break e.kind(),
        }
    };
    shared.end(why);
}

/// A reply that is not RESP2.
#[derive(Debug, PartialEq, Eq)]
struct Malformed;

/// Parses the complete replies at the start of `buf` into `values`; returns the bytes they
/// took (an incomplete reply at the end is left for the next read).
fn parse_replies(buf: &[u8], values: &mut Vec<Value>) -> Result<usize, Malformed> {
    let mut used = 0;
    loop {
        let mut end = used;
        if !complete(buf, &mut end, 0)? {
            return Ok(used);
        }
        let mut at = used;
        values.push(value(buf, &mut at)?);
        used = end;
    }
}

/// The end of the line starting at `from` (the index of its `\r`); `None` when it has not
/// all come yet.
fn line_end(buf: &[u8], from: usize) -> Result<Option<usize>, Malformed> {
    let Some(rest) = buf.get(from..) else {
        return Ok(None);
    };
    let Some(cr) = rest.iter().position(|&b| b == b'\r') else {
        return Ok(None);
    };
    match rest.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some(from + cr)),
        Some(_) => Err(Malformed),
    }
}

/// The integer of a reply's header line.
fn integer(line: &[u8]) -> Result<i64, Malformed> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Malformed)
}

/// Whether a whole reply starts at `*at`; if so, moves `*at` past it.
fn complete(buf: &[u8], at: &mut usize, depth: usize) -> Result<bool, Malformed> {
    if depth > MAX_DEPTH {
        return Err(Malformed);
    }
    let Some(&kind) = buf.get(*at) else {
        return Ok(false);
    };
    let Some(cr) = line_end(buf, *at + 1)? else {
        return Ok(false);
    };
    let line = &buf[*at + 1..cr];
    *at = cr + 2;
    match kind {
        b'+' | b'-' | b':' => Ok(true),
        b'$' => {
            let Ok(n) = usize::try_from(integer(line)?) else {
                return Ok(true); // `$-1`: nil
            };
            let end = at.checked_add(n).ok_or(Malformed)?;
            match buf.get(end..end.checked_add(2).ok_or(Malformed)?) {
                None => Ok(false),
                Some(b"\r\n") => {
                    *at = end + 2;
                    Ok(true)
                }
                Some(_) => Err(Malformed),
            }
        }
        b'*' => {
            let Ok(n) = usize::try_from(integer(line)?) else {
                return Ok(true); // `*-1`: nil
            };
            for _ in 0..n {
                if !complete(buf, at, depth + 1)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        _ => Err(Malformed),
    }
}

/// The reply at `*at`, whole (see [`complete`]), as the redis crate's parser gives it;
/// moves `*at` past it.
fn value(buf: &[u8], at: &mut usize) -> Result<Value, Malformed> {
    let start = *at;
    let kind = *buf.get(start).ok_or(Malformed)?;
    let cr = line_end(buf, start + 1)?.ok_or(Malformed)?;
    let line = &buf[start + 1..cr];
    *at = cr + 2;
    Ok(match kind {
        b'+' if line == b"OK" => Value::Okay,
        b'+' => Value::SimpleString(String::from_utf8_lossy(line).into_owned()),
        b':' => Value::Int(integer(line)?),
        // An error reply, rare: the redis crate's own parser makes its value (the kind of
        // error, a redirect's slot and node).
        b'-' => redis::parse_redis_value(&buf[start..*at]).map_err(|_| Malformed)?,
        b'$' => match usize::try_from(integer(line)?) {
            Err(_) => Value::Nil,
            Ok(n) => {
                let bytes = buf.get(*at..*at + n).ok_or(Malformed)?.to_vec();
                *at += n + 2;
                Value::BulkString(bytes)
            }
        },
        b'*' => match usize::try_from(integer(line)?) {
            Err(_) => Value::Nil,
            Ok(n) => {
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(value(buf, at)?);
                }
                Value::Array(items)
            }
        },
        _ => return Err(Malformed),
    })
}

#[cfg(test)]
mod tests {
    use redis::aio::ConnectionLike;
    use tokio::net::TcpListener;

    use super::*;

    /// Replies of every RESP2 shape, as a node sends them.
    const REPLIES: &[&[u8]] = &[
        b"+OK\r\n",
        b"+PONG\r\n",
        b":0\r\n",
        b":-42\r\n",
        b"$-1\r\n",
        b"$0\r\n\r\n",
        b"$5\r\nhe\r\no\r\n",
        b"*-1\r\n",
        b"*0\r\n",
        b"*3\r\n:1\r\n$1\r\nx\r\n*2\r\n$-1\r\n+QUEUED\r\n",
        b"-ERR unknown command\r\n",
        b"-MOVED 3999 127.0.0.1:6381\r\n",
        b"-WRONGPASS invalid username-password pair\r\n",
        b"*2\r\n-WRONGTYPE Operation against a key\r\n:7\r\n",
    ];

    #[test]
    fn replies_parse_as_the_redis_crates_parser_parses_them() {
        for reply in REPLIES {
            let mut values = Vec::new();
            assert_eq!(parse_replies(reply, &mut values), Ok(reply.len()));
            let theirs = redis::parse_redis_value(reply).map_err(|e| e.to_string());
            assert_eq!(
                Ok(values.remove(0)),
                theirs,
                "{}",
                String::from_utf8_lossy(reply)
            );
        }
    }

    #[test]
    fn a_reply_cut_anywhere_waits_for_the_rest() {
        let all: Vec<u8> = REPLIES.concat();
        let mut whole = Vec::new();
        assert_eq!(parse_replies(&all, &mut whole), Ok(all.len()));
        assert_eq!(whole.len(), REPLIES.len());
        for cut in 0..all.len() {
            // What a first read of `cut` bytes gives, then the rest.
            let mut values = Vec::new();
            let used = parse_replies(&all[..cut], &mut values).expect("well formed");
            let boundaries: Vec<usize> = REPLIES
                .iter()
                .scan(0, |n, r| {
                    *n += r.len();
                    Some(*n)
                })
                .collect();
            let expected_used = boundaries.iter().copied().filter(|&b| b <= cut).max();
            assert_eq!(used, expected_used.unwrap_or(0), "cut at {cut}");
            let rest = &all[used..];
            assert_eq!(parse_replies(rest, &mut values), Ok(rest.len()));
            assert_eq!(values, whole, "cut at {cut}");
        }
    }

    #[test]
    fn what_is_not_resp2_is_malformed() {
        for bad in [
            &b"?1\r\n"[..],
            b":x\r\n",
            b"$3\r\nabcd\r\n",
            b"+OK\rX",
            b"%1\r\n:1\r\n:2\r\n",
        ] {
            assert_eq!(
                parse_replies(bad, &mut Vec::new()),
                Err(Malformed),
                "{bad:?}"
            );
        }
        let deep = "*1\r\n".repeat(MAX_DEPTH + 2) + ":1\r\n";
        assert_eq!(
            parse_replies(deep.as_bytes(), &mut Vec::new()),
            Err(Malformed)
        );
    }

    /// A node on a free loopback port: answers the handshake's `PING` and then what
    /// `script` says for each command it reads (by count), in writes of `chunk` bytes.
    async fn node(
        script: impl Fn(usize) -> Option<Vec<u8>> + Send + 'static,
        chunk: usize,
    ) -> (String, u16, tokio::task::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut buf = Vec::new();
            let mut seen = 0;
            let mut handshake = true;
            loop {
                let mut commands = Vec::new();
                let used = parse_replies(&buf, &mut commands).expect("commands are arrays");
                buf.drain(..used);
                for _ in commands {
                    let reply = if handshake {
                        handshake = false;
                        Some(b"+PONG\r\n".to_vec())
                    } else {
                        seen += 1;
                        script(seen)
                    };
                    let Some(reply) = reply else {
                        return seen; // hang up
                    };
                    for part in reply.chunks(chunk) {
                        socket.write_all(part).await.expect("write");
                        socket.flush().await.expect("flush");
                    }
                }
                if socket.read_buf(&mut buf).await.expect("read") == 0 {
                    return seen;
                }
            }
        });
        ("127.0.0.1".to_owned(), port, task)
    }

    #[tokio::test]
    async fn each_caller_gets_its_own_reply_among_many_in_flight() {
        // The node answers the n-th command with n, one byte at a time.
        let (host, port, _node) = node(|n| Some(format!(":{n}\r\n").into_bytes()), 1).await;
        let wire = Wire::connect(&host, port, &Credentials::default())
            .await
            .expect("connect");
        let calls = (0..50).map(|_| {
            let mut wire = wire.clone();
            async move { wire.req_packed_command(redis::cmd("INCR").arg("k")).await }
        });
        let mut got: Vec<i64> = futures_util::future::join_all(calls)
            .await
            .into_iter()
            .map(|r| match r {
                Ok(Value::Int(n)) => n,
                other => panic!("{other:?}"),
            })
            .collect();
        got.sort_unstable();
        assert_eq!(got, (1..=50).collect::<Vec<_>>());
        // A pipeline gets its replies in order; an error reply is a value among them.
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg("a").cmd("GET").arg("b");
        let values = wire
            .clone()
            .req_packed_commands(&pipe, 0, 2)
            .await
            .expect("answered");
        assert_eq!(values, vec![Value::Int(51), Value::Int(52)]);
    }

    #[tokio::test]
    async fn a_connection_that_ends_fails_the_calls_awaiting_and_refuses_the_next() {
        // The node answers the first command and hangs up at the second.
        let (host, port, node) = node(|n| (n == 1).then(|| b"+OK\r\n".to_vec()), 64).await;
        let mut wire = Wire::connect(&host, port, &Credentials::default())
            .await
            .expect("connect");
        let set = redis::cmd("SET").arg("k").arg(1).clone();
        let first = wire.req_packed_command(&set).await;
        assert_eq!(first.expect("answered"), Value::Okay);
        let second = wire.req_packed_command(redis::cmd("GET").arg("k")).await;
        let e = second.expect_err("the node hung up");
        assert!(e.is_io_error() && !e.is_connection_refusal(), "{e:?}");
        assert_eq!(node.await.expect("node"), 2);
        let third = wire.req_packed_command(redis::cmd("GET").arg("k")).await;
        let e = third.expect_err("ended");
        assert!(e.is_connection_refusal(), "refused unrun: {e:?}");
    }

    #[tokio::test]
    async fn an_empty_command_is_refused_unsent_and_the_replies_stay_in_step() {
        let (host, port, _node) = node(|n| Some(format!(":{n}\r\n").into_bytes()), 64).await;
        let mut wire = Wire::connect(&host, port, &Credentials::default())
            .await
            .expect("connect");
        let e = wire
            .req_packed_command(&redis::Cmd::new())
            .await
            .expect_err("empty");
        assert!(!e.is_io_error(), "{e:?}");
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg("a").add_command(redis::Cmd::new());
        assert!(wire.req_packed_commands(&pipe, 0, 2).await.is_err());
        // Nothing was sent: the node's first command is the next one.
        let next = wire.req_packed_command(redis::cmd("GET").arg("k")).await;
        assert_eq!(next.expect("answered"), Value::Int(1));
    }

    #[test]
    fn a_reply_nobody_awaits_ends_the_connection() {
        let shared = Shared {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        };
        let (tx, mut rx) = oneshot::channel();
        shared
            .lock()
            .awaiting
            .push_back(Awaiting::new(0, 1, Reply::One(tx)));
        // Two replies read for the one call awaiting: the stream is out of step.
        shared.deliver(&mut vec![Value::Int(1), Value::Int(2)]);
        assert_eq!(rx.try_recv().ok().and_then(Result::ok), Some(Value::Int(1)));
        assert_eq!(shared.lock().ended, Some(io::ErrorKind::InvalidData));
    }

    #[tokio::test]
    async fn a_transaction_gets_its_exec_reply_or_the_refusal_of_a_queued_command() {
        let (host, port, _node) = node(
            |n| {
                Some(match n {
                    1 => b"+OK\r\n".to_vec(),
                    2 | 3 => b"+QUEUED\r\n".to_vec(),
                    4 => b"*2\r\n:1\r\n$1\r\nv\r\n".to_vec(),
                    5 => b"+OK\r\n".to_vec(),
                    6 => b"-ERR unknown command 'NOPE'\r\n".to_vec(),
                    _ => b"-EXECABORT Transaction discarded\r\n".to_vec(),
                })
            },
            3,
        )
        .await;
        let mut wire = Wire::connect(&host, port, &Credentials::default())
            .await
            .expect("connect");
        let mut ok = redis::pipe();
        ok.atomic().cmd("INCR").arg("k").cmd("GET").arg("v");
        let (n, v): (i64, String) = ok.query_async(&mut wire).await.expect("exec");
        assert_eq!((n, v.as_str()), (1, "v"));
        let mut refused = redis::pipe();
        refused.atomic().cmd("NOPE");
        let e = refused
            .query_async::<Value>(&mut wire)
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("unknown command"), "{e}");
    }
}
