//! A second host on this machine, for partition tests: a Linux network
//! namespace of its own, joined to this one by one veth link per named path
//! (say `front` for its clients and upstream services, `redis`, `amqp`). A
//! process started in it ([`NetworkHost::command_prefix`]) reaches this
//! namespace's servers only over those links, through a forwarder the test
//! binds on the link's far end ([`NetworkHost::forward`]), so taking one link
//! down ([`NetworkHost::cut`]) is a real partition of that one path: the
//! kernel drops its packets silently in both directions, as a failed switch
//! port or a lost route does, while the other links carry on. Needs root
//! (`ip netns`, `ip link`), which the test machines have.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;
use tokio::process::Command;

use crate::proxy::FaultProxy;

/// One veth pair: `host_ip` on this side, `ns_ip` inside the namespace.
#[derive(Debug, Clone)]
pub struct Link {
    pub name: &'static str,
    /// The interface's name on this side (taking it down cuts the link).
    host_end: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

pub struct NetworkHost {
    name: String,
    links: Vec<Link>,
    forwarders: Vec<FaultProxy>,
}

/// Hosts created by this process so far (names and subnets stay unique).
static CREATED: AtomicU32 = AtomicU32::new(0);

const NAME_PREFIX: &str = "fsnet-";

impl NetworkHost {
    /// Creates the namespace with loopback up and one /30 link per name.
    pub async fn create(links: &[&'static str]) -> anyhow::Result<Self> {
        remove_stale().await;
        let pid = std::process::id();
        let serial = CREATED.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NAME_PREFIX}{pid}-{serial}");
        run(&["ip", "netns", "add", &name]).await.context("creating a network namespace (needs root)")?;
        let mut host = Self { name, links: Vec::new(), forwarders: Vec::new() };
        host.in_namespace(&["ip", "link", "set", "lo", "up"]).await?;
        // 10.<64..191>.<serial*8 + link>.0/30: distinct per process (by pid) and per host.
        let second = 64 + u8::try_from(pid % 128).unwrap_or(0);
        for (index, link) in links.iter().enumerate() {
            let third = u8::try_from((serial as usize * 8 + index) % 256).unwrap_or(0);
            let (host_ip, ns_ip) = (Ipv4Addr::new(10, second, third, 1), Ipv4Addr::new(10, second, third, 2));
            // Interface names are at most 15 bytes.
            let host_end = format!("fs{pid:x}{serial}{index}");
            let inner = format!("eth{index}");
            run(&["ip", "link", "add", &host_end, "type", "veth", "peer", "name", &inner, "netns", &host.name]).await?;
            run(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &host_end]).await?;
            run(&["ip", "link", "set", &host_end, "up"]).await?;
            host.in_namespace(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &inner]).await?;
            host.in_namespace(&["ip", "link", "set", &inner, "up"]).await?;
            host.links.push(Link { name: link, host_end, host_ip, ns_ip });
        }
        Ok(host)
    }

    pub fn link(&self, name: &str) -> anyhow::Result<&Link> {
        self.links.iter().find(|l| l.name == name).ok_or_else(|| anyhow::anyhow!("no link {name}"))
    }

    /// Prefix of a command line that runs a program inside the namespace
    /// (`ip netns exec` execs it, so the child's PID is the program's).
    pub fn command_prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// Makes `upstream` (a server in this namespace) reachable from inside at
    /// the returned address on `link`'s far end; lives as long as the host.
    pub async fn forward(&mut self, link: &str, upstream: SocketAddr) -> anyhow::Result<SocketAddr> {
        let host_ip = self.link(link)?.host_ip;
        let forwarder = FaultProxy::start_on(host_ip.into(), upstream).await?;
        let address = SocketAddr::from((host_ip, forwarder.port));
        self.forwarders.push(forwarder);
        Ok(address)
    }

    /// Takes `link` down: every packet on it is dropped, both ways, with no
    /// reset or error sent to either end.
    pub async fn cut(&self, link: &str) -> anyhow::Result<()> {
        run(&["ip", "link", "set", &self.link(link)?.host_end, "down"]).await
    }

    /// Brings `link` back up (its addresses were kept).
    pub async fn restore(&self, link: &str) -> anyhow::Result<()> {
        run(&["ip", "link", "set", &self.link(link)?.host_end, "up"]).await
    }

    async fn in_namespace(&self, command: &[&str]) -> anyhow::Result<()> {
        let mut line = self.command_prefix().to_vec();
        line.extend_from_slice(command);
        run(&line).await
    }
}

impl Drop for NetworkHost {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth ends, and so their peers here.
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

async fn run(line: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(line[0]).args(&line[1..]).output().await.with_context(|| line.join(" "))?;
    anyhow::ensure!(
        output.status.success(),
        "`{}` failed: {}",
        line.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// Deletes namespaces left by test processes that were killed before their
/// hosts were dropped (named after a PID that no longer runs).
async fn remove_stale() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output().await else { return };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(pid) = name.strip_prefix(NAME_PREFIX).and_then(|rest| rest.split('-').next()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&["ip", "netns", "del", name]).await;
        }
    }
}
