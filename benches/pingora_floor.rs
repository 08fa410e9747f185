//! The framework floor for `benches/load.py`: pingora's `http_proxy` doing exactly the work of
//! the nginx set-up and nothing more — absolute-form request in, origin-form over verified TLS
//! (SNI, pinned address, keepalive pool) out, `Authorization` injected, routing headers
//! dropped, upstream timeouts enforced — with none of sluice's logic (no caller auth, policy,
//! credential store, pacing, retries, metrics or logs).
//!
//! Timeouts: nginx enforces `proxy_read_timeout`, `proxy_send_timeout` and the upstream
//! `keepalive_timeout` (60 s each by default), HAProxy `timeout server` and Envoy its route
//! timeout; sluice sets the same three from `[upstream]` (60 s defaults). A pingora peer without
//! them would wait forever on a stalled upstream, and skips the timer each upstream read and
//! write arms, so the floor sets them too, at those defaults. `--no-timeouts` leaves them
//! unset, as the floor did before issue 14's seventh round (`load.py` measures both).
//!
//! It separates what sluice's own code costs (sluice minus this) from what pingora's HTTP/1
//! proxy path costs (this minus nginx). Not a product: a measuring stick, built by the load
//! bench as sluice is built (`cargo build --profile production --example pingora_floor`,
//! with the PGO profile: `benches/load.py`'s `build_production`).
//!
//! ```text
//! pingora_floor LISTEN UPSTREAM_ADDR SNI CA_FILE TOKEN [--no-timeouts]
//! ```

#![forbid(unsafe_code)]

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session, http_proxy};
use pingora::server::configuration::ServerConf;
use pingora::services::listening::Service;
use std::net::SocketAddr;
use std::time::Duration;

struct Floor {
    upstream: SocketAddr,
    sni: String,
    authorization: String,
    timeouts: bool,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, true, self.sni.clone());
        peer.options.verify_cert = true;
        peer.options.verify_hostname = true;
        if self.timeouts {
            let o = &mut peer.options;
            o.connection_timeout = Some(Duration::from_secs(5));
            o.total_connection_timeout = Some(Duration::from_secs(15));
            o.read_timeout = Some(Duration::from_secs(60));
            o.write_timeout = Some(Duration::from_secs(60));
            o.idle_timeout = Some(Duration::from_secs(60));
        }
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        // Absolute-form in, origin-form out (what nginx's proxy_pass does).
        let raw = req.raw_path();
        let origin = match raw.strip_prefix(b"http://") {
            Some(rest) => rest
                .iter()
                .position(|b| *b == b'/')
                .map_or(&b"/"[..], |i| &rest[i..]),
            None => raw,
        }
        .to_vec();
        req.set_raw_path(&origin)?;
        req.insert_header("host", self.sni.as_str())?;
        req.insert_header("authorization", self.authorization.as_str())?;
        for name in ["proxy-authorization", "x-connector", "x-workspace"] {
            req.remove_header(name);
        }
        Ok(())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let timeouts = match args.get(5).map(String::as_str) {
        None => true,
        Some("--no-timeouts") if args.len() == 6 => false,
        Some(_) => usage(),
    };
    if args.len() < 5 {
        usage();
    }
    let upstream: SocketAddr = args[1].parse().expect("UPSTREAM_ADDR is ip:port");
    let conf = ServerConf {
        threads: 1,
        ca_file: Some(args[3].clone()),
        upstream_keepalive_pool_size: 256,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let proxy = http_proxy(
        &server.configuration,
        Floor {
            upstream,
            sni: args[2].clone(),
            authorization: format!("Bearer {}", args[4]),
            timeouts,
        },
    );
    let mut service = Service::new("pingora-floor".to_string(), proxy);
    service.add_tcp(&args[0]);
    server.add_service(service);
    server.run_forever();
}

fn usage() -> ! {
    // `cargo test --all-targets` builds examples without running them; by hand:
    eprintln!(
        "usage: pingora_floor LISTEN UPSTREAM_ADDR SNI CA_FILE TOKEN [--no-timeouts] \
         (run by benches/load.py)"
    );
    std::process::exit(2);
}
