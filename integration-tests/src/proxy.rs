//! A TCP proxy on 127.0.0.1 that a test can slow down, reset, cut or blackhole,
//! to play a bad link between one service and a dependency without touching the
//! server every other test shares. (No toxiproxy server can be installed here;
//! this is the small part we need.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct FaultProxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    /// While set, bytes in both directions are read and thrown away: the peer
    /// sees a silent link (no reset, no reply), as with a lost route.
    blackhole: Arc<AtomicBool>,
    /// Milliseconds each chunk of bytes waits before it is passed on, both ways.
    latency_ms: Arc<AtomicU64>,
    /// Set while live connections are to be closed with a TCP reset (RST)
    /// rather than a clean close.
    reset: Arc<AtomicBool>,
    /// Bumped on every cut or reset, so live connections notice and close.
    generation: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Forwards 127.0.0.1:<port> to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST.into(), upstream).await
    }

    /// Forwards <bind>:<port> to `upstream`.
    pub async fn start_on(bind: std::net::IpAddr, upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((bind, 0)).await?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let blackhole = Arc::new(AtomicBool::new(false));
        let latency_ms = Arc::new(AtomicU64::new(0));
        let reset = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let task = {
            let cut = cut.clone();
            let blackhole = blackhole.clone();
            let (latency_ms, reset) = (latency_ms.clone(), reset.clone());
            let generation = generation.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        drop(client); // refused, as by a broker that is down
                        continue;
                    }
                    let mut cuts = generation.subscribe();
                    let blackhole = blackhole.clone();
                    let (latency_ms, reset) = (latency_ms.clone(), reset.clone());
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else { return };
                        let (mut client_read, mut client_write) = client.into_split();
                        let (mut server_read, mut server_write) = server.into_split();
                        tokio::select! {
                            _ = pump(&mut client_read, &mut server_write, &blackhole, &latency_ms) => {}
                            _ = pump(&mut server_read, &mut client_write, &blackhole, &latency_ms) => {}
                            _ = cuts.changed() => {
                                if reset.load(Ordering::SeqCst) {
                                    // Linger 0: closing sends RST, as a crashed peer or a
                                    // middlebox dropping state does.
                                    for half in [client_write.as_ref(), server_write.as_ref()] {
                                        let _ = socket2::SockRef::from(half).set_linger(Some(Duration::ZERO));
                                    }
                                }
                            } // both sockets close when dropped
                        }
                    });
                }
            })
        };
        Ok(Self { port, cut, blackhole, latency_ms, reset, generation, task })
    }

    /// Drops every proxied connection and refuses new ones until [`FaultProxy::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Swallows every byte from now on, in both directions, on live and new
    /// connections, until [`FaultProxy::restore`] (which resets the swallowed ones).
    pub fn blackhole(&self) {
        self.blackhole.store(true, Ordering::SeqCst);
    }

    /// Delays every chunk of bytes by `latency`, both ways, on live and new
    /// connections (zero: none).
    pub fn delay(&self, latency: Duration) {
        self.latency_ms.store(u64::try_from(latency.as_millis()).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// Resets every live connection (RST to both ends); new ones go through.
    pub fn reset_connections(&self) {
        self.reset.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.delay(Duration::ZERO);
        self.reset.store(false, Ordering::SeqCst);
        if self.blackhole.swap(false, Ordering::SeqCst) {
            // Their streams lost bytes: a real link would now time out; close them.
            self.generation.send_modify(|g| *g += 1);
        }
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either end closes, dropping what arrives while
/// `blackhole` is set and holding each chunk for the current latency.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    blackhole: &AtomicBool,
    latency_ms: &AtomicU64,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            return Ok(());
        }
        let latency = latency_ms.load(Ordering::SeqCst);
        if latency > 0 {
            // The injected latency itself, not a wait for a condition.
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        if !blackhole.load(Ordering::SeqCst) {
            to.write_all(&buffer[..n]).await?;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
