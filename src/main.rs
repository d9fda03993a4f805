//! The `geomatch` server binary: parse config, set up logging, bind, serve until SIGINT/SIGTERM.

use std::{net::SocketAddr, process::ExitCode, sync::Arc};

use clap::Parser as _;
use geomatch::{clock::SystemClock, config::Config, server, telemetry};
use tokio::net::TcpListener;

/// mimalloc instead of glibc malloc: under load the server spent about a fifth of its CPU
/// in glibc's allocator and its arena locks (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

async fn bind(addr: SocketAddr, what: &str) -> Option<TcpListener> {
    match TcpListener::bind(addr).await {
        Ok(l) => {
            match l.local_addr() {
                Ok(addr) => tracing::info!(%addr, "{what} listening"),
                Err(e) => tracing::warn!(error = %e, "{what} listening on an unknown address"),
            }
            Some(l)
        }
        Err(e) => {
            eprintln!("geomatch: cannot listen for {what} on {addr}: {e}");
            None
        }
    }
}

fn main() -> ExitCode {
    // The default multi-threaded runtime (`TOKIO_WORKER_THREADS` still sets its size),
    // whose workers give their freed pages back as they go idle (`base::alloc`).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(geomatch::base::alloc::collect_when_due)
        .build();
    match runtime {
        Ok(rt) => rt.block_on(async {
            tokio::select! {
                code = run() => code,
                never = main_thread_collects() => match never {},
            }
        }),
        Err(e) => {
            eprintln!("geomatch: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The main thread runs `run` (not a worker: the park hook never fires for it) and builds
/// the restored index there, so it collects its own heap too, once a second: what the
/// restore freed, and later the restored members the workers free.
async fn main_thread_collects() -> std::convert::Infallible {
    let mut tick = tokio::time::interval(geomatch::base::alloc::COLLECT_EVERY);
    loop {
        tick.tick().await;
        geomatch::base::alloc::collect_now();
    }
}

async fn run() -> ExitCode {
    let cfg = Config::parse();
    // Every flag is checked and converted here, once, before anything binds.
    let settings = match cfg.settings() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("geomatch: invalid configuration: {e:#}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logs(cfg.log_format);
    // Restore the snapshot before binding: no client connects to a half-loaded index.
    let app = match server::App::open(settings, Arc::new(SystemClock)).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("geomatch: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(listener) = bind(cfg.listen, "gRPC").await else {
        return ExitCode::FAILURE;
    };
    let metrics = match cfg.metrics_listen {
        Some(addr) => match bind(addr, "metrics").await {
            Some(l) => Some(l),
            None => return ExitCode::FAILURE,
        },
        None => None,
    };
    let listeners = server::Listeners {
        grpc: listener,
        metrics,
    };
    match server::serve(app, listeners, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("geomatch: {e}");
            ExitCode::FAILURE
        }
    }
}
