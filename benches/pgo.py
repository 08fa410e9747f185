#!/usr/bin/env python3
"""Profile-guided optimisation: train instrumented builds on the load bench's traffic.

    python3 benches/pgo.py          # build, train, merge: benches/pgo/sluice.profdata.xz (~25 min)
    python3 benches/pgo.py --train-only --sluice GEN/sluice --floor GEN/pingora_floor --out F
        # either or both of an instrumented sluice and floor, already built

Why: on this bench's VM a warm request ran ~4 % more instructions natively than the pingora
floor's but took 1.26x its user time on the worker thread. callgrind's cache simulation
counts ~5,700 instruction-cache misses per warm request in sluice against ~4,600 in the
floor: sluice's code is spread over more cache lines than the 32 KiB instruction cache
holds. With a profile, LLVM lays each function's hot blocks out together, moves cold ones
out of line and inlines by measured call counts (BENCHMARKS.md, fourteenth round).

This builds sluice and the floor with `-Cprofile-generate` (target/pgo-generate, so the warm
target directory is not rebuilt), then runs each through the load bench's own set-ups
(`load.py`'s configs, certificates, credentials and clients): the warm cache at max load
and unloaded, the cold cache on a real redis-server, the rate-limited connector at a fixed
rate, and intercepted TLS tunnels. Each process exits through its normal shutdown, which
writes its counters; `llvm-profdata merge` (LLVM 19 or newer: Debian's `llvm-19`; older
ones cannot read this rustc's raw profiles) merges them into one profile, committed
xz-compressed. The Dockerfile and `load.py` build with it:

    xz -dc benches/pgo/sluice.profdata.xz > target/sluice.profdata
    RUSTFLAGS="-Cprofile-use=$PWD/target/sluice.profdata" \
        cargo build --profile production --locked --bin sluice

cargo rebuilds when RUSTFLAGS change, not when only the named file does: give a new profile
a new name (`load.py` names it by a hash of its contents) or build in a fresh target
directory (as the Dockerfile does).

A profile matches functions by their symbols and the shape of their code. A function changed
since the profile was trained, a changed dependency (Cargo.lock) or another rustc (its
version is in every crate's symbol hash: the Dockerfile pins the one that trained it) falls
back to the ordinary optimisation, silently: the build stays correct, only slower. So run this
again after changing the request path, the lock file or the toolchain, and commit the profile.
"""

from __future__ import annotations

import argparse
import glob
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # noqa: E402  (the load bench: configs, certificates, process helpers)

ROOT = Path(__file__).resolve().parent.parent
GEN_TARGET = ROOT / "target" / "pgo-generate"


