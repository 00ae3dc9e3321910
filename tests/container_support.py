"""Docker plumbing shared by the tests that build and run containers (test_container, test_packaging).

``docker()`` runs the client and fails the test with its output; ``ensure_base_image()`` finds or builds the
Debian bookworm base those tests build on: the Dockerfile's default when it can be pulled, else one made once
per machine with mmdebstrap (``relayd-test-base:bookworm``, python3 and python3-venv from Debian).
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from support import ROOT, WsClient, msg

TEST_BASE = "relayd-test-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``docker ARGS``; return the finished process. With ``check``, a non-zero exit or a timeout fails
    the test with the command and its output; without, a timeout reads as exit code -1."""
    try:
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        done = subprocess.CompletedProcess(["docker", *args], -1, "", f"no answer within {timeout:.0f} s")
    if check and done.returncode != 0:
        pytest.fail(f"docker {' '.join(args)} exited with {done.returncode}:\n{done.stdout[-3000:]}"
                    f"\n{done.stderr[-3000:]}")
    return done


def require_docker() -> None:
    """Fail (not skip) with what to do when there is no docker client or no daemon answering it."""
    if shutil.which("docker") is None:
        pytest.fail("the container test needs docker: run .ci/docker-daemon (installs docker.io, starts dockerd)")
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=30)
    if info.returncode != 0 or not info.stdout.strip():
        pytest.fail(f"no Docker daemon answers ({info.stderr.strip()[-500:]}); start one with .ci/docker-daemon")


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False).returncode == 0


def dockerfile_default_base() -> str:
    """The Dockerfile's ``ARG BASE=...`` default, the image users build on."""
    found = re.search(r"^ARG BASE=(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert found, "Dockerfile has no ARG BASE=... line"
    return found.group(1)


def build_debian_base(tag: str) -> None:
    """Build a minimal Debian bookworm image with python3 and python3-venv from Debian's packages, for
    machines that reach no image registry. Takes about half a minute; fails the test when mmdebstrap is
    missing or the mirror cannot be reached."""
    if shutil.which("mmdebstrap") is None:
        pytest.fail(f"cannot pull {dockerfile_default_base()} and mmdebstrap is missing to build {tag}: "
                    "run .ci/docker-daemon or apt-get install mmdebstrap")
    no_docs = [f"--dpkgopt=path-{rule}" for rule in (
        "exclude=/usr/share/man/*", "exclude=/usr/share/info/*", "exclude=/usr/share/locale/*",
        "exclude=/usr/share/doc/*", "include=/usr/share/doc/*/copyright")]
    with tempfile.TemporaryDirectory(prefix="relayd-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        done = subprocess.run(["mmdebstrap", "--variant=minbase", "--include=python3,python3-venv",
                               "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr", *no_docs,
                               "bookworm", str(rootfs), DEBIAN_MIRROR],
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"mmdebstrap could not build {tag} from {DEBIAN_MIRROR}:\n{done.stderr[-3000:]}")
        docker("import", str(rootfs), tag, timeout=300)


def debian_base_image() -> str:
    """This machine's Debian bookworm base with Debian's own python3 (what a .deb depends on), built once."""
    if not image_exists(TEST_BASE):
        build_debian_base(TEST_BASE)
    return TEST_BASE


def ensure_base_image() -> str:
    """The base to build on: the Dockerfile's default when present or pullable, else this machine's own
    Debian base (built once, then reused)."""
    default = dockerfile_default_base()
    if image_exists(default):
        return default
    if image_exists(TEST_BASE):
        return TEST_BASE
    if docker("pull", default, timeout=300, check=False).returncode == 0:
        return default
    build_debian_base(TEST_BASE)
    return TEST_BASE


def expect_frame(client: WsClient, ftype: str, timeout: float = 5) -> dict[str, Any]:
    """The client's next frame, skipping sign-in challenges; fails the test unless it is of type ``ftype``."""
    try:
        frame = client.recv(timeout)
        while frame.get("type") == "challenge":
            frame = client.recv(timeout)
    except TimeoutError:
        pytest.fail(f"no frame within {timeout:.0f} s; expected {ftype}")
    assert frame.get("type") == ftype, f"expected {ftype}, got {frame}"
    return frame


def queue_one(port: int) -> tuple[str, dict[str, Any]]:
    """Queue a message for a fresh offline address; return the address and the message."""
    offline = "0x" + secrets.token_hex(20)
    stored = msg(offline, str(uuid.uuid4()), "c3RvcmVk")
    with WsClient(f"ws://127.0.0.1:{port}") as sender:
        sender.send({"type": "auth", "address": "0x" + secrets.token_hex(20)})
        expect_frame(sender, "auth_success")
        sender.send(stored)
        assert expect_frame(sender, "queued")["messageId"] == stored["messageId"]
    return offline, stored
