//! The `driftsync` binary.
//!
//! `driftsync serve` runs the sync server with the embedded SQLite store in `./driftsync-data`
//! by default (`--database-url postgres://…` for PostgreSQL). Errors are one line on stderr and a
//! non-zero exit.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use driftsync_engine::store::AnyStore;

#[derive(Parser)]
#[command(name = "driftsync", version, about = "Offline-first sync engine: server and client")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sync server.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "DRIFTSYNC_LISTEN", default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
    /// Directory of the embedded SQLite store (used unless --database-url is given).
    #[arg(long, env = "DRIFTSYNC_DATA_DIR", default_value = "./driftsync-data")]
    data_dir: PathBuf,
    /// A database URL (postgres://… or sqlite:…) instead of the embedded store.
    #[arg(long, env = "DRIFTSYNC_DATABASE_URL")]
    database_url: Option<String>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("driftsync: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
        }
    });
    if let Err(e) = result {
        eprintln!("driftsync: {e:#}");
        std::process::exit(1);
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "refusing to listen on {} without authentication: this build serves open connections on loopback only",
            args.listen
        );
    }
    let target = match &args.database_url {
        Some(url) => url.clone(),
        None => {
            std::fs::create_dir_all(&args.data_dir)
                .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
            args.data_dir.join("driftsync.db").to_string_lossy().into_owned()
        }
    };
    let store = AnyStore::open(&target)
        .await
        .with_context(|| format!("cannot open the store at {target}"))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr().context("cannot read the listening address")?;
    // One plain line on stdout, for scripts and tests that start the server on port 0.
    println!("driftsync listening on {local}");
    tracing::info!(listen = %local, store = %target, "driftsync serving");
    driftsync_server::serve(listener, store, driftsync_server::Config::default(), shutdown_signal()).await?;
    tracing::info!("driftsync stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
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
