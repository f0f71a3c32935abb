//! A TCP proxy on 127.0.0.1 that a test can cut or blackhole, to play a broker
//! outage for one service without touching the broker every other test shares.
//! (No toxiproxy server can be installed here; this is the small part we need.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct FaultProxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    /// While set, bytes in both directions are read and thrown away: the peer
    /// sees a silent link (no reset, no reply), as with a lost route.
    blackhole: Arc<AtomicBool>,
    /// Bumped on every cut, so live connections notice and close.
    generation: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Forwards 127.0.0.1:<port> to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let blackhole = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let task = {
            let cut = cut.clone();
            let blackhole = blackhole.clone();
            let generation = generation.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        drop(client); // refused, as by a broker that is down
                        continue;
                    }
                    let mut cuts = generation.subscribe();
                    let blackhole = blackhole.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else { return };
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        tokio::select! {
                            _ = pump(client_read, server_write, blackhole.clone()) => {}
                            _ = pump(server_read, client_write, blackhole) => {}
                            _ = cuts.changed() => {} // both sockets close when dropped
                        }
                    });
                }
            })
        };
        Ok(Self { port, cut, blackhole, generation, task })
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

    pub fn restore(&self) {
        if self.blackhole.swap(false, Ordering::SeqCst) {
            // Their streams lost bytes: a real link would now time out; close them.
            self.generation.send_modify(|g| *g += 1);
        }
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until either end closes, dropping what arrives while
/// `blackhole` is set.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            return Ok(());
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
