"""The benchmark scenarios, and the one table that registers them (``SCENARIOS``, at the end).

A scenario is a function ``(ctx, rep, params)``: it picks its variants
(``ctx.variants``), defines one run (start-to-stop of one fresh server under
one load, returning flat figures), lets ``run_rounds`` repeat that in
rotated order, and adds a section of rows to the report. To add one, write
the function and add a ``Scenario`` line to the table; nothing else changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import sqlite3
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from measure import (LagProbe, PeerProbe, Rounds, SyscallCounter, paired_ratios, run_loadgen, run_rounds, split,
                     summary, wait_for_quiet)
from report import Report, Section
from servers import PURE_LOOP, ROOT, BenchError, RedisProcess, Server, Variant, http_get, http_json, rss_kb

COLD_TARGET_ROWS = 1_000_000
COLD_PER_RECIPIENT = 100
FLUSH_QUEUE_MAX = 20000


def pct(values: list[int], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q / 100 * (len(values) - 1)))))]


def per(numerator: Any, denominator: Any, scale: float = 1.0) -> float | None:
    if not isinstance(numerator, (int, float)) or not isinstance(denominator, (int, float)) or not denominator:
        return None
    return scale * numerator / denominator


def median_ratio(values: dict[str, list[Any]], a: str, b: str) -> float | None:
    rs = paired_ratios(values.get(a, []), values.get(b, []))
    return statistics.median(rs) if rs else None


def target(label: str, ok: Callable[[float], bool], text: str) -> Callable[[dict[str, list[Any]]], str]:
    """A verdict on one column's median: 'target TEXT: PASS|FAIL'."""
    def verdict(values: dict[str, list[Any]]) -> str:
        s = summary(values.get(label, []))
        return f"target {text}: " + ("-" if s is None else "PASS" if ok(s[0]) else "FAIL")
    return verdict


def ratio_target(a: str, b: str, ok: Callable[[float], bool], text: str) -> Callable[[dict[str, list[Any]]], str]:
    """A verdict on the median of the per-round ratios a/b."""
    def verdict(values: dict[str, list[Any]]) -> str:
        r = median_ratio(values, a, b)
        return f"target {text}: " + ("-" if r is None else "PASS" if ok(r) else "FAIL")
    return verdict


def load_rows(sec: Section, rounds: Rounds, window: str | Callable[[dict[str, Any]], str]) -> None:
    """The honesty rows every load scenario prints: CPU shares, load processes, bottleneck, background.

    ``window`` names the measured window, or picks it from a run's figures.
    """
    def w(key: str) -> Callable[[dict[str, Any]], Any]:
        return lambda f: f["_windows"][window(f) if callable(window) else window][key]
    sec.rounds_row("server CPU % (100 = one core)", rounds, w("cpu_pct"), digits=0, ratios=False)
    sec.rounds_row("loadgen CPU %, all processes", rounds, w("lg_cpu_pct"), digits=0, ratios=False)
    sec.rounds_row("loadgen CPU %, busiest process", rounds, w("lg_max_pct"), digits=0, ratios=False,
                   note="near 100: that process saturated a core")
    sec.rounds_row("load processes", rounds, "_procs", digits=0, ratios=False,
                   note="more when one saturated a core and the server did not")
    sec.rounds_row("bottleneck", rounds, w("bottleneck"), ratios=False,
                   note="server / loadgen: >= 85% of a core; machine: all cores busy")
    if any(isinstance(f, dict) and f["_windows"][window(f) if callable(window) else window].get("own_cpu_pct")
           for runs in rounds.runs.values() for f in runs):
        sec.rounds_row("the run's other processes CPU %", rounds, w("own_cpu_pct"), digits=0, ratios=False,
                       note="a second instance, redis-server")
    sec.rounds_row("background load (cores)", rounds, w("background_cores"), digits=2, ratios=False,
                   note="other processes on the machine (not the run's own)")


def share_rows(sec: Section, rounds: Rounds, window: str, prefix: str = "") -> None:
    """Server and load-generator CPU shares in one window (for scenarios without a max-rate phase)."""
    sec.rounds_row(f"{prefix}server CPU %", rounds, lambda f: f["_windows"][window]["cpu_pct"], digits=0,
                   ratios=False, note="100 = one core")
    sec.rounds_row(f"{prefix}loadgen CPU %", rounds, lambda f: f["_windows"][window]["lg_cpu_pct"], digits=0,
                   ratios=False, note="all load processes")


def problem_if(ctx: Any, cond: bool, text: str) -> None:
    if cond:
        ctx.problems.append(text)


# 1. Live routing

def live_phase(ctx: Any, run: Any, phase: str, tag: str) -> tuple[dict[str, Any], list[dict[str, Any]], int, int]:
    """The figures every live-routing phase reports (rate, latency), a problem if any message went missing;
    returns them with the phase's loadgen results, messages received and sent."""
    rs = [r[phase] for r in run.results]
    received, sent = sum(r["received"] for r in rs), sum(r["sent"] for r in rs)
    lat = [x for r in rs for x in r["lat_us"]]
    errors = [r["errors"] for r in rs if r["errors"]]
    problem_if(ctx, errors or received != sent or not all(r["complete"] for r in rs),
               f"{tag}/{phase}: sent {sent}, received {received}, errors {errors}")
    return {f"{phase}_rate": received / max(1e-9, max(r["elapsed_s"] for r in rs)),
            f"{phase}_p50_ms": None if not lat else pct(lat, 50) / 1000,
            f"{phase}_p99_ms": None if not lat else pct(lat, 99) / 1000}, rs, received, sent


def queued_phase(ctx: Any, run: Any, tag: str) -> tuple[dict[str, Any], int]:
    """The figures of an offline-path run (``queued`` per second, CPU per queued message), a problem if a load
    process failed; returns them with the number of messages answered ``queued``."""
    queued = sum(r["acks"].get("queued", 0) for r in run.results)
    errors = [r["errors"] for r in run.results if r["errors"]]
    problem_if(ctx, errors or not all(r["complete"] for r in run.results),
               f"{tag}: errors {errors}, complete {[r['complete'] for r in run.results]}")
    win = run.windows["load"]
    return {"rate": queued / max(1e-9, max(r["elapsed_s"] for r in run.results)),
            "cpu_us": per(win["cpu_s"], queued, 1e6), "_windows": run.windows}, queued


