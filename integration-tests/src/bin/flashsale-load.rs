//! `flashsale-load`: seed a sale, storm it, audit the outcome.
//!
//! ```text
//! flashsale-load seed  --users 5000 [--stock 100] > sale.json
//! flashsale-load run   --sale sale.json --phase 30s@5 --phase 60s@5-100 --phase 180s@100 --report run.json
//! flashsale-load run   --sale sale.json --users 256 --duration 30s
//! flashsale-load audit --inventory-db postgres://…/inventory --wallet-db postgres://…/wallet
//! flashsale-load buckets --buckets 1,2,4 --duration 10s
//! flashsale-load verify-queue --seed <hex> --commitment <hex> --item drop --users joined.txt [--tickets told.csv]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flashsale_integration_tests::audit::{Databases, audit, wait_until_settled};
use flashsale_integration_tests::load::run::{Mode, Rpc, RunOptions, Target, run};
use flashsale_integration_tests::load::seed::{Sale, SeedOptions, seed};
use flashsale_integration_tests::load::{Phase, parse_duration};

// The services' allocator: the load generator shares the machine with them, so
// its own malloc time is taken from what it measures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "Load generator and auditor for the flash-sale suite")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a sale and fund its buyers through the admin API; prints the sale as JSON.
    Seed {
        #[arg(long, env = "GATEWAY_URL", default_value = "http://127.0.0.1:50051")]
        gateway_url: String,
        #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
        jwt_secret: String,
        #[arg(long, default_value_t = 5_000)]
        users: u32,
        /// Units on sale (default: random 1..=500, as the original fixtures).
        #[arg(long)]
        stock: Option<u32>,
        #[arg(long, default_value_t = 1)]
        limit: u32,
        /// Unit price in cents.
        #[arg(long, default_value_t = 2_500)]
        price: i64,
        /// Do not fund the buyers (admission-only measurements).
        #[arg(long, conflicts_with = "balance")]
        unfunded: bool,
        /// Fund every buyer with this many cents (default: a random balance
        /// between half the price and three times it, so about one in five
        /// cannot pay, as the original fixtures).
        #[arg(long)]
        balance: Option<i64>,
    },
    /// Drive buyers at a seeded sale and print a summary.
    Run {
        #[arg(long, env = "GATEWAY_URL", default_value = "http://127.0.0.1:50051")]
        gateway_url: String,
        #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
        jwt_secret: String,
        /// The JSON `seed` printed.
        #[arg(long)]
        sale: PathBuf,
        /// Open loop: DURATION@RATE or DURATION@FROM-TO arrivals/s, repeatable, in order.
        #[arg(long = "phase")]
        phases: Vec<Phase>,
        /// Closed loop: this many buyers, each buying again as soon as answered.
        #[arg(long, conflicts_with = "phases")]
        users: Option<usize>,
        /// Closed loop: for this long.
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        duration: Duration,
        /// HTTP/2 connections to spread requests over.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        /// Write the summary (with a per-second timeline) here as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Draw throughput and latency percentiles over time here as PNG
        /// (default: beside `--report`, with the extension `.png`).
        #[arg(long)]
        chart: Option<PathBuf>,
        /// What to call: a purchase, or the health check (the null-RPC ceiling).
        #[arg(long, value_enum, default_value = "purchase")]
        rpc: Rpc,
        /// The API to call: gRPC (`--gateway-url`) or REST (`--http-url`).
        #[arg(long, value_enum, default_value = "grpc")]
        target: Target,
        /// The gateway's HTTP base URL, for `--target rest`.
        #[arg(long, env = "GATEWAY_HTTP_URL", default_value = "http://127.0.0.1:8080")]
        http_url: String,
        /// No progress line (for scripts).
        #[arg(long)]
        quiet: bool,
    },
    /// Wait until every order is final, then check every invariant; non-zero exit on a breach.
    Audit {
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/inventory")]
        inventory_db: String,
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/wallet")]
        wallet_db: String,
        #[arg(long, value_parser = parse_duration, default_value = "120s")]
        timeout: Duration,
    },
    /// Admission throughput of one hot item on a private 3-master Redis Cluster
    /// with its stock in each number of buckets; prints one JSON line per count.
    Buckets {
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        buckets: Vec<u32>,
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        duration: Duration,
        /// Admissions in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
    },
    /// Recompute a waiting room's order from the seed published when its sale
    /// ended; prints `place,user_id,draw` per buyer, first in line first, and
    /// exits non-zero if the seed does not match its commitment or a buyer was
    /// told a place the seed does not give.
    VerifyQueue {
        /// The room's seed (64 hexadecimal digits), published with the item once the sale ended.
        #[arg(long)]
        seed: String,
        /// The SHA-256 of the seed published with the item before the sale.
        #[arg(long)]
        commitment: Option<String>,
        /// The item id.
        #[arg(long)]
        item: String,
        /// The buyers who joined before the sale opened: one user id per line.
        #[arg(long)]
        users: PathBuf,
        /// What buyers were told: `user_id,draw` per line.
        #[arg(long)]
        tickets: Option<PathBuf>,
    },
    /// Receive OTLP/gRPC traces and count them (a stand-in collector for the
    /// tracing-overhead benchmark); prints the count when stopped (SIGINT/SIGTERM).
    OtlpSink {
        #[arg(long, default_value_t = 4317)]
        port: u16,
    },
}

