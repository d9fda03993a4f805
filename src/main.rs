//! The `geomatch` server binary: parse config, set up logging, bind, serve until SIGINT/SIGTERM.

use std::{process::ExitCode, sync::Arc};

use clap::Parser as _;
use geomatch::{clock::SystemClock, config::Config, server, telemetry};
use tokio::net::TcpListener;

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

#[tokio::main]
async fn main() -> ExitCode {
    let cfg = Config::parse();
    if let Err(e) = cfg.validate() {
        eprintln!("geomatch: invalid configuration: {e:#}");
        return ExitCode::from(2);
    }
    telemetry::init(cfg.log_format);
    let listener = match TcpListener::bind(cfg.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("geomatch: cannot listen on {}: {e}", cfg.listen);
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "geomatch listening"),
        Err(e) => tracing::warn!(error = %e, "listening on an unknown address"),
    }
    let app = match server::App::new(&cfg, Arc::new(SystemClock)) {
        Ok(app) => app,
        Err(e) => {
            eprintln!("geomatch: {e}");
            return ExitCode::FAILURE;
        }
    };
    match server::serve(app, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("geomatch: {e}");
            ExitCode::FAILURE
        }
    }
}
