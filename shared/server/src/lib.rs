//! gRPC serving plumbing shared by the three services: standard health and
//! reflection services, the building of a tonic server with our limits, graceful
//! shutdown under one deadline, and statuses that carry a `google.rpc.ErrorInfo`.
//! No business rules live here.

mod deadline;
mod metrics;
mod periodic;
mod shutdown;
mod status;
mod tls;
mod trace;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::{Router, TcpIncoming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use deadline::DeadlineLayer;
pub use metrics::{GrpcMetricsLayer, MetricsEndpoint, prometheus};
pub use periodic::every;
pub use shutdown::shutdown_signal;
pub use status::{ERROR_DOMAIN, internal, invalid_argument, rejection, unavailable};
pub use tls::{
    CallerCheck, CallerCheckLayer, Callers, MutualTls, PeerIdentity, TlsArgs, TlsConnection, TlsConnector, caller_name,
};
pub use trace::{
    GrpcClientTrace, GrpcClientTraceLayer, GrpcServerTrace, GrpcServerTraceLayer, HttpServerTrace, HttpServerTraceLayer,
};

/// Decoded request bodies above this size are refused by tonic before any handler runs.
pub const MAX_DECODING_MESSAGE_SIZE: usize = 256 * 1024;
/// Responses above this size are refused (tonic caps decoding only by default).
pub const MAX_ENCODING_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// Streams a peer may reset before the server accepted them, per connection,
/// before the server closes that connection (h2's default is 20).
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 10_000;

/// The layers every service's server runs: metrics outermost, then tracing,
/// the deadline, and (with mutual TLS) the caller check.
pub type StandardLayers = tower::layer::util::Stack<
    CallerCheckLayer,
    tower::layer::util::Stack<
        DeadlineLayer,
        tower::layer::util::Stack<
            GrpcServerTraceLayer,
            tower::layer::util::Stack<GrpcMetricsLayer, tower::layer::util::Identity>,
        >,
    >,
>;

/// The router every service serves: tonic's, with the gRPC metrics and tracing layers.
pub type StandardRouter = Router<StandardLayers>;

/// A client channel that carries the caller's trace context (W3C `traceparent`
/// in the gRPC metadata) and records a client span per call.
pub type TracedChannel = GrpcClientTrace<tonic::transport::Channel>;

/// A channel for calling another service of the suite, connecting lazily: a
/// short connect timeout, keep-alive pings, and no cap on the streams this
/// client resets itself. h2 sends GOAWAY on its own connection after 1,024 such
/// resets by default (a guard against a hostile server); a gateway that
/// multiplexes every buyer over one connection cancels a call each time a buyer
/// gives up, so one buyer cancelling bursts of calls would close the connection
/// under everyone else's calls. The servers at the other end are our own.
///
/// With `tls`, the URL must be `https://` (tonic would quietly speak plaintext
/// to an `http://` one); every new connection makes its handshake with the
/// certificates read last and presents ours.
pub fn internal_channel(url: &str, tls: Option<&MutualTls>) -> anyhow::Result<tonic::transport::Channel> {
    let endpoint = |url: String| {
        Ok::<_, anyhow::Error>(
            tonic::transport::Endpoint::from_shared(url.clone())
                .map_err(|_| anyhow::anyhow!("{url:?} is not a valid URL"))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .http2_max_local_error_reset_streams(None),
        )
    };
    let uri: http::Uri = url.parse().map_err(|_| anyhow::anyhow!("{url:?} is not a valid URL"))?;
    let https = uri.scheme_str() == Some("https");
    match tls {
        Some(tls) => {
            anyhow::ensure!(https, "{url:?}: with mutual TLS on, internal URLs are https://");
            let authority = uri.authority().ok_or_else(|| anyhow::anyhow!("{url:?} names no host"))?;
            // Our connector makes the TLS; tonic sees plain HTTP/2 over it.
            let port = authority.port_u16().unwrap_or(443);
            Ok(endpoint(format!("http://{}:{port}", authority.host()))?.connect_with_connector_lazy(tls.connector()))
        }
        None => {
            anyhow::ensure!(!https, "{url:?} is https://, but no TLS_CERT_FILE/TLS_KEY_FILE/TLS_CA_FILE is set");
            Ok(endpoint(url.to_owned())?.connect_lazy())
        }
    }
}

/// Wraps `channel` so every call through it carries the current trace.
pub fn traced(channel: tonic::transport::Channel) -> TracedChannel {
    use tower::Layer;
    GrpcClientTraceLayer.layer(channel)
}

/// Who may reach a server: it decides how many stream resets one connection may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposure {
    /// Reached by anyone (the gateway's public port): h2's own rapid-reset guard.
    Public,
    /// Reached only by the other services, which multiplex many buyers' calls
    /// over few connections (inventory, wallet).
    Internal,
}

/// How long a client connection lives before the server rotates it (graceful
/// GOAWAY), so clients behind a plain Kubernetes Service spread over new
/// replicas instead of pinning one pod for ever. Callers retry idempotent calls
/// that raced the close.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);

