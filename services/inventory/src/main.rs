//! `flashsale-inventory`: run the inventory service.

use clap::{Parser, Subcommand};
use flashsale_inventory::{Application, Config, db::MIGRATIONS};

#[derive(Debug, Parser)]
#[command(version, about = "The flash-sale inventory service")]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve gRPC and consume orders (the default). Applies pending migrations first.
    Serve,
    /// Create the database if it is missing, apply pending migrations, exit.
    Migrate,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _telemetry = match flashsale_telemetry::init("inventory") {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("flashsale-inventory: cannot start telemetry: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = async {
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
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "flashsale-inventory failed");
            std::process::ExitCode::FAILURE
        }
    }
}
