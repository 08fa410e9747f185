//! Starting the gateway: under pingora's `Server` for `sluice run` (signals, graceful shutdown,
//! zero-downtime upgrade), or on a listener the caller already bound for tests and embedding
//! (`serve`), the way mini-redis's `server::run` does.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::apps::{HttpServerApp, HttpServerOptions, ServerApp};
use pingora::protocols::Stream;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::proxy::{HttpProxy, http_proxy};
use pingora::server::ShutdownWatch;
use pingora::server::configuration::ServerConf;
use pingora::services::listening::Service;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admin::AdminState;
use crate::config::Snapshot;
use crate::config::reload::{Reloader, watch_config};
use crate::credential::oauth::OAuthClient;
use crate::credential::redis::Invalidation;
use crate::credential::{Vault, build_vault};
use crate::intercept::{self, Minter};
use crate::outbound::OutboundTls;
use crate::proxy::Sluice;
use crate::tunnel::{Opened, Tunnel};
use crate::upstream::CaBundle;

/// Announce what an operator must know before traffic flows.
pub fn startup_warnings(snap: &Snapshot) {
    if snap.listener.dev_mode_unauthenticated {
        warn!(
            listener = %snap.listener.address,
            "DEVELOPMENT MODE: callers are NOT authenticated; any local process may use every workspace's connectors. Never run this in production."
        );
    }
    for net in snap.exception_warnings() {
        warn!(
            cidr = %net,
            "operator exception: destinations in {net} are allowed although special-purpose"
        );
    }
}

fn server_conf(snap: &Snapshot, bundle: Option<&CaBundle>) -> ServerConf {
    ServerConf {
        threads: snap.listener.threads,
        ca_file: bundle.map(|b| b.path().to_string_lossy().into_owned()),
        upstream_keepalive_pool_size: snap.upstream.pool_size,
        // pingora's `max_retries` is the number of attempts, not of retries. Each connector's
        // retry policy stops earlier; fail_to_connect, upstream_response_filter and
        // error_while_proxy decide.
        max_retries: crate::ratelimit::retry::MAX_ATTEMPTS as usize,
        // pingora counts these in whole seconds: round up, so requests in flight get at least
        // the configured time (2500 ms -> 3 s), never less.
        grace_period_seconds: Some(whole_seconds_up(snap.listener.shutdown_grace)),
        graceful_shutdown_timeout_seconds: Some(whole_seconds_up(snap.listener.shutdown_timeout)),
        upgrade_sock: snap.listener.upgrade_sock.to_string_lossy().into_owned(),
        pid_file: snap.listener.pid_file.to_string_lossy().into_owned(),
        ..ServerConf::default()
    }
}

/// `d` in whole seconds, rounded up.
fn whole_seconds_up(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The listening app for a snapshot: the proxy, and the interception CA when configured.
fn build_app(parts: &Parts, conf: &Arc<ServerConf>) -> Result<SluiceApp, String> {
    let minter = match &parts.config.load().interception {
        Some(i) => Some(Arc::new(Minter::load(
            &i.ca_cert_file,
            &i.ca_key_file,
            i.leaf_lifetime,
            i.cache_capacity,
        )?)),
        None => None,
    };
    Ok(SluiceApp {
        proxy: Arc::new(build_proxy(parts, conf)),
        minter,
    })
}

/// Build the pingora proxy app for a snapshot. The CA bundle (if any) is read here and may be
/// deleted once this returns.
fn build_proxy(parts: &Parts, conf: &Arc<ServerConf>) -> HttpProxy<Sluice> {
    let mut proxy = http_proxy(
        conf,
        Sluice::new(
            parts.config.clone(),
            parts.vault.clone(),
            parts.oauth.clone(),
            parts.redis.clone(),
        ),
    );
    proxy.server_options = Some(server_options());
    proxy
}

fn server_options() -> HttpServerOptions {
    // Let CONNECT reach request_filter, which refuses it with sluice's own JSON error
    // (pingora's default is a bare 405).
    let mut options = HttpServerOptions::default();
    options.allow_connect_method_proxying = true;
    options
}

/// The listening app: pingora's HTTP/1 proxy, plus what a CONNECT tunnel turns a connection
/// into. pingora serves each request; after a CONNECT's 200 the connection comes back here
/// (its context says [`Opened`]), and its first byte decides: a TLS handshake is answered with
/// a minted certificate and the requests inside run on the TLS stream; anything else is plain
/// HTTP inside the tunnel.
pub struct SluiceApp {
    proxy: Arc<HttpProxy<Sluice>>,
    minter: Option<Arc<Minter>>,
}

/// How long a new tunnel may stay silent before its first byte.
const TUNNEL_FIRST_BYTE: std::time::Duration = std::time::Duration::from_secs(60);
/// How long an intercepted TLS handshake may take, from the client's first byte.
const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

impl SluiceApp {
    /// The connection after a CONNECT's 200: intercepted TLS, or plain HTTP, or closed.
    async fn open_tunnel(
        &self,
        stream: Stream,
        tunnel: Arc<Tunnel>,
    ) -> Option<(Stream, Box<dyn std::any::Any + Send + Sync>)> {
        use tokio::io::AsyncReadExt;
        // Only a plain TCP connection can become a tunnel (a CONNECT inside one is refused).
        let mut l4 = *stream.into_any().downcast::<L4Stream>().ok()?;
        let mut first = [0u8; 1];
        let n = tokio::time::timeout(TUNNEL_FIRST_BYTE, l4.read(&mut first))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        l4.rewind(&first);
        // 0x16: a TLS handshake record (a ClientHello).
        if first[0] != 0x16 {
            return Some((Box::new(l4), Box::new(tunnel)));
        }
        let Some(minter) = &self.minter else {
            info!(host = %tunnel.host, "TLS inside a tunnel, but [interception] is not configured: closing");
            return None;
        };
        let resolver = Arc::new(SniSeen {
            minter: minter.clone(),
            seen: std::sync::Mutex::new(None),
        });
        let acceptor = pingora::listeners::tls::Acceptor::from_server_config(
            intercept::server_config(resolver.clone()),
        );
        // A client that stalls its handshake holds nothing for long.
        let tls = match tokio::time::timeout(TLS_HANDSHAKE, acceptor.tls_handshake(l4)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                info!(host = %tunnel.host, error = %e.etype().as_str(), "intercepted TLS handshake failed");
                return None;
            }
            Err(_) => {
                info!(host = %tunnel.host, "intercepted TLS handshake timed out");
                return None;
            }
        };
        let sni = resolver.seen.lock().ok()?.take()?;
        let inside = Tunnel {
            tls_sni: Some(sni),
            ..(*tunnel).clone()
        };
        Some((Box::new(tls), Box::new(Arc::new(inside))))
    }
}

