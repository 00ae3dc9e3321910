"""Release artifacts: the wheel and sdist (``python -m build``) and the .deb (deploy/debian/build-deb), installed,
run, upgraded with messages queued and purged in a Debian 12 container.

The container is this machine's Debian bookworm base (container_support.debian_base_image: Debian's python3 and
python3-venv, nothing else), on the host network, without systemd: relayd is started as its user with setpriv,
as the unit would. Needs a Docker daemon (.ci/docker-daemon) and fails, never skips, without one; building the
.deb needs dpkg-deb and a package index reachable by this machine's pip (for the websockets wheel).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path
from typing import Iterator

import pytest

from container_support import debian_base_image, docker, expect_frame, queue_one, require_docker
from support import ROOT, WsClient, free_port, http_request, wait_until

import relayd

BUILD_DEB = ROOT / "deploy" / "debian" / "build-deb"
VERSION = f"{relayd.__version__}-1"
# The next release, for the upgrade test: "+" sorts after the end of a version in dpkg and in PEP 440.
NEXT_VERSION = f"{relayd.__version__}+next-1"
START_TIMEOUT_S = 30.0
# What may differ in the container's file system after install and purge: the relayd user and group stay
# (Debian keeps system users, so their uids are never reused) and useradd keeps backups of what it edits.
ALLOWED_AFTER_PURGE = {"/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-", "/etc/subuid-",
                       "/etc/subgid-"}
# Paths whose contents change with any use of dpkg or a shell, not with what the package leaves behind.
SNAPSHOT_EXCLUDES = ("/proc", "/sys", "/dev", "/tmp", "/run", "/var/lib/dpkg", "/var/log", "/var/cache",
                     "/root", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/etc/ld.so.cache")


def build_deb(out: Path, version: str) -> Path:
    done = subprocess.run([str(BUILD_DEB), "--version", version, "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, f"build-deb failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    deb = Path(done.stdout.strip().splitlines()[-1])
    assert deb.name == f"relayd_{version}_all.deb" and deb.is_file(), done.stdout
    return deb


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """This checkout's .deb as version N and as N+1, built once for the module."""
    out = tmp_path_factory.mktemp("debs")
    return {version: build_deb(out, version) for version in (VERSION, NEXT_VERSION)}


class Debian:
    """A Debian 12 container that sleeps until removed; ``sh`` runs a command in it as root."""

    def __init__(self) -> None:
        require_docker()
        self.name = f"relayd-deb-test-{secrets.token_hex(4)}"
        docker("run", "--detach", "--rm", "--name", self.name, "--network", "host", debian_base_image(),
               "sleep", "infinity")
        self.relayd_pid: str | None = None

    def sh(self, script: str, *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, "sh", "-ec", script, check=check, timeout=timeout)

    def install(self, deb: Path) -> str:
        docker("cp", str(deb), f"{self.name}:/tmp/{deb.name}")
        done = self.sh(f"dpkg -i /tmp/{deb.name} 2>&1")
        return done.stdout

    def files(self) -> set[str]:
        """Every path in the container's file system, outside SNAPSHOT_EXCLUDES."""
        prune = " -o ".join(f"-path {p}" for p in SNAPSHOT_EXCLUDES)
        return set(self.sh(f"find / -xdev \\( {prune} \\) -prune -o -print").stdout.split("\n")) - {""}

    def start_relayd(self, port: int) -> None:
        """relayd as the relayd user from the state directory, as relayd.service runs it; its log in /tmp."""
        self.relayd_pid = self.sh(
            f"cd /var/lib/relayd && RELAYD_SERVER_HOST=127.0.0.1 RELAYD_SERVER_PORT={port} "
            "setsid setpriv --reuid=relayd --regid=relayd --init-groups relayd >/tmp/relayd.log 2>&1 "
            "</dev/null & echo $!").stdout.strip()

        def healthy() -> bool:
            if not self.running(self.relayd_pid):
                pytest.fail(f"relayd exited:\n{self.log()}")
            try:
                return http_request(port, "GET", "/health", timeout=1).status == 200
            except OSError:
                return False
        wait_until(healthy, f"relayd from the package healthy on port {port}", timeout=START_TIMEOUT_S,
                   interval=0.2)

    def stop_relayd(self) -> None:
        """SIGTERM, then wait for relayd to exit, as systemctl stop does."""
        pid = self.relayd_pid
        self.sh(f"kill -TERM {pid}")
        wait_until(lambda: not self.running(pid), "relayd to exit",
                   timeout=START_TIMEOUT_S, interval=0.1)
        self.relayd_pid = None

    def running(self, pid: str | None) -> bool:
        """Whether ``pid`` runs (the container's PID 1, sleep, reaps nobody: an exited relayd stays a zombie)."""
        state = self.sh(f"sed -n 's/^State:[[:space:]]*//p' /proc/{pid}/status 2>/dev/null || true").stdout
        return state[:1] not in ("", "Z")

    def log(self) -> str:
        return self.sh("cat /tmp/relayd.log", check=False).stdout

    def remove(self) -> None:
        docker("rm", "--force", self.name, check=False)


