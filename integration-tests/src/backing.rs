//! Backing servers of a test's own, for tests that stop, kill or restart them:
//! a private PostgreSQL cluster (initdb + pg_ctl) on a free port, in a
//! directory of its own, and a private redis-server (no persistence, so a
//! restart loses every key and every loaded script, as in production). The machine's shared servers are never touched; a
//! private server is stopped by its own data directory (pg_ctl reads the
//! postmaster's PID from it) when the test ends or drops it.

use std::path::{Path, PathBuf};
use tokio::process::Command;

use crate::ports::free_port;

/// A PostgreSQL cluster owned by one test.
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// initdb and the server refuse to run as root: run them as `postgres`.
    run_as: Option<&'static str>,
}

impl PrivatePostgres {
    /// Creates and starts a cluster on a free port (trust auth on 127.0.0.1,
    /// superuser `postgres`). fsync is off: a crash here kills the server
    /// process, never the machine, so the page cache keeps what was written.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = postgres_bindir()?;
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let data = std::env::temp_dir().join(format!("fs-pg-{}", &tag[..12]));
        std::fs::create_dir_all(&data)?;
        let run_as = is_root().then_some("postgres");
        if let Some(user) = run_as {
            run(Command::new("chown").arg(user).arg(&data)).await?;
        }
        let port = free_port()?;
        let this = Self { bin, data, port, run_as };
        this.pg(&["initdb", "-D"], &["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8", "--locale", "C"])
            .await?;
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\nfsync = off\n\
             full_page_writes = off\nmax_connections = 300\nshared_buffers = 32MB\nlog_min_messages = warning\n",
            this.data.display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(this.data.join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))?;
        this.start_again().await?;
        Ok(this)
    }

    /// `postgres://postgres@127.0.0.1:<port>` (append `/<database>`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        let log = self.data.join("server.log");
        let log = log.to_string_lossy().into_owned();
        self.pg(&["pg_ctl", "-D"], &["-l", &log, "-w", "-t", "60", "start"]).await
    }

    /// Stops the server: `fast` (clients disconnected, like a failover's
    /// demotion) or `immediate` (the postmaster and its children killed, like
    /// a crash; recovery replays the WAL on the next start).
    pub async fn stop(&self, mode: StopMode) -> anyhow::Result<()> {
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        self.pg(&["pg_ctl", "-D"], &["-m", mode, "-w", "-t", "60", "stop"]).await
    }

    /// Runs `<bin>/<tool> <before> <data dir> <after>` (as `postgres` under root).
    async fn pg(&self, before: &[&str], after: &[&str]) -> anyhow::Result<()> {
        let (tool, flags) = before.split_first().ok_or_else(|| anyhow::anyhow!("no tool"))?;
        let path = self.bin.join(tool);
        let mut command = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        command.args(flags).arg(&self.data).args(after);
        run(&mut command).await
    }
}