def s1_live(ctx: Any, rep: Report, p: dict[str, Any]) -> None:
    labels = ["relayd/memory", "relayd/uvloop", "baseline", "node"]
    variants = ctx.variants(labels)
    P, W = p["pairs"], p["window"]

    def one(srv: Server, procs: int) -> dict[str, Any]:
        args = [["live", "--pairs", str(n), "--window", str(W), "--count", str(p["count"]),
                 "--warmup", str(p["warmup"]), "--content-bytes", str(p["content_bytes"]),
                 "--max-duration", str(p["max_duration"])] for n in split(P, procs)]
        windows = {"max": ("max_start", "max_end"), "paced": ("paced_start", "paced_end"),
                   "load": ("max_start", "paced_end")}
        probes: list[Any] = []
        if ctx.perf_ok:
            probes.append(SyscallCounter(srv.pid, ["max", "paced"], srv.tmp))
        if srv.kind == "relayd":
            probes.append(LagProbe(srv.port, ["load"]))
        run = run_loadgen(srv, args, 3 * p["max_duration"] + 120, windows=windows, probes=probes, cores=ctx.cores)
        f: dict[str, Any] = {"_windows": run.windows}
        for phase in ("max", "paced"):
            figures, _, received, _ = live_phase(ctx, run, phase, f"1/{srv.label}")
            f.update(figures)
            win = run.windows[phase]
            f[f"{phase}_cpu_us"] = per(win["cpu_s"], received, 1e6)
            f[f"{phase}_syscw"] = per(win["syscw"], received)
            f[f"{phase}_writes"] = per(win.get("syscalls_write"), received)
            f[f"{phase}_syscalls"] = per(win.get("syscalls_all"), received)
        lag = run.windows["load"]
        f["lag_p50_ms"], f["lag_p99_ms"], f["lag_samples"] = lag.get("lag_p50_ms"), lag.get("lag_p99_ms"), \
            lag.get("lag_samples")
        if "lag_error" in lag:
            f["lag_p50_ms"] = f["lag_p99_ms"] = "n/a"
        return f

    rounds = run_rounds(ctx, "1", variants, one, saturation_window="max", max_procs=ctx.max_procs)
    rep.raw["1_live"] = dataclasses.asdict(rounds)
    sec = rep.section(f"1. live routing ({P} pairs x {p['count']:,} messages, {W} in flight per sender, "
                      f"{p['content_bytes']} B content; relayd memory backend; {ctx.rounds_text()})",
                      labels, [("relayd/memory", "baseline"), ("relayd/memory", "node"), ("relayd/uvloop", "node")],
                      ctx.absent(labels))
    sec.rounds_row("routed messages/s at max rate", rounds, "max_rate", note="higher is better")
    sec.rounds_row("server CPU us / routed message, max rate", rounds, "max_cpu_us", note="lower is better")
    sec.rounds_row("server CPU us / routed message, half rate", rounds, "paced_cpu_us", note="lower is better")
    sec.rounds_row("p50 latency at max rate (ms)", rounds, "max_p50_ms", digits=2, note="queueing: in flight / rate")
    sec.rounds_row("p99 latency at max rate (ms)", rounds, "max_p99_ms", digits=2)
    sec.rounds_row("half rate: msg/s (half of each one's max)", rounds, "paced_rate", ratios=False,
                   note="open loop, round-robin over the senders")
    sec.rounds_row("p50 latency at half rate (ms)", rounds, "paced_p50_ms", digits=2)
    sec.rounds_row("p99 latency at half rate (ms)", rounds, "paced_p99_ms", digits=2,
                   verdict=target("relayd/memory", lambda v: v < 50, "relayd < 50 ms"))
    sec.note("relayd/memory runs on asyncio's loop (the pure default), relayd/uvloop on uvloop (the fast extra)")
    if ctx.perf_ok:
        sec.rounds_row("write syscalls / routed message, max rate", rounds, "max_writes", digits=2,
                       note="write+writev+sendto+sendmsg, counted by perf; 2 = one per frame")
        sec.rounds_row("write syscalls / routed message, half rate", rounds, "paced_writes", digits=2)
        sec.rounds_row("all syscalls / routed message, max rate", rounds, "max_syscalls", digits=2)
    sec.rounds_row("syscw / routed message (/proc/PID/io), max rate", rounds, "max_syscw", digits=2,
                   note="write(2) family only: misses send/sendto, which asyncio uses")
    sec.rounds_row("event-loop lag p50 (ms), whole load", rounds, "lag_p50_ms", digits=2, ratios=False,
                   note="relayd_event_loop_lag_seconds: bucket deltas, Prometheus interpolation")
    sec.rounds_row("event-loop lag p99 (ms), whole load", rounds, "lag_p99_ms", digits=2, ratios=False)
    sec.rounds_row("  lag samples in the window", rounds, "lag_samples", digits=0, ratios=False,
                   note="one per housekeeping tick (about 1 s)")
    load_rows(sec, rounds, "max")
    if not ctx.perf_ok:
        sec.note(f"send-side syscalls: perf unavailable ({ctx.perf_reason}); only syscw, which misses sendto")
    discarded_note(sec, rounds)


def discarded_note(sec: Section, rounds: Rounds) -> None:
    for d in rounds.discarded:
        sec.note(f"{d['label']} round {d['round']}: run with {d['procs']} load process(es) discarded "
                 f"({d['reason']}); repeated with more")


# 2. Idle connections

def s2_idle(ctx: Any, rep: Report, p: dict[str, Any]) -> None:
    labels = ["relayd/memory", "relayd/uvloop", "baseline", "node"]
    n = p["connections"]

    def one(srv: Server, procs: int) -> dict[str, Any]:
        run = run_loadgen(srv, [["idle", "--connections", str(n)]], 120 + n / 50,
                          windows={"idle": ("before", "after")}, cores=ctx.cores)
        before, after = run.marks["before"]["rss_kb"], run.marks["after"]["rss_kb"]
        return {"per_conn_kb": (after - before) / n, "before_mib": before / 1024, "after_mib": after / 1024,
                "cpu_us": 1e6 * run.windows["idle"]["cpu_s"] / n, "connects_s": run.results[0]["connects_per_s"],
                "_windows": run.windows}

    rounds = run_rounds(ctx, "2", ctx.variants(labels), one)
    rep.raw["2_idle"] = dataclasses.asdict(rounds)
    sec = rep.section(f"2. idle connections ({n:,} authenticated and idle; relayd memory backend; "
                      f"{ctx.rounds_text()})", labels,
                      [("relayd/memory", "baseline"), ("relayd/memory", "node"), ("relayd/uvloop", "node")],
                      ctx.absent(labels))

    sec.rounds_row("RSS growth per connection (KiB)", rounds, "per_conn_kb", digits=2, note="lower is better",
                   verdict=ratio_target("relayd/memory", "node", lambda r: r <= 1.5, "relayd <= 1.5 x node"))
    sec.rounds_row("RSS before (MiB)", rounds, "before_mib", note="fresh server")
    sec.rounds_row(f"RSS with {n:,} connected (MiB)", rounds, "after_mib")
    sec.rounds_row("server CPU us per connect+auth", rounds, "cpu_us", note="lower is better")
    sec.rounds_row("connects+auth per s", rounds, "connects_s", note="100 handshakes in flight")
    share_rows(sec, rounds, "idle", "while connecting: ")


# 3. Offline path

def s3_offline(ctx: Any, rep: Report, p: dict[str, Any]) -> None:
    labels = ["relayd/sqlite", "relayd/sqlite+uvloop", "relayd/memory", "baseline", "node"]
    variants = ctx.variants(labels, queue_max=10_000_000)

    def one(srv: Server, procs: int) -> dict[str, Any]:
        senders, recipients = split(p["senders"], procs), split(p["recipients"], procs)
        args = [["offline", "--senders", str(s), "--window", str(p["window"]), "--duration", str(p["duration"]),
                 "--count", str(p["count"]), "--recipients", str(r)] for s, r in zip(senders, recipients)]
        run = run_loadgen(srv, args, p["duration"] + 90, windows={"load": ("start", "end")}, cores=ctx.cores)
        return queued_phase(ctx, run, f"3/{srv.label}")[0]

    rounds = run_rounds(ctx, "3", variants, one, saturation_window="load", max_procs=ctx.max_procs)
    rep.raw["3_offline"] = dataclasses.asdict(rounds)
    sec = rep.section(f"3. offline path ({p['senders']} senders x {p['window']} in flight to {p['recipients']:,} "
                      f"distinct offline recipients, {p['duration']:g} s; {ctx.rounds_text()})", labels,
                      [("relayd/sqlite", "relayd/memory"), ("relayd/sqlite", "node"), ("relayd/sqlite+uvloop", "node"),
                       ("relayd/memory", "node")], ctx.absent(labels))
    sec.rounds_row("queued/s", rounds, "rate", note="higher is better",
                   verdict=target("relayd/sqlite", lambda v: v >= 20000, "sqlite >= 20,000/s"))
    sec.rounds_row("server CPU us / queued message", rounds, "cpu_us", note="incl. the SQLite writer thread")
    load_rows(sec, rounds, "load")
    sec.note("sqlite: synchronous = normal (relayd's default); node and baseline keep queues in memory only")
    discarded_note(sec, rounds)


# 4. Reconnect flush