@pytest.fixture
def debian() -> Iterator[Debian]:
    container = Debian()
    yield container
    container.remove()


def test_deb_installs_starts_nothing_runs_as_its_user_and_purges_clean(debian: Debian,
                                                                        debs: dict[str, Path]) -> None:
    before = debian.files()
    output = debian.install(debs[VERSION])
    assert f"Setting up relayd ({VERSION})" in output, output

    # Installed, configured, and nothing started or enabled.
    assert debian.sh("relayd -V").stdout.strip() == f"relayd {relayd.__version__}"
    check = debian.sh("relayd --check-config")
    assert "configuration OK" in check.stdout and "file /etc/relayd/relayd.conf" in check.stdout, check
    assert debian.sh("for p in /proc/[0-9]*; do tr '\\0' ' ' <$p/cmdline; echo; done").stdout.count("relayd") == 0
    assert debian.sh("find /etc/systemd -name 'relayd*'").stdout.strip() == "", "the unit got enabled"
    modes = debian.sh("stat -c '%n %U:%G %a' /etc/relayd/relayd.conf /var/lib/relayd "
                      "/lib/systemd/system/relayd.service").stdout.splitlines()
    assert modes == ["/etc/relayd/relayd.conf root:relayd 640", "/var/lib/relayd relayd:relayd 750",
                     "/lib/systemd/system/relayd.service root:root 644"], modes
    assert debian.sh("getent passwd relayd | cut -d: -f6,7").stdout.strip() == "/var/lib/relayd:/usr/sbin/nologin"
    unit = debian.sh("cat /lib/systemd/system/relayd.service").stdout
    assert "ExecStart=/opt/relayd/bin/relayd --config /etc/relayd/relayd.conf" in unit
    assert (ROOT / "relayd.service").read_text().split("[Unit]")[1] == unit.split("[Unit]")[1]

    port = free_port()
    debian.start_relayd(port)
    health = http_request(port, "GET", "/health").json
    assert (health["version"], health["storage"]) == (relayd.__version__, {"backend": "sqlite", "status": "ok"})
    assert debian.sh(f"stat -c %U /proc/{debian.relayd_pid}").stdout.strip() == "relayd"
    assert debian.sh("stat -c %U /var/lib/relayd/relayd.db").stdout.strip() == "relayd"
    debian.stop_relayd()

    debian.sh("dpkg --purge relayd 2>&1")
    assert debian.sh("dpkg -s relayd", check=False).returncode != 0
    left = debian.files() - before - ALLOWED_AFTER_PURGE
    assert not left, f"purge left {sorted(left)}"
    gone = before - debian.files()
    assert not gone, f"install and purge removed {sorted(gone)}"
    assert debian.sh("getent passwd relayd", check=False).returncode == 0, "the system user stays (Debian policy)"


