#!/usr/bin/env python3
"""Instructions per request, under callgrind: nginx, the pingora floor and sluice.

    python3 benches/instructions.py              # 2,000 requests each, ~3 minutes
    python3 benches/instructions.py --requests 500
    python3 benches/instructions.py --cache-sim  # also I1, D1 and LL misses per request
    python3 benches/instructions.py --keep     # keep the callgrind dumps, for
        # callgrind_annotate --inclusive=yes DIR/cg-sluice.out.1

CPU-seconds on a shared VM move by 10-20 % between runs of the same binary (BENCHMARKS.md);
instruction counts do not: the same binary, config and requests give the same count within
a fraction of a percent, so a change of a few hundred instructions per request is visible
here when the load bench cannot see it. Counted: the proxy's user-space instructions (every
thread) between a warm-up and the end of the measured requests. Not counted: the kernel
(syscalls, TCP, wake-ups), so this complements benches/load.py, it does not replace it.

Each proxy runs under `valgrind --tool=callgrind` with the load bench's own configs (nginx
as a single process, `master_process off`); a Python client sends the requests one at a
time on one keep-alive connection, absolute-form, through the proxy to a native nginx TLS
upstream. sluice authenticates the caller, cycles through 100 workspaces with stored
credentials, injects, paces and logs, exactly as in the load bench's warm set-up. A second
sluice row is the load bench's cold set-up: the store on a real redis-server (pinned with the
upstream) and a cache of one entry, so every request reads its record from Redis and opens
it (`--no-cold` skips it). Every proxy gets the same request head (X-Connector, X-Workspace,
Proxy-Authorization); the others drop those headers, as in the load bench.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402  (the load bench: configs, certificates, process helpers)


def drive(port: int, n: int, workspaces: int, token: str) -> None:
    """n sequential requests on one connection; every answer must be a 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    target = f"http://{load.HOST}:{UP_PORT[0]}{load.PATH}"
    for i in range(n):
        headers = {"Host": f"{load.HOST}:{UP_PORT[0]}", "Accept": "application/json"}
        if workspaces:
            headers.update({"X-Connector": "bench", "X-Workspace": f"ws_{i % workspaces}",
                            "Proxy-Authorization": f"Bearer {token}"})
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise SystemExit(f"request {i}: status {resp.status}")
    conn.close()


# The upstream's port, set once the upstream runs (drive() builds absolute-form targets).
UP_PORT = [0]


# `--cache-sim`: callgrind's cache simulation, sized like the bench VM's caches (32 KiB I1,
# 48 KiB D1, a 2 MiB last level standing in for its L2). No prefetcher is simulated, so the
# counts compare proxies with each other; they are not what the CPU sees.
CACHE_SIM = ["--cache-sim=yes", "--I1=32768,8,64", "--D1=49152,12,64", "--LL=2097152,16,64"]


def callgrind(cmd: list, out: Path, cache_sim: bool = False) -> list:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            "--instr-atstart=no", *(CACHE_SIM if cache_sim else []), *map(str, cmd)]