def s4_flush(ctx: Any, rep: Report, p: dict[str, Any]) -> None:
    labels = ["relayd/sqlite", "relayd/sqlite+uvloop", "relayd/memory", "baseline", "node"]
    n = p["messages"]

    def one(srv: Server, procs: int) -> dict[str, Any]:
        run = run_loadgen(srv, [["flush", "--messages", str(n)]], 60 + n / 50,
                          windows={"flush": ("flush_start", "flush_end")}, cores=ctx.cores)
        r = run.results[0]
        f = r["flush"]
        problem_if(ctx, f["received"] != n or f["queued_true"] != n or not f["in_order"] or bool(r["fill"]["errors"]),
                   f"4/{srv.label}: fill {r['fill']}, flush {f}")
        return {"all_s": f["all_s"], "first_ms": 1000 * f["first_s"], "cpu_us": 1e6 * run.windows["flush"]["cpu_s"] / n,
                "fill_rate": n / r["fill"]["s"], "_windows": run.windows}

    rounds = run_rounds(ctx, "4", ctx.variants(labels, queue_max=max(FLUSH_QUEUE_MAX, 2 * n)), one)
    rep.raw["4_flush"] = dataclasses.asdict(rounds)
    sec = rep.section(f"4. reconnect flush (one recipient, {n:,} queued messages from 4 senders x 32 in flight; "
                      f"{ctx.rounds_text()})", labels,
                      [("relayd/sqlite", "node"), ("relayd/sqlite+uvloop", "node"), ("relayd/memory", "baseline"),
                       ("relayd/memory", "node")], ctx.absent(labels))
    sec.rounds_row("time to receive all (s)", rounds, "all_s", digits=3, note="from sending auth; lower is better")
    sec.rounds_row("first message after auth (ms)", rounds, "first_ms", digits=2)
    sec.rounds_row("server CPU us / flushed message", rounds, "cpu_us")
    sec.rounds_row("fill rate (queued/s, one recipient)", rounds, "fill_rate", note="not the offline-path figure")
    share_rows(sec, rounds, "flush", "during the flush: ")
    sec.note("the recipient sends a ping right after auth_success, as a client that listens: relayd holds a plain "
             "session's backlog until then (or a key upload, or [queue] flush_delay_ms)")


# 5. REST

def s5_rest(ctx: Any, rep: Report, p: dict[str, Any]) -> None:
    labels = ["relayd/sqlite", "relayd/sqlite+uvloop", "baseline", "node"]
    phases = {"relayd": ["public-keys", "public-keys:close", "live"], "baseline": ["live"],
              "node": ["public-keys", "public-keys:close"]}

    def one(srv: Server, procs: int) -> dict[str, Any]:
        ph = phases[srv.kind]
        args = [["rest", "--concurrency", str(c), "--duration", str(p["duration"]), "--phases", ",".join(ph)]
                for c in split(p["concurrency"], procs)]
        windows = {x: (f"{x}_start", f"{x}_end") for x in ph}
        run = run_loadgen(srv, args, len(ph) * p["duration"] + 60, windows=windows, cores=ctx.cores)
        f: dict[str, Any] = {"_windows": run.windows}
        for x in ph:
            rs = [r[x] for r in run.results]
            ok, requests = sum(r["ok"] for r in rs), sum(r["requests"] for r in rs)
            conns = sum(r["connections"] for r in rs)
            errors = [r["errors"] for r in rs if r["errors"]]
            problem_if(ctx, bool(errors) or ok != requests,
                       f"5/{srv.label}/{x}: statuses {[r['statuses'] for r in rs]}, errors {errors}")
            f[f"{x}_rate"] = ok / max(1e-9, max(r["elapsed_s"] for r in rs))
            f[f"{x}_per_conn"] = per(requests, conns)
            f[f"{x}_cpu_us"] = per(run.windows[x]["cpu_s"], requests, 1e6)
        f["_main"] = ph[0]
        return f

    rounds = run_rounds(ctx, "5", ctx.variants(labels), one, saturation_window=lambda f: f["_main"],
                        max_procs=ctx.max_procs)
    rep.raw["5_rest"] = dataclasses.asdict(rounds)
    sec = rep.section(f"5. REST ({p['concurrency']} concurrent clients, {p['duration']:g} s per phase; relayd "
                      f"sqlite backend (its default); {ctx.rounds_text()})", labels,
                      [("relayd/sqlite", "node"), ("relayd/sqlite+uvloop", "node"), ("relayd/sqlite", "baseline")],
                      ctx.absent(labels))
    sec.rounds_row("GET /api/public-keys/:a req/s, keep-alive requested", rounds, "public-keys_rate",
                   verdict=target("relayd/sqlite", lambda v: v >= 2000, "relayd >= 2,000"))
    sec.rounds_row("  requests per TCP connection", rounds, "public-keys_per_conn",
                   note="1.0: the server closed after each answer", ratios=False)
    sec.rounds_row("  server CPU us / request", rounds, "public-keys_cpu_us", note="lower is better")
    sec.rounds_row("GET /api/public-keys/:a req/s, Connection: close", rounds, "public-keys:close_rate",
                   note="one request per connection, for context")
    sec.rounds_row("  server CPU us / request", rounds, "public-keys:close_cpu_us")
    sec.rounds_row("GET /health/live req/s, keep-alive requested", rounds, "live_rate",
                   note="the floor of websockets' HTTP path (baseline)")
    sec.rounds_row("  requests per TCP connection", rounds, "live_per_conn", ratios=False)
    sec.rounds_row("  server CPU us / request", rounds, "live_cpu_us")
    load_rows(sec, rounds, lambda f: f["_main"])
    sec.note("baseline has no REST API: only /health/live; node has no /health/live")
    sec.note("load rows: the first phase of each server (key lookups; baseline: /health/live)")
    discarded_note(sec, rounds)


# 6. Cold start

def cold_address(role: int, i: int) -> str:
    return f"0x{role:02x}{i:038x}"