/// Mutual TLS for an internal server: the certificates (used by
/// [`serve_internal`]), and who may call what (checked by the router).
#[derive(Debug, Clone, Copy)]
pub struct InternalTls<'a> {
    pub tls: &'a MutualTls,
    pub callers: &'static Callers,
}

/// A tonic server builder with the settings every service shares; with
/// `tls`, it answers each internal method only to the callers `tls.callers`
/// names (the connections it is given, by [`serve_internal`], are all TLS
/// with a certificate the CA signed).
pub fn server_builder(
    exposure: Exposure,
    max_connection_age: Duration,
    tls: Option<InternalTls<'_>>,
) -> Result<Server<StandardLayers>, tonic::transport::Error> {
    let reset_streams = match exposure {
        Exposure::Public => None,
        Exposure::Internal => Some(MAX_PENDING_ACCEPT_RESET_STREAMS),
    };
    Ok(Server::builder()
        .tcp_nodelay(true)
        // Detect dead peers on long-lived HTTP/2 connections (WatchOrder streams).
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_connection_age(max_connection_age)
        // h2 closes a connection after 20 streams reset before they were
        // accepted (its guard against rapid-reset floods). A gateway multiplexes
        // every buyer over one connection to inventory and wallet, so buyers who
        // cancel bursts of calls would make those resets and fail everyone's
        // calls on it. Internal servers allow many; the public port keeps h2's
        // guard, which only ever closes the flooding client's own connection.
        .http2_max_pending_accept_reset_streams(reset_streams)
        // Outermost of ours, so it times the whole call and sees every status
        // our layers and handlers produce (tonic's own answers, such as an
        // oversized message, come from outside it).
        .layer(GrpcMetricsLayer)
        // One server span per sampled call, child of the caller's `traceparent`
        // when it sent one. Health checks (probes every few seconds) are not traced.
        .layer(GrpcServerTraceLayer)
        // The caller's `grpc-timeout`, and at most 30 s (without a limit a slow
        // handler holds the caller for ever), answered DEADLINE_EXCEEDED.
        .layer(DeadlineLayer { max: Duration::from_secs(30) })
        // Innermost: a refused caller still shows in the metrics and traces.
        .layer(CallerCheckLayer { callers: tls.map(|internal| internal.callers) }))
}

/// The health service plus the names of the services it reports on, so shutdown
/// can flip every one of them (and the whole-server `""` entry) to NOT_SERVING.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Vec<&'static str>,
}

impl Health {
    /// A new health service and its server half, to add to the router.
    pub fn new() -> (Self, tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>)
    {
        let (reporter, server) = tonic_health::server::health_reporter();
        (Self { reporter, services: Vec::new() }, server)
    }

    /// Registers a service name whose status follows the server's.
    pub fn track(&mut self, service_name: &'static str) {
        self.services.push(service_name);
    }

