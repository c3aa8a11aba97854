//! `metaldctl`: command-line client for metald. See `metaldctl --help`.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = metald::cli::Cli::parse();
    match metald::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metaldctl: {}", e.message);
            ExitCode::from(e.exit_code)
        }
    }
}
