//! One service binary as a child process: which service, its ports and
//! environment, starting (and restarting on the same ports), stopping, and
//! reading its `/metrics`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::ports::free_port;
use crate::service_binary;
use crate::suite::amqp_addr;

/// The three services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Wallet,
    Inventory,
    Gateway,
}

impl Service {
    fn binary(self) -> &'static str {
        match self {
            Self::Wallet => "flashsale-wallet",
            Self::Inventory => "flashsale-inventory",
            Self::Gateway => "flashsale-gateway",
        }
    }

    fn listen_var(self) -> &'static str {
        match self {
            Self::Wallet => "WALLET_LISTEN_ADDR",
            Self::Inventory => "INVENTORY_LISTEN_ADDR",
            Self::Gateway => "GATEWAY_LISTEN_ADDR",
        }
    }
}

/// Where a process runs: this machine's loopback, or another network
/// namespace ([`crate::netns::NetworkHost`]) and its address there.
#[derive(Debug, Clone)]
pub struct Place {
    pub ip: IpAddr,
    /// `ip netns exec …` prefix, when in another namespace.
    pub prefix: Vec<String>,
}

impl Place {
    pub fn loopback() -> Self {
        Self { ip: Ipv4Addr::LOCALHOST.into(), prefix: Vec::new() }
    }

    /// In `host`, listening on its address on `link`.
    pub fn in_host(host: &crate::netns::NetworkHost, link: &str) -> anyhow::Result<Self> {
        Ok(Self {
            ip: host.link(link)?.ns_ip.into(),
            prefix: host.command_prefix().iter().map(|s| (*s).to_owned()).collect(),
        })
    }
}

/// One service process and its ports.
pub struct ServiceProcess {
    child: Child,
    service: Service,
    env: Vec<(String, String)>,
    place: Place,
    pub grpc_port: u16,
    pub metrics_port: u16,
}

impl ServiceProcess {
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", SocketAddr::new(self.place.ip, self.metrics_port))
    }

    /// Where its gRPC server answers.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", SocketAddr::new(self.place.ip, self.grpc_port))
    }

    /// The most resident memory the process has used so far (`VmHWM`), in KiB.
    pub fn peak_resident_kib(&self) -> anyhow::Result<u64> {
        let pid = self.child.id().ok_or_else(|| anyhow::anyhow!("{} has exited", self.service.binary()))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmHWM for {pid}"))
    }

    /// Waits until the process ends by itself (a crash point fired), at most `timeout`.
    pub async fn exited(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| anyhow::anyhow!("{} still running after {timeout:?}", self.service.binary()))?
            .map_err(Into::into)
    }

    /// The exit status, if the process has ended (without waiting).
    pub fn try_exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Starts the service again on the same ports, with `drop` removed from its environment.
    pub async fn restart_without(&mut self, drop: &str) -> anyhow::Result<()> {
        self.env.retain(|(key, _)| key != drop);
        let env: Vec<(&str, String)> = self.env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        *self = start_on(self.service, &env, self.place.clone(), self.grpc_port, self.metrics_port).await?;
        Ok(())
    }

    /// Stops the process (SIGKILL) and starts it again on the same ports with
    /// `key` set to `value` (replacing every earlier setting of it).
    pub async fn restart_with(&mut self, key: &str, value: &str) -> anyhow::Result<()> {
        self.kill().await?;
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
        let env: Vec<(&str, String)> = self.env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        *self = start_on(self.service, &env, self.place.clone(), self.grpc_port, self.metrics_port).await?;
        Ok(())
    }

    /// SIGTERM (a graceful stop, as an orchestrator sends), without waiting.
    pub async fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.child.id().ok_or_else(|| anyhow::anyhow!("{} has exited", self.service.binary()))?;
        let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        Ok(())
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await.map_err(Into::into)
    }
}

pub(super) async fn start(service: Service, env: &[(&str, String)]) -> anyhow::Result<ServiceProcess> {
    start_at(service, env, Place::loopback()).await
}

pub(super) async fn start_at(service: Service, env: &[(&str, String)], place: Place) -> anyhow::Result<ServiceProcess> {
    // A port free here is free in a fresh namespace too.
    start_on(service, env, place, free_port()?, free_port()?).await
}

async fn start_on(
    service: Service,
    env: &[(&str, String)],
    place: Place,
    grpc_port: u16,
    metrics_port: u16,
) -> anyhow::Result<ServiceProcess> {
    let binary = service_binary(service.binary())?;
    let mut command = match place.prefix.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(binary);
            command
        }
        None => Command::new(binary),
    };
    command
        .env(service.listen_var(), SocketAddr::new(place.ip, grpc_port).to_string())
        .env("METRICS_ADDR", SocketAddr::new(place.ip, metrics_port).to_string())
        .env("RUST_LOG", std::env::var("TEST_LOG").unwrap_or_else(|_| "error".into()))
        .env("AMQP_ADDR", amqp_addr())
        .stdout(if std::env::var_os("TEST_LOG").is_some() { Stdio::inherit() } else { Stdio::null() })
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command.spawn()?;
    let env = env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    let mut process = ServiceProcess { child, service, env, place, grpc_port, metrics_port };
    process.wait_until_listening().await?;
    Ok(process)
}

impl ServiceProcess {
    /// Waits until both ports accept connections, failing at once if the
    /// process exits first (a port it could not bind, a bad setting). Metrics
    /// are bound last, so both answering means start-up got past every bind.
    async fn wait_until_listening(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for port in [self.grpc_port, self.metrics_port] {
            loop {
                if let Some(status) = self.child.try_wait()? {
                    anyhow::bail!("{} exited during start-up ({status})", self.service.binary());
                }
                if tokio::net::TcpStream::connect((self.place.ip, port)).await.is_ok() {
                    break;
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "{} is not listening on {port}",
                    self.service.binary()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

impl ServiceProcess {
    /// Waits until the process's `/metrics` show `gauge` at `value` (30 s at most).
    pub async fn wait_for_gauge(&self, gauge: &str, value: f64) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(samples) = scrape(&self.metrics_url()).await
                && sum(&samples, gauge, &[]) == value
            {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{}: {gauge} did not reach {value}",
                self.service.binary()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Fetches a Prometheus text page and returns its samples as (series, value),
/// where series is the name with its labels exactly as printed.
pub async fn scrape(url: &str) -> anyhow::Result<Vec<(String, f64)>> {
    let text = reqwest::get(url).await?.error_for_status()?.text().await?;
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| anyhow::anyhow!("bad sample line {line:?}"))?;
        samples.push((series.to_owned(), value.parse()?));
    }
    Ok(samples)
}

/// The sum of every sample of `name` whose labels include all of `labels`
/// (each as `key="value"`).
pub fn sum(samples: &[(String, f64)], name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
            metric == name && labels.iter().all(|label| rest.contains(label))
        })
        .map(|(_, value)| value)
        .sum()
}