def build_cold_db(path: Path, rows: int) -> dict[str, Any]:
    """Create relayd's schema with SQLiteStore.open(), then bulk-insert ``rows`` queued messages."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from relayd.storage.sqlite.store import SQLiteStore

    async def create() -> None:
        store = SQLiteStore(str(path))
        await asyncio.wait_for(store.open(), 30)
        await asyncio.wait_for(store.close(), 30)

    asyncio.run(create())
    t0 = time.monotonic()
    recipients = max(1, rows // COLD_PER_RECIPIENT)
    now = int(time.time() * 1000)
    content = "c" * 160
    size = len(content.encode("utf-8"))  # ASCII content: characters and UTF-8 bytes agree

    def gen() -> Any:
        for i in range(rows):
            yield (cold_address(0xC1, i % recipients), cold_address(0xC2, i % 1000), f"cold-{i}", content,
                   now - (rows - i), now - (rows - i), size)

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # Bulk-load speed only; relayd sets its own journal mode and pragmas when it opens the file.
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")
        conn.execute("BEGIN IMMEDIATE")
        # relayd's explicit indexes on messages are dropped and re-created from their own SQL after the
        # load (faster than maintaining them row by row); the schema ends up exactly as relayd made it.
        indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                               "AND tbl_name = 'messages' AND sql IS NOT NULL").fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        conn.executemany("INSERT INTO messages (recipient, sender, message_id, content, timestamp, queued_at, size) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)", gen())
        for _, sql in indexes:
            conn.execute(sql)
        conn.execute("INSERT INTO queues (recipient, count, bytes) "
                     "SELECT recipient, COUNT(*), SUM(size) FROM messages GROUP BY recipient")
        conn.execute("COMMIT")
        check = conn.execute("SELECT (SELECT COUNT(*) FROM messages), (SELECT SUM(count) FROM queues), "
                             "(SELECT COUNT(*) FROM queues), (SELECT SUM(bytes) FROM queues), "
                             "(SELECT SUM(size) FROM messages)").fetchone()
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()
    if check[0] != rows or check[1] != rows or check[3] != check[4]:
        raise BenchError(f"cold DB build mismatch: {check}")
    return {"rows": rows, "recipients": check[2], "build_s": round(time.monotonic() - t0, 2),
            "db_mb": round(path.stat().st_size / 2**20, 1)}


def s6_cold(ctx: Any, rep: Report, p: dict[str, Any]) -> None:
    rows, repeats = p["rows"], p["repeats"]
    label = "relayd/sqlite"
    sec = rep.section(f"6. cold start with queued messages (sqlite; {rows:,} rows"
                      + (f", extrapolated to {COLD_TARGET_ROWS:,}" if rows != COLD_TARGET_ROWS else "")
                      + f"; {repeats} starts of each, interleaved)", [label], [], ctx.absent([label]))
    sec.note("baseline and node: no persistence, nothing to measure")
    if not ctx.sqlite_ok:
        sec.row("cold start", {label: []})
        return
    variant = ctx.variants([label])[0]
    tmp = ctx.tmpdir("cold")
    empty_db, full_db = tmp / "empty.db", tmp / "full.db"
    info = build_cold_db(full_db, rows)

    def start_once(db: Path) -> dict[str, float]:
        # Every start opens the same file, as a restarted relay would; the warm-up start
        # below already let relayd do whatever it does on a first open or a clean stop.
        srv = ctx.server(variant, db_path=db, start=False)
        try:
            srv.start(ready_path="/health", timeout=120)
            ready = srv.ready_s
            time.sleep(1.3)  # past the first housekeeping tick (retention expiry runs there)
            if http_get(srv.port, "/health") != 200:
                raise BenchError("relayd /health stopped answering 200 after a cold start")
            if db == full_db:  # relayd reads the built file as its own: counters and total agree
                want = min(rows, COLD_PER_RECIPIENT)
                status, body = http_json(srv.port, f"/api/messages/{cold_address(0xC1, 0)}/queue-size")
                _, health = http_json(srv.port, "/health")
                if status != 200 or (body or {}).get("queueSize") != want \
                        or (health or {}).get("queuedMessages") != rows:
                    raise BenchError(f"relayd does not see the built queue: queue-size {status} {body}, "
                                     f"/health queuedMessages {(health or {}).get('queuedMessages')}")
            rss = rss_kb(srv.pid)
        finally:
            srv.stop()
        return {"ready_s": ready, "rss_mib": rss / 1024}

    # Warm the byte-code cache, the page cache and each file's first open; not counted.
    start_once(empty_db)
    start_once(full_db)
    os.sync()  # no write-back of the freshly built file competes with the measured starts
    wait_for_quiet()
    empty, full = [], []
    for i in range(repeats):  # interleaved and alternating which goes first, so background load hits both alike
        pair = [(empty, empty_db), (full, full_db)]
        for out, db in (pair if i % 2 == 0 else pair[::-1]):
            out.append(start_once(db))
    factor = COLD_TARGET_ROWS / rows
    est = [e["ready_s"] + max(0.0, f["ready_s"] - e["ready_s"]) * factor for e, f in zip(empty, full)]
    rep.raw["6_cold"] = {"db": info, "empty": empty, "full": full, "estimate_1m_s": est}
    sec.row("Popen -> first 200 from /health, empty DB (s)", {label: [x["ready_s"] for x in empty]}, digits=3)
    sec.row(f"Popen -> first 200 from /health, {rows:,} msgs (s)", {label: [x["ready_s"] for x in full]}, digits=3,
            note=f"DB {info['db_mb']} MB, {info['recipients']:,} recipients, built in {info['build_s']} s",
            verdict=target(label, lambda v: v < 3, "< 3 s") if rows == COLD_TARGET_ROWS else None)
    if rows != COLD_TARGET_ROWS:
        sec.row(f"  extrapolated to {COLD_TARGET_ROWS:,} msgs (s)", {label: est}, digits=3,
                note=f"linear (empty + (loaded - empty) x {factor:g}) per pair: an estimate only; "
                     "--scale full measures it")
    sec.row("RSS 1.3 s after ready, empty DB (MiB)", {label: [x["rss_mib"] for x in empty]},
            note="past the first expiry run")
    sec.row(f"RSS 1.3 s after ready, {rows:,} msgs (MiB)", {label: [x["rss_mib"] for x in full]},
            note="should not grow with queue length")


# 7. Acks

ACK_FORMS = (("one", "single-id acks, 1 connection"), ("many", "single-id acks, {conns} connections"),
             ("batch", "acks of up to 1,000 ids, 1 connection"), ("none", "no acks (delivery only, reference)"))


def merged(results: list[dict[str, Any]], form: str) -> dict[str, Any]:
    """One form's result over several load processes: counts summed, elapsed the longest, errors merged."""
    xs = [r[form] for r in results]
    out: dict[str, Any] = {"elapsed_s": max(x["elapsed_s"] for x in xs), "errors": {}, "fill": {}}
    for x in xs:
        for k in ("received", "sent", "redelivered", "stored_delivered"):
            if isinstance(x.get(k), int):
                out[k] = out.get(k, 0) + x[k]
        for k, v in x.get("errors", {}).items():
            out["errors"][k] = out["errors"].get(k, 0) + v
        for k, v in x.get("fill", {}).items():
            out["fill"][k] = out["fill"].get(k, 0) + v
    count = out.get("received", out.get("sent", 0))
    out["rate"] = count / max(1e-9, out["elapsed_s"])
    out.setdefault("redelivered", None)
    return out


def s7_acks(ctx: Any, rep: Report, p: dict[str, Any]) -> None:
    labels = ["relayd/sqlite", "relayd/memory", "baseline", "node"]
    n, conns = p["messages"], p["conns"]
    forms = [f for f, _ in ACK_FORMS]

    def one(srv: Server, procs: int) -> dict[str, Any]:
        wait = 60 + n / 20  # each wait allows down to 20 acks/s
        common = ["--timeout", str(wait)]
        single = [f for f in forms if f != "many"]  # one connection each: one load process
        run = run_loadgen(srv, [["acks", "--forms", ",".join(single), "--messages", str(n), *common]], 4 * wait,
                          windows={f: (f"{f}_start", f"{f}_end") for f in single}, cores=ctx.cores)
        # Many recipients in parallel: spread over the load processes, each its own share of both.
        many = run_loadgen(srv, [["acks", "--forms", "many", "--messages", str(m), "--conns", str(k), "--warmup", "0",
                                  *common] for m, k in zip(split(n, procs), split(conns, procs))], 2 * wait,
                           windows={"many": ("many_start", "many_end")}, cores=ctx.cores)
        out: dict[str, Any] = {"_windows": {**run.windows, **many.windows}}
        for f in forms:
            x = merged(many.results if f == "many" else run.results, f)
            problem_if(ctx, x["received"] != n or bool(x["errors"]) or x["fill"].get("queued") != n,
                       f"7/{srv.label}/{f}: fill {x['fill']}, received {x['received']} of {n}, errors {x['errors']}")
            out[f"{f}_rate"] = x["rate"]
            out[f"{f}_cpu_us"] = per(out["_windows"][f]["cpu_s"], n, 1e6)
            out[f"{f}_redelivered"] = x["redelivered"]
        for f in forms:
            if f != "none":
                out[f"{f}_ack_us"] = None if out["none_cpu_us"] is None or out[f"{f}_cpu_us"] is None \
                    else out[f"{f}_cpu_us"] - out["none_cpu_us"]
        return out

    rounds = run_rounds(ctx, "7", ctx.variants(labels, queue_max=max(1000, 2 * n)), one, saturation_window="many",
                        max_procs=ctx.max_procs)
    rep.raw["7_acks"] = dataclasses.asdict(rounds)
    sec = rep.section(f"7. acks (ack-mode recipients, {n:,} stored messages per form, each acked as it arrives; "
                      f"{ctx.rounds_text()})", labels,
                      [("relayd/sqlite", "relayd/memory"), ("relayd/memory", "baseline")], ctx.absent(labels))
    for f, text in ACK_FORMS:
        text = text.format(conns=conns)
        if f == "none":
            sec.rounds_row(f"{text}: messages/s", rounds, "none_rate", note="auth to pong after the last message")
            sec.rounds_row("  server CPU us / message", rounds, "none_cpu_us")
            share_rows(sec, rounds, f, "  ")
            continue
        sec.rounds_row(f"{text}: acks/s", rounds, f"{f}_rate", note="auth to the pong after the last ack")
        sec.rounds_row("  server CPU us / acked message", rounds, f"{f}_cpu_us", note="delivery + ack")
        sec.rounds_row("  of which the ack (us)", rounds, f"{f}_ack_us", ratios=False,
                       note="minus the delivery-only run of the same round")
        sec.rounds_row("  re-delivered on an immediate reconnect", rounds, f"{f}_redelivered", digits=0,
                       ratios=False, note="should be 0")
        share_rows(sec, rounds, f, "  ")
        if f == "many":
            sec.rounds_row("  load processes", rounds, "_procs", digits=0, ratios=False)
    sec.note("node has no ack extension: it ignores \"ack\": true, deletes each queue as it sends it and "
             "answers nothing to ack frames (it logs a warning for each): its figures are delivery plus ignoring "
             "a frame, with no at-least-once delivery behind them")
    sec.note("baseline: ack-mode messages stay in a dict until an ack names them (no store)")
    sec.note("one connection cannot be spread over load processes: where its loadgen CPU nears 100 the "
             "1-connection figures are a floor; the many-connection form gets more load processes then")
    discarded_note(sec, rounds)


