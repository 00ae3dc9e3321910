"""Issue 20's CPU and handshake attacks, timed: another IP's ``GET /health/live`` while one IP attacks.

Each scenario starts a relayd process (this checkout, or ``--relayd DIR``, e.g. an export of an older commit, for
a before/after), runs the attack from 127.0.0.1 or 127.0.0.3 and probes ``/health/live`` from 127.0.0.2 on a new
connection every 100 ms. The goal: every probe answered, p99 under 1 s.

    .venv/bin/python bench/abuse_transport.py                    # every scenario, about a minute
    .venv/bin/python bench/abuse_transport.py --only pipeline,half_open --seconds 10 --relayd /tmp/old-relayd

Scenarios: ``pipeline`` (20 connections pipelining 1,000 ``GET /metrics`` each, reading the answers),
``pipeline_unbudgeted`` (the same with ``rate_limit_max_probes = 0``: only the turn-taking between connections
protects the probe), ``unread`` (300 connections x 1,000 pipelined ``/metrics``, never read), ``half_open``
(3,000 connections that never finish a request head, against a relay limited to 2,048 descriptors).
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import support  # noqa: E402
from support import PipelineFlood, ProcessRelay, UnreadPipelines, client_socket, live_latency  # noqa: E402

CONFIG = "[auth]\nmode = open\n"
PROBE_TIMEOUT = 10.0


def probe(port: int, seconds: float) -> list[float]:
    """``/health/live`` latencies from 127.0.0.2, one new connection every 100 ms for ``seconds``."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        out.append(live_latency(port, "127.0.0.2", PROBE_TIMEOUT))
        time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime in clock ticks (USER_HZ = 100)


class HalfOpen:
    """3,000 connections from 127.0.0.3 that send half a request head and then nothing."""

    def __init__(self, port: int, count: int = 3000) -> None:
        self.port, self.count = port, count
        self.socks: list[socket.socket] = []
        self.statuses: dict[int, int] = {}

    def __enter__(self) -> "HalfOpen":
        for _ in range(self.count):
            s = client_socket("127.0.0.3")
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.socks.append(s)
        time.sleep(0.2)
        for s in self.socks:
            try:
                s.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for s in self.socks:
            s.close()


Attack = Callable[[int], Any]
SCENARIOS: dict[str, tuple[str, Attack, int | None]] = {
    "pipeline": ("", lambda port: PipelineFlood(port, "127.0.0.1", connections=20, requests=1000), None),
    "pipeline_unbudgeted": ("[limits]\nrate_limit_max_probes = 0\n",
                            lambda port: PipelineFlood(port, "127.0.0.1", connections=20, requests=1000), None),
    "unread": ("", UnreadPipelines, None),
    "half_open": ("[server]\nhead_timeout_s = 30\n", HalfOpen, 2048),
}


def run(name: str, seconds: float, tmp: Path) -> dict[str, Any]:
    config, attack, nofile = SCENARIOS[name]
    relay = ProcessRelay(tmp / name, config_text=CONFIG + config, nofile=nofile)
    try:
        with attack(relay.port) as flood:
            cpu0, t0 = cpu_seconds(relay.proc.pid), time.monotonic()
            latencies = probe(relay.port, seconds)
            cpu = (cpu_seconds(relay.proc.pid) - cpu0) / (time.monotonic() - t0)
            statuses = dict(flood.statuses)
            closes = getattr(flood, "closes", None)
    finally:
        relay.stop()
    latencies.sort()
    return {"scenario": name, "probes": len(latencies),
            "unanswered": sum(1 for x in latencies if x >= PROBE_TIMEOUT),
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
            "max_ms": latencies[-1] * 1000, "relay_cpu_pct": cpu * 100, "attacker_answers": statuses,
            "attacker_connections_closed": closes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help="scenarios, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="probing time per scenario")
    parser.add_argument("--relayd", type=Path, help="a relayd checkout to run instead of this one")
    args = parser.parse_args(argv)
    if args.relayd:
        support.ROOT = args.relayd.resolve()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))
    print(f"relayd: {support.ROOT}")
    print(f"{'scenario':<22}{'probes':>7}{'lost':>6}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'relay CPU':>11}  attacker")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            r = run(name, args.seconds, Path(tmp))
            closed = r["attacker_connections_closed"]
            print(f"{name:<22}{r['probes']:>7}{r['unanswered']:>6}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}"
                  f"{r['max_ms']:>9.1f}{r['relay_cpu_pct']:>10.0f}%  answers {r['attacker_answers']}"
                  + (f", closed early {closed}" if closed is not None else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
