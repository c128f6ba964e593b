//! `sluice-broker`: flags to config, then run until SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use sluice_broker::{Broker, BrokerArgs, BrokerConfig};

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested: finishing in-flight requests and closing logs");
}

fn main() -> ExitCode {
    // Every request's buffers are fresh: reuse freed ones rather than fault new pages in
    // (about a sixth less broker CPU for 1 KiB records, docs/benchmarks-history.md).
    sluice_log_store::memory::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match BrokerConfig::from_args(BrokerArgs::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice-broker: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.network_threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice-broker: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: BrokerConfig) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sluice-broker: cannot listen on {}: {e}", config.listen);
            return ExitCode::from(1);
        }
    };
    let broker = match Broker::start(config, listener, shutdown_signal()).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("sluice-broker: {e}");
            return ExitCode::from(1);
        }
    };
    // One plain line on stdout, so scripts and tests learn the bound address (useful with
    // `--listen 127.0.0.1:0`).
    println!("sluice-broker listening on {}", broker.local_addr());
    match broker.wait().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-broker: {e}");
            ExitCode::from(1)
        }
    }
}
