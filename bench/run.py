#!/usr/bin/env python3
"""relayd benchmark runner.

    python bench/run.py [--scale quick|full|N] [--only 1,2,...] [--json FILE]

Starts every server (relayd, or the bench/baseline.py floor) as its own
process on 127.0.0.1, drives it with bench/loadgen.py in another process,
samples the server's CPU time (utime+stime from /proc/PID/stat) and RSS
(VmRSS from /proc/PID/status) at the load generator's phase marks, stops
the server with SIGTERM by PID, and prints one table: relayd's figure, the
baseline's figure from the same run, their ratio, and absolute figures.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"

# Environment names relayd also reads (the seed's legacy names); stripped from the
# servers' environment so a stray PORT or LOG_LEVEL in the caller's shell cannot leak in.
# (Completed from relayd's config schema at start-up.)
LEGACY_ENV = {"PORT", "ALLOWED_ORIGINS", "RATE_LIMIT_WINDOW_MS", "RATE_LIMIT_MAX_REQUESTS",
              "MAX_OFFLINE_MESSAGES", "MESSAGE_RETENTION_HOURS", "LOG_LEVEL"}

SCALES: dict[str, dict[str, Any]] = {
    "quick": {
        "live": {"pairs": 50, "window": 8, "duration": 3.0, "count": 20000, "paced_duration": 3.0},
        "idle": {"connections": 2000},
        "offline": {"senders": 20, "window": 16, "duration": 3.0, "count": 20000, "recipients": 5000},
        "flush": {"messages": 10000},
        "rest": {"concurrency": 4, "duration": 2.0},
        "cold": {"rows": 100_000, "repeats": 5},
    },
    "full": {
        "live": {"pairs": 200, "window": 8, "duration": 10.0, "count": 100000, "paced_duration": 10.0, "rounds": 3},
        "idle": {"connections": 10000},
        "offline": {"senders": 50, "window": 16, "duration": 10.0, "count": 100000, "recipients": 50000},
        "flush": {"messages": 10000},
        "rest": {"concurrency": 4, "duration": 5.0},
        "cold": {"rows": 1_000_000, "repeats": 5},
    },
}
COLD_TARGET_ROWS = 1_000_000
RELAYD_BASE_ENV: dict[str, str] = {}  # filled from relayd's schema at start-up
COLD_PER_RECIPIENT = 100
FLUSH_QUEUE_MAX = 20000


def scale_params(scale: str) -> dict[str, dict[str, Any]]:
    """quick, full, or a number N: quick's sizes and durations times N (pairs and windows unchanged)."""
    if scale in SCALES:
        return json.loads(json.dumps(SCALES[scale]))
    try:
        n = float(scale)
    except ValueError:
        raise SystemExit(f"--scale must be quick, full or a number, got {scale!r}") from None
    if not 0.05 <= n <= 50:
        raise SystemExit("--scale N must be between 0.05 and 50")
    p = json.loads(json.dumps(SCALES["quick"]))
    for key in ("duration", "paced_duration"):
        p["live"][key] = max(0.5, p["live"][key] * n)
    p["offline"]["duration"] = max(0.5, p["offline"]["duration"] * n)
    p["rest"]["duration"] = max(0.5, p["rest"]["duration"] * n)
    p["idle"]["connections"] = max(10, int(p["idle"]["connections"] * n))
    p["flush"]["messages"] = max(100, min(FLUSH_QUEUE_MAX, int(p["flush"]["messages"] * n)))
    p["cold"]["rows"] = max(1000, int(p["cold"]["rows"] * n))
    return p


# /proc sampling

def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def machine_busy_seconds() -> float:
    """CPU time all processes used, summed over CPUs (/proc/stat: user nice system irq softirq steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


BACKGROUND: list[float] = []  # cores used by other processes during each measured window


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 1.0) -> int:
    """Status of one GET (0 when nothing answers); a raw socket, so polling is cheap."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(64)
    except OSError:
        return 0
    if not data.startswith(b"HTTP/1.1 "):
        return 0
    try:
        return int(data[9:12])
    except ValueError:
        return 0


