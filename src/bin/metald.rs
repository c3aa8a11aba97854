//! The metald daemon: reads `UNKEY_METALD_*`, starts, and shuts down
//! gracefully on SIGTERM/SIGINT (VMs keep running).

use std::process::ExitCode;

use metald::daemon::Config;
use metald::telemetry::LogFormat;
use tracing_subscriber::EnvFilter;

/// Logs to stderr (lines inside a traced span carry `trace_id`/`span_id`)
/// and feeds spans to OpenTelemetry when telemetry is on.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = EnvFilter::try_from_env("UNKEY_METALD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    metald::telemetry::subscriber(format, filter, std::io::stderr, ansi).init();
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop metald with SIGKILL");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--version" || a == "-V") {
        println!("metald {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprint!("metald: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(cfg.log_format);
    match metald::daemon::raise_fd_limit() {
        Ok((before, after)) if after > before => tracing::info!(before, after, "raised the open files limit"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let daemon = match metald::daemon::start(cfg).await {
        Ok(d) => d,
        Err(e) => {
            let msg = metald::util::chain(&e);
            tracing::error!(error = %msg, "metald failed to start");
            eprintln!("metald: {msg}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(address = %daemon.addr, version = env!("CARGO_PKG_VERSION"), "metald started");
    wait_for_signal().await;
    daemon.shutdown();
    match daemon.wait().await {
        Ok(()) => {
            tracing::info!("metald stopped; VMs keep running");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server error during shutdown");
            ExitCode::FAILURE
        }
    }
}