# 8. Read receipts

def s8_receipts(ctx: Any, rep: Report, p: dict[str, Any]) -> None:
    labels = ["relayd/sqlite", "relayd/memory", "baseline", "node"]
    n, conns = p["receipts"], p["conns"]

    def one(srv: Server, procs: int) -> dict[str, Any]:
        wait = 60 + n / 20  # each wait allows down to 20 receipts/s
        run = run_loadgen(srv, [["receipts", "--forms", "one", "--receipts", str(n), "--timeout", str(wait)]],
                          2 * wait, windows={"one": ("one_start", "one_end")}, cores=ctx.cores)
        # Many readers in parallel: spread over the load processes (each to its own offline address).
        many = run_loadgen(srv, [["receipts", "--forms", "many", "--receipts", str(m), "--conns", str(k),
                                  "--warmup", "0", "--timeout", str(wait)]
                                 for m, k in zip(split(n, procs), split(conns, procs))],
                           2 * wait, windows={"many": ("many_start", "many_end")}, cores=ctx.cores)
        out: dict[str, Any] = {"_windows": {**run.windows, **many.windows}}
        for f in ("one", "many"):
            x = merged(many.results if f == "many" else run.results, f)
            problem_if(ctx, bool(x["errors"]) or x["sent"] != n, f"8/{srv.label}/{f}: sent {x['sent']} of {n}, "
                                                                  f"errors {x['errors']}")
            out[f"{f}_rate"] = x["rate"]
            out[f"{f}_cpu_us"] = per(out["_windows"][f]["cpu_s"], x["sent"], 1e6)
            out[f"{f}_stored"] = x["stored_delivered"]
        return out

    rounds = run_rounds(ctx, "8", ctx.variants(labels), one, saturation_window="many", max_procs=ctx.max_procs)
    rep.raw["8_receipts"] = dataclasses.asdict(rounds)
    sec = rep.section(f"8. read receipts to an offline recipient ({n:,} single-receipt frames per form; "
                      f"{ctx.rounds_text()})", labels,
                      [("relayd/sqlite", "relayd/memory"), ("relayd/memory", "baseline"), ("relayd/sqlite", "node")],
                      ctx.absent(labels))
    for f, text in (("one", "1 connection"), ("many", f"{conns} connections")):
        sec.rounds_row(f"{text}: receipts/s", rounds, f"{f}_rate", note="first frame to the last pong")
        sec.rounds_row("  server CPU us / receipt", rounds, f"{f}_cpu_us")
        sec.rounds_row(f"  delivered when the recipient connects (of {n:,})", rounds, f"{f}_stored", digits=0,
                       ratios=False, note="stored receipts")
        share_rows(sec, rounds, f, "  ")
        if f == "many":
            sec.rounds_row("  load processes", rounds, "_procs", digits=0, ratios=False,
                           note="each with its own readers and offline address")
    sec.note("node drops receipts for offline recipients (its figures are the cost of dropping them)")
    sec.note("one connection cannot be spread over load processes: where its loadgen CPU nears 100 the "
             "1-connection figures are a floor; the many-connection form gets more load processes then")
    discarded_note(sec, rounds)


# 9. Several instances on one Redis

def s9_redis(ctx: Any, rep: Report, p: dict[str, Any]) -> None:
    """Live routing across two relayd instances on one Redis against the same load on one instance, and the
    queued path on Redis against SQLite. Redis is a redis-server of the run's own (no persistence, FLUSHALL
    before each run); CPU per message counts every relayd instance, Redis's CPU is reported apart."""
    missing = RedisProcess.missing()
    if missing:
        rep.problems.append(f"9: not measured ({missing})")
        return
    redis = RedisProcess(ctx.tmpdir("redis")).start()
    try:
        _s9_live(ctx, rep, p, redis)
        _s9_queued(ctx, rep, p, redis)
        _s9_sign_ins(ctx, rep, p, redis)
    finally:
        redis.stop()


def _s9_variant(label: str, redis: RedisProcess, **settings: Any) -> Variant:
    env = (("RELAYD_REDIS_URL", redis.url), ("RELAYD_REDIS_KEY_PREFIX", "bench:"), *PURE_LOOP)
    return Variant(label, "relayd", "redis", tuple(sorted({"relayd_env": env, **settings}.items())))


def _redis_rows(sec: Section, rounds: Rounds, label: str, key: str, per_what: str, verdict: Any = None) -> None:
    sec.rounds_row(f"{label}Redis round trips / {per_what}", rounds, f"{key}redis_calls", digits=2, verdict=verdict,
                   note="EVALSHA + EVAL + SPUBLISH + PUBLISH counted by redis-server; pipelined ones each count")
    sec.rounds_row(f"{label}Redis CPU us / {per_what}", rounds, f"{key}redis_cpu_us", digits=1,
                   note="used_cpu_sys + used_cpu_user")
    sec.rounds_row(f"{label}Redis bytes in+out / {per_what}", rounds, f"{key}redis_bytes", digits=0)


def _redis_figures(win: dict[str, Any], count: int) -> dict[str, Any]:
    return {"redis_calls": per(win.get("redis_calls"), count), "redis_cpu_us": per(win.get("redis_cpu_s"), count, 1e6),
            "redis_bytes": per(win.get("redis_net_bytes"), count), "redis_commands": win.get("redis_calls_by_command")}


def _s9_live(ctx: Any, rep: Report, p: dict[str, Any], redis: RedisProcess) -> None:
    one_label, two_label = "one instance", "two instances"
    variants = [_s9_variant(one_label, redis), _s9_variant(two_label, redis)]
    P, W = p["pairs"], p["window"]

    def one(srv: Server, procs: int) -> dict[str, Any]:
        redis.flush()
        peer = ctx.server(srv.variant) if srv.label == two_label else None
        try:
            extra = ["--receiver-port", str(peer.port)] if peer is not None else []
            args = [["live", "--pairs", str(n), "--window", str(W), "--count", str(p["count"]),
                     "--warmup", str(p["warmup"]), "--content-bytes", str(p["content_bytes"]),
                     "--max-duration", str(p["max_duration"]), *extra] for n in split(P, procs)]
            probe = PeerProbe({"peer": peer.pid} if peer is not None else {}, redis, ["max", "paced"])
            run = run_loadgen(srv, args, 3 * p["max_duration"] + 120,
                              windows={"max": ("max_start", "max_end"), "paced": ("paced_start", "paced_end")},
                              probes=[probe], cores=ctx.cores)
        finally:
            if peer is not None:
                peer.stop()
        f: dict[str, Any] = {"_windows": run.windows}
        for phase in ("max", "paced"):
            figures, rs, received, sent = live_phase(ctx, run, phase, f"9/{srv.label}")
            f.update(figures)
            win = run.windows[phase]
            mine, theirs = win["cpu_s"], win.get("peer_cpu_s", 0.0)
            f[f"{phase}_cpu_us"] = per(mine + theirs, received, 1e6)
            f[f"{phase}_cpu_sender_us"] = per(mine, received, 1e6)
            f[f"{phase}_cpu_receiver_us"] = per(theirs, received, 1e6) if peer is not None else None
            f.update({f"{phase}_{k}": v for k, v in _redis_figures(win, received).items()})
            f[f"{phase}_delivered"] = per(sum(r["acks"].get("delivered", 0) for r in rs), sent)
        return f

    rounds = run_rounds(ctx, "9a", variants, one, saturation_window="max", max_procs=ctx.max_procs)
    rep.raw["9_live"] = dataclasses.asdict(rounds)
    labels = [one_label, two_label]
    sec = rep.section(f"9a. live routing on Redis: senders on one relayd instance, receivers on the same one or on a "
                      f"second one ({P} pairs x {p['count']:,} messages, {W} in flight per sender, "
                      f"{p['content_bytes']} B; one redis-server; {ctx.rounds_text()})",
                      labels, [(two_label, one_label)])
    sec.rounds_row("routed messages/s at max rate", rounds, "max_rate", note="higher is better")
    sec.rounds_row("relayd CPU us / message, max rate (all instances)", rounds, "max_cpu_us",
                   verdict=ratio_target(two_label, one_label, lambda r: r <= 2.0, "two instances <= 2 x one"))
    sec.rounds_row("  of which the sender's instance", rounds, "max_cpu_sender_us", ratios=False)
    sec.rounds_row("  of which the receiver's instance", rounds, "max_cpu_receiver_us", ratios=False)
    sec.rounds_row("relayd CPU us / message, half rate (all instances)", rounds, "paced_cpu_us",
                   verdict=ratio_target(two_label, one_label, lambda r: r <= 2.0, "two instances <= 2 x one"))
    sec.rounds_row("p50 latency at max rate (ms)", rounds, "max_p50_ms", digits=2)
    sec.rounds_row("p99 latency at max rate (ms)", rounds, "max_p99_ms", digits=2)
    sec.rounds_row("p50 latency at half rate (ms)", rounds, "paced_p50_ms", digits=2)
    sec.rounds_row("p99 latency at half rate (ms)", rounds, "paced_p99_ms", digits=2)
    _redis_rows(sec, rounds, "max rate: ", "max_", "message",
                verdict=target(two_label, lambda v: v <= 2.0, "two instances <= 2 per live message"))
    _redis_rows(sec, rounds, "half rate: ", "paced_", "message")
    sec.rounds_row("answered delivered (share)", rounds, "max_delivered", digits=3, ratios=False)
    load_rows(sec, rounds, "max")
    sec.note("one instance on Redis routes live messages in memory (Redis sees only heartbeats and probes); "
             "across instances each message is one SPUBLISH to the receiver's instance and one back")
    discarded_note(sec, rounds)


