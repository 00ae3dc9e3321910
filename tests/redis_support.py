"""Real ``redis-server`` processes for tests: one server, or a local three-master cluster.

Each server listens on a free 127.0.0.1 port with its own temporary directory and is
stopped by its PID. Nothing here fakes Redis; tests fail (not skip) when the Debian
``redis-server`` package is missing.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import signal
import subprocess
from pathlib import Path

from support import free_port, wait_until

INSTALL_HINT = "redis-server not found on PATH: install it with `apt-get install redis-server` (Debian package)"


def redis_binary(name: str = "redis-server") -> str:
    """Path of a Redis program; raises RuntimeError with the install command when missing."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(INSTALL_HINT if name == "redis-server" else
                           f"{name} not found on PATH: install it with `apt-get install redis-server`")
    return path


def free_cluster_port() -> int:
    """A free port P below 55536 whose cluster bus port P + 10000 is free too."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisServer:
    """One ``redis-server`` child process; ``stop()``/``start()`` keep its port and directory."""

    def __init__(self, workdir: Path, *, appendonly: bool = False, port: int | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "redis.log"
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        args = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no",
                "--logfile", str(self.log_path), "--protected-mode", "no"]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        return args + list(self.extra)

    def start(self, timeout: float = 10) -> None:
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     cwd=self.workdir)
        try:
            wait_until(self.ready, f"redis-server on port {self.port}", timeout=timeout)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()[-2000:]}")
        try:
            return self.cli("PING", timeout=2).startswith(("PONG", "NOAUTH"))
        except (subprocess.SubprocessError, OSError):
            return False

    def cli(self, *args: str, timeout: float = 10) -> str:
        """Run one command with redis-cli; returns its raw text answer (stripped)."""
        out = subprocess.run([redis_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(self.port), *args],
                             capture_output=True, text=True, timeout=timeout)
        return out.stdout.strip()

    def info(self, section: str) -> dict[str, str]:
        pairs = (line.split(":", 1) for line in self.cli("INFO", section).splitlines() if ":" in line)
        return {k: v.strip() for k, v in pairs}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def command_calls(self) -> dict[str, int]:
        """Calls per command since start (``INFO commandstats``), e.g. ``{"evalsha": 12, ...}``."""
        calls = {}
        for name, value in self.info("commandstats").items():
            fields = dict(part.split("=", 1) for part in value.split(","))
            calls[name.removeprefix("cmdstat_")] = int(fields["calls"])
        return calls

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        """Stop the server by its PID (SIGTERM lets it finish its AOF; SIGKILL is a crash)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


class RedisCluster:
    """Three masters with no replicas on loopback ports, created with ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes: list[RedisServer] = []
        try:
            for i in range(masters):
                self.nodes.append(RedisServer(workdir / f"node{i}", port=free_cluster_port(), extra=(
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "2000")))
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            created = subprocess.run([redis_binary("redis-cli"), "--cluster", "create", *addresses,
                                      "--cluster-replicas", "0", "--cluster-yes"],
                                     capture_output=True, text=True, timeout=60)
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
            wait_until(self.state_ok, "cluster_state:ok on every node", timeout=30, interval=0.1)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def state_ok(self) -> bool:
        return all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class ReplicatedRedisCluster:
    """Three masters with one replica each (``--cluster-replicas 1``), for failover: ``kill(node)`` is a crash
    (SIGKILL) and the master's replica takes over after the node timeout (1 s here)."""

    def __init__(self, workdir: Path, masters: int = 3, *, node_timeout_ms: int = 1000) -> None:
        self.nodes: list[RedisServer] = []
        try:
            for i in range(2 * masters):
                self.nodes.append(RedisServer(workdir / f"node{i}", port=free_cluster_port(), extra=(
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms), "--appendonly", "no")))
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            created = subprocess.run([redis_binary("redis-cli"), "--cluster", "create", *addresses,
                                      "--cluster-replicas", "1", "--cluster-yes"],
                                     capture_output=True, text=True, timeout=60)
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
            wait_until(self.state_ok, "cluster_state:ok on every node", timeout=30, interval=0.1)
            wait_until(lambda: all(n.info("replication").get("connected_slaves") == "1" for n in self.masters()),
                       "a connected replica for every master", timeout=30, interval=0.1)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def live(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None]

    def masters(self) -> list[RedisServer]:
        return [n for n in self.live() if n.info("replication").get("role") == "master"]

    def state_ok(self) -> bool:
        return all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.live())

    def failed_over(self, masters: int) -> bool:
        """A replica took the killed master's place: ``masters`` live masters again, and the cluster is ok (right
        after a kill the state still says ok: the failure is not detected yet)."""
        return len(self.masters()) == masters and self.state_ok()

    def kill(self, node: RedisServer) -> None:
        node.stop(signal.SIGKILL)

    def rejoin(self, node: RedisServer) -> None:
        """Start a killed node again: it comes back as a replica of the master that took its place."""
        node.start()
        wait_until(lambda: all(n.info("replication").get("connected_slaves") == "1" for n in self.masters()),
                   "a connected replica for every master", timeout=30, interval=0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
