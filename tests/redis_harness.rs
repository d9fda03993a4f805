//! The Redis / Valkey test harness (tests/common/redis.rs) on its own: servers start on free
//! loopback ports, a cluster forms and fails over, a missing binary skips (or fails under
//! `GEOMATCH_REQUIRE_REDIS=1`), and no server outlives the test process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashSet,
    ffi::OsString,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::redis::{self as harness, Env, Flavor, Role, SLOTS};
use redis::AsyncCommands as _;

/// Whether `pid` is gone (or a zombie nobody reaped: dead all the same).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // `pid (comm) S ...`: the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[tokio::test]
async fn standalone_round_trips_a_key() {
    let Some(server) = harness::standalone().await else {
        return;
    };
    assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
    let mut con = server.connection().await;
    let () = con.set("greeting", "hello").await.unwrap();
    let got: Option<String> = con.get("greeting").await.unwrap();
    assert_eq!(got.as_deref(), Some("hello"));
    // No persistence: the server was told to save nothing.
    let save: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(save, ["save", ""]);
}

#[tokio::test]
async fn kill9_stops_the_server_and_drop_removes_its_dir() {
    let Some(mut server) = harness::standalone().await else {
        return;
    };
    let pid = server.pid().unwrap();
    let dir = server.dir().to_owned();
    let url = server.url();
    assert!(dir.is_dir());
    server.kill9();
    assert!(dead(pid), "pid {pid} still runs after kill9");
    let refused = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await;
    assert!(refused.is_err(), "{url} still accepts connections");
    drop(server);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test]
async fn drop_kills_a_running_server() {
    let Some(server) = harness::standalone().await else {
        return;
    };
    let pid = server.pid().unwrap();
    drop(server);
    assert!(dead(pid), "pid {pid} outlived its RedisServer");
}

#[tokio::test]
async fn valkey_standalone_is_valkey_and_round_trips_a_key() {
    let Some(server) = harness::valkey_standalone().await else {
        return;
    };
    let mut con = server.connection().await;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(info.contains("server_name:valkey"), "{info}");
    let () = con.set("k", "v").await.unwrap();
    let got: Option<String> = con.get("k").await.unwrap();
    assert_eq!(got.as_deref(), Some("v"));
}

// ---------------------------------------------------------------------------------------
// Finding binaries, and the skip rule (through explicit environments: tests run on
// threads, so none sets a process variable)

fn missing() -> Option<OsString> {
    Some("/nonexistent/geomatch-test/redis-server".into())
}

