#!/usr/bin/env python3
"""Two sluice builds side by side: CPU per request at max load, against the pingora floor.

    python3 benches/ab.py --a OLD/sluice --b NEW/sluice --floor target/production/examples/pingora_floor
    python3 benches/ab.py --a OLD --b NEW --floor FLOOR --cold --rounds 12 --slice 2

On this VM the speed of the machine moves by tens of percent between runs of the load bench,
and by ±0.05 in the ratios it reports (BENCHMARKS.md), so two builds measured in two runs of
`load.py` cannot be told apart by less than that. This loads them in the same run instead,
like `load.py`'s interleaved rounds: the floor and each build's warm set-up (and, with
`--cold`, its cold set-up on its own redis-server) all run at once, pinned to the proxy core
and idle unless loaded, and each round loads every one in turn for `--slice` seconds, the
order rotating and reversed every other block (`load.round_order`). It prints each set-up's
CPU-s/10k over all its slices, its ratio to the floor, and the median of the per-round
ratios. Configs, credentials, the request head and the
placement are `load.py`'s own (it is imported).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402  (the load bench: configs, certificates, process helpers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="sluice binary A (e.g. the last round's)")
    ap.add_argument("--b", required=True, help="sluice binary B (e.g. this change's)")
    ap.add_argument("--floor", required=True, help="pingora floor binary")
    ap.add_argument("--floor-b", help="a second floor build (e.g. built like B) in the same rounds;"
                    " B is also given against it")
    ap.add_argument("--cold", action="store_true",
                    help="also each build's cold set-up (a cache of one entry, on Redis)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--slice", type=int, default=2, help="seconds per set-up per round")
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    load.ensure_tools()
    bench_args = argparse.Namespace(sluice=args.a, floor=args.floor, sluice_log="info",
                                    connections=args.connections, rate=1000, duration=5,
                                    warmup=2, min_wait_ms=None, bare_peer_requests=False)
    with tempfile.TemporaryDirectory(prefix="sluice-ab-") as tmp:
        d = Path(tmp)
        os.chmod(d, 0o755)
        load.make_certs(d)
        b = load.Bench(bench_args, d)
        up = None
        try:
            up, _ = b.start_upstream("ab")
            runs = []
            for name, binary in (("floor", args.floor), ("floor B", args.floor_b)):
                if binary:
                    fp, fport = b.start_floor(binary, name, f"{name.replace(' ', '-')}.out")
                    runs.append((name, fp, f"http://127.0.0.1:{fport}", *b.peer_routing()))
            setups = [("warm", False, 10_000)] + ([("cold", True, 1)] if args.cold else [])
            for tag, binary in (("A", args.a), ("B", args.b)):
                for kind, redis, capacity in setups:
                    bench_args.sluice = binary
                    s, p, _ = b.start_sluice(f"{kind}-{tag}", redis=redis,
                                             cache_capacity=capacity)
                    runs.append((f"{kind} {tag}", p, f"http://127.0.0.1:{s.port}",
                                 load.WORKSPACES, s.caller_token))
            target = f"http://{load.HOST}:{b.up_port}{load.PATH}"
            totals = {name: [0.0, 0] for name, *_ in runs}
            per_round: dict[str, list[float]] = {name: [] for name, *_ in runs}
            for _, _, url, ws, token in runs:
                b.wrk(url, target, ws, token, duration=2, conns=args.connections)
            for i in range(args.rounds):
                for name, p, url, ws, token in load.round_order(runs, i):
                    used, requests = b.max_slice(name, p, url, target, ws, token, args.slice)
                    totals[name][0] += used
                    totals[name][1] += requests
                    per_round[name].append(used / max(requests, 1) * 10_000)
        finally:
            if up is not None:
                b.stop(up, load.signal.SIGQUIT)  # graceful: the master stops its workers
            b.stop_all()
    def table(base: str, names) -> None:
        """CPU-s/10k of each set-up, its ratio to `base` and the median of per-round ratios."""
        b = totals[base][0] / totals[base][1] * 10_000
        print("| set-up | CPU-s/10k @max | to the floor | per-round ratio: median (min–max) |")
        print("|---|---:|---:|---:|")
        for name in names:
            cpu, n = totals[name]
            v = cpu / n * 10_000
            rr = [x / f for x, f in zip(per_round[name], per_round[base])]
            print(f"| {name} | {v:.3f} | {v / b:.2f}× | {statistics.median(rr):.2f}× "
                  f"({min(rr):.2f}–{max(rr):.2f}×) |")

    print(f"A = {args.a}\nB = {args.b}\n" + (f"floor B = {args.floor_b}\n" if args.floor_b else "")
          + f"{args.rounds} rounds of {args.slice}s per set-up\n")
    table("floor", totals)
    if args.floor_b:
        print("\nAgainst floor B:")
        table("floor B", [n for n in totals if n.endswith(" B") and n != "floor B"])

if __name__ == "__main__":
    main()
