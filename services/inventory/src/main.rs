//! `flashsale-inventory`: run the inventory service.

use clap::Parser;
use flashsale_inventory::{Application, Config};

#[derive(Debug, Parser)]
#[command(version, about = "The flash-sale inventory service")]
struct Cli {
    #[command(flatten)]
    config: Config,
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
        let app = Application::build(&cli.config).await?;
        app.run_until_stopped(flashsale_server::shutdown_signal()).await
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
