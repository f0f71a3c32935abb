//! `flashsale-inventory`: run the inventory service.

use clap::{Parser, Subcommand};
use flashsale_inventory::{Application, Config, db::MIGRATIONS};

// Faster than glibc's malloc for many small, short-lived allocations across
// threads (requests, protobuf, HTTP/2 frames): glibc's malloc was a fifth of the
// gateway's time in the benchmark profiles (integration-tests/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Messages set aside for good (undecodable, unknown item, refused by the
    /// database, or past the delivery limit), per queue.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Exit 0 if inventory on the listen address reports SERVING (container health checks).
    Health,
}

#[derive(Debug, Subcommand)]
enum DeadLetters {
    /// Print each dead-lettered message's reason and payload (left in place).
    List {
        #[arg(long, value_enum, default_value_t = Queue::Orders)]
        queue: Queue,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        max: usize,
    },
    /// Move every dead-lettered message back to its queue (after fixing the cause).
    Replay {
        #[arg(long, value_enum, default_value_t = Queue::Orders)]
        queue: Queue,
    },
}

/// The work queues that have a dead-letter queue.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Queue {
    /// `OrderPlaced`, gateway → inventory.
    Orders,
    /// `OrderEvent`, inventory → gateways (the Redis side effects).
    OrderEvents,
}

fn main() -> std::process::ExitCode {
    flashsale_server::block_on("inventory", run())
}

async fn run() -> std::process::ExitCode {
    // clap exits with a usage message on bad flags or environment values.
    let cli = Cli::parse();
    if let Some(Command::Health) = cli.command {
        return flashsale_server::probe("inventory", cli.config.listen_addr, &cli.config.tls).await;
    }
    flashsale_server::run_service("inventory", || async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                let app = Application::build(&cli.config).await?;
                app.run_until_stopped(flashsale_server::shutdown_signal()).await
            }
            Command::Migrate => Ok(flashsale_db::create_and_migrate(&cli.config.database_url, MIGRATIONS).await?),
            Command::DeadLetters(command) => dead_letters(&cli.config, command).await,
            Command::Health => Ok(()),
        }
    })
    .await
}

async fn dead_letters(config: &Config, command: DeadLetters) -> anyhow::Result<()> {
    use std::io::Write;
    let topology = flashsale_messaging::Topology::with_prefix(&config.amqp_prefix);
    let queue = |queue: Queue| match queue {
        Queue::Orders => topology.orders_queue.clone(),
        Queue::OrderEvents => topology.admission_events_queue.clone(),
    };
    let connection = flashsale_messaging::connect(&config.amqp_addr, "inventory-dead-letters").await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel).await?;
    // Written at the end: the logs go to stdout too, and holding its lock across
    // an await blocks the connection's tasks as soon as they log.
    let mut out = Vec::new();
    match command {
        DeadLetters::List { queue: which, max } => {
            let name = queue(which);
            let letters = flashsale_messaging::list_dead_letters(&connection, &name, max).await?;
            for letter in &letters {
                writeln!(out, "{}\t{}", letter.reason, describe(which, &letter.payload))?;
            }
            writeln!(
                out,
                "{} dead-lettered message(s) in {}",
                letters.len(),
                flashsale_messaging::Topology::dead_letter_queue(&name)
            )?;
        }
        DeadLetters::Replay { queue: which } => {
            let name = queue(which);
            let moved = flashsale_messaging::replay_dead_letters(&connection, &name).await?;
            writeln!(out, "{moved} message(s) moved back to {name}")?;
        }
    }
    let _ = connection.close(200, "done".into()).await;
    std::io::stdout().lock().write_all(&out)?;
    Ok(())
}

/// One line about a payload: the decoded message, or its size when it does not decode.
fn describe(queue: Queue, payload: &[u8]) -> String {
    use prost::Message;
    let decoded = match queue {
        Queue::Orders => flashsale_proto::inventory::v1::OrderPlaced::decode(payload).map(|m| format!("{m:?}")),
        Queue::OrderEvents => flashsale_proto::inventory::v1::OrderEvent::decode(payload).map(|m| format!("{m:?}")),
    };
    decoded.unwrap_or_else(|_| format!("<{} undecodable bytes>", payload.len()))
}