/// The certificate resolver of one intercepted handshake: mints for the SNI name and keeps
/// it, so the tunnel can check it against the CONNECT's host.
#[derive(Debug)]
struct SniSeen {
    minter: Arc<Minter>,
    seen: std::sync::Mutex<Option<String>>,
}

impl rustls::server::ResolvesServerCert for SniSeen {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(name.clone());
        }
        self.minter.resolve_name(&name)
    }
}

#[async_trait::async_trait]
impl ServerApp for SluiceApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // pingora's own HTTP/1 loop (apps/mod.rs), with the tunnel step between requests.
        let mut session = ServerSession::new_http1(stream);
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        let mut result = self.proxy.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = result.map(|r| r.consume()) {
            let Some(mut settings) = settings else {
                let session = ServerSession::new_http1(stream);
                result = self.proxy.process_new_http(session, shutdown).await;
                continue;
            };
            let stream = match settings.take_user_context() {
                Some(context) => match context.downcast::<Opened>() {
                    Ok(opened) => {
                        let (stream, context) = self.open_tunnel(stream, opened.0).await?;
                        settings.set_user_context(context);
                        stream
                    }
                    Err(context) => {
                        settings.set_user_context(context);
                        stream
                    }
                },
                None => stream,
            };
            let mut session = ServerSession::new_http1(stream);
            settings.apply_to_session(&mut session);
            result = self.proxy.process_new_http(session, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

/// What a running sluice holds beside the proxy: the live config, the vault, and the admin
/// API's address.
struct Parts {
    config: Arc<ArcSwap<Snapshot>>,
    vault: Option<Arc<Vault>>,
    oauth: Arc<OAuthClient>,
    /// The Redis store, when credentials live there (it also holds shared rate budgets).
    redis: Option<Arc<crate::credential::redis::RedisStore>>,
    admin_addr: Option<SocketAddr>,
}

/// Build the vault, load stored definitions into the snapshot, listen for other replicas'
/// changes, and start the admin API. Runs on (and spawns onto) the current tokio runtime.
async fn assemble(snapshot: Snapshot) -> Result<Parts, String> {
    let oauth = Arc::new(OAuthClient::new(OutboundTls::new(
        snapshot.upstream.extra_ca_file.as_deref(),
    )?));
    let built = match &snapshot.credentials {
        Some(creds) => Some(build_vault(creds).await?),
        None => None,
    };
    let admin = snapshot.admin.clone();
    let config = Arc::new(ArcSwap::from_pointee(snapshot));
    let (vault, redis) = match built {
        Some((vault, redis)) => (Some(vault), redis),
        None => (None, None),
    };
    let reloader = Arc::new(Reloader::new(
        config.clone(),
        vault.as_ref().map(|v| v.store().clone()),
    ));
    if vault.is_some() {
        reloader.reload_or_retry().await;
    }
    watch_config(reloader.clone());
    if let (Some(redis), Some(vault)) = (&redis, &vault) {
        let vault = Arc::downgrade(vault);
        let reloader = reloader.clone();
        redis.start_invalidation_listener(Arc::new(move |event| {
            let Some(vault) = vault.upgrade() else { return };
            let reloader = reloader.clone();
            match event {
                Invalidation::Credential(ws, conn) => {
                    let (ws, conn) = (ws.to_string(), conn.to_string());
                    tokio::spawn(async move { vault.invalidate_local(&ws, &conn).await });
                }
                Invalidation::Everything => {
                    vault.invalidate_all_fresh();
                    tokio::spawn(async move { reloader.reload_or_retry().await });
                }
                Invalidation::Definitions => {
                    tokio::spawn(async move { reloader.reload_or_retry().await });
                }
            }
        }));
    }
    let admin_addr = match (admin, &vault) {
        (Some(admin), Some(vault)) => {
            let listener = TcpListener::bind(admin.address)
                .await
                .map_err(|e| format!("cannot listen on admin.address {}: {e}", admin.address))?;
            let state = Arc::new(AdminState::new(
                config.clone(),
                vault.clone(),
                reloader.clone(),
                oauth.clone(),
                admin.token_sha256,
            ));
            Some(crate::admin::spawn(listener, state))
        }
        _ => None,
    };
    Ok(Parts {
        config,
        vault,
        oauth,
        redis,
        admin_addr,
    })
}

/// `sluice run`: serve forever under pingora's server. SIGTERM stops accepting and lets
/// requests in flight finish (up to `shutdown_grace_ms` + `shutdown_timeout_ms`), then exits 0;
/// SIGQUIT hands the listening sockets to a new `sluice run --upgrade` (zero downtime).
pub fn run(snapshot: Snapshot, upgrade: bool) -> Result<(), String> {
    startup_warnings(&snapshot);
    let bundle = snapshot
        .upstream
        .extra_ca_file
        .as_deref()
        .map(CaBundle::build)
        .transpose()?;
    let conf = server_conf(&snapshot, bundle.as_ref());
    let address = snapshot.listener.address;

    // Background work that outlives any one request (the Redis connection, invalidation
    // subscription) runs on its own small runtime; pingora's runtimes serve traffic.
    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sluice-bg")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the background runtime: {e}"))?;
    let parts = background.block_on(assemble(snapshot))?;

    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..pingora::server::configuration::Opt::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    let app = build_app(&parts, &server.configuration)?;
    drop(bundle);
    let mut service = Service::new("sluice".to_string(), app);
    service.add_tcp(&address.to_string());
    server.add_service(service);
    info!(listener = %address, "sluice listening");
    // `background` must live as long as the server.
    let _background = background;
    // `run` (not `run_forever`, which exits the process) returns after shutdown, so the
    // caller's log guard flushes the last lines.
    server.run(pingora::server::RunArgs::default());
    Ok(())
}