/// How [`PrivatePostgres::stop`] stops the server.
#[derive(Debug, Clone, Copy)]
pub enum StopMode {
    Fast,
    Immediate,
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Synchronous on purpose: the test's runtime may be gone by now.
        let path = self.bin.join("pg_ctl");
        let mut command = match self.run_as {
            Some(user) => {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => std::process::Command::new(&path),
        };
        let _ = command
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

async fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command.stdin(std::process::Stdio::null()).output().await?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The newest installed PostgreSQL's binaries (Debian puts them under
/// /usr/lib/postgresql/<major>/bin; `PG_BINDIR` overrides).
fn postgres_bindir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            Path::new(&bin).join("initdb").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors.pop().map(|(_, bin)| bin).ok_or_else(|| anyhow::anyhow!("no PostgreSQL server binaries (initdb) found"))
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A redis-server owned by one test, on a free port, keeping nothing on disk.
pub struct PrivateRedis {
    port: u16,
    child: tokio::sync::Mutex<Option<tokio::process::Child>>,
}

impl PrivateRedis {
    pub async fn start() -> anyhow::Result<Self> {
        let port = free_port()?;
        let this = Self { port, child: tokio::sync::Mutex::new(None) };
        this.start_again().await?;
        Ok(this)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: everything it held is gone).
    pub async fn kill(&self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.lock().await.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts the server (again, empty) and waits until it answers PING.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        *self.child.lock().await = Some(child);
        let client = redis::Client::open(self.url())?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
            {
                return Ok(());
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "redis-server did not start on {}", self.port);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// A Redis Cluster owned by one test: three masters, each with one replica,
/// on free loopback ports (client and cluster-bus ports), keeping nothing on
/// disk but each node's `nodes.conf`. The node timeout is 1 s, so a killed
/// master's replica takes over within a few seconds.
pub struct PrivateRedisCluster {
    dir: PathBuf,
    nodes: Vec<ClusterNode>,
}

struct ClusterNode {
    port: u16,
    child: std::sync::Mutex<Option<tokio::process::Child>>,
}

impl PrivateRedisCluster {
    const MASTERS: usize = 3;

    pub async fn start() -> anyhow::Result<Self> {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let dir = std::env::temp_dir().join(format!("fs-redis-cluster-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let mut nodes = Vec::new();
        for _ in 0..Self::MASTERS * 2 {
            let (port, bus) = (free_port()?, free_port()?);
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir)?;
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--cluster-port", &bus.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()?;
            nodes.push(ClusterNode { port, child: std::sync::Mutex::new(Some(child)) });
        }
        let this = Self { dir, nodes };
        for node in &this.nodes {
            this.wait_for(node.port, "PONG", &["PING"]).await?;
        }
        let addresses: Vec<String> = this.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(std::process::Stdio::null())
            .output()
            .await?;
        anyhow::ensure!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        for node in &this.nodes {
            this.wait_for(node.port, "cluster_state:ok", &["CLUSTER", "INFO"]).await?;
        }
        // A replica that has not synced yet cannot take over (its master's
        // slots would stay down): wait until every replica has its copy.
        for node in &this.nodes {
            let replication: String = this.query(node.port, redis::cmd("INFO").arg("replication")).await?;
            if replication.contains("role:slave") {
                this.wait_for(node.port, "master_link_status:up", &["INFO", "replication"]).await?;
            }
        }
        Ok(this)
    }

    /// `redis://127.0.0.1:<port>` of every node, comma-separated: what the
    /// gateway's `REDIS_URL` takes with `REDIS_CLUSTER`.
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// Kills (SIGKILL) the master serving `key`'s slot and waits until a
    /// replica serves that slot and the cluster is whole again; returns the
    /// killed node's port. What the master had not yet copied to its replica
    /// is lost, as in a real failover.
    pub async fn fail_over_master_of(&self, key: &str) -> anyhow::Result<u16> {
        let alive = self.alive_port()?;
        let slot: i64 = self.query(alive, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await?;
        let old = self.master_of(alive, slot).await?;
        let node = self.nodes.iter().find(|n| n.port == old).ok_or_else(|| anyhow::anyhow!("no node on {old}"))?;
        let child = node.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.take();
        if let Some(mut child) = child {
            child.start_kill()?;
            child.wait().await?;
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let survivor = self.alive_port()?;
            let promoted = self.master_of(survivor, slot).await.ok().filter(|port| *port != old);
            let info: String = self.query(survivor, redis::cmd("CLUSTER").arg("INFO")).await.unwrap_or_default();
            if promoted.is_some() && info.contains("cluster_state:ok") {
                return Ok(old);
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "no replica took over slot {slot} from {old}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// The ports of the masters serving `keys`' slots (as a live node sees it).
    pub async fn masters_of(
        &self,
        keys: impl IntoIterator<Item = String>,
    ) -> anyhow::Result<std::collections::BTreeSet<u16>> {
        let alive = self.alive_port()?;
        let mut masters = std::collections::BTreeSet::new();
        for key in keys {
            let slot: i64 = self.query(alive, redis::cmd("CLUSTER").arg("KEYSLOT").arg(&key)).await?;
            masters.insert(self.master_of(alive, slot).await?);
        }
        Ok(masters)
    }

    /// The ports of the live nodes that are masters now.
    async fn live_masters(&self) -> anyhow::Result<Vec<u16>> {
        let mut masters = Vec::new();
        for node in &self.nodes {
            if node.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.is_none() {
                continue;
            }
            let role: Vec<redis::Value> = self.query(node.port, &redis::cmd("ROLE")).await?;
            if matches!(role.first(), Some(redis::Value::BulkString(role)) if role == b"master") {
                masters.push(node.port);
            }
        }
        Ok(masters)
    }

    /// CPU seconds (user + system, `INFO cpu`) each live master has used, by port.
    pub async fn master_cpu_seconds(&self) -> anyhow::Result<Vec<(u16, f64)>> {
        let mut out = Vec::new();
        for port in self.live_masters().await? {
            let info: String = self.query(port, redis::cmd("INFO").arg("cpu")).await?;
            let field = |name: &str| {
                info.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':')?.trim().parse::<f64>().ok())
            };
            out.push((port, field("used_cpu_user").unwrap_or(0.0) + field("used_cpu_sys").unwrap_or(0.0)));
        }
        Ok(out)
    }

    /// Keys held by each live master (`DBSIZE`), by port.
    pub async fn keys_per_master(&self) -> anyhow::Result<Vec<(u16, i64)>> {
        let mut out = Vec::new();
        for port in self.live_masters().await? {
            out.push((port, self.query(port, &redis::cmd("DBSIZE")).await?));
        }
        Ok(out)
    }

    /// The port of the master serving `slot`, as the node on `port` sees it.
    async fn master_of(&self, port: u16, slot: i64) -> anyhow::Result<u16> {
        // CLUSTER SLOTS: [[start, end, [ip, port, id, …] (master), replicas…], …]
        let ranges: Vec<redis::Value> = self.query(port, &redis::cmd("CLUSTER").arg("SLOTS").to_owned()).await?;
        for range in ranges {
            let redis::Value::Array(parts) = range else { continue };
            let int = |value: Option<&redis::Value>| match value {
                Some(redis::Value::Int(n)) => Some(*n),
                _ => None,
            };
            let (Some(start), Some(end)) = (int(parts.first()), int(parts.get(1))) else { continue };
            if (start..=end).contains(&slot)
                && let Some(redis::Value::Array(master)) = parts.get(2)
                && let Some(master_port) = int(master.get(1))
            {
                return Ok(u16::try_from(master_port)?);
            }
        }
        anyhow::bail!("slot {slot} has no master")
    }

    fn alive_port(&self) -> anyhow::Result<u16> {
        self.nodes
            .iter()
            .find(|n| n.child.lock().is_ok_and(|child| child.is_some()))
            .map(|n| n.port)
            .ok_or_else(|| anyhow::anyhow!("every node is down"))
    }

    async fn query<T: redis::FromRedisValue>(&self, port: u16, cmd: &redis::Cmd) -> anyhow::Result<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        Ok(cmd.query_async(&mut conn).await?)
    }

    /// Waits until the node on `port` answers `command` with text containing `expect`.
    async fn wait_for(&self, port: u16, expect: &str, command: &[&str]) -> anyhow::Result<()> {
        let mut cmd = redis::cmd(command[0]);
        for arg in &command[1..] {
            cmd.arg(*arg);
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(answer) = self.query::<String>(port, &cmd).await
                && answer.contains(expect)
            {
                return Ok(());
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "redis on {port}: no {expect:?} to {command:?}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PrivateRedisCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            if let Ok(mut child) = node.child.lock()
                && let Some(child) = child.as_mut()
            {
                let _ = child.start_kill();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A RabbitMQ node owned by one test: its own node name, AMQP and distribution
/// ports, data and log directories, and no plugins (the machine's own broker
/// holds the management ports). Its data survives [`PrivateRabbit::kill`], as a
/// real node's disk does, so quorum queues keep every confirmed message.
pub struct PrivateRabbit {
    dir: PathBuf,
    node: String,
    port: u16,
    dist_port: u16,
    child: std::sync::Mutex<Option<std::process::Child>>,
}

impl PrivateRabbit {
    pub async fn start() -> anyhow::Result<Self> {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let dir = std::env::temp_dir().join(format!("fs-rmq-{tag}"));
        std::fs::create_dir_all(dir.join("log"))?;
        let (port, dist_port) = (free_port()?, free_port()?);
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(dir.join("rabbitmq.conf"), format!("listeners.tcp.default = 127.0.0.1:{port}\n"))?;
        let this =
            Self { dir, node: format!("fs-test-{tag}@localhost"), port, dist_port, child: std::sync::Mutex::new(None) };
        this.start_again().await?;
        Ok(this)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Starts the node (again) and waits until it accepts AMQP connections.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("log").join("console.log"))?;
        let child = std::process::Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            .current_dir(&self.dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        *self.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(child);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Ok(connection) = flashsale_messaging::connect(&self.url(), "integration-test-probe").await {
                let _ = connection.close(200, "probe".into()).await;
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "RabbitMQ node {} did not start on {} (see {})",
                self.node,
                self.port,
                self.dir.join("log").display()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Kills the node's Erlang VM (SIGKILL, as a crash or an OOM kill does)
    /// and waits until its start script has exited.
    pub async fn kill(&self) -> anyhow::Result<()> {
        self.signal_and_wait("-KILL");
        Ok(())
    }

    /// Stops the node cleanly (SIGTERM: RabbitMQ shuts down in order, as in a
    /// rolling restart) and waits until it has exited.
    pub async fn stop(&self) -> anyhow::Result<()> {
        let child = self.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.take();
        let Some(mut child) = child else { return Ok(()) };
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = std::process::Command::new("kill").args(["-TERM", pid.trim()]).status();
        }
        // The start script exits once the VM has; blocking, so off the runtime.
        tokio::task::spawn_blocking(move || child.wait()).await??;
        let _ = std::fs::remove_file(self.dir.join("pid"));
        Ok(())
    }

    fn signal_and_wait(&self, signal: &str) {
        // The VM is a child of the start script; it writes its own PID here.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = std::process::Command::new("kill").args([signal, pid.trim()]).status();
        }
        if let Ok(mut child) = self.child.lock()
            && let Some(mut child) = child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(self.dir.join("pid"));
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.signal_and_wait("-KILL");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
