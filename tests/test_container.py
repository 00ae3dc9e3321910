"""The container image: build it, run it, smoke-test it over real sockets, stop it, run it again on its volume.

Needs a working Docker daemon (``.ci/docker-daemon`` provides one on a Debian machine) and fails, never skips,
without one. The image is built from the Dockerfile's default BASE when it can be pulled; otherwise from a
Debian bookworm base the test builds once per machine with mmdebstrap and ``docker import`` (kept as
``relayd-test-base:bookworm``). Containers run with ``--network host`` on free ports of 127.0.0.1. The test
removes the containers and volumes it created and keeps the images, so later runs build from cache.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import secrets
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from container_support import TEST_BASE, docker, ensure_base_image, expect_frame, queue_one, require_docker
from support import ROOT, WsClient, free_port, http_request, read_until_closed, wait_until

IMAGE = "relayd:test"
IMAGE_REDIS = "relayd:test-redis"
# A fixed port keeps the build argument PIP_INDEX_URL, and with it Docker's layer cache, the same from run to
# run; when it is taken the forwarder falls back to any free port and the build runs without cache.
INDEX_FORWARDER_PORT = 38741
START_TIMEOUT_S = 30.0


# Docker plumbing for the image (the rest is in container_support.py)


def pip_setting(name: str) -> str | None:
    """This machine's pip setting ``name`` (e.g. ``index-url``): the PIP_* variable, else pip's config."""
    env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
    if env:
        return env
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            timeout=60)
    for line in listed.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.rpartition(".")[2] == name:
            return value.strip().strip("'\"")
    return None


class IndexForwarder:
    """This machine's package index, as its pip reaches it, served over HTTP on 127.0.0.1 to a build.

    A build container sees neither this machine's file:// indexes nor the certificate authorities its pip
    trusts (``cert``), so it may not reach PyPI by itself. This forwards the index's pages and the files
    they link to (absolute https links become ``/_https/HOST/PATH`` here), fetched with the host's trust;
    pip in the build still checks every file against the page's sha256. Use as a context manager; ``url``
    is the value for the build argument PIP_INDEX_URL (reachable with ``docker build --network host``).
    """

    def __init__(self) -> None:
        upstream = pip_setting("index-url") or "https://pypi.org/simple"
        parts = urllib.parse.urlsplit(upstream)
        cafile = pip_setting("cert")
        context = ssl.create_default_context(cafile=cafile)
        forwarder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/_https/"):
                    target = "https://" + self.path[len("/_https/"):]
                else:
                    target = f"{parts.scheme}://{parts.netloc}{self.path}"
                request = urllib.request.Request(target, headers={"Accept": "text/html"})
                try:
                    with urllib.request.urlopen(request, timeout=60, context=context) as reply:
                        status, ctype, body = reply.status, reply.headers.get("Content-Type", ""), reply.read()
                except urllib.error.HTTPError as exc:
                    status, ctype, body = exc.code, "text/plain", str(exc).encode()
                except OSError as exc:
                    status, ctype, body = 502, "text/plain", f"{target}: {exc}".encode()
                if ctype.startswith("text/html"):
                    body = body.replace(b'href="https://', f'href="{forwarder.origin}/_https/'.encode())
                self.send_response(status)
                self.send_header("Content-Type", ctype or "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", INDEX_FORWARDER_PORT), Handler)
        except OSError:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = self.origin + parts.path
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "IndexForwarder":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def image_id(tag: str) -> str | None:
    done = docker("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def build_image(tag: str, base: str, *, index_url: str | None = None, extras: str = "") -> None:
    """``docker build`` the repository's Dockerfile as ``tag``, its build stage as ``tag-build``, so the layers
    of both are reused by the next run; the images these tags named before are removed when superseded, so
    repeated runs do not pile up (with the vfs storage driver every layer is a full copy of the base)."""
    args = ["build", "--force-rm", "--network", "host", "--build-arg", f"BASE={base}"]
    if index_url:
        args += ["--build-arg", f"PIP_INDEX_URL={index_url}"]
    if extras:
        args += ["--build-arg", f"EXTRAS={extras}"]
    stages = ((f"{tag}-build", ("--target", "build")), (tag, ()))
    before = {name: image_id(name) for name, _ in stages}
    for name, target in stages:
        docker(*args, *target, "--tag", name, str(ROOT), timeout=900)
    for name, old in before.items():
        if old is not None and old != image_id(name):
            docker("rmi", old, check=False)


def container_state(name: str, field: str) -> str:
    return docker("inspect", "--format", "{{" + field + "}}", name).stdout.strip()


def container_logs(name: str) -> str:
    done = docker("logs", name, check=False)
    return done.stdout + done.stderr


def wait_ready(name: str, port: int) -> None:
    """Wait until the container's relayd answers /health/ready with 200 on ``port``; fail with its logs
    when it exits or does not get there within START_TIMEOUT_S."""
    def ready() -> bool:
        if container_state(name, ".State.Running") != "true":
            pytest.fail(f"container {name} exited with {container_state(name, '.State.ExitCode')}:\n"
                        f"{container_logs(name)}")
        try:
            return http_request(port, "GET", "/health/ready", timeout=1).status == 200
        except OSError:
            return False
    wait_until(ready, f"{name} ready on port {port}", timeout=START_TIMEOUT_S, interval=0.2)


def wait_healthy(name: str) -> None:
    """Wait until Docker's HEALTHCHECK reports the container healthy (run with a short --health-interval)."""
    try:
        wait_until(lambda: container_state(name, ".State.Health.Status") == "healthy", f"{name} healthy",
                   timeout=START_TIMEOUT_S, interval=0.2)
    except AssertionError:
        pytest.fail(f"{name} is {container_state(name, '.State.Health.Status')}: "
                    f"{docker('inspect', '--format', '{{json .State.Health.Log}}', name).stdout}")