/// A running in-process gateway (tests, embedding). Dropping it stops accepting connections.
pub struct Running {
    pub addr: SocketAddr,
    pub config: Arc<ArcSwap<Snapshot>>,
    pub vault: Option<Arc<Vault>>,
    /// Where the admin API listens, when `[admin]` is configured.
    pub admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Serve on a listener the caller bound (e.g. `127.0.0.1:0`). The snapshot's
/// `listener.address` is replaced by the real bound address, so the self-connection check
/// sees the port actually in use.
pub async fn serve(listener: TcpListener, mut snapshot: Snapshot) -> Result<Running, String> {
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    snapshot.listener.address = addr;
    startup_warnings(&snapshot);
    let bundle = snapshot
        .upstream
        .extra_ca_file
        .as_deref()
        .map(CaBundle::build)
        .transpose()?;
    let conf = Arc::new(server_conf(&snapshot, bundle.as_ref()));
    let parts = assemble(snapshot).await?;
    let app = Arc::new(build_app(&parts, &conf)?);
    let Parts {
        config,
        vault,
        admin_addr,
        ..
    } = parts;
    drop(bundle);

    let (tx, rx) = watch::channel(false);
    let mut stop = rx.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.changed() => break,
            };
            let (tcp, _) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
            };
            let app = app.clone();
            let shutdown = rx.clone();
            tokio::spawn(async move {
                let stream: pingora::protocols::Stream = Box::new(L4Stream::from(tcp));
                let mut next = app.process_new(stream, &shutdown).await;
                while let Some(stream) = next {
                    next = app.process_new(stream, &shutdown).await;
                }
            });
        }
    });
    Ok(Running {
        addr,
        config,
        vault,
        admin_addr,
        shutdown: tx,
    })
}

#[cfg(test)]
mod tests {
    use super::whole_seconds_up;
    use std::time::Duration;

    #[test]
    fn shutdown_periods_round_up_to_whole_seconds() {
        for (ms, secs) in [
            (0, 0),
            (1, 1),
            (999, 1),
            (1000, 1),
            (1001, 2),
            (2500, 3),
            (30_000, 30),
        ] {
            assert_eq!(whole_seconds_up(Duration::from_millis(ms)), secs, "{ms} ms");
        }
    }
}
