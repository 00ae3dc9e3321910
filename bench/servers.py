"""The servers under test, each its own process on 127.0.0.1, and how to read them from /proc.

Three kinds: ``relayd`` (``python relayd.py --config EMPTY`` plus RELAYD_*
environment, memory or sqlite backend), ``baseline`` (bench/baseline.py) and
``node`` (the original Node relay from a checkout outside this repository,
see ``NodeRelay``). A ``Server`` starts one of them on a free port, waits
until it answers HTTP 200, checks that it listens on 127.0.0.1 only, and
stops it by PID (SIGTERM, then SIGKILL). Every child gets PR_SET_PDEATHSIG,
so none outlives a killed runner.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PY = sys.executable

# Environment names relayd also reads (the seed's legacy names, which the Node original reads too);
# stripped from every server's environment so a stray PORT or LOG_LEVEL in the caller's shell cannot
# leak in. Completed from relayd's config schema at start-up (``configure_relayd``).
LEGACY_ENV = {"PORT", "ALLOWED_ORIGINS", "RATE_LIMIT_WINDOW_MS", "RATE_LIMIT_MAX_REQUESTS",
              "MAX_OFFLINE_MESSAGES", "MESSAGE_RETENTION_HOURS", "LOG_LEVEL", "NODE_ENV", "NODE_OPTIONS",
              "WS_PORT"}
RELAYD_BASE_ENV: dict[str, str] = {}  # limits switched off, plus --relayd-env; filled by configure_relayd


class BenchError(Exception):
    pass


# /proc

def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads, live and exited), in seconds; 10 ms ticks."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def cpu_seconds_precise(pid: int) -> float | None:
    """Time on CPU of the process's live threads, in seconds, to the nanosecond (/proc/PID/task/*/schedstat).

    Threads that exited are missing here (``cpu_seconds`` keeps them), so a
    window uses this only when both agree to within the tick resolution
    (``cpu_delta``). None when schedstat is not available.
    """
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    except OSError:
        return None
    return total / 1e9


def cpu_sample(pid: int) -> tuple[float, float | None]:
    return cpu_seconds(pid), cpu_seconds_precise(pid)


def cpu_delta(a: tuple[float, float | None], b: tuple[float, float | None]) -> float:
    """CPU seconds between two ``cpu_sample``s: the precise figure unless a thread's exit made it fall short."""
    coarse = b[0] - a[0]
    if a[1] is None or b[1] is None:
        return coarse
    precise = b[1] - a[1]
    return coarse if coarse - precise > 2.0 / CLK_TCK + 0.05 * coarse else precise


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def io_counters(pid: int) -> dict[str, int]:
    """/proc/PID/io (all threads): syscw counts write(2)/writev(2)/pwrite, not send/sendto/sendmsg."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return {k: int(v) for k, _, v in (line.partition(": ") for line in f.read().splitlines())}
    except OSError:
        return {}


def machine_busy_seconds() -> float:
    """CPU time all processes used, summed over CPUs (/proc/stat: user nice system irq softirq steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def listening_addresses(port: int) -> set[str]:
    """Local addresses of TCP sockets listening on ``port`` (/proc/net/tcp and tcp6)."""
    out: set[str] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, _, hexport = fields[1].partition(":")
            if fields[3] != "0A" or int(hexport, 16) != port:
                continue
            raw = bytes.fromhex(addr)
            if len(raw) == 4:
                out.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                out.add(socket.inet_ntop(socket.AF_INET6, words))
    return out


def is_loopback_only(addresses: set[str]) -> bool:
    return bool(addresses) and all(a in ("127.0.0.1", "::ffff:127.0.0.1") for a in addresses)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the runner dies, so no server outlives a killed run."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# HTTP, for readiness and checks (raw sockets: cheap and dependency-free)

def end_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10.0) -> bool:
    """Send ``sig`` to a child we started (by PID), then SIGKILL it if it has not exited within ``timeout``;
    returns whether it had to be killed."""
    if proc.poll() is not None:
        return False
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout)
        return False
    except subprocess.TimeoutExpired:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
        return True