    /// Sets the server and every tracked service to `status`.
    pub async fn set_all(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for name in &self.services {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// gRPC server reflection (v1 and v1alpha: grpcurl, Postman and older tools ask
/// for one or the other) over the proto files of the APIs this server serves
/// (`files`, e.g. `flashsale/wallet/v1/wallet.proto`, with everything they
/// import) and the health service. Only those: the public gateway must not
/// describe the internal services to whoever asks.
pub fn reflection(
    files: &[&str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let served = served_descriptors(files)?;
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_file_descriptor_set(served.clone())
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// The descriptors of `roots` and of every file they import, out of all of ours.
fn served_descriptors(roots: &[&str]) -> Result<prost_types::FileDescriptorSet, tonic_reflection::server::Error> {
    use prost::Message as _;
    let encoded = flashsale_proto::descriptor_set_of(roots)
        .map_err(|e| tonic_reflection::server::Error::InvalidFileDescriptorSet(e.to_string()))?;
    Ok(prost_types::FileDescriptorSet::decode(encoded.as_slice())?)
}

/// A server with our settings already serving health and reflection (of
/// `proto_files`, see [`reflection`]); add the service's own APIs (and
/// `Health::track` their names) before serving.
pub fn standard_router(
    exposure: Exposure,
    max_connection_age: Duration,
    proto_files: &[&str],
    tls: Option<InternalTls<'_>>,
) -> anyhow::Result<(Health, StandardRouter)> {
    let (health, health_service) = Health::new();
    let (reflection_v1, reflection_v1alpha) = reflection(proto_files)?;
    let router = server_builder(exposure, max_connection_age, tls)?
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((health, router))
}

/// The `health` command of every service binary, for container health checks
/// (Docker's `HEALTHCHECK`, Compose) where no gRPC probe is at hand: asks the
/// service listening on `listen` (its own listen address; an unspecified IP
/// means this host) for `grpc.health.v1` of the whole server, and exits 0 only
/// when it answers SERVING, within 3 s. Kubernetes asks the same service with
/// its native gRPC probes instead.
///
/// With `tls` (a server that requires mutual TLS), it presents the service's
/// own certificate and expects the server to carry the first DNS name of it.
pub async fn probe(service: &'static str, listen: std::net::SocketAddr, tls: &TlsArgs) -> std::process::ExitCode {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::health_client::HealthClient;

    let ip = if listen.ip().is_unspecified() {
        match listen {
            std::net::SocketAddr::V4(_) => std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
            std::net::SocketAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        listen.ip()
    };
    let tls = match MutualTls::load(tls) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("flashsale-{service}: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}", std::net::SocketAddr::new(ip, listen.port()));
    let check = async {
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())?;
        if let Some(tls) = &tls {
            let mut client = tls.client();
            if let Some(name) = tls.own_dns_name() {
                client = client.domain_name(name);
            }
            endpoint = endpoint.tls_config(client)?;
        }
        let channel = endpoint.connect().await?;
        let reply = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
        Ok::<_, anyhow::Error>(reply.into_inner().status())
    };
    match tokio::time::timeout(Duration::from_secs(3), check).await {
        Ok(Ok(Status::Serving)) => std::process::ExitCode::SUCCESS,
        Ok(Ok(status)) => {
            eprintln!("flashsale-{service}: {url} is {}", status.as_str_name());
            std::process::ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("flashsale-{service}: health check of {url} failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("flashsale-{service}: {url} did not answer its health check within 3 s");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a service's `main` on a multi-threaded runtime whose worker threads are
/// named after the service, so `top -H` and `perf` tell the services apart
/// (`#[tokio::main]` names every worker `tokio-rt-worker`).
pub fn block_on<Fut>(service: &'static str, main: Fut) -> std::process::ExitCode
where
    Fut: Future<Output = std::process::ExitCode>,
{
    match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name(service).build() {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            eprintln!("flashsale-{service}: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The body of every service's `main`: telemetry first, then `run`; a failure
/// becomes one error line (in the JSON log) and a non-zero exit code.
pub async fn run_service<F, Fut>(service: &'static str, run: F) -> std::process::ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    // Test builds only: crash points configured from `FAILPOINTS` (see `crash_point`).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let _telemetry = match flashsale_telemetry::init(service) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("flashsale-{service}: cannot start telemetry: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), service, "service failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A named point where the fault tests make the process die at once, as a
/// `kill -9` would land exactly there: nothing after it runs, no reply is sent,
/// no delivery acked, no transaction committed that was not already.
///
/// Compiled in only with the `failpoints` feature (the integration tests turn it
/// on); elsewhere it is an empty function. In such a build, `FAILPOINTS` sets
/// when a point fires, in the `fail` crate's syntax: `FAILPOINTS=inventory-before-ack=3*off->return`
/// lets the point pass three times and aborts the process the fourth. The points
/// and what must survive each are listed in `integration-tests/RELIABILITY.md`.
#[inline]
pub fn crash_point(name: &str) {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(name, |_| {
        eprintln!("crash point {name} reached: aborting");
        std::process::abort()
    });
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Accepted connections from `listener`, with TCP_NODELAY (small gRPC frames
/// must not wait for Nagle's algorithm).
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves an internal server's `router` on `listener` until `stop`: with
/// `tls`, only connections that completed a mutual-TLS handshake with the
/// current certificates ([`tls::incoming`]); without, plain TCP.
pub async fn serve_internal(
    router: StandardRouter,
    listener: TcpListener,
    tls: Option<&MutualTls>,
    stop: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    match tls {
        Some(tls) => router.serve_with_incoming_shutdown(tls::incoming(listener, tls), stop).await,
        None => router.serve_with_incoming_shutdown(incoming(listener), stop).await,
    }
}

/// Runs a server until `shutdown` resolves, then: every health status goes
/// NOT_SERVING, the listener closes, in-flight calls get up to `grace` to finish.
/// tonic's graceful shutdown also waits for idle HTTP/2 connections, which may
/// never close, hence the deadline.
///
/// `start` receives the future that tells the server to stop and returns the
/// server future, typically
/// `|stop| router.serve_with_incoming_shutdown(incoming(listener), stop)`;
/// taking a closure keeps tonic's layer generics out of this signature.
pub async fn serve_until_stopped<F, Fut>(
    health: Health,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    start: F,
) -> Result<(), tonic::transport::Error>
where
    F: FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = Result<(), tonic::transport::Error>>,
{
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = start(Box::pin(async {
        let _ = stop_rx.await;
    }));
    tokio::pin!(server);
    health.set_all(ServingStatus::Serving).await;

    tokio::select! {
        result = &mut server => return result,
        () = shutdown => {}
    }
    tracing::info!("shutdown requested: health NOT_SERVING, draining in-flight calls");
    health.set_all(ServingStatus::NotServing).await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(grace, server).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(grace.ms = grace.as_millis() as u64, "grace period over; closing remaining connections");
            Ok(())
        }
    }
}
