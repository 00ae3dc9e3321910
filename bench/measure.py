"""Measuring a server under load: load processes, phase marks, windows, probes, rounds.

``run_loadgen`` starts one or more bench/loadgen.py processes against a
server, waits until every one of them has printed the same ``MARK``, samples
the server (CPU, RSS, /proc/PID/io), lets the probes act, and answers them
all; so several load processes start each phase together. A *window* is a
pair of marks; ``Window`` holds what happened in between. Probes add figures
to windows: ``SyscallCounter`` (system calls, counted in the kernel by
``perf stat`` on tracepoints) and ``LagProbe`` (relayd's event-loop lag
histogram, scraped from ``GET /metrics``).

``run_rounds`` runs a scenario's variants round after round in rotated order,
a fresh server per run, and adds load processes for a variant whose single
load process saturated a core while the server did not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from servers import (BENCH, PY, BenchError, Server, cpu_delta, cpu_sample, die_with_parent, end_process, http_body,
                     machine_busy_seconds)

QUIET_CORES = 0.5  # background load below which a measurement may start
QUIET = {"max_wait": 10.0, "budget": 30.0}  # seconds per wait, and in all for the run (set by --quiet-budget)
BACKGROUND: list[float] = []  # cores used by other processes during each measured window
SATURATED_PCT = 85.0  # a process at or above this share of one core is taken as saturated


def wait_for_quiet() -> float:
    """Wait (bounded) until other processes use less than QUIET_CORES; return the last reading.

    The machine is shared: starting a measurement while someone else's job
    holds a core halves the rates. This only delays the start, at most
    ``max_wait`` each time and ``budget`` over the whole run; the load that
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


# Probes

class Probe(Protocol):
    """Acts at a window's start mark (before the /proc sample) and end mark (after it)."""

    def start(self, window: str) -> None: ...

    def stop(self, window: str) -> None: ...

    def finish(self) -> dict[str, dict[str, Any]]:
        """Per window, the figures to add to it; called once after the load processes exit."""
        ...


SYSCALL_EVENTS = {
    "writes": ("write", "writev", "sendto", "sendmsg", "sendmmsg"),
    "all": ("raw_syscalls:sys_enter",),
}


def syscall_event_list() -> list[str]:
    names = [f"syscalls:sys_enter_{n}" for n in SYSCALL_EVENTS["writes"]]
    return names + list(SYSCALL_EVENTS["all"])


def perf_available() -> str:
    """'' when ``perf stat`` can count syscall tracepoints here, else why not."""
    perf = shutil.which("perf")
    if perf is None:
        return "perf is not installed (Debian: linux-perf)"
    try:
        r = subprocess.run([perf, "stat", "-x,", "-e", ",".join(syscall_event_list()), "--", "true"],
                           capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "perf stat timed out"
    counts = parse_perf(r.stderr)
    if r.returncode != 0 or len(counts) != len(syscall_event_list()):
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"perf stat cannot count syscall tracepoints ({last[:120]}); needs root or perf_event_paranoid <= -1"
    usage = subprocess.run([perf, "stat", "-h"], capture_output=True, text=True, timeout=30)
    if "--control" not in usage.stdout + usage.stderr:
        return "this perf has no 'perf stat --control' (perf >= 5.9 has)"
    return ""


def parse_perf(text: str) -> dict[str, int]:
    """``perf stat -x,`` output: event name -> count (events not counted are left out)."""
    out = {}
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) >= 3 and parts[0].strip().isdigit():
            out[parts[2].strip()] = int(parts[0])
    return out