def http_get(port: int, path: str, timeout: float = 1.0) -> int:
    """Status of one GET (0 when nothing answers)."""
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


def http_body(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``path`` with ``Connection: close``; (status, body) read to EOF (0 and b"" when nothing answers)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except OSError:
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        return int(head[9:12]), body
    except ValueError:
        return 0, b""


def http_json(port: int, path: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET ``path``; (status, decoded JSON body or None)."""
    status, body = http_body(port, path, timeout)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


# Redis (scenario 9): a redis-server of the benchmark's own, spoken to in RESP over a raw socket

def resp_call(port: int, *args: str, timeout: float = 5.0) -> Any:
    """One Redis command; its reply (bulk and simple strings decoded, integers as int). Raises BenchError."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(payload)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    raise BenchError(f"redis on port {port} closed the connection")
                data += chunk
            head, _, rest = data.partition(b"\r\n")
            kind, value = head[:1], head[1:].decode()
            if kind == b"$":
                size = int(value)
                while len(rest) < size + 2:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise BenchError(f"redis on port {port} closed the connection")
                    rest += chunk
                return rest[:size].decode()
    except OSError as exc:
        raise BenchError(f"redis on port {port}: {exc}") from None
    if kind == b"-":
        raise BenchError(f"redis: {value}")
    return int(value) if kind == b":" else value


class RedisProcess:
    """A redis-server (no persistence) on a free 127.0.0.1 port, stopped by PID."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def missing() -> str:
        """'' when a Redis scenario can run here, else why not."""
        if shutil.which("redis-server") is None:
            return "redis-server is not installed (Debian: redis-server)"
        r = subprocess.run([PY, "-c", "import redis"], cwd=ROOT, capture_output=True, timeout=60)
        return "" if r.returncode == 0 else "relayd's Redis extra is not installed (pip install -e '.[redis]')"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "RedisProcess":
        self.port = free_port()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "",
                                      "--appendonly", "no", "--dir", str(self.tmp), "--protected-mode", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if resp_call(self.port, "PING", timeout=0.5) == "PONG":
                    return self
            except BenchError:
                time.sleep(0.02)
        self.stop()
        raise BenchError("redis-server did not answer within 10 s")

    def info(self) -> dict[str, str]:
        text = resp_call(self.port, "INFO", "all")
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))

    def flush(self) -> None:
        resp_call(self.port, "FLUSHALL")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            end_process(proc)


# relayd's configuration schema

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


# "0: no limit", "0: unlimited", "0 = off", "0 disables it", ... in a key's help text.
NO_LIMIT = re.compile(r"\b0\s*(?::|=|means)?\s*(?:no limit|unlimited|off|disables?)\b", re.IGNORECASE)


def unlimited_overrides(schema: dict[str, dict[str, dict[str, Any]]]) -> dict[str, str]:
    """Every [limits] key documented as '0: no limit' / '0: unlimited', set to 0.

    The benchmark measures the relay's own cost, so abuse limits (per-IP
    connection caps, frames per second, REST rate limit...) are switched off.
    """
    out = {}
    for key, meta in schema.get("limits", {}).items():
        if meta["min"] == 0 and NO_LIMIT.search(meta["help"] or ""):
            out[f"RELAYD_LIMITS_{key.upper()}"] = "0"
    return out


def configure_relayd(extra: list[str]) -> dict[str, str]:
    """Fill RELAYD_BASE_ENV from relayd's schema and ``--relayd-env`` items; return the limits switched off."""
    schema = relayd_schema()
    off = unlimited_overrides(schema)
    RELAYD_BASE_ENV.clear()
    RELAYD_BASE_ENV.update(off)
    LEGACY_ENV.update(meta["env"] for keys in schema.values() for meta in keys.values() if meta.get("env"))
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("RELAYD_"):
            raise SystemExit(f"--relayd-env {item!r}: expected RELAYD_SECTION_KEY=VALUE")
        RELAYD_BASE_ENV[key] = value
    return off


# The Node original

@dataclasses.dataclass
class NodeRelay:
    """A checkout of idenacommunity/idena-p2p's ``relay-server`` folder, outside this repository.

    ``prepare`` checks it can run: node on PATH, an entry point, and
    node_modules (installed with ``npm install --omit=dev`` when missing and
    npm is present). ``reason`` says why not when it cannot; ``notes`` what
    was done.
    """

    directory: Path | None
    node: str | None = None
    entry: Path | None = None
    reason: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return not self.reason

    @classmethod
    def prepare(cls, directory: str | None) -> "NodeRelay":
        if not directory:
            return cls(None, reason="no checkout given (--node-relay DIR or RELAYDBENCH_NODE_RELAY)")
        d = Path(directory).expanduser().resolve()
        relay = cls(d)
        relay.node = shutil.which("node")
        if relay.node is None:
            relay.reason = "node is not on PATH"
            return relay
        try:
            pkg = json.loads((d / "package.json").read_text())
        except (OSError, ValueError) as exc:
            relay.reason = f"{d}/package.json unreadable ({exc.__class__.__name__})"
            return relay
        relay.entry = d / pkg.get("main", "src/server.js")
        if not relay.entry.is_file():
            relay.reason = f"entry point {relay.entry} missing"
            return relay
        if not (d / "node_modules").is_dir():
            npm = shutil.which("npm")
            if npm is None:
                relay.reason = f"{d} has no node_modules and npm is not on PATH"
                return relay
            relay.notes.append(f"ran `npm install --omit=dev` in {d} (it had no node_modules)")
            print(f"node relay: running npm install --omit=dev in {d} ...", file=sys.stderr,
                  flush=True)
            try:
                r = subprocess.run([npm, "install", "--omit=dev", "--no-audit", "--no-fund"], cwd=d,
                                   capture_output=True, text=True, timeout=600, preexec_fn=die_with_parent)
            except subprocess.TimeoutExpired:
                relay.reason = "npm install --omit=dev timed out"
                return relay
            if r.returncode != 0:
                relay.reason = f"npm install --omit=dev failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
                return relay
        r = subprocess.run([relay.node, "--version"], capture_output=True, text=True, timeout=30)
        relay.versions["node"] = r.stdout.strip()
        relay.versions["relay-server"] = str(pkg.get("version", "?"))
        for dep in ("ws", "express"):
            try:
                relay.versions[dep] = json.loads((d / "node_modules" / dep / "package.json").read_text())["version"]
            except (OSError, ValueError, KeyError):
                relay.versions[dep] = "?"
        return relay

    def describe(self) -> str:
        if not self.usable:
            return f"Node original: not measured ({self.reason})"
        v = self.versions
        return (f"Node original: {self.directory} (relay-server {v.get('relay-server')}, node {v.get('node')}, "
                f"ws {v.get('ws')}, express {v.get('express')}; NODE_ENV=production, LOG_LEVEL=warn, bound to "
                f"127.0.0.1 by bench/node_loopback.js)")


# Servers

PURE_LOOP = (("RELAYD_SERVER_EVENT_LOOP", "asyncio"),)
"""relayd on asyncio's loop, the pure default: the memory and SQLite variants, and the Redis and PostgreSQL ones
compared with them (relayd's ``auto`` would pick uvloop where the fast extra is installed)."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One server configuration a scenario measures: a column of its table.

    ``settings`` are generic knobs each kind maps to its own configuration:
    ``queue_max`` (messages held per offline recipient); ``relayd_env``
    (pairs of extra RELAYD_* variables, relayd only).
    """

    label: str
    kind: str  # relayd | baseline | node
    backend: str = "memory"
    settings: tuple[tuple[str, Any], ...] = ()

    def setting(self, name: str, default: Any = None) -> Any:
        return dict(self.settings).get(name, default)


class Server:
    """One server process of a variant; started on a free port, stopped by PID."""

    READY_PATH = {"relayd": "/health/live", "baseline": "/health/live", "node": "/health"}

    def __init__(self, variant: Variant, tmp: Path, *, node: NodeRelay | None = None,
                 db_path: Path | None = None) -> None:
        self.variant = variant
        self.kind = variant.kind
        self.label = variant.label
        self.tmp = tmp
        self.node = node
        self.db_path = db_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = tmp / f"{self.label.replace('/', '-')}-{time.monotonic_ns()}.log"
        self.started_at = 0.0
        self.ready_s = 0.0
        self.stop_note: str | None = None  # an unclean exit, reported under "problems"

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_") and k not in LEGACY_ENV}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        # Byte-code goes to a cache inside the bench's temp dir, never into relayd/.
        env["PYTHONPYCACHEPREFIX"] = str(self.tmp.parent / "pycache")
        return env

    def command_env(self) -> tuple[list[str], dict[str, str], Path]:
        """(argv, environment, working directory) for this kind."""
        env = self._base_env()
        queue_max = self.variant.setting("queue_max")
        if self.kind == "baseline":
            return [PY, str(BENCH / "baseline.py"), str(self.port)], env, ROOT
        if self.kind == "node":
            if self.node is None or not self.node.usable or self.node.entry is None or self.node.node is None:
                raise BenchError(self.node.describe() if self.node else "Node original: not configured")
            env.update({"PORT": str(self.port), "LOG_LEVEL": "warn", "NODE_ENV": "production"})
            if queue_max:
                env["MAX_OFFLINE_MESSAGES"] = str(queue_max)
            return ([self.node.node, "--require", str(BENCH / "node_loopback.js"), str(self.node.entry)],
                    env, self.node.directory or ROOT)
        config = self.tmp / "empty.conf"
        config.touch()
        db = self.db_path or (self.tmp / f"relayd-{self.port}.db")
        env.update(RELAYD_BASE_ENV)
        env.update({
            "RELAYD_SERVER_HOST": HOST, "RELAYD_SERVER_PORT": str(self.port),
            "RELAYD_STORAGE_BACKEND": self.variant.backend, "RELAYD_STORAGE_PATH": str(db),
            "RELAYD_LOG_LEVEL": "warning",
        })
        if queue_max:
            env["RELAYD_QUEUE_MAX_OFFLINE_MESSAGES"] = str(queue_max)
        env.update(dict(self.variant.setting("relayd_env", ())))
        return [PY, str(ROOT / "relayd.py"), "--config", str(config)], env, ROOT

    def start(self, *, ready_path: str | None = None, timeout: float = 30.0) -> "Server":
        self.port = free_port()
        cmd, env, cwd = self.command_env()
        log = open(self.log_path, "wb")
        try:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        finally:
            log.close()
        self.wait_ready(ready_path or self.READY_PATH[self.kind], timeout)
        where = listening_addresses(self.port)
        if not is_loopback_only(where):
            self.stop()
            raise BenchError(f"{self.label} listens on {sorted(where) or 'nothing'}, not 127.0.0.1 only; "
                             "not measured")
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

    def sample(self) -> dict[str, Any]:
        if not self.alive():
            raise BenchError(f"{self.label} (pid {self.pid}) died with {self.proc.returncode if self.proc else '?'}:"
                             f"\n{self.log_tail()}")
        io = io_counters(self.pid)
        return {"t": time.monotonic(), "cpu": cpu_sample(self.pid), "rss_kb": rss_kb(self.pid),
                "syscw": io.get("syscw"), "syscr": io.get("syscr")}

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
        if end_process(proc, timeout=timeout):
            self.stop_note = f"{self.label} did not exit within {timeout:.0f} s of SIGTERM; killed"
        elif proc.returncode != 0:
            self.stop_note = f"{self.label} exited with {proc.returncode} after SIGTERM:\n{self.log_tail()}"
        return proc.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