def _s9_queued(ctx: Any, rep: Report, p: dict[str, Any], redis: RedisProcess) -> None:
    labels = ["relayd/redis", "relayd/sqlite"]
    variants = [_s9_variant("relayd/redis", redis, queue_max=10_000_000)]
    variants += [v for v in ctx.variants(["relayd/sqlite"], queue_max=10_000_000)]

    def one(srv: Server, procs: int) -> dict[str, Any]:
        if srv.variant.backend == "redis":
            redis.flush()
        senders, recipients = split(p["senders"], procs), split(p["recipients"], procs)
        args = [["offline", "--senders", str(s), "--window", str(p["window"]), "--duration", str(p["duration"]),
                 "--count", str(p["queued_count"]), "--recipients", str(r)] for s, r in zip(senders, recipients)]
        probe = PeerProbe({}, redis if srv.variant.backend == "redis" else None, ["load"])
        run = run_loadgen(srv, args, p["duration"] + 90, windows={"load": ("start", "end")}, probes=[probe],
                          cores=ctx.cores)
        figures, queued = queued_phase(ctx, run, f"9b/{srv.label}")
        return {**figures, **_redis_figures(run.windows["load"], queued)}

    rounds = run_rounds(ctx, "9b", variants, one, saturation_window="load", max_procs=ctx.max_procs)
    rep.raw["9_queued"] = dataclasses.asdict(rounds)
    sec = rep.section(f"9b. queued path on Redis and on SQLite ({p['senders']} senders x {p['window']} in flight to "
                      f"{p['recipients']:,} distinct offline recipients, {p['duration']:g} s; {ctx.rounds_text()})",
                      labels, [("relayd/redis", "relayd/sqlite")], ctx.absent(labels))
    sec.rounds_row("queued/s", rounds, "rate", note="higher is better")
    sec.rounds_row("relayd CPU us / queued message", rounds, "cpu_us", note="sqlite: incl. its writer thread")
    _redis_rows(sec, rounds, "", "", "queued message",
                verdict=target("relayd/redis", lambda v: v <= 3.0, "<= 3 per queued message"))
    load_rows(sec, rounds, "load")
    sec.note("new-queue budgets are off here (the runner switches every limit off): with them, the first message "
             "to a recipient within the hour also costs one round trip for both budgets together")
    discarded_note(sec, rounds)


def _s9_sign_ins(ctx: Any, rep: Report, p: dict[str, Any], redis: RedisProcess) -> None:
    """What a session costs on Redis: connect + auth (the presence write, the backlog read) and an idle
    connection's memory, against the memory backend (no Redis at all)."""
    labels = ["relayd/redis", "relayd/memory"]
    variants = [_s9_variant("relayd/redis", redis), *ctx.variants(["relayd/memory"])]
    n = p["connections"]

    def one(srv: Server, procs: int) -> dict[str, Any]:
        on_redis = srv.variant.backend == "redis"
        if on_redis:
            redis.flush()
        probe = PeerProbe({}, redis if on_redis else None, ["idle"])
        run = run_loadgen(srv, [["idle", "--connections", str(n)]], 120 + n / 50,
                          windows={"idle": ("before", "after")}, probes=[probe], cores=ctx.cores)
        win = run.windows["idle"]
        before, after = run.marks["before"]["rss_kb"], run.marks["after"]["rss_kb"]
        commands = win.get("redis_calls_by_command") or {}
        return {"cpu_us": per(win["cpu_s"], n, 1e6), "per_conn_kb": (after - before) / n,
                "connects_s": run.results[0]["connects_per_s"], "_windows": run.windows,
                "redis_calls": per(win.get("redis_calls"), n), "redis_reads": per(sum(
                    v for k, v in commands.items() if k in ("hget", "zcard")), n) if on_redis else None,
                "redis_cpu_us": per(win.get("redis_cpu_s"), n, 1e6), "redis_bytes": per(win.get("redis_net_bytes"), n)}

    rounds = run_rounds(ctx, "9c", variants, one)
    rep.raw["9_sign_ins"] = dataclasses.asdict(rounds)
    sec = rep.section(f"9c. sessions on Redis: {n:,} connections that sign in (unsigned) and stay idle, 100 "
                      f"handshakes in flight; {ctx.rounds_text()}", labels, [("relayd/redis", "relayd/memory")])
    sec.rounds_row("server CPU us per connect+auth", rounds, "cpu_us", note="lower is better")
    sec.rounds_row("connects+auth per s", rounds, "connects_s")
    sec.rounds_row("RSS growth per connection (KiB)", rounds, "per_conn_kb", digits=2)
    _redis_rows(sec, rounds, "", "", "sign-in")
    sec.rounds_row("  Redis reads / sign-in (HGET + ZCARD: the backlog size)", rounds, "redis_reads", digits=2,
                   ratios=False, note="a script's own reads count here too")
    share_rows(sec, rounds, "idle", "while connecting: ")


# 10. PostgreSQL

class PgCpuProbe:
    """A PostgreSQL server's CPU per window: the postmaster and every process it started (its connections'
    backends live as long as relayd's pooled connections, so none of their CPU is lost to an exit)."""

    def __init__(self, postmaster: int, windows: list[str]) -> None:
        self.postmaster = postmaster
        self.windows = windows
        self.before: dict[str, float] = {}
        self.result: dict[str, dict[str, Any]] = {}

    def _cpu(self) -> float:
        total = 0.0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(entry) == self.postmaster or int(fields[1]) == self.postmaster:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def start(self, window: str) -> None:
        if window in self.windows:
            self.before[window] = self._cpu()

    def stop(self, window: str) -> None:
        if window in self.before:
            self.result[window] = {"pg_cpu_s": self._cpu() - self.before[window]}

    def finish(self) -> dict[str, dict[str, Any]]:
        return self.result