#[tokio::test]
async fn a_missing_server_binary_skips() {
    let env = Env {
        redis_server: missing(),
        ..Env::default()
    };
    assert!(
        harness::standalone_with(Flavor::Redis, &env)
            .await
            .is_none()
    );
    let off = Env {
        require: Some("0".into()),
        ..env
    };
    assert!(
        harness::standalone_with(Flavor::Redis, &off)
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_missing_cli_skips_a_cluster_before_starting_any_node() {
    let Ok(server) = Env::from_process().server(Flavor::Redis) else {
        return;
    };
    let env = Env {
        redis_server: Some(server.into()),
        redis_cli: missing(),
        ..Env::default()
    };
    assert!(
        harness::cluster_with(Flavor::Redis, &env, 3, 0)
            .await
            .is_none()
    );
}

#[tokio::test]
#[should_panic(expected = "GEOMATCH_REQUIRE_REDIS=1 makes that a failure")]
async fn required_turns_the_skip_into_a_panic() {
    let env = Env {
        redis_server: missing(),
        require: Some("1".into()),
        ..Env::default()
    };
    let _ = harness::standalone_with(Flavor::Redis, &env).await;
}

#[test]
fn valkey_is_required_only_when_named() {
    let require = Env {
        require: Some("1".into()),
        ..Env::default()
    };
    assert!(require.required(Flavor::Redis));
    assert!(!require.required(Flavor::Valkey));
    let named = Env {
        valkey_server: missing(),
        ..require
    };
    assert!(named.required(Flavor::Valkey));
}

/// A scratch directory holding a fake `redis-server`, removed on drop.
struct FakeBin(PathBuf);

impl FakeBin {
    fn new(mode: u32) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "geomatch-fakebin-{}-{}",
            std::process::id(),
            harness::unique_prefix("fake").replace(':', "-")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("redis-server");
        std::fs::File::create(&file)
            .unwrap()
            .write_all(b"#!/bin/sh\n")
            .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        Self(dir)
    }

    fn path(&self) -> Option<OsString> {
        Some(std::env::join_paths([Path::new("/nonexistent"), &self.0]).unwrap())
    }
}

impl Drop for FakeBin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn binaries_come_from_the_variable_else_path() {
    let fake = FakeBin::new(0o755);
    let on_path = Env {
        path: fake.path(),
        ..Env::default()
    };
    assert_eq!(
        on_path.server(Flavor::Redis).unwrap(),
        fake.0.join("redis-server")
    );
    // A variable that names a missing file is an error, not a fall back to PATH.
    let typo = Env {
        redis_server: missing(),
        ..on_path
    };
    let why = typo.server(Flavor::Redis).unwrap_err();
    assert!(why.contains("REDIS_SERVER=/nonexistent"), "{why}");

    let not_executable = FakeBin::new(0o644);
    let env = Env {
        path: not_executable.path(),
        ..Env::default()
    };
    let why = env.server(Flavor::Redis).unwrap_err();
    assert!(why.contains("redis-server not found"), "{why}");
}

// ---------------------------------------------------------------------------------------
// No server outlives the test process

/// The child half of [`servers_die_with_the_test_process`], run in a child test process:
/// starts a server from a thread that then ends, checks the server outlives that thread,
/// prints its pid, and aborts (no Drop, no atexit).
fn orphan_probe() -> ! {
    let server = std::thread::spawn(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(harness::standalone())
    })
    .join()
    .unwrap()
    .expect("the parent test checked redis-server exists");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut con = server.connection().await;
            let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
            assert_eq!(pong, "PONG");
        });
    println!("probe-pid={}", server.pid().unwrap());
    println!("probe-root={}", server.dir().parent().unwrap().display());
    std::io::stdout().flush().unwrap();
    std::process::abort();
}

