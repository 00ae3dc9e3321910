#!/usr/bin/env python3
"""relayd benchmark runner.

    python bench/run.py [--scale quick|full|N] [--only 1,2,...] [--node-relay DIR] [--json FILE]

Starts every server (relayd, the bench/baseline.py floor, the Node original
when a checkout is given) as its own process on 127.0.0.1, drives it with
bench/loadgen.py processes, samples the server from /proc at the load
generator's phase marks, stops it by PID, and prints one table per scenario:
each figure a median over rounds with its [min-max] spread, servers in
rotated order, each ratio taken within a round. See bench/README.md.

The scenarios and their parameters are registered in ``scenarios.SCENARIOS``;
the modules: servers.py (the servers and /proc), measure.py (load processes,
marks, probes, rounds), report.py (the tables), scenarios.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from measure import BACKGROUND, QUIET, log, perf_available
from report import Report
from scenarios import SCENARIOS, Scenario
from servers import PURE_LOOP, PY, RELAYD_BASE_ENV, ROOT, NodeRelay, Server, Variant, configure_relayd

ASYNCIO = (("relayd_env", PURE_LOOP),)
UVLOOP = (("relayd_env", (("RELAYD_SERVER_EVENT_LOOP", "uvloop"),)),)
VARIANTS = {  # relayd/memory and relayd/sqlite: the pure default (asyncio's loop); +uvloop: the fast extra's loop
    "relayd/memory": Variant("relayd/memory", "relayd", "memory", ASYNCIO),
    "relayd/uvloop": Variant("relayd/uvloop", "relayd", "memory", UVLOOP),
    "relayd/sqlite": Variant("relayd/sqlite", "relayd", "sqlite", ASYNCIO),
    "relayd/sqlite+uvloop": Variant("relayd/sqlite+uvloop", "relayd", "sqlite", UVLOOP),
    "baseline": Variant("baseline", "baseline"),
    "node": Variant("node", "node"),
}


def scale_params(sc: Scenario, scale: str) -> dict[str, Any]:
    """quick, full, or a number N: quick's values with the scenario's ``scaled`` keys times N."""
    if scale == "quick":
        return dict(sc.quick)
    if scale == "full":
        return dict(sc.full)
    n = float(scale)
    p = dict(sc.quick)
    for key in sc.scaled:
        v = p[key] * n
        p[key] = max(1, int(v)) if isinstance(p[key], int) else max(0.5, v)
    return p


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it) toward ``want``."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


PROBE_CODE = """
import asyncio, os, shutil, sys, tempfile
from relayd.storage.sqlite.store import SQLiteStore
from relayd.storage import store as S
d = tempfile.mkdtemp()
async def go():
    s = SQLiteStore(os.path.join(d, "probe.db"))
    await asyncio.wait_for(s.open(), 10)
    await asyncio.wait_for(s.close(), 10)
try:
    asyncio.run(go())
finally:
    shutil.rmtree(d, ignore_errors=True)
wanted = set()
for proto in (getattr(S, "Store", None), getattr(S, "MessageStore", None), getattr(S, "KeyStore", None)):
    for klass in getattr(proto, "__mro__", ()):
        if klass.__module__ == S.__name__:
            wanted |= {n for n in vars(klass) if not n.startswith("_")}
