"""Real relays for tests: in a background thread, or as a separate process.

Every server listens on an ephemeral port on 127.0.0.1 and is driven with
real WebSocket clients and real HTTP requests.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from relayd.config import Config, load_config
from relayd.server import RelayServer
from relayd.storage.store import Store

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(**sections: dict[str, Any]) -> Config:
    """``make_config(server={"auth_timeout_s": "1"})``: defaults plus overrides, memory storage."""
    # A session that has not sent a frame gets its backlog after [queue] flush_delay_ms (the app listens late);
    # tests that are not about that hold start with it off, so a fresh session takes live messages at once.
    overrides = [("storage", "backend", "memory"), ("server", "host", "127.0.0.1"), ("server", "port", "0"),
                 ("queue", "flush_delay_ms", "0")]
    for section, values in sections.items():
        overrides += [(section, k, str(v)) for k, v in values.items()]
    return load_config(None, environ={}, overrides=overrides)


class HttpReply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<HttpReply {self.status} {self.body[:200]!r}>"


def http_request(port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                 raw_body: bytes | None = None, timeout: float = 5) -> HttpReply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    hdrs = {"Connection": "close", **(headers or {})}
    data = raw_body
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    payload = resp.read()
    reply = HttpReply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload)
    conn.close()
    return reply


class WsClient:
    """A blocking WebSocket client that speaks JSON frames."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self._cm = connect(url, compression=None, open_timeout=5, **kwargs)
        self.ws = self._cm.__enter__()

    def send(self, frame: Any) -> None:
        self.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    def recv(self, timeout: float = 3) -> dict[str, Any]:
        return json.loads(self.ws.recv(timeout=timeout))

    def recv_type(self, ftype: str, timeout: float = 3) -> dict[str, Any]:
        """Skip frames of other types (e.g. a challenge) until one of ``ftype`` arrives."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv(max(0.01, deadline - time.monotonic()))
            if frame.get("type") == ftype:
                return frame

    def no_frame(self, timeout: float = 0.3) -> bool:
        try:
            self.ws.recv(timeout=timeout)
        except TimeoutError:
            return True
        return False

    def auth(self, address: str, **extra: Any) -> dict[str, Any]:
        self.send({"type": "auth", "address": address, **extra})
        return self.recv_type("auth_success")

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def __enter__(self) -> "WsClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ThreadRelay:
    """A RelayServer on its own event loop in a daemon thread."""

    def __init__(self, config: Config, store: Store | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = RelayServer(config, store)
        started = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self.server.start())
            except BaseException as exc:  # surfaced to the test
                self.error = exc
                started.set()
                return
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(10)
        if self.error:
            raise self.error
        self.port = self.server.port
        self.url = f"ws://127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Any, *args: Any) -> Any:
        async def wrapper() -> Any:
            return fn(*args)
        return self.call(wrapper())

    def http(self, method: str, path: str, body: Any = None, **kw: Any) -> HttpReply:
        return http_request(self.port, method, path, body, **kw)

    def ws(self, **kwargs: Any) -> WsClient:
        return WsClient(self.url, **kwargs)

    def stop(self) -> None:
        if self.loop.is_running():
            self.call(self.server.stop(), timeout=15)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class ProcessRelay:
    """``python relayd.py`` as a child process, for signals, crashes and restarts."""

    def __init__(self, tmp: Path, *, config_text: str = "", env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), port: int | None = None, wait: bool = True) -> None:
        self.port = port or free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.config_path = tmp / "relayd.conf"
        if not self.config_path.exists() or config_text:
            self.config_path.write_text(config_text)
        self.log_path = tmp / f"relayd-{self.port}-{time.monotonic_ns()}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_")}
        full_env.update({"RELAYD_SERVER_HOST": "127.0.0.1", "RELAYD_SERVER_PORT": str(self.port),
                         "RELAYD_QUEUE_FLUSH_DELAY_MS": "0",
                         "PYTHONUNBUFFERED": "1"})
        full_env.update(env or {})
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "relayd.py"), "--config", str(self.config_path),
                                      *args], cwd=tmp, env=full_env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relayd exited with {self.proc.returncode}:\n{self.log()}")
            if "relayd listening" in self.log():
                try:
                    http_request(self.port, "GET", "/health/live", timeout=1)
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"relayd did not start:\n{self.log()}")

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text()

    def http(self, method: str, path: str, body: Any = None, **kw: Any) -> HttpReply:
        return http_request(self.port, method, path, body, **kw)

    def ws(self, **kwargs: Any) -> WsClient:
        return WsClient(self.url, **kwargs)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()
        return self.proc.returncode