def count(pid: int, out_prefix: Path, run) -> dict[str, int]:
    """Each event's total (instructions are `Ir`) while `run()` runs."""
    subprocess.run(["callgrind_control", "--instr=on", str(pid)], check=True,
                   capture_output=True)
    run()
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True)
    subprocess.run(["callgrind_control", "--instr=off", str(pid)], check=True,
                   capture_output=True)
    totals: dict[str, int] = {}
    for dump in out_prefix.parent.glob(out_prefix.name + "*"):
        if dump.name == out_prefix.name:
            continue  # out_prefix itself stays empty; each dump is out_prefix.N
        text = dump.read_text(errors="replace")
        events = re.search(r"^events:\s+(.+)$", text, re.M)
        m = re.search(r"^summary:\s+(.+)$", text, re.M) or re.search(r"^totals:\s+(.+)$",
                                                                    text, re.M)
        if events and m:
            for name, value in zip(events.group(1).split(), m.group(1).split()):
                totals[name] = totals.get(name, 0) + int(value)
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--sluice", help="sluice binary (default: build target/release/sluice)")
    ap.add_argument("--floor", help="pingora floor binary (default: build the example)")
    ap.add_argument("--log-format", choices=["text", "json"], default="text",
                    help="sluice's SLUICE_LOG_FORMAT (the container image uses json)")
    ap.add_argument("--no-cold", dest="cold", action="store_false",
                    help="skip the cold-cache row (sluice on a real redis-server, a cache of "
                    "one entry, so every request reads and opens its record)")
    ap.add_argument("--cache-sim", action="store_true",
                    help="also simulate the caches: I1, D1-read and last-level misses per "
                    "request (slower)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the working directory (configs, callgrind dumps)")
    args = ap.parse_args()
    load.ensure_tools()
    if shutil.which("valgrind") is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "valgrind"], check=True)
    if not args.sluice or not args.floor:
        load.run(["cargo", "build", "--profile", "production", "--locked", "--bin", "sluice",
                  "--example", "pingora_floor"], cwd=load.ROOT)
        args.sluice = args.sluice or str(load.ROOT / "target/production/sluice")
        args.floor = args.floor or str(load.ROOT / "target/production/examples/pingora_floor")
    load.WORKSPACES = 100
    results = []
    with tempfile.TemporaryDirectory(prefix="sluice-instr-") as tmp:
        d = Path(tmp)
        if args.keep:
            d = Path(tempfile.mkdtemp(prefix="sluice-instr-kept-"))
            load.log(f"keeping configs and callgrind dumps in {d}")
        load.make_certs(d)
        b = load.Bench(argparse.Namespace(sluice_log="info"), d)
        UP_PORT[0] = b.up_port
        try:
            up, _ = b.start_upstream("instr")
            n, w = args.requests, args.warmup

            def plain(name: str, key: str, command) -> None:
                """Count a proxy that takes no routing headers; `command(port)` starts it."""
                port = load.free_port()
                p = b.spawn(callgrind(command(port), d / f"cg-{key}.out", args.cache_sim),
                            b.proxy_cpu, f"{key}-cg.log")
                load.wait_for(f"{name} under callgrind", lambda: load.port_open(port), 120)
                # The request head sluice gets, whose routing headers these proxies drop.
                ws, token = load.WORKSPACES, load.PEER_TOKEN
                drive(port, w, ws, token)
                results.append((name, count(p.pid, d / f"cg-{key}.out",
                                            lambda: drive(port, n, ws, token))))
                b.stop(p, load.signal.SIGKILL)

            def nginx(port: int) -> list:
                # One process: callgrind follows no fork.
                conf = d / "nginx-proxy.conf"
                conf.write_text(load.nginx_proxy_conf(d, port, b.up_port).replace(
                    "worker_processes 1;", "worker_processes 1;\nmaster_process off;"))
                return ["nginx", "-c", conf, "-p", d]

            plain("nginx (header-injecting proxy)", "nginx", nginx)
            plain("pingora floor (bare http_proxy)", "floor",
                  lambda port: [args.floor, f"127.0.0.1:{port}", f"127.0.0.1:{b.up_port}",
                                load.HOST, d / "ca.pem", load.CANARY])

            env = dict(os.environ, SLUICE_LOG="info", SLUICE_LOG_FORMAT=args.log_format)

            def sluice(name: str, key: str, store: str, cache_capacity: int) -> None:
                """Count sluice with this store and cache; the rest is the load bench's."""
                s = load.Sluice(load.free_port(), load.free_port(), "a" * 64, "b" * 64)
                conf = d / f"{key}.toml"
                conf.write_text(load.sluice_conf(d, s, b.up_port, store, "", cache_capacity))
                p = b.spawn(callgrind([args.sluice, "run", "--config", conf],
                                      d / f"cg-{key}.out", args.cache_sim),
                            b.proxy_cpu, f"{key}-cg.log", env=env)
                load.wait_for(f"{name} under callgrind", lambda: load.port_open(s.port), 300)
                load.wait_for("sluice's admin API", lambda: load.port_open(s.admin_port), 300)
                load.put_credentials(s, load.WORKSPACES)
                drive(s.port, w, load.WORKSPACES, s.caller_token)
                results.append((name, count(p.pid, d / f"cg-{key}.out",
                                            lambda: drive(s.port, n, load.WORKSPACES,
                                                          s.caller_token))))
                b.stop(p, load.signal.SIGKILL)

            sluice(f"sluice, warm cache ({args.log_format} logs)", "sluice",
                   f'store = "embedded"\npath = "{d}/sluice.redb"', 10_000)
            # The load bench's cold set-up: a cache of one entry, so every request reads and
            # opens its record.
            if args.cold:
                rport = load.free_port()
                b.spawn(["redis-server", "--port", rport, "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no"], b.gen_cpus, "redis.out")
                load.wait_for("redis", lambda: load.port_open(rport))
                sluice("sluice, cold cache on Redis", "sluice-cold",
                       f'store = "redis"\nredis_url = "redis://127.0.0.1:{rport}/"', 1)
            # SIGTERM: nginx's master then stops its workers (SIGKILL would orphan them).
            b.stop(up)
        finally:
            b.stop_all()
    nginx = results[0][1]["Ir"]
    floor = results[1][1]["Ir"]
    print(f"user-space instructions per request ({args.requests} requests, after "
          f"{args.warmup} of warm-up):\n")
    misses = [("I1mr", "I1 misses"), ("D1mr", "D1 read misses"), ("DLmr", "LL read misses")]
    extra = misses if args.cache_sim else []
    print("| proxy | instructions/request | vs nginx | vs floor |"
          + "".join(f" {label}/request |" for _, label in extra))
    print("|---|---:|---:|---:|" + "---:|" * len(extra))
    for name, totals in results:
        total = totals["Ir"]
        per = total / args.requests
        print(f"| {name} | {per:,.0f} | {total / nginx:.2f}× | {total / floor:.2f}× |"
              + "".join(f" {totals.get(e, 0) / args.requests:,.0f} |" for e, _ in extra))


if __name__ == "__main__":
    main()