def http_json(port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET ``path``; (status, decoded JSON body or None)."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return int(head[9:12]), json.loads(body)
    except ValueError:
        return int(head[9:12] or 0), None


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (children inherit it) toward ``want``."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


SCHEMA_CODE = """
import dataclasses, json
from relayd.config import SECTIONS
out = {}
for name, cls in SECTIONS.items():
    out[name] = {f.name: {"help": f.metadata.get("help", ""), "min": f.metadata.get("min"),
                          "env": f.metadata.get("env")} for f in dataclasses.fields(cls)}
print(json.dumps(out))
"""


def relayd_schema() -> dict[str, dict[str, dict[str, Any]]]:
    """relayd's configuration keys as of now (the schema changes while relayd is developed)."""
    r = subprocess.run([PY, "-c", SCHEMA_CODE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise SystemExit(f"cannot read relayd's configuration schema:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)


def unlimited_overrides(schema: dict[str, dict[str, dict[str, Any]]]) -> dict[str, str]:
    """Every [limits] key documented as '0: no limit' / '0: unlimited', set to 0.

    The benchmark measures the relay's own cost, so abuse limits (per-IP
    connection caps, frames per second, REST rate limit...) are switched off.
    """
    out = {}
    for key, meta in schema.get("limits", {}).items():
        text = meta["help"].lower()
        if meta["min"] == 0 and ("0: no limit" in text or "0: unlimited" in text):
            out[f"RELAYD_LIMITS_{key.upper()}"] = "0"
    return out


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the runner dies, so no server outlives a killed run."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class BenchError(Exception):
    pass


# Servers

class Server:
    """One server process: relayd (memory or sqlite backend) or the baseline."""

    def __init__(self, kind: str, tmp: Path, *, backend: str = "memory", env: dict[str, str] | None = None,
                 db_path: Path | None = None, label: str | None = None) -> None:
        self.kind = kind
        self.backend = backend
        self.tmp = tmp
        self.extra_env = env or {}
        self.db_path = db_path
        self.label = label or (f"relayd/{backend}" if kind == "relayd" else "baseline")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = tmp / f"{self.label.replace('/', '-')}-{time.monotonic_ns()}.log"
        self.started_at = 0.0
        self.ready_s = 0.0
        self.stop_note: str | None = None  # an unclean exit, reported under "problems"

    def command_env(self) -> tuple[list[str], dict[str, str]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_") and k not in LEGACY_ENV}
        # Byte-code goes to a cache inside the bench's temp dir, never into relayd/.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(self.tmp.parent / "pycache")
        if self.kind == "baseline":
            return [PY, str(BENCH / "baseline.py"), str(self.port)], env
        config = self.tmp / "empty.conf"
        config.touch()
        db = self.db_path or (self.tmp / f"relayd-{self.port}.db")
        env.update(RELAYD_BASE_ENV)
        env.update({
            "RELAYD_SERVER_HOST": HOST, "RELAYD_SERVER_PORT": str(self.port),
            "RELAYD_STORAGE_BACKEND": self.backend, "RELAYD_STORAGE_PATH": str(db),
            "RELAYD_LIMITS_RATE_LIMIT_MAX_REQUESTS": "0", "RELAYD_LOG_LEVEL": "warning",
        })
        env.update(self.extra_env)
        return [PY, str(ROOT / "relayd.py"), "--config", str(config)], env

    def start(self, *, ready_path: str = "/health/live", timeout: float = 30.0) -> "Server":
        self.port = free_port()
        cmd, env = self.command_env()
        log = open(self.log_path, "wb")
        try:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        finally:
            log.close()
        self.wait_ready(ready_path, timeout)
        return self

    def wait_ready(self, path: str, timeout: float) -> None:
        assert self.proc is not None
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.label} exited with {self.proc.returncode} before it was ready:\n"
                                 f"{self.log_tail()}")
            if http_get(self.port, path, timeout=0.5) == 200:
                self.ready_s = time.monotonic() - self.started_at
                return
            time.sleep(0.005)
        raise BenchError(f"{self.label} was not ready within {timeout:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sample(self) -> dict[str, float]:
        if not self.alive():
            raise BenchError(f"{self.label} (pid {self.pid}) died with {self.proc.returncode if self.proc else '?'}:"
                             f"\n{self.log_tail()}")
        return {"t": time.monotonic(), "cpu": cpu_seconds(self.pid), "rss_kb": rss_kb(self.pid)}

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:]) or "(empty log)"

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by PID, then SIGKILL by PID if it does not exit in time."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is not None:
            if self.stop_note is None and proc.returncode != 0:
                self.stop_note = f"{self.label} had exited by itself with {proc.returncode}:\n{self.log_tail()}"
            return proc.returncode
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop_note = f"{self.label} did not exit within {timeout:.0f} s of SIGTERM; killed"
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
        else:
            if proc.returncode != 0:
                self.stop_note = f"{self.label} exited with {proc.returncode} after SIGTERM:\n{self.log_tail()}"
        return proc.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# The load generator

QUIET_CORES = 0.5  # background load below which a measurement may start
QUIET = {"max_wait": 10.0, "budget": 30.0}  # seconds per wait, and in all for the run (set by --quiet-budget)


def wait_for_quiet() -> float:
    """Wait (bounded) until other processes use less than QUIET_CORES; return the last reading.

    The machine is shared: starting a measurement while someone else's job
    holds a core halves the rates. This only delays the start, at most
    ``max_wait`` each time and ``budget`` over the whole run (a machine that
    stays busy should not turn a quick run into a long one); the load that
    arrives during a window is reported with it.
    """
    deadline = time.monotonic() + min(QUIET["max_wait"], QUIET["budget"])
    started = time.monotonic()
    try:
        while True:
            a, t0 = machine_busy_seconds(), time.monotonic()
            time.sleep(0.2)
            load = (machine_busy_seconds() - a) / (time.monotonic() - t0)
            if load < QUIET_CORES or time.monotonic() >= deadline:
                return load
    finally:
        QUIET["budget"] = max(0.0, QUIET["budget"] - (time.monotonic() - started))


def run_loadgen(server: Server, args: list[str], timeout: float) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Run bench/loadgen.py against ``server``; sample /proc at each MARK; return (result, marks)."""
    wait_for_quiet()
    cmd = [PY, str(BENCH / "loadgen.py"), "--port", str(server.port), "--marks",
           "--max-time", str(max(5.0, timeout - 5)), *args]
    err_path = server.tmp / f"loadgen-{time.monotonic_ns()}.err"
    err = open(err_path, "wb")
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                preexec_fn=_die_with_parent)
    finally:
        err.close()
    marks: dict[str, dict[str, float]] = {}
    result: dict[str, Any] | None = None
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        assert proc.stdout is not None and proc.stdin is not None
        fd = proc.stdout.fileno()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"loadgen {args[0]} did not finish within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                if not server.alive():
                    raise BenchError(f"{server.label} died during the load:\n{server.log_tail()}")
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith("MARK "):
                    sample = server.sample()
                    sample["lg_cpu"] = cpu_seconds(proc.pid)
                    sample["busy"] = machine_busy_seconds()
                    marks[text[5:].strip()] = sample
                    proc.stdin.write(b"\n")
                    proc.stdin.flush()
                elif text.startswith("RESULT "):
                    result = json.loads(text[7:])
        proc.wait(10)
    finally:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    if result is None:
        raise BenchError(f"loadgen {args[0]} printed no result (exit {proc.returncode}):\n"
                         f"{err_path.read_text(errors='replace')[-2000:]}")
    if not result.get("ok"):
        raise BenchError(f"loadgen {args[0]} failed: {result.get('error')}\n"
                         f"{err_path.read_text(errors='replace')[-1000:]}")
    return result, marks


def window(marks: dict[str, dict[str, float]], start: str, end: str) -> dict[str, float]:
    a, b = marks[start], marks[end]
    wall = max(1e-9, b["t"] - a["t"])
    ours = (b["cpu"] - a["cpu"]) + (b["lg_cpu"] - a["lg_cpu"])
    background = max(0.0, (b["busy"] - a["busy"] - ours) / wall)
    if wall >= 0.5:
        BACKGROUND.append(background)
    return {"wall_s": wall, "cpu_s": b["cpu"] - a["cpu"], "cpu_pct": 100 * (b["cpu"] - a["cpu"]) / wall,
            "lg_cpu_pct": 100 * (b["lg_cpu"] - a["lg_cpu"]) / wall, "rss_kb": b["rss_kb"],
            "background_cores": round(background, 2)}


# Formatting

def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def ratio(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return "-"
    return f"{a / b:.2f}"


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str, str]] = []
        self.raw: dict[str, Any] = {}
        self.problems: list[str] = []

    def section(self, title: str) -> None:
        self.rows.append((title, "", "", "", "", ""))

    def row(self, metric: str, relayd: Any, baseline: Any = None, note: str = "", *, digits: int = 1,
            show_ratio: bool = True) -> None:
        r = ratio(relayd, baseline) if show_ratio else "-"
        self.rows.append(("  " + metric, fmt(relayd, digits), fmt(baseline, digits), r, note, ""))

    def render(self) -> str:
        head = ("scenario / metric", "relayd", "baseline", "ratio", "notes")
        rows = [r[:5] for r in self.rows]
        data = [r for r in rows if any(r[1:])]  # section titles do not set column widths
        widths = [max([len(head[i])] + [len(r[i]) for r in data]) for i in range(4)]
        out = []
        line = f"{head[0]:<{widths[0]}}  {head[1]:>{widths[1]}}  {head[2]:>{widths[2]}}  {head[3]:>{widths[3]}}  {head[4]}"
        out.append(line)
        out.append("-" * min(140, len(line) + 30))
        for r in rows:
            if not any(r[1:]):
                out.append(r[0])
            else:
                out.append(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}")
        return "\n".join(out)


# Scenarios

def relayd_env(**extra: Any) -> dict[str, str]:
    return {k: str(v) for k, v in extra.items()}


NA_SQLITE = "n/a"  # the sqlite backend is not importable or does not open (reason under "problems")
PROBE_CODE = """
import asyncio, os, shutil, sys, tempfile
from relayd.storage.sqlite import SQLiteStore
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


def attempt(rep: Report, tag: str, fn: Callable[[], Any]) -> Any:
    """Run one variant; on failure record the problem and return the string 'error'."""
    try:
        return fn()
    except Exception as exc:
        rep.problems.append(f"{tag} failed: {exc}".rstrip())
        return "error"


def val(x: Any, fn: Callable[[Any], Any]) -> Any:
    """A figure from a variant's result, or the variant's marker ('error', 'n/a ...')."""
    if isinstance(x, str) or x is None:
        return x
    try:
        return fn(x)
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def s1_live(ctx: "Ctx", rep: Report) -> None:
    p = ctx.params["live"]
    args = ["live", "--pairs", str(p["pairs"]), "--window", str(p["window"]), "--duration", str(p["duration"]),
            "--count", str(p["count"]), "--paced-duration", str(p["paced_duration"])]
    timeout = p["duration"] + p["paced_duration"] + 90
    res: dict[str, Any] = {}

    def run(kind: str, extra: list[str]) -> dict[str, Any]:
        with ctx.server(kind) as srv:
            result, marks = run_loadgen(srv, args + extra, timeout)
        out = {"result": result, "max_win": window(marks, "max_start", "max_end"),
               "paced_win": window(marks, "paced_start", "paced_end")}
        out["cpu_us"] = 1e6 * out["max_win"]["cpu_s"] / max(1, result["max"]["received"])
        for phase in ("max", "paced"):
            ph = result[phase]
            if not ph["complete"] or ph["errors"] or ph["received"] != ph["sent"]:
                rep.problems.append(f"1/{kind}/{phase}: sent {ph['sent']}, received {ph['received']}, "
                                    f"errors {ph['errors']}, acks {ph['acks']}")
        return out

    rounds = max(1, int(p.get("rounds", 1)))
    runs: dict[str, list[Any]] = {"relayd": [], "baseline": []}
    for i in range(rounds):  # alternate, so background load hits both alike
        for kind in ("relayd", "baseline"):
            runs[kind].append(attempt(rep, f"1/{kind}" + (f"/round {i + 1}" if rounds > 1 else ""),
                                      lambda: run(kind, [])))
    for kind, xs in runs.items():
        ok = [x for x in xs if isinstance(x, dict)]
        # The least disturbed round: the highest max rate (background load only ever lowers it).
        res[kind] = max(ok, key=lambda x: x["result"]["max"]["rate"]) if ok else "error"
    rep.raw["1_live"] = {"best": res, "rounds": runs}
    r, b = res["relayd"], res["baseline"]
    rep.section(f"1. live routing ({p['pairs']} pairs, {p['window']} in flight per sender, "
                f"{p['duration']:g} s max-rate phase, {p['paced_duration']:g} s paced; relayd memory backend"
                + (f"; best of {rounds} rounds" if rounds > 1 else "") + ")")
    rep.row("routed messages/s (max)", val(r, lambda x: x["result"]["max"]["rate"]),
            val(b, lambda x: x["result"]["max"]["rate"]), "higher is better; depends on free CPU")
    rep.row("server CPU us / routed message", val(r, lambda x: x["cpu_us"]), val(b, lambda x: x["cpu_us"]),
            "lower is better; the steadiest figure")
    rep.row("p50 latency at max (ms)", val(r, lambda x: x["result"]["max"]["p50_ms"]),
            val(b, lambda x: x["result"]["max"]["p50_ms"]), "queueing: in-flight / rate", digits=2)
    rep.row("p99 latency at max (ms)", val(r, lambda x: x["result"]["max"]["p99_ms"]),
            val(b, lambda x: x["result"]["max"]["p99_ms"]), "", digits=2)
    rep.row("server CPU % during max phase", val(r, lambda x: x["max_win"]["cpu_pct"]),
            val(b, lambda x: x["max_win"]["cpu_pct"]), "100 = one core", show_ratio=False)
    rep.row("loadgen CPU % during max phase", val(r, lambda x: x["max_win"]["lg_cpu_pct"]),
            val(b, lambda x: x["max_win"]["lg_cpu_pct"]), "", show_ratio=False)
    rep.row("paced rate (msg/s; half of each one's max)", val(r, lambda x: x["result"]["paced"]["rate"]),
            val(b, lambda x: x["result"]["paced"]["rate"]), "open loop, round-robin over the senders",
            show_ratio=False)
    rep.row("p50 latency paced (ms)", val(r, lambda x: x["result"]["paced"]["p50_ms"]),
            val(b, lambda x: x["result"]["paced"]["p50_ms"]), "", digits=2)
    p99 = val(r, lambda x: x["result"]["paced"]["p99_ms"])
    verdict = "PASS" if isinstance(p99, (int, float)) and p99 < 50 else "FAIL"
    rep.row("p99 latency paced (ms)", p99, val(b, lambda x: x["result"]["paced"]["p99_ms"]),
            f"target < 50 ms: {verdict}", digits=2)
    rep.row("server CPU % paced", val(r, lambda x: x["paced_win"]["cpu_pct"]),
            val(b, lambda x: x["paced_win"]["cpu_pct"]), "", show_ratio=False)
    rep.row("background load, max / paced phase (cores)",
            val(r, lambda x: f"{x['max_win']['background_cores']:.2f} / {x['paced_win']['background_cores']:.2f}"),
            val(b, lambda x: f"{x['max_win']['background_cores']:.2f} / {x['paced_win']['background_cores']:.2f}"),
            "other processes on the machine", show_ratio=False)


def s2_idle(ctx: "Ctx", rep: Report) -> None:
    n = ctx.params["idle"]["connections"]
    res: dict[str, Any] = {}

    def run(kind: str) -> dict[str, Any]:
        with ctx.server(kind) as srv:
            result, marks = run_loadgen(srv, ["idle", "--connections", str(n)], 120 + n / 50)
        before, after = marks["before"]["rss_kb"], marks["after"]["rss_kb"]
        return {"result": result, "before_kb": before, "after_kb": after, "per_conn_kb": (after - before) / n,
                "cpu_us_per_conn": 1e6 * (marks["after"]["cpu"] - marks["before"]["cpu"]) / n}

    for kind in ("relayd", "baseline"):
        res[kind] = attempt(rep, f"2/{kind}", lambda: run(kind))
    rep.raw["2_idle"] = res
    r, b = res["relayd"], res["baseline"]
    rep.section(f"2. idle connections ({n:,} authenticated, idle; relayd memory backend)")
    rep.row("RSS growth per connection (KiB)", val(r, lambda x: x["per_conn_kb"]),
            val(b, lambda x: x["per_conn_kb"]), "lower is better", digits=2)
    rep.row("RSS before (MiB)", val(r, lambda x: x["before_kb"] / 1024), val(b, lambda x: x["before_kb"] / 1024),
            "fresh server")
    rep.row(f"RSS with {n:,} connected (MiB)", val(r, lambda x: x["after_kb"] / 1024),
            val(b, lambda x: x["after_kb"] / 1024), "")
    rep.row("server CPU us per connect+auth", val(r, lambda x: x["cpu_us_per_conn"]),
            val(b, lambda x: x["cpu_us_per_conn"]), "lower is better")
    rep.row("connects+auth per s", val(r, lambda x: x["result"]["connects_per_s"]),
            val(b, lambda x: x["result"]["connects_per_s"]), "100 handshakes in flight")


def s3_offline(ctx: "Ctx", rep: Report) -> None:
    p = ctx.params["offline"]
    args = ["offline", "--senders", str(p["senders"]), "--window", str(p["window"]), "--duration",
            str(p["duration"]), "--count", str(p["count"]), "--recipients", str(p["recipients"])]
    env = relayd_env(RELAYD_QUEUE_MAX_OFFLINE_MESSAGES=10_000_000)
    res: dict[str, Any] = {}

    def run(label: str) -> dict[str, Any]:
        kind = "baseline" if label == "baseline" else "relayd"
        with ctx.server(kind, backend=label, env=env) as srv:
            result, marks = run_loadgen(srv, args, p["duration"] + 90)
        win = window(marks, "start", "end")
        if result["errors"] or not result["complete"]:
            rep.problems.append(f"3/{label}: errors {result['errors']}, complete {result['complete']}")
        return {"result": result, "win": win, "cpu_us": 1e6 * win["cpu_s"] / max(1, result["acks"].get("queued", 0))}

    for label in ("sqlite", "memory", "baseline"):
        if label == "sqlite" and not ctx.sqlite_ok:
            res[label] = NA_SQLITE
        else:
            res[label] = attempt(rep, f"3/{label}", lambda: run(label))
    rep.raw["3_offline"] = res
    s, m, b = res["sqlite"], res["memory"], res["baseline"]
    rate = lambda x: x["result"]["rate"]  # noqa: E731
    rep.section(f"3. offline path ({p['senders']} senders x {p['window']} in flight, "
                f"{p['recipients']:,} distinct offline recipients)")
    rep.row("queued/s, relayd sqlite", val(s, rate), val(b, rate), "higher is better")
    rep.row("queued/s, relayd memory", val(m, rate), val(b, rate), "higher is better")
    sm = val(s, lambda x: rate(x) / rate(m)) if isinstance(m, dict) else val(s, lambda x: None)
    note = "target >= 0.5" + (f": {'PASS' if sm >= 0.5 else 'FAIL'}" if isinstance(sm, float) else "")
    rep.row("ratio sqlite / memory", sm, None, note, digits=2, show_ratio=False)
    rep.row("server CPU us / queued, sqlite", val(s, lambda x: x["cpu_us"]), val(b, lambda x: x["cpu_us"]),
            "incl. the writer thread")
    rep.row("server CPU us / queued, memory", val(m, lambda x: x["cpu_us"]), val(b, lambda x: x["cpu_us"]), "")
    rep.row("server CPU % sqlite / memory", val(s, lambda x: x["win"]["cpu_pct"]),
            val(m, lambda x: x["win"]["cpu_pct"]), "(second column: memory, not baseline)", show_ratio=False)
    rep.row("loadgen CPU % sqlite / memory", val(s, lambda x: x["win"]["lg_cpu_pct"]),
            val(m, lambda x: x["win"]["lg_cpu_pct"]), "(second column: memory, not baseline)", show_ratio=False)


def s4_flush(ctx: "Ctx", rep: Report) -> None:
    n = ctx.params["flush"]["messages"]
    env = relayd_env(RELAYD_QUEUE_MAX_OFFLINE_MESSAGES=FLUSH_QUEUE_MAX)
    res: dict[str, Any] = {}

    def run(label: str) -> dict[str, Any]:
        kind = "baseline" if label == "baseline" else "relayd"
        with ctx.server(kind, backend=label, env=env) as srv:
            result, marks = run_loadgen(srv, ["flush", "--messages", str(n)], 60 + n / 50)
        f = result["flush"]
        if f["received"] != n or f["queued_true"] != n or not f["in_order"] or result["fill"]["errors"]:
            rep.problems.append(f"4/{label}: fill {result['fill']}, flush {f}")
        return {"result": result, "win": window(marks, "flush_start", "flush_end"),
                "rss_after_kb": marks["flush_end"]["rss_kb"]}

    for label in ("sqlite", "memory", "baseline"):
        if label == "sqlite" and not ctx.sqlite_ok:
            res[label] = NA_SQLITE
        else:
            res[label] = attempt(rep, f"4/{label}", lambda: run(label))
    rep.raw["4_flush"] = res
    s, m, b = res["sqlite"], res["memory"], res["baseline"]
    rep.section(f"4. reconnect flush (one recipient, {n:,} queued messages, sent by 4 senders x 32 in flight)")
    for name, x in (("sqlite", s), ("memory", m)):
        rep.row(f"time to receive all, {name} (s)", val(x, lambda y: y["result"]["flush"]["all_s"]),
                val(b, lambda y: y["result"]["flush"]["all_s"]), "from sending auth; lower is better", digits=3)
        rep.row(f"  first message after auth, {name} (ms)", val(x, lambda y: 1000 * y["result"]["flush"]["first_s"]),
                val(b, lambda y: 1000 * y["result"]["flush"]["first_s"]), "", digits=2)
        rep.row(f"  server CPU s for the flush, {name}", val(x, lambda y: y["win"]["cpu_s"]),
                val(b, lambda y: y["win"]["cpu_s"]), "", digits=3)
        rep.row(f"  fill rate, {name} (queued/s)", val(x, lambda y: n / y["result"]["fill"]["s"]),
                val(b, lambda y: n / y["result"]["fill"]["s"]), "all to one recipient")


def s5_rest(ctx: "Ctx", rep: Report) -> None:
    p = ctx.params["rest"]
    base = ["rest", "--concurrency", str(p["concurrency"]), "--duration", str(p["duration"])]
    res: dict[str, Any] = {}

    def run(label: str, endpoints: str) -> dict[str, Any]:
        kind = "baseline" if label == "baseline" else "relayd"
        with ctx.server(kind, backend=label) as srv:
            result, marks = run_loadgen(srv, base + ["--endpoints", endpoints], 3 * p["duration"] + 60)
        out: dict[str, Any] = {"result": result}
        for ep in endpoints.split(","):
            out[ep] = window(marks, f"{ep}_start", f"{ep}_end")
            out[ep]["cpu_us"] = 1e6 * out[ep]["cpu_s"] / max(1, result[ep]["requests"])
            r = result[ep]
            if r["errors"] or r["ok"] != r["requests"]:
                rep.problems.append(f"5/{label}/{ep}: statuses {r['statuses']}, errors {r['errors']}")
        return out

    res["memory"] = attempt(rep, "5/memory", lambda: run("memory", "status,public-keys,live"))
    res["sqlite"] = attempt(rep, "5/sqlite", lambda: run("sqlite", "status,public-keys")) if ctx.sqlite_ok \
        else NA_SQLITE
    res["baseline"] = attempt(rep, "5/baseline", lambda: run("baseline", "live"))
    rep.raw["5_rest"] = res
    m, s, b = res["memory"], res["sqlite"], res["baseline"]
    rep.section(f"5. REST ({p['concurrency']} concurrent clients, a new connection per request, "
                f"{p['duration']:g} s each; baseline has no REST API: absolute figures)")

    def line(name: str, x: Any, ep: str) -> None:
        rate = val(x, lambda y: y["result"][ep]["rate"])
        note = "target >= 2000" + (f": {'PASS' if rate >= 2000 else 'FAIL'}" if isinstance(rate, float) else "")
        if isinstance(x, dict) and ep in x:
            note += (f"; server {x[ep]['cpu_us']:.0f} us/req at {x[ep]['cpu_pct']:.0f}% CPU, "
                     f"loadgen {x[ep]['lg_cpu_pct']:.0f}%")
        rep.row(name, rate, None, note, show_ratio=False)

    line("GET /api/status/:address req/s (memory)", m, "status")
    line("GET /api/public-keys/:address req/s (memory)", m, "public-keys")
    line("GET /api/status/:address req/s (sqlite)", s, "status")
    line("GET /api/public-keys/:address req/s (sqlite)", s, "public-keys")
    rep.row("GET /health/live req/s (HTTP floor)", val(m, lambda x: x["result"]["live"]["rate"]),
            val(b, lambda x: x["result"]["live"]["rate"]), "context: websockets' HTTP path, both servers")
    rep.row("  server CPU us / request", val(m, lambda x: x["live"]["cpu_us"]), val(b, lambda x: x["live"]["cpu_us"]),
            "lower is better")


def cold_address(role: int, i: int) -> str:
    return f"0x{role:02x}{i:038x}"


def build_cold_db(path: Path, rows: int) -> dict[str, Any]:
    """Create relayd's schema with SQLiteStore.open(), then bulk-insert ``rows`` queued messages."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from relayd.storage.sqlite import SQLiteStore

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

    addr = cold_address

    def gen() -> Any:
        for i in range(rows):
            yield (addr(0xC1, i % recipients), addr(0xC2, i % 1000), f"cold-{i}", content,
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


def s6_cold(ctx: "Ctx", rep: Report) -> None:
    p = ctx.params["cold"]
    rows, repeats = p["rows"], p["repeats"]
    rep.section(f"6. cold start with queued messages (sqlite; {rows:,} rows"
                + (f", extrapolated to {COLD_TARGET_ROWS:,}" if rows != COLD_TARGET_ROWS else "") + ")")
    if not ctx.sqlite_ok:
        rep.row("cold start", NA_SQLITE, None, show_ratio=False)
        return
    tmp = ctx.tmpdir("cold")
    empty_db, full_db = tmp / "empty.db", tmp / "full.db"
    info = build_cold_db(full_db, rows)

    def start_once(db: Path, settle: bool = True) -> dict[str, float]:
        # Every start opens the same file, as a restarted relay would; the warm-up start
        # below already let relayd do whatever it does on a first open or a clean stop.
        srv = ctx.server("relayd", backend="sqlite", db_path=db)
        try:
            srv.start(ready_path="/health", timeout=120)
            ready = srv.ready_s
            rss0 = rss_kb(srv.pid)
            if not settle:
                return {"ready_s": ready, "rss_ready_kb": rss0}
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
            rss1 = rss_kb(srv.pid)
        finally:
            srv.stop()
        return {"ready_s": ready, "rss_ready_kb": rss0, "rss_settled_kb": rss1}

    # Warm the byte-code cache, the page cache and each file's first open; not counted.
    start_once(empty_db)
    start_once(full_db)
    os.sync()  # no write-back of the freshly built file competes with the measured starts
    wait_for_quiet()
    empty, full = [], []
    for i in range(repeats):  # interleaved, so background load hits both alike; RSS on the first pair
        empty.append(start_once(empty_db, settle=i == 0))
        full.append(start_once(full_db, settle=i == 0))
    # The fastest start is the least disturbed one: background load only ever adds time.
    e_t, f_t = min(x["ready_s"] for x in empty), min(x["ready_s"] for x in full)
    e_med, f_med = statistics.median(x["ready_s"] for x in empty), statistics.median(x["ready_s"] for x in full)
    e_rss, f_rss = empty[0]["rss_settled_kb"], full[0]["rss_settled_kb"]
    factor = COLD_TARGET_ROWS / rows
    est = e_t + max(0.0, f_t - e_t) * factor
    rep.raw["6_cold"] = {"db": info, "empty": empty, "full": full, "estimate_1m_s": est}
    rep.row("Popen -> first 200 from /health, empty DB (s)", e_t, None,
            f"best of {repeats} (median {e_med:.3f})", digits=3, show_ratio=False)
    rep.row(f"Popen -> first 200 from /health, {rows:,} msgs (s)", f_t, None,
            f"best of {repeats} (median {f_med:.3f}); DB {info['db_mb']} MB, {info['recipients']:,} recipients, "
            f"built in {info['build_s']} s", digits=3, show_ratio=False)
    if rows != COLD_TARGET_ROWS:
        rep.row(f"  extrapolated to {COLD_TARGET_ROWS:,} msgs (s)", est, None,
                f"linear (empty + (loaded - empty) x {factor:g}): an estimate only, start-up work need not "
                "scale linearly; --scale full measures it", digits=3, show_ratio=False)
    rep.row("RSS after start, empty DB (MiB)", e_rss / 1024, None, "1.3 s after ready (past the first expiry run)",
            show_ratio=False)
    rep.row(f"RSS after start, {rows:,} msgs (MiB)", f_rss / 1024, None,
            f"growth {(f_rss - e_rss) / 1024:+.1f} MiB (should not grow with queue length)", show_ratio=False)


SCENARIOS: dict[int, tuple[str, Callable[["Ctx", Report], None]]] = {
    1: ("live routing", s1_live),
    2: ("idle connections", s2_idle),
    3: ("offline path", s3_offline),
    4: ("reconnect flush", s4_flush),
    5: ("REST", s5_rest),
    6: ("cold start", s6_cold),
}


class Ctx:
    def __init__(self, params: dict[str, Any], root: Path, sqlite_ok: bool) -> None:
        self.params = params
        self.root = root
        self.sqlite_ok = sqlite_ok
        self.servers: list[Server] = []
        self.problems: list[str] = []
        self._n = 0

    def tmpdir(self, name: str) -> Path:
        self._n += 1
        d = self.root / f"{self._n:02d}-{name}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def server(self, kind: str, *, backend: str = "memory", env: dict[str, str] | None = None,
               db_path: Path | None = None, start: bool | None = None) -> Server:
        """A server in its own temp dir; started unless a db_path is given (cold start starts it itself)."""
        label = "baseline" if kind == "baseline" else f"relayd/{backend}"
        srv = Server(kind, self.tmpdir(label.replace("/", "-")), backend=backend, env=env, db_path=db_path)
        self.servers.append(srv)
        if start if start is not None else db_path is None:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="relayd benchmarks (see bench/README.md)")
    ap.add_argument("--scale", default="quick", help="quick (default), full, or a number N times quick")
    ap.add_argument("--only", default="", help="comma-separated scenario numbers, e.g. 1,3")
    ap.add_argument("--json", metavar="FILE", help="also write every raw figure as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, databases)")
    ap.add_argument("--quiet-budget", type=float, metavar="SECONDS",
                    help="longest total wait for other processes to go quiet before loads "
                         "(quick: 30, full: 120; 0: never wait)")
    ap.add_argument("--rounds", type=int, help="scenario 1: alternate relayd/baseline this many times, keep "
                                                 "each one's best round (quick: 1, full: 3)")
    ap.add_argument("--relayd-env", action="append", default=[], metavar="RELAYD_SECTION_KEY=VALUE",
                    help="extra relayd setting for every relayd started (e.g. RELAYD_AUTH_MODE=open); may repeat")
    args = ap.parse_args(argv)
    params = scale_params(args.scale)
    if args.rounds:
        params["live"]["rounds"] = max(1, min(10, args.rounds))
    QUIET["budget"] = args.quiet_budget if args.quiet_budget is not None else \
        (120.0 if args.scale == "full" else 30.0)
    try:
        only = [int(x) for x in args.only.split(",") if x.strip()] or sorted(SCENARIOS)
    except ValueError:
        raise SystemExit("--only takes scenario numbers like 1,3") from None
    unknown = [n for n in only if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}")

    nofile = raise_nofile(params["idle"]["connections"] + 1024)
    if 2 in only and nofile < params["idle"]["connections"] + 256:
        print(f"warning: RLIMIT_NOFILE is {nofile}; scenario 2 needs about "
              f"{params['idle']['connections'] + 256} (raise the hard limit: ulimit -Hn)", file=sys.stderr)

    schema = relayd_schema()
    RELAYD_BASE_ENV.clear()
    RELAYD_BASE_ENV.update(unlimited_overrides(schema))
    LEGACY_ENV.update(meta["env"] for keys in schema.values() for meta in keys.values() if meta.get("env"))
    for item in args.relayd_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("RELAYD_"):
            raise SystemExit(f"--relayd-env {item!r}: expected RELAYD_SECTION_KEY=VALUE")
        RELAYD_BASE_ENV[key] = value
    sqlite_ok, why = sqlite_available()
    rep = Report()
    if why:
        rep.problems.append(why)
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    tmp = Path(tempfile.mkdtemp(prefix="relayd-bench-"))
    started = time.monotonic()
    ctx = Ctx(params, tmp, sqlite_ok)
    try:
        # One start of each server first: it fills the byte-code cache (compiling would otherwise land in
        # the first measured server's CPU and RSS) and shows at once whether relayd starts at all.
        for kind, backend in (("relayd", "memory"), ("baseline", "memory")) + ((("relayd", "sqlite"),) if sqlite_ok else ()):
            try:
                ctx.server(kind, backend=backend).stop()
            except Exception as exc:
                rep.problems.append(f"warm-up start of {kind}/{backend} failed: {exc}")
        ctx.stop_all()
        ctx.servers.clear()
        for n in only:
            name, fn = SCENARIOS[n]
            t0 = time.monotonic()
            print(f"[{time.monotonic() - started:6.1f}s] scenario {n}: {name} ...", file=sys.stderr, flush=True)
            try:
                fn(ctx, rep)
            except Exception as exc:
                rep.section(f"{n}. {name}")
                rep.row("FAILED", f"{type(exc).__name__}", None, str(exc).splitlines()[0][:100] if str(exc) else "",
                        show_ratio=False)
                rep.problems.append(f"scenario {n} failed: {exc}\n{traceback.format_exc(limit=3)}")
            finally:
                ctx.stop_all()
                ctx.servers.clear()
            print(f"[{time.monotonic() - started:6.1f}s] scenario {n} done in {time.monotonic() - t0:.1f}s",
                  file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        rep.problems.append("interrupted")
    finally:
        ctx.stop_all()
        if args.keep:
            print(f"temp dir kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rep.problems += ctx.problems
    total = time.monotonic() - started
    print()
    print(f"relayd benchmarks: scale {args.scale}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
          f"{total:.0f} s. ratio = relayd / baseline. CPU from /proc/PID/stat (utime+stime), RSS = VmRSS.")
    extra = {k: v for k, v in RELAYD_BASE_ENV.items() if not k.startswith("RELAYD_LIMITS_")}
    if extra:
        print("relayd extra settings: " + ", ".join(f"{k}={v}" for k, v in sorted(extra.items())))
    print("relayd limits switched off: " + (", ".join(k[len("RELAYD_LIMITS_"):].lower()
                                                     for k in sorted(RELAYD_BASE_ENV)
                                                     if k.startswith("RELAYD_LIMITS_")) or "-"))
    if BACKGROUND:
        print(f"background load (other processes) during the measured windows: mean "
              f"{statistics.mean(BACKGROUND):.2f}, max {max(BACKGROUND):.2f} of {os.cpu_count()} cores. "
              "Rates depend on free CPU; CPU per operation does much less.")
    print(rep.render())
    if rep.problems:
        print("\nproblems:")
        for pr in rep.problems:
            print(" - " + pr.rstrip().replace("\n", "\n   "))
    if args.json:
        Path(args.json).write_text(json.dumps({"scale": args.scale, "params": params, "seconds": total,
                                               "raw": rep.raw, "problems": rep.problems,
                                               "table": rep.rows}, indent=2))
    return 1 if any(p.startswith("scenario") for p in rep.problems) else 0


if __name__ == "__main__":
    sys.exit(main())
