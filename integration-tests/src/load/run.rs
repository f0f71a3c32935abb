//! `run`: buyers at a seeded sale over gRPC or REST, open loop (arrivals per second in
//! phases, like Artillery) or closed loop (N users as fast as they can). A buyer
//! retries `UNAVAILABLE` with the same idempotency key, as real clients should.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flashsale_proto::gateway::v1::PurchaseRequest;
use flashsale_proto::gateway::v1::flash_sale_gateway_client::FlashSaleGatewayClient;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::Semaphore;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::Phase;
use super::seed::Sale;
use super::stats::{Report, Stats};
use crate::error_reason;

/// Most requests an open-loop run keeps in flight; arrivals beyond it are
/// counted as CLIENT_SATURATED instead of piling up without bound.
const MAX_IN_FLIGHT: usize = 20_000;

#[derive(Debug, Clone)]
pub enum Mode {
    Open(Vec<Phase>),
    Closed { users: usize, duration: Duration },
}

/// What each arrival calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Rpc {
    /// `FlashSaleGateway/Purchase`, as a buyer.
    Purchase,
    /// `grpc.health.v1.Health/Check`: the null RPC, the ceiling the purchase path is compared with.
    Health,
}

/// Which API the buyers call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// gRPC over HTTP/2 (`--connections` channels, requests multiplexed on each).
    Grpc,
    /// REST/JSON over HTTP/1.1 keep-alive connections (`POST /v1/purchases`, `GET /healthz`).
    Rest,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub rpc: Rpc,
    pub target: Target,
    /// The gateway's HTTP base URL (REST target).
    pub http_url: String,
    pub gateway_url: String,
    pub jwt_secret: String,
    pub connections: usize,
    pub mode: Mode,
    pub show_progress: bool,
}

struct Shared {
    rpc: Rpc,
    target: Target,
    http: reqwest::Client,
    purchases_url: String,
    healthz_url: String,
    sale: Sale,
    tokens: Vec<String>,
    /// `authorization` values for gRPC, built once per buyer.
    bearers: Vec<MetadataValue<Ascii>>,
    clients: Vec<FlashSaleGatewayClient<Channel>>,
    health: Vec<HealthClient<Channel>>,
    stats: Mutex<Stats>,
    started: Instant,
}

pub async fn run(sale: Sale, options: &RunOptions) -> anyhow::Result<Report> {
    let mut clients = Vec::new();
    let mut channels = Vec::new();
    for _ in 0..options.connections.max(1) {
        let channel = Channel::from_shared(options.gateway_url.clone())?.tcp_nodelay(true).connect().await?;
        channels.push(channel.clone());
        clients.push(FlashSaleGatewayClient::new(channel));
    }
    let tokens = (0..sale.users)
        .map(|n| flashsale_gateway::auth::mint(&options.jwt_secret, &sale.user(n), false, Duration::from_secs(3600)))
        .collect::<Result<Vec<_>, _>>()?;
    let bearers =
        tokens.iter().map(|token| MetadataValue::try_from(format!("Bearer {token}"))).collect::<Result<Vec<_>, _>>()?;
    let health = channels.into_iter().map(HealthClient::new).collect();
    let http = reqwest::Client::builder().tcp_nodelay(true).pool_max_idle_per_host(MAX_IN_FLIGHT).build()?;
    let base = options.http_url.trim_end_matches('/');
    let shared = Arc::new(Shared {
        rpc: options.rpc,
        target: options.target,
        http,
        purchases_url: format!("{base}/v1/purchases"),
        healthz_url: format!("{base}/healthz"),
        sale,
        tokens,
        bearers,
        clients,
        health,
        stats: Mutex::new(Stats::default()),
        started: Instant::now(),
    });

    let progress = progress_bar(options.show_progress);
    let ticker = {
        let shared = shared.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let stats = shared.stats.lock();
                let outcomes: Vec<String> = stats.outcomes.iter().map(|(k, v)| format!("{k}={v}")).collect();
                progress.set_message(format!("{}/s  {}", stats.completed - last, outcomes.join(" ")));
                last = stats.completed;
            }
        })
    };

    match &options.mode {
        Mode::Open(phases) => open_loop(&shared, phases).await,
        Mode::Closed { users, duration } => closed_loop(&shared, *users, *duration).await,
    }
    ticker.abort();
    progress.finish_and_clear();
    let elapsed = shared.started.elapsed();
    let report = shared.stats.lock().report(elapsed);
    Ok(report)
}

