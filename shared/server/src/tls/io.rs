//! The TLS connections themselves: accepted ones for inventory's and wallet's
//! servers ([`incoming`]), and outgoing ones for the channels between the
//! services ([`TlsConnector`]), each made with the files read last.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::{MutualTls, caller_name};

/// A caller has this long to finish its handshake (our own clients give up
/// connecting after 2 s); a client that opens a connection and says nothing
/// holds a handshake slot no longer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once; further connections wait in the kernel's
/// backlog, so clients without a certificate cannot use up the process's file
/// descriptors (which its database and broker connections need too).
const MAX_HANDSHAKES: usize = 512;

/// Who is at the other end of an accepted connection, in every request's
/// extensions: named once, when the handshake verified its certificate.
/// (tonic's `Request::remote_addr` knows only its own connection types and
/// answers `None` on these connections; use `remote_addr` here.)
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub remote_addr: SocketAddr,
    /// The service its certificate names (see [`caller_name`]); `None` when
    /// the certificate names none.
    pub caller: Option<Arc<str>>,
}

/// An accepted connection whose handshake is done.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerIdentity,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The connections of `listener` that completed a handshake with the current
/// files and presented a certificate the CA signed, for
/// `serve_with_incoming_shutdown`. Handshakes run each in a task of its own,
/// so a slow or silent client holds up nobody else's; one that fails is
/// dropped (and counted). The listener closes when the server stops taking
/// connections (it drops this stream); handshakes still in progress are
/// abandoned with it.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: &MutualTls,
) -> ReceiverStream<Result<TlsConnection, std::io::Error>> {
    let (ready, stream) = tokio::sync::mpsc::channel(64);
    let tls = tls.clone();
    tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let mut handshakes = tokio::task::JoinSet::new();
        loop {
            while handshakes.try_join_next().is_some() {}
            let accepted = tokio::select! {
                () = ready.closed() => return,
                accepted = async {
                    let slot = slots.clone().acquire_owned().await;
                    (slot, listener.accept().await)
                } => accepted,
            };
            let (tcp, remote_addr, slot) = match accepted {
                (Ok(slot), Ok((tcp, remote_addr))) => (tcp, remote_addr, slot),
                (_, Err(e)) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    if is_resource_error(&e) {
                        // Out of file descriptors or memory: the next accept
                        // may succeed once a connection closes; spinning
                        // would not help.
                        tokio::select! {
                            () = ready.closed() => return,
                            () = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                    continue;
                }
                // The semaphore is never closed.
                (Err(_), Ok(_)) => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
            let ready = ready.clone();
            handshakes.spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let caller = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(|cert| caller_name(cert.as_ref()))
                            .map(Arc::from);
                        let _ =
                            ready.send(Ok(TlsConnection { stream, peer: PeerIdentity { remote_addr, caller } })).await;
                    }
                    Ok(Err(e)) => {
                        metrics::counter!("flashsale_tls_handshakes_failed_total").increment(1);
                        tracing::debug!(%remote_addr, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics::counter!("flashsale_tls_handshakes_failed_total").increment(1);
                        tracing::debug!(%remote_addr, "TLS handshake not finished in time");
                    }
                }
            });
        }
    });
    ReceiverStream::new(stream)
}

/// Accept errors that say the process is out of something (file
/// descriptors, buffers, memory), as opposed to one connection's failure.
fn is_resource_error(error: &std::io::Error) -> bool {
    // Linux errno values (not worth the `libc` crate): ENOMEM, ENFILE, EMFILE, ENOBUFS.
    matches!(error.raw_os_error(), Some(12 | 23 | 24 | 105))
}

/// Makes the connections of a channel to another service: TCP, then a TLS
/// handshake with the current files, verifying the server's certificate
/// against the URL's host. The channel's URL is `http://` (the TLS is ours, so
/// tonic must not add its own); [`crate::internal_channel`] sees to it.
#[derive(Clone)]
pub struct TlsConnector {
    tls: MutualTls,
}

impl TlsConnector {
    pub(super) fn new(tls: MutualTls) -> Self {
        Self { tls }
    }
}

type Connecting =
    Pin<Box<dyn Future<Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, std::io::Error>> + Send>>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.tls.client_config();
        Box::pin(async move {
            let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{uri}: {what}"));
            let host = uri.host().ok_or_else(|| invalid("no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().ok_or_else(|| invalid("no port"))?;
            let name =
                rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| invalid("not a server name"))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