def test_deb_upgrade_keeps_queued_messages_and_the_edited_configuration(debian: Debian,
                                                                       debs: dict[str, Path]) -> None:
    debian.install(debs[VERSION])
    # An operator's edit to the conffile, which an upgrade must keep.
    debian.sh("sed -i 's/^summary_interval_s = .*/summary_interval_s = 600.0/' /etc/relayd/relayd.conf")
    port = free_port()
    debian.start_relayd(port)
    offline, stored = queue_one(port)
    old_env = debian.sh("readlink /opt/relayd/bin").stdout.strip()

    # Upgraded while running, as dpkg does under systemd (postinst then try-restarts the unit).
    output = debian.install(debs[NEXT_VERSION])
    assert f"Unpacking relayd ({NEXT_VERSION}) over ({VERSION})" in output, output
    assert debian.sh("relayd -V").stdout.strip() == f"relayd {NEXT_VERSION.rsplit('-', 1)[0]}"
    assert debian.sh("readlink /opt/relayd/bin").stdout.strip() != old_env
    assert debian.sh("ls /opt/relayd").stdout.split() == ["bin", debian.sh("readlink /opt/relayd/bin")
                                                           .stdout.strip().split("/")[0]], "old environment left"
    assert "summary_interval_s = 600.0" in debian.sh("cat /etc/relayd/relayd.conf").stdout
    assert debian.sh("stat -c '%U:%G %a' /etc/relayd/relayd.conf").stdout.strip() == "root:relayd 640"

    debian.stop_relayd()
    debian.start_relayd(port)
    assert http_request(port, "GET", "/health").json["version"] == NEXT_VERSION.rsplit("-", 1)[0]
    with WsClient(f"ws://127.0.0.1:{port}") as recipient:
        recipient.send({"type": "auth", "address": offline})
        expect_frame(recipient, "auth_success")
        got = expect_frame(recipient, "message")
    assert (got["messageId"], got["content"], got["queued"]) == (stored["messageId"], stored["content"], True)
    debian.stop_relayd()


def test_deb_takes_over_from_the_readmes_install_by_hand(debian: Debian, debs: dict[str, Path]) -> None:
    """The README's systemd set-up (a user, a venv in /opt/relayd, a database) followed by the package."""
    debian.sh("useradd --system --home /var/lib/relayd --shell /usr/sbin/nologin relayd && "
              "python3 -m venv /opt/relayd && install -d -o relayd -g relayd -m 0750 /var/lib/relayd && "
              "echo made-by-hand >/var/lib/relayd/marker")
    output = debian.install(debs[VERSION])
    assert "moved the environment installed by hand in /opt/relayd to /opt/relayd.before-package" in output, output
    assert debian.sh("relayd -V").stdout.strip() == f"relayd {relayd.__version__}"
    assert debian.sh("cat /var/lib/relayd/marker").stdout.strip() == "made-by-hand"
    assert debian.sh("test -f /opt/relayd.before-package/pyvenv.cfg && echo kept").stdout.strip() == "kept"
    port = free_port()
    debian.start_relayd(port)
    debian.stop_relayd()
    debian.sh("dpkg --purge relayd")
    assert debian.sh("ls -d /opt/relayd* /var/lib/relayd 2>/dev/null || true").stdout.strip() == ""


def test_wheel_and_sdist_build_with_the_package_and_its_metadata(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info",
                                                             "build", "dist", "relayd-data", ".mypy_cache"))
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    version = relayd.__version__
    wheel = tmp_path / "dist" / f"relayd-{version}-py3-none-any.whl"
    sdist = tmp_path / "dist" / f"relayd-{version}.tar.gz"

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = HeaderParser().parsestr(zf.read(f"relayd-{version}.dist-info/METADATA").decode())
        entry_points = zf.read(f"relayd-{version}.dist-info/entry_points.txt").decode()
    packaged = {n for n in names if n.startswith("relayd/") and n.endswith(".py")}
    in_tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "relayd").rglob("*.py")}
    assert packaged == in_tree, sorted(packaged ^ in_tree)
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    assert meta["Name"] == "relayd" and meta["Version"] == version
    assert meta.get_all("Requires-Dist")[0].startswith("websockets"), meta.get_all("Requires-Dist")
    assert re.search(r"^relayd = relayd\.cli:main$", entry_points, re.MULTILINE), entry_points

    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "README.md", "LICENSE", "relayd/__init__.py", "relayd/cli/__init__.py"} <= members
