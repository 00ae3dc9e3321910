"""What surprised a new operator (issue 23): environment names, flags that mean nothing, close and TLS messages,
permissions, redaction, --check-config, listening on several hosts, and the client's --cafile."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from support import (client_context, clean_env, cli_ok, make_cert, new_address, run_cli, scaled, wait_until)

from relayd.client import ConnectionLost, Identity, RelayClient
from relayd.client.errors import close_detail
from relayd.config import ConfigError, load_config

OPEN = "[auth]\nmode = open\n"


# The daemon's environment namespace


def test_test_bench_and_ci_variables_are_not_the_daemons():
    environ = {"RELAYD_TEST_TIMEOUT_FACTOR": "3", "RELAYD_BENCH_NODE_RELAY": "/x", "RELAYD_CI_VENV": "/v",
               "RELAYDTEST_TIMEOUT_FACTOR": "3", "RELAYDBENCH_NODE_RELAY": "/x"}
    assert load_config(environ=environ).server.port == 3000
    with pytest.raises(ConfigError, match="RELAYD_TESTX: unknown setting"):
        load_config(environ={"RELAYD_TESTX": "1"})


def test_check_config_passes_in_a_shell_that_exports_the_test_variables(tmp_path):
    env = clean_env(RELAYD_TEST_TIMEOUT_FACTOR="3", RELAYD_BENCH_NODE_RELAY=str(tmp_path))
    result = cli_ok(tmp_path, "--check-config", env=env)
    assert "configuration OK" in result.stdout


# Flags that mean nothing to a command


@pytest.mark.parametrize("argv", [("stats", "--port", "3002"), ("--host", "::", "backup", "x.db"),
                                  ("migrate", "--host", "h", "--from", "sqlite:x.db", "--to", "redis://h/0")])
def test_database_commands_refuse_listening_flags(tmp_path, argv):
    result = run_cli(tmp_path, *argv)
    assert result.returncode == 2
    assert "mean nothing to `relayd" in result.stderr, result.stderr


# Messages


def test_close_detail_has_no_stray_space():
    assert close_detail(1001, "") == " (code 1001)"
    assert close_detail(1001, "going away") == " (code 1001 going away)"
    assert close_detail(None, "") == ""


def test_a_relay_shutting_down_is_reported_without_a_stray_space(start_relay):
    relay = start_relay(auth={"mode": "open"})

    async def watch() -> str:
        client = RelayClient(relay.url, Identity(new_address()), timeout=scaled(5))
        await client.connect()
        await asyncio.get_running_loop().run_in_executor(None, relay.stop)
        with pytest.raises(ConnectionLost) as lost:
            await client.recv(timeout=scaled(5))
        await client.close()
        return str(lost.value)
    message = asyncio.run(watch())
    assert "(code 1001" in message and " )" not in message, message


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_wss_to_a_plain_relay_hints_at_ws_and_cafile_trusts_a_private_certificate(process_relays, tmp_path):
    plain = process_relays(tmp_path / "plain", config_text=OPEN)
    result = run_cli(tmp_path, "check", "--relay", f"wss://127.0.0.1:{plain.port}", "--timeout", "5")
    assert result.returncode == 1
    assert "WRONG_VERSION_NUMBER" in result.stdout + result.stderr
    assert "use ws://" in result.stdout + result.stderr, result.stdout + result.stderr

    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = make_cert(certs, "relay")
    tls = process_relays(tmp_path / "tls", config_text=OPEN + f"[tls]\ncertfile = {cert}\nkeyfile = {key}\n",
                         wait=False)

    def up() -> bool:
        assert tls.proc.poll() is None, tls.log()
        return "relayd listening" in tls.log()
    wait_until(up, "the TLS relay to start", timeout=15)
    url = f"wss://127.0.0.1:{tls.port}"
    untrusted = run_cli(tmp_path, "check", "--plain", "--relay", url, "--timeout", "5")
    assert untrusted.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stdout + untrusted.stderr
    trusted = cli_ok(tmp_path, "check", "--plain", "--relay", url, "--cafile", str(cert), "--timeout", "10")
    assert "queued" in trusted.stdout
    missing = run_cli(tmp_path, "status", new_address(), "--relay", url, "--cafile", str(tmp_path / "none.pem"))
    assert missing.returncode == 2 and "--cafile" in missing.stderr
    client_context(cert)  # the same file loads as a trust store


@pytest.mark.skipif(os.getuid() == 0, reason="root writes anywhere")
def test_a_directory_relayd_cannot_write_names_the_uid(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = run_cli(tmp_path, "--storage", "sqlite", "--db", str(locked / "data" / "relayd.db"),
                         "--port", "0")
    finally:
        locked.chmod(0o700)
    assert result.returncode == 2, result.stderr
    assert f"relayd runs as uid {os.getuid()}" in result.stderr, result.stderr
    assert "chown" in result.stderr


def test_the_container_uid_is_told_how_to_fix_a_bind_mount(monkeypatch, tmp_path):
    from relayd.storage.sqlite.file import CONTAINER_UID, permission_hint
    monkeypatch.setattr(os, "getuid", lambda: CONTAINER_UID)
    assert f"chown -R {CONTAINER_UID}:{CONTAINER_UID}" in permission_hint(Path(tmp_path))