def profdata_tool() -> str:
    """An llvm-profdata that reads the raw profiles of this rustc's LLVM (19 or newer);
    Debian's `llvm-19` is installed when none is found."""
    def find() -> str | None:
        for v in range(30, 18, -1):
            for cand in (f"llvm-profdata-{v}", f"/usr/lib/llvm-{v}/bin/llvm-profdata"):
                if shutil.which(cand):
                    return cand
        return None

    if find() is None and os.geteuid() == 0:
        load.log("installing llvm-19 (llvm-profdata)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "llvm-19"], env=env)
    tool = find()
    if tool is None:
        raise SystemExit("no llvm-profdata 19 or newer: apt-get install llvm-19")
    return tool


def build_instrumented() -> tuple[str, str]:
    """Instrumented sluice and floor, built as `load.py` builds them for use. A fixed path in
    the flags (the runs write where LLVM_PROFILE_FILE says), so the next run reuses
    target/pgo-generate instead of rebuilding it."""
    return load.build_production(GEN_TARGET, f"-Cprofile-generate={GEN_TARGET / 'raw'}")


def train(sluice: str | None, floor: str | None, raw: Path, seconds: int) -> None:
    """Run the builds given through the load bench's traffic; their raw profiles land in
    raw/sluice and raw/floor."""
    args = argparse.Namespace(sluice=sluice, floor=floor, sluice_log="info", connections=32,
                              rate=1000, duration=5, warmup=2, min_wait_ms=None,
                              bare_peer_requests=False, lockstep_pacing=False)
    for sub, binary in (("sluice", sluice), ("floor", floor)):
        if binary:
            (raw / sub).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sluice-pgo-") as tmp:
        d = Path(tmp)
        os.chmod(d, 0o755)
        load.make_certs(d)
        b = load.Bench(args, d)
        try:
            up, _ = b.start_upstream("pgo")
            target = f"http://{load.HOST}:{b.up_port}{load.PATH}"
            if floor:
                train_floor(b, floor, raw, target, seconds)
            if sluice:
                train_sluice(b, raw, target, seconds)
            b.stop(up, load.signal.SIGQUIT)
        finally:
            b.stop_all()
            os.environ.pop("LLVM_PROFILE_FILE", None)


def train_floor(b: load.Bench, floor: str, raw: Path, target: str, seconds: int) -> None:
    os.environ["LLVM_PROFILE_FILE"] = str(raw / "floor" / "%p-%m.profraw")
    fp, fport = b.start_floor(floor, "floor", "floor.out", env=dict(os.environ))
    ws, token = b.peer_routing()
    load.log(f"training the floor: {seconds} s at max load, {seconds // 4} s unloaded")
    b.wrk(f"http://127.0.0.1:{fport}", target, ws, token, duration=seconds, conns=32)
    b.wrk(f"http://127.0.0.1:{fport}", target, ws, token, duration=seconds // 4, conns=1,
          delay_ms=5)
    # SIGINT: pingora's fast shutdown, still through process::exit (which writes the profile);
    # its graceful SIGTERM waits out a 300 s default grace period.
    b.stop(fp, load.signal.SIGINT)
    if fp.returncode != 0:
        raise SystemExit(f"the floor exited {fp.returncode}")


def train_sluice(b: load.Bench, raw: Path, target: str, seconds: int) -> None:
    limited = ("\n[connector.rate_limit]\ncapacity = 1\nper_second = 1000\nmax_wait_ms = 1000\n"
               "queue_size = 64\n")
    os.environ["LLVM_PROFILE_FILE"] = str(raw / "sluice" / "%p-%m.profraw")
    tls_target = f"https://{load.HOST}:{b.up_port}{load.PATH}"
    for scenario, kw, conns, delay in (
            ("warm", {}, 32, 0),
            ("unloaded", {}, 1, 5),
            ("cold", {"redis": True, "cache_capacity": 1}, 32, 0),
            ("limited", {"workspaces": 1, "extra_connector": limited}, 10, 10),
            # HTTPS_PROXY clients: CONNECT, then requests inside intercepted tunnels.
            ("tunnel", {"intercept": True}, 32, 0)):
        load.log(f"training sluice: {scenario}, {seconds} s")
        s, p, redis_proc = b.start_sluice(f"pgo-{scenario}", **kw)
        client = b.tunnel_client if kw.get("intercept") else b.wrk
        st = client(f"http://127.0.0.1:{s.port}", tls_target if kw.get("intercept") else target,
                    kw.get("workspaces", load.WORKSPACES), s.caller_token, duration=seconds,
                    conns=conns, delay_ms=delay, jitter=bool(delay))
        if st["errors"]:
            raise SystemExit(f"errors while training ({scenario}): {st}")
        b.stop(p)  # SIGTERM: sluice drains and exits 0, which writes the profile
        if p.returncode != 0:
            raise SystemExit(f"sluice exited {p.returncode} after {scenario}")
        if redis_proc:
            b.stop(redis_proc)


def merge(raw: Path, dest: Path) -> None:
    """One profile for both builds (their symbols do not overlap: see build_instrumented),
    without the functions that never ran (`--sparse`), xz-compressed: ~0.3 MB instead of
    ~13 MB."""
    files = sorted(glob.glob(str(raw / "*" / "*.profraw")))
    for sub in sorted(p.name for p in raw.iterdir() if p.is_dir()):
        if not glob.glob(str(raw / sub / "*.profraw")):
            raise SystemExit(f"no raw profile was written for {sub}")
    merged = raw / "merged.profdata"
    subprocess.run([profdata_tool(), "merge", "--sparse", "-o", str(merged), *files], check=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(lzma.compress(merged.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
    load.log(f"{dest}: {dest.stat().st_size:,} bytes ({merged.stat().st_size:,} uncompressed) "
             f"from {len(files)} raw profile(s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-only", action="store_true",
                    help="skip the build: train the given instrumented binaries")
    ap.add_argument("--sluice", help="instrumented sluice (with --train-only)")
    ap.add_argument("--floor", help="instrumented pingora floor (with --train-only)")
    ap.add_argument("--seconds", type=int, default=12, help="seconds of load per set-up")
    ap.add_argument("--out", default=str(load.PGO_PROFILE),
                    help="the merged, compressed profile (default: the committed one)")
    args = ap.parse_args()
    load.ensure_tools()
    with tempfile.TemporaryDirectory(prefix="sluice-pgo-raw-") as tmp:
        raw = Path(tmp)
        if args.train_only:
            if not (args.sluice or args.floor):
                raise SystemExit("--train-only needs --sluice, --floor or both")
            sluice, floor = args.sluice, args.floor
        else:
            sluice, floor = build_instrumented()
        train(sluice, floor, raw, args.seconds)
        merge(raw, Path(args.out))


if __name__ == "__main__":
    main()
