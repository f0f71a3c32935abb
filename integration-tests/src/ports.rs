//! Ports for the processes a test starts and must address before they run
//! (service binaries, private PostgreSQL, Redis and RabbitMQ servers).
//!
//! Binding port 0, reading the port and releasing it for the child to bind
//! later is a race: the port comes from the kernel's ephemeral range, so in the
//! gap any outgoing connection on the machine may take it as its local port,
//! another `bind(0)` may be handed it again (even the very next call, so a
//! service could be given the same port for gRPC and metrics and die half
//! started, resetting the connections it had queued), and the bind of the child
//! then fails or, worse, a test talks to someone else's listener.
//!
//! So ports come from below the ephemeral range (`ip_local_port_range` starts
//! at 32768 by default), where the kernel never picks a port on its own, and
//! this process never hands out one port twice. The starting point depends on
//! the process id, so two test processes at once start far apart; each port is
//! still checked free by binding it before it is handed out.

use std::sync::atomic::{AtomicU32, Ordering};

/// The range ports are taken from: clear of the well-known ports and of the
/// services' default ports (8080, 9091–9093, 50051–50053), below the ephemeral
/// range. It holds RabbitMQ's default distribution port 25672; a port in use
/// (by the machine's node or anyone else) fails the bind check and is skipped.
const FIRST: u32 = 20_000;
const LAST: u32 = 32_000;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A port no other caller in this process got, free when it was checked.
pub fn free_port() -> anyhow::Result<u16> {
    let span = LAST - FIRST;
    let start = (std::process::id().wrapping_mul(7_919)) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(FIRST + offset)?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {FIRST}..{LAST}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_hands_out_a_port_twice_or_one_the_kernel_would_pick() {
        let ports: Vec<u16> = (0..200).map(|_| free_port().unwrap()).collect();
        let unique: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(unique.len(), ports.len());
        assert!(ports.iter().all(|&p| (FIRST..LAST).contains(&u32::from(p))));
    }
}