fn progress_bar(visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn open_loop(shared: &Arc<Shared>, phases: &[Phase]) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let mut phase_start = Instant::now();
    for phase in phases {
        let length = phase.duration.as_secs_f64();
        let mut t = 0.0;
        while t < length {
            let rate = phase.from_rate + (phase.to_rate - phase.from_rate) * (t / length.max(f64::EPSILON));
            if rate <= 0.0 {
                t += 0.01;
                continue;
            }
            let due = phase_start + Duration::from_secs_f64(t);
            tokio::time::sleep_until(due.into()).await;
            shared.stats.lock().launched += 1;
            match in_flight.clone().try_acquire_owned() {
                Ok(permit) => {
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        attempt(&shared, due).await;
                        drop(permit);
                    });
                }
                Err(_) => record(shared, due, "CLIENT_SATURATED"),
            }
            t += 1.0 / rate;
            // Reap finished tasks so the set does not grow for the whole run.
            while tasks.try_join_next().is_some() {}
        }
        phase_start += phase.duration;
    }
    while tasks.join_next().await.is_some() {}
}

async fn closed_loop(shared: &Arc<Shared>, users: usize, duration: Duration) {
    let deadline = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..users.max(1) {
        let shared = shared.clone();
        tasks.spawn(async move {
            while Instant::now() < deadline {
                shared.stats.lock().launched += 1;
                attempt(&shared, Instant::now()).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// One buyer's purchase, retried on UNAVAILABLE under the same key. Latency is
/// measured from when the arrival was due (no coordinated omission).
async fn attempt(shared: &Shared, due: Instant) {
    let (user, client) = {
        let mut rng = rand::rng();
        let user = rng.random_range(0..shared.sale.users) as usize;
        (user, rng.random_range(0..shared.clients.len()))
    };
    if shared.target == Target::Rest {
        let outcome = rest_attempt(shared, user).await;
        record(shared, due, &outcome);
        return;
    }
    if shared.rpc == Rpc::Health {
        let outcome = match shared.health[client].clone().check(HealthCheckRequest::default()).await {
            Ok(_) => "OK".to_owned(),
            Err(status) => format!("{:?}", status.code()),
        };
        record(shared, due, &outcome);
        return;
    }
    let mut client = shared.clients[client].clone();
    let key = uuid::Uuid::new_v4().simple().to_string();
    let mut outcome = String::from("UNAVAILABLE");
    for retry in 0..3 {
        let request =
            PurchaseRequest { item_id: shared.sale.item_id.clone(), quantity: 1, idempotency_key: key.clone() };
        let mut request = tonic::Request::new(request);
        request.metadata_mut().insert("authorization", shared.bearers[user].clone());
        match client.purchase(request).await {
            Ok(_) => {
                outcome = "ACCEPTED".into();
                break;
            }
            Err(status) => {
                outcome = error_reason(&status).unwrap_or_else(|| format!("{:?}", status.code()));
                if outcome != "UNAVAILABLE" || retry == 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    record(shared, due, &outcome);
}

/// The REST twin of a purchase attempt (or of the null call: `GET /healthz`).
async fn rest_attempt(shared: &Shared, user: usize) -> String {
    if shared.rpc == Rpc::Health {
        return match shared.http.get(&shared.healthz_url).send().await {
            Ok(response) if response.status().is_success() => "OK".into(),
            Ok(response) => format!("HTTP_{}", response.status().as_u16()),
            Err(_) => "CLIENT_ERROR".into(),
        };
    }
    let key = uuid::Uuid::new_v4().simple().to_string();
    let body = serde_json::json!({"item_id": shared.sale.item_id, "quantity": 1});
    let mut outcome = String::from("UNAVAILABLE");
    for retry in 0..3 {
        let sent = shared
            .http
            .post(&shared.purchases_url)
            .bearer_auth(&shared.tokens[user])
            .header("idempotency-key", &key)
            .json(&body)
            .send()
            .await;
        outcome = match sent {
            Ok(response) if response.status() == reqwest::StatusCode::ACCEPTED => "ACCEPTED".into(),
            Ok(response) => match response.json::<serde_json::Value>().await {
                Ok(error) => error["error"]["code"].as_str().unwrap_or("HTTP_ERROR").to_owned(),
                Err(_) => "HTTP_ERROR".into(),
            },
            Err(_) => "CLIENT_ERROR".into(),
        };
        if outcome != "UNAVAILABLE" || retry == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    outcome
}

fn record(shared: &Shared, due: Instant, outcome: &str) {
    let now = Instant::now();
    let second = now.duration_since(shared.started).as_secs() as usize;
    shared.stats.lock().record(second, now.saturating_duration_since(due), outcome);
}
