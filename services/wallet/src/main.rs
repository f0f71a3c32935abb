//! `flashsale-wallet`: run the wallet service, or just migrate its database.

use clap::{Parser, Subcommand};
use flashsale_wallet::{Application, Config, db::MIGRATIONS};

// Faster than glibc's malloc for many small, short-lived allocations across
// threads (requests, protobuf, HTTP/2 frames): glibc's malloc was a fifth of the
// gateway's time in the benchmark profiles (integration-tests/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(version, about = "The flash-sale wallet service")]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve gRPC (the default). Applies pending migrations first.
    Serve,
    /// Create the database if it is missing, apply pending migrations, exit.
    Migrate,
    /// Exit 0 if the wallet on the listen address reports SERVING (container health checks).
    Health,
}

fn main() -> std::process::ExitCode {
    flashsale_server::block_on("wallet", run())
}

async fn run() -> std::process::ExitCode {
    // clap exits with a usage message on bad flags or environment values.
    let cli = Cli::parse();
    if let Some(Command::Health) = cli.command {
        return flashsale_server::probe("wallet", cli.config.listen_addr, &cli.config.tls).await;
    }
    flashsale_server::run_service("wallet", || async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                let app = Application::build(&cli.config).await?;
                app.run_until_stopped(flashsale_server::shutdown_signal()).await
            }
            Command::Migrate => Ok(flashsale_db::create_and_migrate(&cli.config.database_url, MIGRATIONS).await?),
            Command::Health => Ok(()),
        }
    })
    .await
}
