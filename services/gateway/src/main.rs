//! `flashsale-gateway`: run the gateway, mint a development token, check its
//! health, or write its descriptor set.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use flashsale_gateway::{Application, Config};

// Faster than glibc's malloc for many small, short-lived allocations across
// threads (requests, protobuf, HTTP/2 frames): glibc's malloc was a fifth of the
// gateway's time in the benchmark profiles (integration-tests/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(version, about = "The flash-sale gateway")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Config,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the public API (the default).
    Serve,
    /// Print a signed development token (HS256 with JWT_SECRET).
    Token(TokenArgs),
    /// Exit 0 if the gateway on the listen address reports SERVING (container health checks).
    Health,
    /// Write the public API's descriptor set (with its `google.api.http` REST
    /// routes) to stdout, for gRPC-JSON transcoders such as Envoy's.
    DescriptorSet,
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// The buyer's id (`sub` claim).
    #[arg(long)]
    sub: String,
    /// Grant the admin role (only while the gateway's settings in this
    /// environment listen on loopback alone).
    #[arg(long)]
    admin: bool,
    /// Lifetime, e.g. 30m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: Duration,
    /// The signing secret (the gateway's JWT_SECRET).
    #[arg(long = "secret", env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
}

fn parse_ttl(raw: &str) -> Result<Duration, String> {
    let (number, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len()));
    let n: u64 = number.parse().map_err(|_| format!("{raw:?}: expected e.g. 30m, 1h, 7d"))?;
    let seconds = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{raw:?}: unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(seconds))
}

fn main() -> std::process::ExitCode {
    flashsale_server::block_on("gateway", run())
}

async fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Health) = &cli.command {
        return flashsale_server::probe("gateway", cli.config.listen_addr, &cli.config.tls).await;
    }
    if let Some(Command::DescriptorSet) = &cli.command {
        return match flashsale_proto::descriptor_set_of(flashsale_gateway::PUBLIC_PROTO_FILES) {
            Ok(set) => {
                use std::io::Write as _;
                match std::io::stdout().lock().write_all(&set) {
                    Ok(()) => std::process::ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("flashsale-gateway: cannot write the descriptor set: {e}");
                        std::process::ExitCode::FAILURE
                    }
                }
            }
            Err(e) => {
                eprintln!("flashsale-gateway: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Token(args)) = &cli.command {
        if args.admin && !cli.config.listens_on_loopback_only() {
            eprintln!(
                "flashsale-gateway: no admin token for a gateway listening beyond loopback (GATEWAY_LISTEN_ADDR \
                 {}, GATEWAY_HTTP_ADDR {}): operators get theirs from the identity provider",
                cli.config.listen_addr, cli.config.http_addr
            );
            return std::process::ExitCode::FAILURE;
        }
        return match flashsale_gateway::auth::mint(&args.jwt_secret, &args.sub, args.admin, args.ttl) {
            Ok(token) => {
                #[expect(clippy::print_stdout, reason = "the token is this command's output")]
                {
                    println!("{token}");
                }
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("flashsale-gateway: cannot sign a token: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let config = cli.config;
    flashsale_server::run_service("gateway", || async move {
        let app = Application::build(&config).await?;
        app.run_until_stopped(flashsale_server::shutdown_signal()).await
    })
    .await
}
