//! Shared harness: the real server in-process on an ephemeral port, with a manual clock;
//! Redis and Valkey servers for the tests that need them ([`redis`]).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

pub mod build;
pub mod contract;
pub mod fixtures;
pub mod pki;
pub mod process;
pub mod redis;

use std::{net::SocketAddr, sync::Arc};

use clap::Parser as _;
use geomatch::{
    clock::ManualClock,
    config::Config,
    grpc::pb::{self, nearby_client::NearbyClient, shake_client::ShakeClient},
    server::{self, App, ServeError},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

/// Unix ms the manual clock starts at.
pub const T0: i64 = 1_700_000_000_000;

/// A running server; stop it with [`TestServer::stop`].
pub struct TestServer {
    pub addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub app: App,
    pub clock: ManualClock,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), ServeError>>,
}

/// Abuse controls and load shedding are off unless a test sets these flags itself: most
/// tests move the same users about at will, and many fire hundreds of calls at once at a
/// debug build on a busy machine.
const LIMITS_OFF: [(&str, &str); 4] = [
    ("--max-speed", "0"),
    ("--search-burst", "0"),
    ("--shake-burst", "0"),
    ("--max-queue-delay", "0"),
];

/// Parses and validates flags as the binary would.
pub fn config(args: &[&str]) -> Config {
    let defaults = LIMITS_OFF
        .iter()
        .filter(|(flag, _)| !args.contains(flag))
        .flat_map(|(flag, value)| [*flag, *value]);
    let argv = std::iter::once("geomatch")
        .chain(defaults)
        .chain(args.iter().copied());
    let cfg = Config::try_parse_from(argv).unwrap();
    cfg.validate().unwrap();
    cfg
}

/// Starts geomatch with the given flags (defaults otherwise).
pub async fn start(args: &[&str]) -> TestServer {
    start_at(args, T0).await
}

/// Starts geomatch with its clock reading `now_ms`.
pub async fn start_at(args: &[&str], now_ms: i64) -> TestServer {
    let cfg = config(args);
    let clock = ManualClock::new(now_ms);
    let app = App::new(&cfg, Arc::new(clock.clone())).unwrap();
    serve_app(app, &cfg, clock).await
}

/// Starts geomatch on the store its flags name (`--store redis ...` included), with the
/// clock at [`T0`].
pub async fn start_store(args: &[&str]) -> TestServer {
    let cfg = config(args);
    let clock = ManualClock::new(T0);
    let app = App::open(cfg.settings().unwrap(), Arc::new(clock.clone()))
        .await
        .unwrap();
    serve_app(app, &cfg, clock).await
}

async fn serve_app(app: App, cfg: &Config, clock: ManualClock) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = match cfg.metrics_listen {
        Some(a) => Some(TcpListener::bind(a).await.unwrap()),
        None => None,
    };
    let metrics_addr = metrics.as_ref().map(|l| l.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let listeners = server::Listeners {
        grpc: listener,
        metrics,
    };
    let handle = tokio::spawn(server::serve(app.clone(), listeners, async {
        let _ = stopped.await;
    }));
    TestServer {
        addr,
        metrics_addr,
        app,
        clock,
        stop: Some(stop),
        handle,
    }
}

impl TestServer {
    /// A fresh HTTP/2 connection to the server.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn nearby(&self) -> NearbyClient<Channel> {
        NearbyClient::new(self.channel().await)
    }

    pub async fn shake(&self) -> ShakeClient<Channel> {
        ShakeClient::new(self.channel().await)
    }

    /// Starts the shake `req` and returns once it waits for a partner (as the only shake
    /// waiting).
    pub async fn waiting_shake(
        &self,
        req: pb::ShakeRequest,
    ) -> JoinHandle<Result<pb::ShakeResponse, tonic::Status>> {
        let mut c = self.shake().await;
        let call = tokio::spawn(async move { c.shake(req).await.map(tonic::Response::into_inner) });
        self.app.shakes.until_waiting(1).await;
        call
    }

    /// Graceful shutdown; fails the test if the server errored.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.handle).await.unwrap().unwrap();
    }
}

/// The ids one page of a search returns, in the order returned.
pub async fn found(c: &mut NearbyClient<Channel>, req: pb::SearchNearbyRequest) -> Vec<String> {
    let page = c.search_nearby(req).await.unwrap().into_inner();
    page.users.into_iter().map(|u| u.user_id).collect()
}

/// The field named by an INVALID_ARGUMENT status's BadRequest details.
pub fn bad_field(status: &tonic::Status) -> String {
    use tonic_types::StatusExt as _;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let details = status
        .get_details_bad_request()
        .expect("BadRequest details");
    assert_eq!(details.field_violations.len(), 1);
    let field = details.field_violations[0].field.clone();
    assert!(
        status.message().starts_with(&field),
        "message {:?} names {field}",
        status.message()
    );
    field
}

/// A plain HTTP/1.1 GET of `path`: the body of a 200 answer.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The value of the counter `name` with labels `labels` (as `key="value"`) in a
/// Prometheus text `body`; 0 when the series is not there yet.
pub fn counter(body: &str, name: &str, labels: &str) -> u64 {
    let series = format!("{name}{{{labels}}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Why geomatch with these flags refuses to serve (it must): the error `serve` returns
/// before binding anything but the given listener.
pub async fn serve_error(args: &[&str]) -> ServeError {
    let cfg = config(args);
    let app = App::new(&cfg, Arc::new(geomatch::clock::SystemClock)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let listeners = server::Listeners {
        grpc: listener,
        metrics: None,
    };
    server::serve(app, listeners, std::future::pending())
        .await
        .expect_err("geomatch served with flags it should refuse")
}