fn main() -> anyhow::Result<()> {
    // Named workers: in a whole-machine profile this process shows as `load`.
    tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("load").build()?.block_on(run_command())
}

async fn run_command() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Seed { gateway_url, jwt_secret, users, stock, limit, price, unfunded, balance } => {
            let options = SeedOptions {
                gateway_url,
                jwt_secret,
                users,
                stock,
                per_user_limit: limit,
                price_minor: price,
                unfunded,
                balance_minor: balance,
            };
            let sale = seed(&options).await?;
            #[expect(clippy::print_stdout, reason = "the sale is this command's output")]
            {
                println!("{}", serde_json::to_string_pretty(&sale)?);
            }
            Ok(())
        }
        Command::Run {
            gateway_url,
            jwt_secret,
            sale,
            phases,
            users,
            duration,
            connections,
            report,
            chart,
            rpc,
            target,
            http_url,
            quiet,
        } => {
            let sale: Sale =
                serde_json::from_slice(&std::fs::read(&sale).with_context(|| format!("{}", sale.display()))?)?;
            let mode = match users {
                Some(users) => Mode::Closed { users, duration },
                None if phases.is_empty() => anyhow::bail!("give --phase … (open loop) or --users N (closed loop)"),
                None => Mode::Open(phases),
            };
            let options =
                RunOptions { rpc, target, http_url, gateway_url, jwt_secret, connections, mode, show_progress: !quiet };
            let summary = run(sale, &options).await?;
            eprint!("{}", summary.render());
            if let Some(path) = &report {
                std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
                eprintln!("report written to {}", path.display());
            }
            if let Some(path) = chart.or_else(|| report.as_ref().map(|r| r.with_extension("png"))) {
                let title =
                    format!("flashsale-load: {:.0} req/s mean, p99 {:.2} ms", summary.mean_rps, summary.latency_ms.p99);
                flashsale_integration_tests::load::chart::draw(&summary, &title, &path)?;
                eprintln!("chart written to {}", path.display());
            }
            Ok(())
        }
        Command::Audit { inventory_db, wallet_db, timeout } => {
            let databases = Databases { inventory_url: inventory_db, wallet_url: wallet_db };
            wait_until_settled(&databases, &Default::default(), timeout).await?;
            let report = audit(&databases).await?;
            eprintln!(
                "audit clean: {} orders, confirmed units per item {:?}, units left {:?}",
                report.orders.len(),
                report.confirmed_units,
                report.remaining
            );
            let spans = flashsale_integration_tests::audit::settlement_spans(&databases).await?;
            #[expect(clippy::print_stdout, reason = "machine-readable result for scripts")]
            {
                println!("{}", serde_json::to_string(&spans)?);
            }
            Ok(())
        }
        Command::Buckets { buckets, duration, concurrency } => {
            let figures = flashsale_integration_tests::load::buckets::measure(&buckets, duration, concurrency).await?;
            for figure in &figures {
                eprintln!(
                    "{} bucket(s) on {} master(s): {:.0} admissions/s, Redis {:.1} µs CPU each, busiest master {:.0}% \
                     (one core of it: {:.0}/s)",
                    figure.buckets,
                    figure.masters_used,
                    figure.admissions_per_second,
                    figure.redis_cpu_us_per_admission,
                    figure.busiest_master_share * 100.0,
                    figure.shard_bound_per_second
                );
                #[expect(clippy::print_stdout, reason = "machine-readable result for scripts")]
                {
                    println!("{}", serde_json::to_string(figure)?);
                }
            }
            Ok(())
        }
        Command::VerifyQueue { seed, commitment, item, users, tickets } => {
            let users = std::fs::read_to_string(&users).with_context(|| format!("reading {}", users.display()))?;
            let tickets = tickets
                .map(|path| std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display())))
                .transpose()?;
            let verdict = flashsale_integration_tests::load::queue::verify(
                &seed,
                commitment.as_deref(),
                &item,
                &users,
                tickets.as_deref(),
            )?;
            #[expect(clippy::print_stdout, reason = "the order is this command's output")]
            for place in &verdict.places {
                println!("{place}");
            }
            for breach in &verdict.breaches {
                eprintln!("breach: {breach}");
            }
            anyhow::ensure!(verdict.breaches.is_empty(), "{} breach(es)", verdict.breaches.len());
            eprintln!("verified: {} places from the published seed", verdict.places.len());
            Ok(())
        }
        Command::OtlpSink { port } => {
            let sink = flashsale_integration_tests::otlp::OtlpSink::start(port, false).await?;
            eprintln!("otlp sink listening on {}", sink.endpoint());
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            #[expect(clippy::print_stdout, reason = "machine-readable result for scripts")]
            {
                println!("{}", sink.count());
            }
            Ok(())
        }
    }
}