class SyscallCounter:
    """System calls of one server process in given windows, counted by the kernel (``perf stat``).

    ``/proc/PID/io`` ``syscw`` counts only write(2)-family calls; asyncio
    writes sockets with send(2) (sendto), which it misses, while Node's
    libuv uses write/writev. Tracepoint counting sees both, at the cost of a
    counter increment per system call. One ``perf stat`` per window starts
    disabled before the load and is switched on and off at the window's marks
    through its control FIFO (the ack makes the switch synchronous). Threads
    the server creates after the start (none in steady state) are not counted.
    """

    def __init__(self, pid: int, windows: list[str], tmp: Path) -> None:
        self.perf = shutil.which("perf") or "perf"
        self.procs: dict[str, tuple[subprocess.Popen[bytes], int, int, Path]] = {}
        self.err: dict[str, str] = {}
        for w in windows:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", w)
            ctl, ack = tmp / f"perf-{safe}-{time.monotonic_ns()}.ctl", tmp / f"perf-{safe}-{time.monotonic_ns()}.ack"
            os.mkfifo(ctl)
            os.mkfifo(ack)
            out = tmp / f"perf-{safe}-{time.monotonic_ns()}.out"
            proc = subprocess.Popen([self.perf, "stat", "-x,", "-D", "-1", "--control", f"fifo:{ctl},{ack}",
                                     "-o", str(out), "-e", ",".join(syscall_event_list()), "-p", str(pid)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
            # Opening the FIFOs blocks until perf opens its ends; O_RDWR never blocks.
            ctl_fd = os.open(ctl, os.O_RDWR)
            ack_fd = os.open(ack, os.O_RDWR)
            self.procs[w] = (proc, ctl_fd, ack_fd, out)

    def _command(self, window: str, command: str) -> None:
        proc, ctl_fd, ack_fd, _ = self.procs[window]
        os.write(ctl_fd, command.encode() + b"\n")
        ready, _, _ = select.select([ack_fd], [], [], 10)
        if not ready or not os.read(ack_fd, 64).startswith(b"ack"):
            self.err[window] = f"perf did not acknowledge {command} (exit {proc.poll()})"

    def start(self, window: str) -> None:
        if window in self.procs:
            self._command(window, "enable")

    def stop(self, window: str) -> None:
        if window in self.procs:
            self._command(window, "disable")

    def finish(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for w, (proc, ctl_fd, ack_fd, path) in self.procs.items():
            end_process(proc, signal.SIGINT)
            os.close(ctl_fd)
            os.close(ack_fd)
            counts = parse_perf(path.read_text(errors="replace") if path.exists() else "")
            if w in self.err or not counts:
                out[w] = {"syscalls_error": self.err.get(w, "perf counted nothing")}
                continue
            out[w] = {"syscalls_write": sum(counts.get(f"syscalls:sys_enter_{n}", 0)
                                            for n in SYSCALL_EVENTS["writes"]),
                      "syscalls_all": counts.get("raw_syscalls:sys_enter", 0),
                      "syscalls_detail": counts}
        self.procs.clear()
        return out


HISTOGRAM_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)_bucket\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')


def scrape_histogram(port: int, name: str) -> dict[float, float] | None:
    """Cumulative bucket counts {upper bound: count} of one histogram at ``GET /metrics``, or None."""
    status, body = http_body(port, "/metrics", timeout=5)
    if status != 200:
        return None
    buckets: dict[float, float] = {}
    for line in body.decode("utf-8", "replace").splitlines():
        m = HISTOGRAM_LINE.match(line)
        if not m or m.group("name") != name:
            continue
        le = re.search(r'le="([^"]+)"', m.group("labels"))
        if le:
            bound = float("inf") if le.group(1) in ("+Inf", "Inf") else float(le.group(1))
            buckets[bound] = buckets.get(bound, 0.0) + float(m.group("value"))
    return buckets or None


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile on cumulative buckets: linear inside the bucket that holds q."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for b in bounds:
        count = buckets[b]
        if count >= rank:
            if b == float("inf"):
                return lower  # above the last finite bound: report that bound
            return lower + (b - lower) * ((rank - below) / max(1e-12, count - below))
        lower, below = b, count
    return lower


class LagProbe:
    """relayd's ``relayd_event_loop_lag_seconds`` histogram, scraped at a window's marks."""

    METRIC = "relayd_event_loop_lag_seconds"

    def __init__(self, port: int, windows: list[str]) -> None:
        self.port = port
        self.windows = windows
        self.before: dict[str, dict[float, float] | None] = {}
        self.result: dict[str, dict[str, Any]] = {}

    def start(self, window: str) -> None:
        if window in self.windows:
            self.before[window] = scrape_histogram(self.port, self.METRIC)

    def stop(self, window: str) -> None:
        if window not in self.windows:
            return
        a, b = self.before.get(window), scrape_histogram(self.port, self.METRIC)
        if a is None or b is None:
            self.result[window] = {"lag_error": f"no {self.METRIC} at GET /metrics"}
            return
        delta = {k: b[k] - a.get(k, 0.0) for k in b}
        samples = max(delta.values(), default=0.0)
        self.result[window] = {"lag_samples": samples,
                               "lag_p50_ms": None if not samples else 1000 * histogram_quantile(0.5, delta),
                               "lag_p99_ms": None if not samples else 1000 * histogram_quantile(0.99, delta)}

    def finish(self) -> dict[str, dict[str, Any]]:
        return self.result


REDIS_TOP_LEVEL = ("evalsha", "eval", "spublish", "publish")
"""Commands relayd sends on its live and queued paths; INFO's command statistics also count the commands a
script runs inside it, so only these are taken as round trips."""


class PeerProbe:
    """Other processes of a run (a second relayd instance, redis-server): CPU, and Redis's own counters.

    ``peers`` maps a name to a PID; per window it adds ``{name}_cpu_s`` and,
    with ``redis``, ``redis_cpu_s`` (server CPU), ``redis_calls`` (top-level
    commands, see REDIS_TOP_LEVEL), ``redis_calls_by_command`` and
    ``redis_net_bytes`` (in + out). ``own_cpu_s`` sums their CPU: it is the
    run's own work, so the window's background load leaves it out.
    """

    def __init__(self, peers: dict[str, int], redis: Any, windows: list[str]) -> None:
        self.peers = peers
        self.redis = redis
        self.windows = windows
        self.before: dict[str, dict[str, Any]] = {}
        self.result: dict[str, dict[str, Any]] = {}

    def _sample(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: cpu_sample(pid) for name, pid in self.peers.items()}
        if self.redis is not None:
            info = self.redis.info()
            out["redis_cpu"] = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
            out["redis_net"] = int(info["total_net_input_bytes"]) + int(info["total_net_output_bytes"])
            out["redis_calls"] = {name[len("cmdstat_"):]: int(dict(kv.split("=", 1) for kv in value.split(","))["calls"])
                                  for name, value in info.items() if name.startswith("cmdstat_")}
        return out

    def start(self, window: str) -> None:
        if window in self.windows:
            self.before[window] = self._sample()

    def stop(self, window: str) -> None:
        if window not in self.windows or window not in self.before:
            return
        a, b = self.before[window], self._sample()
        fig: dict[str, Any] = {f"{name}_cpu_s": cpu_delta(a[name], b[name]) for name in self.peers}
        fig["own_cpu_s"] = sum(fig.values())
        if self.redis is not None:
            calls = {k: v - a["redis_calls"].get(k, 0) for k, v in b["redis_calls"].items()}
            fig.update(redis_cpu_s=b["redis_cpu"] - a["redis_cpu"], redis_net_bytes=b["redis_net"] - a["redis_net"],
                       redis_calls=sum(calls.get(k, 0) for k in REDIS_TOP_LEVEL),
                       redis_calls_by_command={k: v for k, v in calls.items() if v})
            fig["own_cpu_s"] += fig["redis_cpu_s"]
        self.result[window] = fig

    def finish(self) -> dict[str, dict[str, Any]]:
        return self.result


# Load processes

@dataclasses.dataclass
class LoadRun:
    """What one load run produced: each load process's RESULT, the samples at each mark, the windows."""

    results: list[dict[str, Any]]
    marks: dict[str, dict[str, Any]]
    windows: dict[str, dict[str, Any]]


def run_loadgen(server: Server, proc_args: list[list[str]], timeout: float, *,
                windows: dict[str, tuple[str, str]] | None = None, probes: list[Probe] | None = None,
                cores: int | None = None) -> LoadRun:
    """Run one bench/loadgen.py process per entry of ``proc_args`` against ``server``.

    ``windows`` names mark pairs (start, end); probes act at them. Returns
    the processes' results, the samples at each mark and each window's
    figures (see ``window_figures``). Raises BenchError when a process fails,
    the server dies, or the whole run passes ``timeout`` seconds.
    """
    windows = windows or {}
    probes = probes or []
    starts: dict[str, list[str]] = {}
    ends: dict[str, list[str]] = {}
    for w, (a, b) in windows.items():
        starts.setdefault(a, []).append(w)
        ends.setdefault(b, []).append(w)
    wait_for_quiet()
    procs: list[subprocess.Popen[bytes]] = []
    err_paths: list[Path] = []
    try:
        for args in proc_args:
            cmd = [PY, str(BENCH / "loadgen.py"), "--port", str(server.port), "--marks",
                   "--max-time", str(max(5.0, timeout - 5)), *args]
            err_path = server.tmp / f"loadgen-{time.monotonic_ns()}.err"
            err_paths.append(err_path)
            with open(err_path, "wb") as err:
                procs.append(subprocess.Popen(cmd, cwd=BENCH.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=err, preexec_fn=die_with_parent))
        marks: dict[str, dict[str, Any]] = {}
        results: list[dict[str, Any] | None] = [None] * len(procs)
        waiting: dict[str, set[int]] = {}
        bufs = [b""] * len(procs)
        open_fds = {p.stdout.fileno(): i for i, p in enumerate(procs) if p.stdout is not None}
        deadline = time.monotonic() + timeout
        while open_fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"loadgen {proc_args[0][0]} did not finish within {timeout:.0f} s")
            ready, _, _ = select.select(list(open_fds), [], [], min(remaining, 1.0))
            if not ready and not server.alive():
                raise BenchError(f"{server.label} died during the load:\n{server.log_tail()}")
            for fd in ready:
                i = open_fds[fd]
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    del open_fds[fd]
                    if results[i] is None:
                        raise BenchError(f"loadgen {proc_args[i][0]} (process {i + 1} of {len(procs)}) exited "
                                         f"without a result:\n{err_paths[i].read_text(errors='replace')[-2000:]}")
                    continue
                bufs[i] += chunk
                while b"\n" in bufs[i]:
                    line, bufs[i] = bufs[i].split(b"\n", 1)
                    text = line.decode(errors="replace")
                    if text.startswith("MARK "):
                        name = text[5:].strip()
                        waiting.setdefault(name, set()).add(i)
                        if len(waiting[name]) == len(procs):
                            del waiting[name]
                            for w in starts.get(name, ()):
                                for p in probes:
                                    p.start(w)
                            sample = server.sample()
                            sample["lg_cpu"] = [cpu_sample(p.pid) for p in procs]
                            sample["busy"] = machine_busy_seconds()
                            marks[name] = sample
                            for w in ends.get(name, ()):
                                for p in probes:
                                    p.stop(w)
                            for p in procs:
                                assert p.stdin is not None
                                p.stdin.write(b"\n")
                                p.stdin.flush()
                    elif text.startswith("RESULT "):
                        results[i] = json.loads(text[7:])
                        if not results[i].get("ok"):  # the others may wait at a mark for it: stop now
                            raise BenchError(f"loadgen {proc_args[i][0]} failed: {results[i].get('error')}\n"
                                             f"{err_paths[i].read_text(errors='replace')[-1000:]}")
        for p in procs:
            p.wait(10)
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        extra: dict[str, dict[str, Any]] = {}
        for probe in probes:  # always: a probe may hold processes (perf) that must end with the run
            for w, figures in probe.finish().items():
                extra.setdefault(w, {}).update(figures)
    failed = [(i, r) for i, r in enumerate(results) if r is None or not r.get("ok")]
    if failed:
        i, r = failed[0]
        raise BenchError(f"loadgen {proc_args[i][0]} failed: {(r or {}).get('error')}\n"
                         f"{err_paths[i].read_text(errors='replace')[-1000:]}")
    computed = {w: {**window_figures(marks, a, b, cores, extra.get(w, {}).get("own_cpu_s", 0.0)), **extra.get(w, {})}
                for w, (a, b) in windows.items() if a in marks and b in marks}
    return LoadRun([r for r in results if r is not None], marks, computed)


def window_figures(marks: dict[str, dict[str, Any]], start: str, end: str, cores: int | None,
                   own_cpu_s: float = 0.0) -> dict[str, Any]:
    """Server CPU, loadgen CPU (sum and busiest process), RSS, write syscalls from /proc, background load.
    ``own_cpu_s``: CPU of the run's other processes (a second instance, redis-server), not background."""
    a, b = marks[start], marks[end]
    wall = max(1e-9, b["t"] - a["t"])
    lg = [cpu_delta(x, y) for x, y in zip(a["lg_cpu"], b["lg_cpu"])]
    server_cpu = cpu_delta(a["cpu"], b["cpu"])
    background = max(0.0, (b["busy"] - a["busy"] - server_cpu - sum(lg) - own_cpu_s) / wall)
    if wall >= 0.5:
        BACKGROUND.append(background)
    out = {"wall_s": wall, "cpu_s": server_cpu, "cpu_pct": 100 * server_cpu / wall,
           "lg_cpu_pct": 100 * sum(lg) / wall, "lg_max_pct": 100 * max(lg, default=0.0) / wall,
           "lg_procs": len(lg), "rss_kb": b["rss_kb"], "background_cores": background,
           "own_cpu_pct": 100 * own_cpu_s / wall,
           "syscw": None if a.get("syscw") is None or b.get("syscw") is None else b["syscw"] - a["syscw"]}
    out["bottleneck"] = bottleneck(out, cores or os.cpu_count() or 1)
    return out


def bottleneck(w: dict[str, Any], cores: int) -> str:
    """Which side limited a max-rate window: server, loadgen, the whole machine, or none of them."""
    if w["cpu_pct"] >= SATURATED_PCT:
        return "server"
    if w["lg_max_pct"] >= SATURATED_PCT:
        return "loadgen"
    if w["cpu_pct"] + w["lg_cpu_pct"] + w.get("own_cpu_pct", 0.0) + 100 * w["background_cores"] >= 0.9 * 100 * cores:
        return "machine"
    return "neither (waits)"


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as possible (every part at least 1 when total allows)."""
    parts = max(1, min(parts, total)) if total > 0 else 1
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# Rounds

Figures = dict[str, Any]
RunOne = Callable[[Server, int], Figures]


@dataclasses.dataclass
class Rounds:
    """Per variant label, one entry per round: the figures of that run, or an error string."""

    labels: list[str]
    runs: dict[str, list[Figures | str]]
    procs: dict[str, int]
    discarded: list[dict[str, Any]]

    def values(self, label: str, key: str) -> list[Any]:
        return [r.get(key) if isinstance(r, dict) else None for r in self.runs.get(label, [])]


def run_rounds(ctx: Any, tag: str, variants: list[Any], one_run: RunOne, *, rounds: int | None = None,
               saturation_window: str | Callable[[Figures], str] | None = None, max_procs: int = 1) -> Rounds:
    """Run every variant ``rounds`` times, rotating the order each round, a fresh server each run.

    ``one_run(server, procs)`` drives the load with ``procs`` load processes
    and returns flat figures; with ``saturation_window`` (a window name, or
    a function of the figures that names it) it also returns ``_windows``
    (window name -> window figures). When the busiest load process used
    SATURATED_PCT of a core while the server did not, that run is discarded
    and the whole round is run again with one more process (up to
    ``max_procs``): every server of a round, and of every later round, gets
    the same number of load processes, so a phase paced at a fraction of each
    one's maximum is compared under the same load on the machine.
    """
    rounds = rounds or ctx.rounds
    labels = [v.label for v in variants]
    out = Rounds(labels, {v.label: [] for v in variants}, {}, [])
    n = len(variants)
    for r in range(rounds):
        order = variants[r % n:] + variants[:r % n] if n else []
        while True:
            procs = ctx.procs_plan.get(tag, 1)
            results: dict[str, Any] = {}
            for v in order:
                try:
                    with ctx.server(v) as srv:
                        figures = one_run(srv, procs)
                except Exception as exc:
                    ctx.problems.append(f"{tag}/{v.label}/round {r + 1} failed: {exc}".rstrip())
                    results[v.label] = "error"
                    continue
                name = saturation_window(figures) if callable(saturation_window) else saturation_window
                w = (figures.get("_windows") or {}).get(name) if name else None
                if (w and procs < max_procs and w["lg_max_pct"] >= SATURATED_PCT
                        and w["cpu_pct"] < SATURATED_PCT):
                    out.discarded.append({"label": v.label, "round": r + 1, "procs": procs,
                                          "reason": f"one load process at {w['lg_max_pct']:.0f}% of a core, "
                                                    f"server at {w['cpu_pct']:.0f}%: the round runs again with "
                                                    f"{procs + 1} for every server"})
                    ctx.procs_plan[tag] = procs + 1
                    break
                figures["_procs"] = procs
                results[v.label] = figures
            else:
                break
        for v in variants:
            out.runs[v.label].append(results[v.label])
            out.procs[v.label] = procs
    return out


def summary(values: list[Any]) -> tuple[float, float, float, int] | None:
    """(median, min, max, n) of the numeric values, or None when there are none."""
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not nums:
        return None
    return statistics.median(nums), min(nums), max(nums), len(nums)


def paired_ratios(a: list[Any], b: list[Any]) -> list[float]:
    """a[i] / b[i] for each round where both are numbers (a ratio only ever within one round)."""
    return [x / y for x, y in zip(a, b)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
