"""``python relayd.py`` as a real process: --check-config, exit codes, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_support import A, B, assert_auth_success, msg, recv_closed
from relay_harness import ROOT, ProcessRelay

LEGACY = {"PORT", "ALLOWED_ORIGINS", "RATE_LIMIT_WINDOW_MS", "RATE_LIMIT_MAX_REQUESTS", "MAX_OFFLINE_MESSAGES",
          "MESSAGE_RETENTION_HOURS", "LOG_LEVEL"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYD_") and k not in LEGACY}
    env.update(extra)
    return env


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "relayd.py"), *args], cwd=tmp_path,
                          env=env if env is not None else clean_env(), capture_output=True, text=True, timeout=30)


def conf(tmp_path: Path, text: str) -> str:
    path = tmp_path / "relayd.conf"
    path.write_text(text)
    return str(path)


def test_check_config_ok_exits_0(tmp_path):
    path = conf(tmp_path, "[server]\nport = 3002\n[storage]\nbackend = memory\n")
    result = run_cli(tmp_path, "--config", path, "--check-config")
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    assert result.stderr == ""


def test_check_config_with_defaults_only_exits_0(tmp_path):
    result = run_cli(tmp_path, "--check-config")
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


@pytest.mark.parametrize("text,needle", [
    ("[server]\nport = 99999\n", "[server] port"),
    ("[server]\nport = abc\n", "[server] port"),
    ("[queue]\noverflow = maybe\n", "[queue] overflow"),
    ("[server]\nwhatever = 1\n", "[server] whatever"),
    ("[mystery]\nx = 1\n", "[mystery]"),
])
def test_bad_config_file_exits_2_naming_the_key(tmp_path, text, needle):
    path = conf(tmp_path, text)
    result = run_cli(tmp_path, "--config", path, "--check-config")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr
    assert "configuration OK" not in result.stdout


def test_bad_config_file_refuses_to_serve_with_exit_2(tmp_path):
    path = conf(tmp_path, "[server]\nport = 99999\n[storage]\nbackend = memory\n")
    result = run_cli(tmp_path, "--config", path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "[server] port" in result.stderr


@pytest.mark.parametrize("env,needle", [
    ({"PORT": "abc"}, "[server] port"),
    ({"RELAYD_SERVER_PORT": "-3"}, "[server] port"),
    ({"RELAYD_SERVER_PROT": "3000"}, "RELAYD_SERVER_PROT"),
    ({"LOG_LEVEL": "chatty"}, "[log] level"),
])
def test_bad_environment_exits_2_naming_the_key(tmp_path, env, needle):
    result = run_cli(tmp_path, "--check-config", env=clean_env(**env))
    assert result.returncode == 2, result.stdout
    assert needle in result.stderr


@pytest.mark.parametrize("args,needle", [
    (("--set", "limits.rate_limit_max_requests=lots"), "[limits] rate_limit_max_requests"),
    (("--set", "server.nothing=1"), "[server] nothing"),
    (("--port", "70000"), "[server] port"),
    (("--storage", "paper"), "[storage] backend"),
])
def test_bad_command_line_override_exits_2_naming_the_key(tmp_path, args, needle):
    result = run_cli(tmp_path, "--check-config", *args)
    assert result.returncode == 2, result.stdout
    assert needle in result.stderr


def test_sigterm_closes_clients_with_1001_and_exits_0(tmp_path):
    relay = ProcessRelay(tmp_path, config_text="[storage]\nbackend = memory\n[auth]\nmode = open\n")
    try:
        with relay.ws() as a, relay.ws() as b:
            assert_auth_success(a.auth(A), A)
            assert_auth_success(b.auth(B), B)
            a.send(msg(B, "before-term", "x", timestamp=1))
            assert a.recv()["type"] == "delivered"
            assert b.recv()["messageId"] == "before-term"
            started = time.monotonic()
            relay.signal(signal.SIGTERM)
            assert recv_closed(a, timeout=10).code == 1001
            assert recv_closed(b, timeout=10).code == 1001
            assert relay.proc.wait(10) == 0, relay.log()
            assert time.monotonic() - started < 10
    finally:
        relay.stop()


def test_sigterm_without_clients_exits_0(tmp_path):
    relay = ProcessRelay(tmp_path, config_text="[storage]\nbackend = memory\n")
    try:
        assert relay.http("GET", "/health").status == 200
        relay.signal(signal.SIGTERM)
        assert relay.proc.wait(10) == 0, relay.log()
    finally:
        relay.stop()


def test_package_version_matches_pyproject():
    import tomllib
    from pathlib import Path

    import relayd
    meta = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert meta["project"]["version"] == relayd.__version__