def s10_postgres(ctx: Any, rep: Report, p: dict[str, Any]) -> None:
    """The queued path on PostgreSQL against SQLite and Redis, in the same run and under the same load: queued
    per second, relayd CPU per queued message, and the database server's own CPU per queued message (PostgreSQL:
    a server of the run's own, fsync on, started as in the tests; Redis: no persistence)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pg_support import PgServer, pg_bindir
    missing = "" if pg_bindir() is not None else "PostgreSQL server binaries are not installed (Debian: postgresql)"
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        missing = missing or "relayd's PostgreSQL extra is not installed (pip install -e '.[postgres]')"
    if missing:
        rep.problems.append(f"10: not measured ({missing})")
        return
    pg = PgServer(fsync=True)
    redis = None if RedisProcess.missing() else RedisProcess(ctx.tmpdir("redis")).start()
    try:
        _s10_queued(ctx, rep, p, pg, redis)
        _s10_live(ctx, rep, p, pg, redis)
    finally:
        pg.destroy()
        if redis is not None:
            redis.stop()


def _s10_queued(ctx: Any, rep: Report, p: dict[str, Any], pg: Any, redis: RedisProcess | None) -> None:
    labels = ["relayd/postgres", "relayd/sqlite", "relayd/redis"]
    pg_env = (("RELAYD_POSTGRES_URL", pg.url), *PURE_LOOP)
    variants = [Variant("relayd/postgres", "relayd", "postgres",
                        tuple(sorted({"relayd_env": pg_env, "queue_max": 10_000_000}.items())))]
    variants += ctx.variants(["relayd/sqlite"], queue_max=10_000_000)
    if redis is not None:
        variants.append(_s9_variant("relayd/redis", redis, queue_max=10_000_000))

    def one(srv: Server, procs: int) -> dict[str, Any]:
        backend = srv.variant.backend
        if backend == "postgres":
            pg.psql("TRUNCATE messages, queues, delivered, receipts")
        elif backend == "redis" and redis is not None:
            redis.flush()
        senders, recipients = split(p["senders"], procs), split(p["recipients"], procs)
        args = [["offline", "--senders", str(s), "--window", str(p["window"]), "--duration", str(p["duration"]),
                 "--count", str(p["queued_count"]), "--recipients", str(r)] for s, r in zip(senders, recipients)]
        probes: list[Any] = [PeerProbe({}, redis if backend == "redis" else None, ["load"])]
        if backend == "postgres":
            probes.append(PgCpuProbe(pg.proc.pid, ["load"]))
        run = run_loadgen(srv, args, p["duration"] + 90, windows={"load": ("start", "end")}, probes=probes,
                          cores=ctx.cores)
        figures, queued = queued_phase(ctx, run, f"10/{srv.label}")
        win = run.windows["load"]
        db_cpu = win.get("pg_cpu_s") if backend == "postgres" else win.get("redis_cpu_s")
        return {**figures, "db_cpu_us": per(db_cpu, queued, 1e6)}

    rounds = run_rounds(ctx, "10", variants, one, saturation_window="load", max_procs=ctx.max_procs)
    rep.raw["10_queued"] = dataclasses.asdict(rounds)
    absent = ctx.absent(labels)
    if redis is None:
        absent["relayd/redis"] = "n/a"
    sec = rep.section(f"10. queued path on PostgreSQL, SQLite and Redis ({p['senders']} senders x {p['window']} in "
                      f"flight to {p['recipients']:,} distinct offline recipients, {p['duration']:g} s; one instance "
                      f"each; {ctx.rounds_text()})", labels,
                      [("relayd/postgres", "relayd/sqlite"), ("relayd/postgres", "relayd/redis")], absent)
    sec.rounds_row("queued/s", rounds, "rate", note="higher is better")
    sec.rounds_row("relayd CPU us / queued message", rounds, "cpu_us", note="sqlite: incl. its writer thread")
    sec.rounds_row("database server CPU us / queued message", rounds, "db_cpu_us",
                   note="PostgreSQL: the postmaster and its backends; Redis: redis-server; SQLite: in relayd")
    load_rows(sec, rounds, "load")
    sec.note("PostgreSQL with fsync on and synchronous_commit on (each batch of messages one committed call of "
             "relayd_enqueue_many); SQLite with synchronous = normal and group commit; Redis without persistence. "
             "Cross-instance routing: 10b")
    discarded_note(sec, rounds)


def _s10_live(ctx: Any, rep: Report, p: dict[str, Any], pg: Any, redis: RedisProcess | None) -> None:
    """Live routing across two instances on PostgreSQL alone ([postgres] cluster = true) against two on Redis:
    senders on one instance, receivers on the other; CPU per message of both instances and of the server."""
    pg_label, redis_label = "two on postgres", "two on redis"
    pg_env = (("RELAYD_POSTGRES_URL", pg.url), ("RELAYD_POSTGRES_CLUSTER", "true"), *PURE_LOOP)
    variants = [Variant(pg_label, "relayd", "postgres", tuple(sorted({"relayd_env": pg_env}.items())))]
    if redis is not None:
        variants.append(_s9_variant(redis_label, redis))
    P, W = p["pairs"], p["window"]

    def one(srv: Server, procs: int) -> dict[str, Any]:
        backend = srv.variant.backend
        if backend == "redis" and redis is not None:
            redis.flush()
        peer = ctx.server(srv.variant)
        try:
            args = [["live", "--pairs", str(n), "--window", str(W), "--count", str(p["count"]),
                     "--warmup", str(p["warmup"]), "--content-bytes", str(p["content_bytes"]),
                     "--max-duration", str(p["max_duration"]), "--receiver-port", str(peer.port)]
                    for n in split(P, procs)]
            probes: list[Any] = [PeerProbe({"peer": peer.pid}, redis if backend == "redis" else None, ["max"])]
            if backend == "postgres":
                probes.append(PgCpuProbe(pg.proc.pid, ["max"]))
            run = run_loadgen(srv, args, 3 * p["max_duration"] + 120, windows={"max": ("max_start", "max_end")},
                              probes=probes, cores=ctx.cores)
        finally:
            peer.stop()
        figures, rs, received, sent = live_phase(ctx, run, "max", f"10b/{srv.label}")
        win = run.windows["max"]
        db_cpu = win.get("pg_cpu_s") if backend == "postgres" else win.get("redis_cpu_s")
        return {**figures, "_windows": run.windows,
                "cpu_us": per(win["cpu_s"] + win.get("peer_cpu_s", 0.0), received, 1e6),
                "cpu_sender_us": per(win["cpu_s"], received, 1e6),
                "cpu_receiver_us": per(win.get("peer_cpu_s", 0.0), received, 1e6),
                "db_cpu_us": per(db_cpu, received, 1e6),
                "delivered": per(sum(r["acks"].get("delivered", 0) for r in rs), sent)}

    rounds = run_rounds(ctx, "10b", variants, one, saturation_window="max", max_procs=ctx.max_procs)
    rep.raw["10_live"] = dataclasses.asdict(rounds)
    labels = [pg_label, redis_label]
    absent = {} if redis is not None else {redis_label: "n/a"}
    sec = rep.section(f"10b. live routing across two instances on PostgreSQL alone and on Redis ({P} pairs x "
                      f"{p['count']:,} messages, {W} in flight per sender, {p['content_bytes']} B; senders on one "
                      f"instance, receivers on the other; {ctx.rounds_text()})", labels, [(pg_label, redis_label)],
                      absent)
    sec.rounds_row("routed messages/s at max rate", rounds, "max_rate", note="higher is better")
    sec.rounds_row("relayd CPU us / message (both instances)", rounds, "cpu_us")
    sec.rounds_row("  of which the sender's instance", rounds, "cpu_sender_us", ratios=False)
    sec.rounds_row("  of which the receiver's instance", rounds, "cpu_receiver_us", ratios=False)
    sec.rounds_row("database server CPU us / message", rounds, "db_cpu_us",
                   note="PostgreSQL: the postmaster and its backends; Redis: redis-server")
    sec.rounds_row("p50 latency at max rate (ms)", rounds, "max_p50_ms", digits=2)
    sec.rounds_row("p99 latency at max rate (ms)", rounds, "max_p99_ms", digits=2)
    sec.rounds_row("answered delivered (share)", rounds, "delivered", digits=3, ratios=False)
    load_rows(sec, rounds, "max")
    sec.note("across instances each message is one notice to the receiver's instance and one back: SPUBLISH on "
             "Redis, pg_notify on PostgreSQL (batched per round trip on a connection of its own)")
    discarded_note(sec, rounds)


# The table

@dataclasses.dataclass(frozen=True)
class Scenario:
    """A registered scenario: its number and name, its function, and its parameters per scale.

    ``scaled`` names the parameters multiplied by N for ``--scale N`` (quick's values times N).
    """

    number: int
    name: str
    run: Callable[[Any, Report, dict[str, Any]], None]
    quick: dict[str, Any]
    full: dict[str, Any]
    scaled: tuple[str, ...] = ()


# 10. Many connections

def gc_pauses(port: int) -> dict[str, float]:
    """relayd's full garbage-collector passes so far, from its /metrics: how many, their total length, and the
    upper bound of the bucket of the longest (ms)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    buckets: list[tuple[float, float]] = []
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("relayd_gc_full_pause_seconds_bucket"):
            bound = name.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((math.inf if bound == "+Inf" else float(bound), float(value)))
        elif name in ("relayd_gc_full_pause_seconds_count", "relayd_gc_full_pause_seconds_sum"):
            found[name.rsplit("_", 1)[1]] = float(value)
    count = found.get("count", 0.0)
    longest = next((bound for bound, n in sorted(buckets) if n >= count), math.inf) if count else 0.0
    return {"gc_full_passes": count, "gc_full_ms": found.get("sum", 0.0) * 1000, "gc_longest_ms": longest * 1000}


def s10_crowd(ctx: Any, rep: Report, p: dict[str, Any]) -> None:
    labels = ["relayd/memory", "relayd/uvloop", "node"]
    n, P, W = p["connections"], p["pairs"], p["window"]

    def one(srv: Server, procs: int) -> dict[str, Any]:
        args = [["live", "--crowd", str(n), "--pairs", str(P), "--window", str(W), "--count", str(p["count"]),
                 "--warmup", str(p["warmup"]), "--content-bytes", str(p["content_bytes"]),
                 "--max-duration", str(p["max_duration"])]]
        windows = {"crowd": ("crowd_start", "crowd_ready"), "max": ("max_start", "max_end"),
                   "paced": ("paced_start", "paced_end")}
        run = run_loadgen(srv, args, 3 * p["max_duration"] + 240 + n / 50, windows=windows, cores=ctx.cores)
        before, after = run.marks["crowd_start"]["rss_kb"], run.marks["crowd_ready"]["rss_kb"]
        f: dict[str, Any] = {"per_conn_kb": (after - before) / n, "crowd_mib": after / 1024,
                             "connect_cpu_us": per(run.windows["crowd"]["cpu_s"], n, 1e6),
                             "connects_s": run.results[0].get("crowd_connects_per_s"), "_windows": run.windows}
        for phase in ("max", "paced"):
            figures, _, received, _ = live_phase(ctx, run, phase, f"10/{srv.label}")
            f.update(figures)
            f[f"{phase}_cpu_us"] = per(run.windows[phase]["cpu_s"], received, 1e6)
        if srv.kind == "relayd":
            f.update(gc_pauses(srv.port))
        return f

    rounds = run_rounds(ctx, "10", ctx.variants(labels), one, max_procs=1)
    rep.raw["10_crowd"] = dataclasses.asdict(rounds)
    sec = rep.section(f"11. many connections ({n:,} authenticated idle connections from 127.1.0.0/16, 1,000 per "
                      f"source address, then live routing between {P} more pairs ({W} in flight, {p['count']:,} "
                      f"messages each) while they stay; {ctx.rounds_text()})", labels,
                      [("relayd/memory", "node"), ("relayd/uvloop", "node")], ctx.absent(labels))
    sec.rounds_row("RSS growth per idle connection (KiB)", rounds, "per_conn_kb", digits=2,
                   verdict=ratio_target("relayd/uvloop", "node", lambda r: r <= 1.0, "relayd <= node"))
    sec.rounds_row(f"RSS with {n:,} connected (MiB)", rounds, "crowd_mib")
    sec.rounds_row("server CPU us per connect+auth", rounds, "connect_cpu_us")
    sec.rounds_row("connects+auth per s", rounds, "connects_s", note="100 handshakes in flight")
    sec.rounds_row("routed messages/s at max rate, meanwhile", rounds, "max_rate")
    sec.rounds_row("server CPU us / routed message, max rate", rounds, "max_cpu_us")
    sec.rounds_row("server CPU us / routed message, half rate", rounds, "paced_cpu_us")
    sec.rounds_row("p50 latency at half rate (ms)", rounds, "paced_p50_ms", digits=2)
    sec.rounds_row("p99 latency at half rate (ms)", rounds, "paced_p99_ms", digits=2,
                   verdict=target("relayd/uvloop", lambda v: v < 50, "relayd < 50 ms"))
    sec.rounds_row("full GC passes over the run (relayd)", rounds, "gc_full_passes")
    sec.rounds_row("their pauses, in all (ms)", rounds, "gc_full_ms", digits=1)
    sec.rounds_row("longest pause at most (ms, histogram bucket)", rounds, "gc_longest_ms",
                   note="relayd_gc_full_pause_seconds from /metrics at the end of the run")
    sec.note("one load process holds the idle connections and drives the pairs; the descriptor limit caps the "
             "count: each side needs one per connection, and relayd refuses connections past 95 % of its limit "
             "(a reserve that keeps accept() working), so N + 200 must stay under that")


SCENARIOS: list[Scenario] = [
    Scenario(1, "live routing", s1_live,
             quick={"pairs": 20, "window": 16, "count": 1000, "warmup": 100, "content_bytes": 200, "max_duration": 30},
             full={"pairs": 20, "window": 16, "count": 2000, "warmup": 200, "content_bytes": 200, "max_duration": 60},
             scaled=("count",)),
    Scenario(2, "idle connections", s2_idle, quick={"connections": 2000}, full={"connections": 10000},
             scaled=("connections",)),
    Scenario(3, "offline path", s3_offline,
             quick={"senders": 20, "window": 16, "duration": 2.0, "count": 100000, "recipients": 5000},
             full={"senders": 50, "window": 16, "duration": 10.0, "count": 1000000, "recipients": 50000},
             scaled=("duration",)),
    Scenario(4, "reconnect flush", s4_flush, quick={"messages": 10000}, full={"messages": 10000}, scaled=("messages",)),
    Scenario(5, "REST", s5_rest, quick={"concurrency": 4, "duration": 1.5}, full={"concurrency": 4, "duration": 5.0},
             scaled=("duration",)),
    Scenario(6, "cold start", s6_cold, quick={"rows": 100_000, "repeats": 5}, full={"rows": 1_000_000, "repeats": 5},
             scaled=("rows",)),
    Scenario(7, "acks", s7_acks, quick={"messages": 1000, "conns": 20}, full={"messages": 10000, "conns": 50},
             scaled=("messages",)),
    Scenario(8, "read receipts", s8_receipts, quick={"receipts": 1000, "conns": 20},
             full={"receipts": 10000, "conns": 50}, scaled=("receipts",)),
    Scenario(9, "several instances on Redis", s9_redis,
             quick={"pairs": 20, "window": 16, "count": 1000, "warmup": 100, "content_bytes": 200, "max_duration": 30,
                    "senders": 20, "duration": 2.0, "recipients": 5000, "queued_count": 100000, "connections": 2000},
             full={"pairs": 20, "window": 16, "count": 2000, "warmup": 200, "content_bytes": 200, "max_duration": 60,
                   "senders": 50, "duration": 10.0, "recipients": 50000, "queued_count": 1000000,
                   "connections": 10000},
             scaled=("count", "duration", "connections")),
    Scenario(10, "PostgreSQL", s10_postgres,
             quick={"senders": 20, "window": 16, "duration": 2.0, "recipients": 5000, "queued_count": 100000,
                    "pairs": 20, "count": 1000, "warmup": 100, "content_bytes": 200, "max_duration": 30},
             full={"senders": 50, "window": 16, "duration": 10.0, "recipients": 50000, "queued_count": 1000000,
                   "pairs": 20, "count": 2000, "warmup": 200, "content_bytes": 200, "max_duration": 60},
             scaled=("duration", "count")),
    Scenario(11, "many connections", s10_crowd,
             quick={"connections": 10000, "pairs": 100, "window": 4, "count": 200, "warmup": 20, "content_bytes": 200,
                    "max_duration": 30},
             full={"connections": 100000, "pairs": 100, "window": 4, "count": 500, "warmup": 50, "content_bytes": 200,
                   "max_duration": 60},
             scaled=("connections",)),
]