#[test]
fn servers_die_with_the_test_process() {
    if std::env::var_os("GEOMATCH_ORPHAN_PROBE").is_some() {
        orphan_probe();
    }
    if Env::from_process().server(Flavor::Redis).is_err() {
        return;
    }
    // This same test, as the probe, in a child process.
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "servers_die_with_the_test_process",
            "--exact",
            "--nocapture",
        ])
        .env("GEOMATCH_ORPHAN_PROBE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "the probe aborts: {stdout}");
    let pid: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("probe-pid="))
        .unwrap_or_else(|| {
            panic!(
                "no pid from the probe:\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .parse()
        .unwrap();
    // PR_SET_PDEATHSIG delivers SIGKILL as the probe dies; give the kernel a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !dead(pid) {
        assert!(
            Instant::now() < deadline,
            "redis-server {pid} outlived its test process"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // An abort skips the exit hook: the probe's directory is left for the next process
    // that starts a server to sweep, or for us.
    let probe_root = stdout
        .lines()
        .find_map(|l| l.strip_prefix("probe-root="))
        .expect("the probe names its directory");
    let _ = std::fs::remove_dir_all(probe_root);
}

// ---------------------------------------------------------------------------------------
// Cluster: one shared 3+3 cluster for this file

#[tokio::test]
async fn shared_cluster_has_three_masters_covering_every_slot() {
    let Some(cluster) = harness::shared_cluster().await else {
        return;
    };
    let nodes = cluster.nodes().await;
    assert_eq!(nodes.len(), 6, "{nodes:?}");
    let masters: HashSet<u16> = nodes
        .iter()
        .filter(|n| n.role == Role::Master)
        .map(|n| n.port)
        .collect();
    assert_eq!(masters.len(), 3, "{nodes:?}");
    let slots: u32 = nodes.iter().map(|n| n.slots).sum();
    assert_eq!(slots, SLOTS);
    let replicated: HashSet<u16> = nodes
        .iter()
        .filter_map(|n| match n.role {
            Role::Replica { master } => Some(master),
            Role::Master => None,
        })
        .collect();
    assert_eq!(replicated, masters, "each master has a replica: {nodes:?}");
    for port in cluster.live_ports() {
        let mut con = cluster.node_connection(port).await;
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(info.contains("cluster_state:ok"), "{port}: {info}");
        assert!(info.contains("cluster_slots_ok:16384"), "{port}: {info}");
    }
}

#[tokio::test]
async fn shared_cluster_routes_keys_through_a_cluster_client() {
    let Some(cluster) = harness::shared_cluster().await else {
        return;
    };
    let prefix = harness::unique_prefix("routes");
    let keys: Vec<String> = (0..20).map(|i| format!("{prefix}{i}")).collect();
    let mut con = cluster.connection().await;
    for key in &keys {
        let () = con.set(key, key.len()).await.unwrap();
    }
    // A second client reads what the first wrote, wherever the slots live.
    let mut other = cluster.connection().await;
    let mut owners = HashSet::new();
    for key in &keys {
        let got: Option<usize> = other.get(key).await.unwrap();
        assert_eq!(got, Some(key.len()), "{key}");
        owners.insert(cluster.master_for_key(key).await);
    }
    assert!(owners.len() > 1, "20 keys on one master: {owners:?}");
}

#[tokio::test]
async fn killed_master_fails_over_and_keeps_replicated_writes() {
    let Some(cluster) = harness::shared_cluster_exclusive().await else {
        return;
    };
    let key = format!("{}key", harness::unique_prefix("failover"));
    let mut con = cluster.connection().await;
    let () = con.set(&key, "kept").await.unwrap();
    // WAIT goes to every master; the key's master answers for this connection's write.
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(1000)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(acked, 1, "the write reached the replica");

    let victim = cluster.master_for_key(&key).await;
    let heir = cluster
        .nodes()
        .await
        .into_iter()
        .find(|n| n.role == Role::Replica { master: victim })
        .expect("the victim has a replica")
        .port;
    let killed = Instant::now();
    cluster.kill9(victim);
    cluster.wait_ok().await;
    eprintln!("failover took {:?}", killed.elapsed());

    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3, "{masters:?}");
    assert!(masters.contains(&heir) && !masters.contains(&victim));
    assert_eq!(cluster.master_for_key(&key).await, heir);
    let mut fresh = cluster.connection().await;
    let got: Option<String> = fresh.get(&key).await.unwrap();
    assert_eq!(got.as_deref(), Some("kept"));

    // Back again, the old master rejoins as its heir's replica.
    cluster.restart(victim).await;
    cluster.wait_ok().await;
    let nodes = cluster.nodes().await;
    let back = nodes.iter().find(|n| n.port == victim).unwrap();
    assert_eq!(back.role, Role::Replica { master: heir }, "{nodes:?}");
}

#[tokio::test]
async fn valkey_cluster_forms_and_routes_a_key() {
    let Some(cluster) = harness::valkey_cluster(3, 0).await else {
        return;
    };
    assert_eq!(cluster.masters().await.len(), 3);
    let key = format!("{}k", harness::unique_prefix("valkey"));
    let mut con = cluster.connection().await;
    let () = con.set(&key, "v").await.unwrap();
    let got: Option<String> = con.get(&key).await.unwrap();
    assert_eq!(got.as_deref(), Some("v"));
}