print(" ".join(sorted(n for n in wanted if not hasattr(SQLiteStore, n))))
"""


def sqlite_available() -> tuple[bool, str]:
    """Whether relayd's sqlite backend imports and opens (checked in a child process).

    Returns (usable, remark): a backend that opens but lacks methods of the
    Store protocol is still run (its failures show as errors) and the remark
    names what is missing.
    """
    try:
        r = subprocess.run([PY, "-c", PROBE_CODE], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False, "sqlite backend unavailable: probe timed out"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return False, f"sqlite backend unavailable: {last[:300]}"
    missing = r.stdout.strip()
    if missing:
        return True, (f"SQLiteStore lacks {', '.join(missing.split())} of the Store protocol; "
                      "relayd calls them (e.g. mixed-mode auth), so sqlite variants may fail")
    return True, ""


class Ctx:
    """What scenarios share: temp dirs, the servers started (stopped by PID at the end), the choices made."""

    def __init__(self, root: Path, *, sqlite_ok: bool, node: NodeRelay, rounds: int, perf_reason: str,
                 max_procs: int) -> None:
        self.root = root
        self.sqlite_ok = sqlite_ok
        self.node = node
        self.rounds = rounds
        self.perf_reason = perf_reason
        self.perf_ok = not perf_reason
        self.max_procs = max_procs
        self.cores = os.cpu_count() or 1
        self.procs_plan: dict[str, int] = {}
        self.servers: list[Server] = []
        self.problems: list[str] = []
        self._n = 0

    def tmpdir(self, name: str) -> Path:
        self._n += 1
        d = self.root / f"{self._n:03d}-{name}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def available(self, label: str) -> bool:
        if "uvloop" in label and importlib.util.find_spec("uvloop") is None:
            return False
        if label.startswith("relayd/sqlite"):
            return self.sqlite_ok
        if label == "node":
            return self.node.usable
        return True

    def variants(self, labels: list[str], **settings: Any) -> list[Variant]:
        """The variants of ``labels`` that can run here, with scenario settings (e.g. queue_max)."""
        out = []
        for label in labels:
            if self.available(label):
                v = VARIANTS[label]
                items = tuple(sorted((*v.settings, *((k, tuple(sorted(x.items())) if isinstance(x, dict) else x)
                                                    for k, x in settings.items()))))
                out.append(Variant(v.label, v.kind, v.backend, items))
        return out

    def absent(self, labels: list[str]) -> dict[str, str]:
        """What a column prints when its variant cannot run here."""
        return {label: ("not measured" if label == "node" else "n/a") for label in labels
                if not self.available(label)}

    def rounds_text(self) -> str:
        return f"median [min-max] of {self.rounds} round{'s' if self.rounds != 1 else ''}, order rotated"

    def server(self, variant: Variant, *, db_path: Path | None = None, start: bool = True) -> Server:
        """A server of ``variant`` in its own temp dir, started unless ``start`` is False."""
        srv = Server(variant, self.tmpdir(variant.label.replace("/", "-")), node=self.node, db_path=db_path)
        self.servers.append(srv)
        if start:
            srv.start()
        return srv

    def stop_all(self) -> None:
        for srv in self.servers:
            try:
                srv.stop()
            except Exception as exc:
                srv.stop_note = srv.stop_note or f"{srv.label}: stopping failed: {exc}"
            if srv.stop_note and srv.stop_note not in self.problems:
                self.problems.append(srv.stop_note)
        self.servers.clear()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="relayd benchmarks (see bench/README.md)")
    ap.add_argument("--scale", default="quick", help="quick (default), full, or a number N times quick's sizes")
    ap.add_argument("--only", default="", help="comma-separated scenario numbers, e.g. 1,3")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per scenario (default 3); every figure is "
                                                          "the median over them")
    ap.add_argument("--node-relay", metavar="DIR", default=os.environ.get("RELAYDBENCH_NODE_RELAY"),
                    help="a checkout of idena-p2p's relay-server folder (or env RELAYDBENCH_NODE_RELAY)")
    ap.add_argument("--max-loadgen-procs", type=int, default=os.cpu_count() or 1,
                    help="most load processes per run (default: the number of CPUs)")
    ap.add_argument("--json", metavar="FILE", help="also write every raw figure as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, databases)")
    ap.add_argument("--quiet-budget", type=float, metavar="SECONDS",
                    help="longest total wait for other processes to go quiet before loads "
                         "(quick: 60, full: 180; 0: never wait)")
    ap.add_argument("--relayd-env", action="append", default=[], metavar="RELAYD_SECTION_KEY=VALUE",
                    help="extra relayd setting for every relayd started (e.g. RELAYD_AUTH_MODE=open); may repeat")
    args = ap.parse_args(argv)
    if args.scale not in ("quick", "full"):
        try:
            n = float(args.scale)
        except ValueError:
            raise SystemExit(f"--scale must be quick, full or a number, got {args.scale!r}") from None
        if not 0.05 <= n <= 50:
            raise SystemExit("--scale N must be between 0.05 and 50")
    if not 1 <= args.rounds <= 20:
        raise SystemExit("--rounds must be between 1 and 20")
    table = {sc.number: sc for sc in SCENARIOS}
    try:
        only = [int(x) for x in args.only.split(",") if x.strip()] or sorted(table)
    except ValueError:
        raise SystemExit("--only takes scenario numbers like 1,3") from None
    unknown = [n for n in only if n not in table]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {sorted(table)}")
    params = {n: scale_params(table[n], args.scale) for n in only}
    QUIET["budget"] = args.quiet_budget if args.quiet_budget is not None else \
        (180.0 if args.scale == "full" else 60.0)

    conns = max(params.get(2, {}).get("connections", 0), params.get(10, {}).get("connections", 0))
    nofile = raise_nofile(conns + 1024)
    if conns and nofile < conns + 256:
        print(f"warning: RLIMIT_NOFILE is {nofile}; scenarios 2 and 10 need about {conns + 256} "
              "(raise the hard limit: ulimit -Hn)", file=sys.stderr)

    limits_off = configure_relayd(args.relayd_env)
    sqlite_ok, why = sqlite_available()
    node = NodeRelay.prepare(args.node_relay)
    perf_reason = perf_available()
    rep = Report()
    if why:
        rep.problems.append(why)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="relayd-bench-"))
    started = time.monotonic()
    ctx = Ctx(tmp, sqlite_ok=sqlite_ok, node=node, rounds=args.rounds, perf_reason=perf_reason,
              max_procs=max(1, args.max_loadgen_procs))
    try:
        # One start of each server first: it fills the byte-code cache (compiling would otherwise land in
        # the first measured server's CPU and RSS) and shows at once whether each one starts at all.
        for label in VARIANTS:
            if not ctx.available(label):
                continue
            try:
                ctx.server(VARIANTS[label]).stop()
            except Exception as exc:
                rep.problems.append(f"warm-up start of {label} failed: {exc}")
                if label == "node":
                    node.reason = f"it did not start: {str(exc).splitlines()[0]}"
        ctx.stop_all()
        for n in only:
            sc = table[n]
            t0 = time.monotonic()
            log(f"[{time.monotonic() - started:6.1f}s] scenario {n}: {sc.name} ...")
            try:
                sc.run(ctx, rep, params[n])
            except Exception as exc:
                sec = rep.section(f"{n}. {sc.name}", ["relayd"])
                sec.row("FAILED", {"relayd": [type(exc).__name__]}, note=str(exc).splitlines()[0][:100] if str(exc) else "")
                rep.problems.append(f"scenario {n} failed: {exc}\n{traceback.format_exc(limit=3)}")
            finally:
                ctx.stop_all()
            log(f"[{time.monotonic() - started:6.1f}s] scenario {n} done in {time.monotonic() - t0:.1f}s")
    except KeyboardInterrupt:
        rep.problems.append("interrupted")
    finally:
        ctx.stop_all()
        if args.keep:
            log(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rep.problems += ctx.problems
    total = time.monotonic() - started
    print()
    print(f"relayd benchmarks, {time.strftime('%Y-%m-%d %H:%M %Z')}: scale {args.scale}, {os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}, {total:.0f} s. Servers and load generators are separate processes "
          "on 127.0.0.1; CPU = time on CPU of all threads (/proc/PID/task/*/schedstat), RSS = VmRSS.")
    print("Every figure: median [min-max] over the rounds. Ratio columns (relayd's prefix dropped): the first "
          "variant's figure / the second's, taken within each round.")
    print(node.describe())
    for note in node.notes:
        print("  " + note)
    print("send-side syscalls: " + ("perf stat on syscall tracepoints" if ctx.perf_ok
                                    else f"not counted ({perf_reason}); /proc/PID/io syscw only"))
    extra = {k: v for k, v in RELAYD_BASE_ENV.items() if k not in limits_off}
    if extra:
        print("relayd extra settings: " + ", ".join(f"{k}={v}" for k, v in sorted(extra.items())))
    print("relayd limits switched off: " + (", ".join(k[len("RELAYD_LIMITS_"):].lower()
                                                     for k in sorted(limits_off)) or "-"))
    if BACKGROUND:
        print(f"background load (other processes) during the measured windows: mean "
              f"{statistics.mean(BACKGROUND):.2f}, max {max(BACKGROUND):.2f} of {os.cpu_count()} cores. "
              "Rates depend on free CPU; CPU per operation much less.")
    print()
    print(rep.render())
    if rep.problems:
        print("\nproblems:")
        for pr in rep.problems:
            print(" - " + pr.rstrip().replace("\n", "\n   "))
    if args.json:
        Path(args.json).write_text(json.dumps({"scale": args.scale, "params": params, "seconds": total,
                                               "node": node.describe(), "raw": rep.raw, "problems": rep.problems,
                                               "table": rep.table()}, indent=1, default=str))
    return 1 if any(p.startswith("scenario") or p == "interrupted" for p in rep.problems) else 0


if __name__ == "__main__":
    sys.exit(main())
