//! `flashsale-wallet`: run the wallet service, or just migrate its database.

use clap::{Parser, Subcommand};
use flashsale_wallet::{Application, Config, db::MIGRATIONS};

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
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // clap exits with a usage message on bad flags or environment values.
    let cli = Cli::parse();
    let _telemetry = match flashsale_telemetry::init("wallet") {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("flashsale-wallet: cannot start telemetry: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "flashsale-wallet failed");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let app = Application::build(&cli.config).await?;
            app.run_until_stopped(flashsale_server::shutdown_signal()).await
        }
        Command::Migrate => {
            flashsale_db::create_database_if_missing(&cli.config.database_url).await?;
            flashsale_db::run_migrations(&cli.config.database_url, MIGRATIONS).await?;
            Ok(())
        }
    }
}