# The protocol smoke test: relayd's own client, run from the image


def relayd_check(image: str, port: int) -> str:
    """``relayd check`` from ``image`` against the relay on 127.0.0.1:``port`` (two throwaway identities, a live
    and a queued message, a key round trip); fails the test with its report unless every step passed."""
    done = docker("run", "--rm", "--network", "host", image, "check", "--relay", f"ws://127.0.0.1:{port}",
                  check=False)
    assert done.returncode == 0, f"relayd check failed:\n{done.stdout}{done.stderr}"
    return done.stdout


# Fixtures


@pytest.fixture(scope="module")
def images() -> Iterator[Callable[[str], str]]:
    """``images(extras)`` builds the image (once per extras value in this module) and returns its tag."""
    require_docker()
    base = ensure_base_image()
    built: dict[str, str] = {}
    # The default base comes from a registry, whose users reach PyPI; this machine's own base is built for
    # machines that may reach packages only the way this machine's pip does.
    with IndexForwarder() if base == TEST_BASE else contextlib.nullcontext() as index:
        index_url = index.url if index is not None else None

        def build(extras: str = "") -> str:
            if extras not in built:
                tag = IMAGE_REDIS if extras == "redis" else IMAGE
                build_image(tag, base, index_url=index_url, extras=extras)
                built[extras] = tag
            return built[extras]

        yield build


class Containers:
    """Containers and volumes one test creates, all named ``relayd-test-<random>``; ``remove()`` deletes them,
    containers first, so their volumes are no longer in use."""

    def __init__(self) -> None:
        self.containers: list[str] = []
        self.volumes: list[str] = []

    def run(self, image: str, *, env: dict[str, str] | None = None, volumes: tuple[str, ...] = ()) -> str:
        """Start a detached container on the host network, health-checked every second; return its name."""
        name = f"relayd-test-{secrets.token_hex(4)}"
        self.containers.append(name)
        command = ["run", "--detach", "--name", name, "--network", "host", "--health-interval", "1s"]
        for key, value in (env or {}).items():
            command += ["--env", f"{key}={value}"]
        for volume in volumes:
            command += ["--volume", volume]
        docker(*command, image)
        return name

    def volume(self) -> str:
        """Create a named volume; return its name."""
        name = f"relayd-test-{secrets.token_hex(4)}"
        docker("volume", "create", name)
        self.volumes.append(name)
        return name

    def remove(self) -> None:
        for name in self.containers:
            docker("rm", "--force", "--volumes", name, check=False)
        for name in self.volumes:
            docker("volume", "rm", "--force", name, check=False)


