//! A real `geomatch` process (the binary this package builds) with JSON logs on a pipe,
//! for the tests that `kill -9` it.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;

/// A running `geomatch` process; killed when dropped.
pub struct Process {
    /// The process itself, for `kill -9` (`start_kill`) and `wait`.
    pub child: tokio::process::Child,
    /// The address it serves gRPC on.
    pub addr: String,
    /// The address of its `/metrics` endpoint, when started with `--metrics-listen`.
    pub metrics: Option<std::net::SocketAddr>,
}

/// Starts `geomatch --listen 127.0.0.1:0 --log-format json ARGS` and waits until it
/// serves; an ERROR logged before that fails the test.
pub async fn spawn(args: &[&str]) -> Process {
    spawn_logging(&["--log-format", "json"], args, |_| {}).await
}

/// Starts `geomatch --listen 127.0.0.1:0 LOG_ARGS ARGS`, shows `seen` every stderr line
/// up to the one saying it serves, and waits until it serves (and, with
/// `--metrics-listen` among `ARGS`, until its metrics endpoint listens); an ERROR logged
/// before that fails the test.
pub async fn spawn_logging(
    log_args: &[&str],
    args: &[&str],
    mut seen: impl FnMut(&str),
) -> Process {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_geomatch"))
        .args(["--listen", "127.0.0.1:0"])
        .args(log_args)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = until_listening(&mut lines, &mut seen, "gRPC").await;
    let metrics = if args.contains(&"--metrics-listen") {
        let at = until_listening(&mut lines, &mut seen, "metrics").await;
        Some(at.parse().unwrap())
    } else {
        None
    };
    // Keep draining the pipe so the process never blocks on a full stderr.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Process {
        child,
        addr,
        metrics,
    }
}

/// Reads `lines` (showing `seen` each) up to the one saying `what` listens; answers its
/// address. An ERROR logged before that fails the test.
async fn until_listening(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    seen: &mut impl FnMut(&str),
    what: &str,
) -> String {
    let what = format!("{what} listening");
    loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("geomatch exited before listening");
        assert!(
            !line.contains("\"level\":\"ERROR\"") && !line.contains(" ERROR "),
            "{line}"
        );
        seen(&line);
        if line.contains(&what) {
            // JSON: "addr":"127.0.0.1:1234"; text: addr=127.0.0.1:1234
            let (at, end) = match line.find("\"addr\":\"") {
                Some(at) => (at + 8, '"'),
                None => (line.find("addr=").unwrap() + 5, ' '),
            };
            let addr = line[at..].split(end).next().unwrap();
            return addr
                .trim_end_matches(|c: char| !c.is_ascii_digit())
                .to_string();
        }
    }
}

impl Process {
    /// A connected channel to the process.
    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}