@pytest.fixture
def containers() -> Iterator[Containers]:
    created = Containers()
    yield created
    created.remove()


# Tests


def test_container_serves_stops_gracefully_and_keeps_queued_messages_on_its_volume(
        images: Callable[[str], str], containers: Containers) -> None:
    image = images("")
    port = free_port()
    volume = containers.volume()
    first = containers.run(image, env={"RELAYD_SERVER_PORT": str(port)}, volumes=(f"{volume}:/var/lib/relayd",))
    wait_ready(first, port)

    status = docker("exec", first, "cat", "/proc/1/status").stdout
    uid = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
    assert uid and uid.group(1) != "0", f"PID 1 runs as root:\n{status}"
    cmdline = docker("exec", first, "cat", "/proc/1/cmdline").stdout.split("\0")
    assert "/opt/relayd/bin/relayd" in cmdline, f"PID 1 is not relayd: {cmdline}"
    wait_healthy(first)

    report = relayd_check(image, port)
    assert re.fullmatch(r"relayd check: (\d+) of \1 steps passed", report.splitlines()[-1]), report
    offline, stored = queue_one(port)

    with WsClient(f"ws://127.0.0.1:{port}") as watcher:
        watcher.auth("0x" + secrets.token_hex(20))
        docker("stop", first, timeout=60)
        closed, _ = read_until_closed(watcher)
    assert closed is not None and closed.code == 1001, f"sessions closed with {closed}"
    assert container_state(first, ".State.ExitCode") == "0", container_logs(first)
    assert re.search(r"relayd\.server: stopped$", container_logs(first), re.MULTILINE), container_logs(first)

    second = containers.run(image, env={"RELAYD_SERVER_PORT": str(port)}, volumes=(f"{volume}:/var/lib/relayd",))
    wait_ready(second, port)
    with WsClient(f"ws://127.0.0.1:{port}") as recipient:
        recipient.send({"type": "auth", "address": offline})
        expect_frame(recipient, "auth_success")
        got = expect_frame(recipient, "message")
    assert (got["messageId"], got["content"], got["queued"]) == (stored["messageId"], stored["content"], True)


def test_mounted_config_file_is_read_and_environment_overrides_it(
        images: Callable[[str], str], containers: Containers, tmp_path: Path) -> None:
    file_port, env_port = free_port(), free_port()
    config = tmp_path / "relayd.conf"
    config.write_text(f"[server]\nhost = 127.0.0.1\nport = {file_port}\n\n[auth]\nmode = open\n\n"
                      "[storage]\nbackend = memory\n")
    config.chmod(0o644)
    name = containers.run(images(""), env={"RELAYD_SERVER_PORT": str(env_port)},
                          volumes=(f"{config}:/etc/relayd/relayd.conf:ro",))
    wait_ready(name, env_port)

    with pytest.raises(ConnectionRefusedError):
        http_request(file_port, "GET", "/health/live", timeout=2)
    # The online list is served in open mode only: the file's [auth] mode took effect.
    assert http_request(env_port, "GET", "/api/status/online/all").status == 200
    assert "storage: memory" in container_logs(name)
    wait_healthy(name)
    # Every command that reads a configuration finds the mounted file by RELAYD_CONFIG, as the relay did.
    effective = docker("run", "--rm", "--network", "host", "--volume", f"{config}:/etc/relayd/relayd.conf:ro",
                       images(""), "config").stdout.splitlines()
    assert f"port = {file_port}  # file /etc/relayd/relayd.conf" in effective, effective


def test_redis_extra_is_installed_by_build_argument(images: Callable[[str], str]) -> None:
    probe = ("--rm", "--network", "host", "--entrypoint", "/opt/relayd/bin/python")
    plain = docker("run", *probe, images(""), "-c", "import redis", check=False)
    assert plain.returncode != 0 and "No module named 'redis'" in plain.stderr, plain
    with_redis = docker("run", *probe, images("redis"), "-c", "import redis; print(redis.__version__)")
    assert re.match(r"\d+\.", with_redis.stdout), with_redis
