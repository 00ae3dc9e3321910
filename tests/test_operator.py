"""What surprised a new operator (issue 23): environment names, flags that mean nothing, close and TLS messages,
permissions, redaction, --check-config, listening on several hosts, and the client's --cafile."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import (base64_key, client_context, clean_env, cli_ok, make_cert, new_address, run_cli, scaled, wait_until)

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


@pytest.mark.skipif(os.getuid() == 0 and shutil.which("setpriv") is None,
                    reason="root writes anywhere: needs setpriv to run relayd as nobody")
def test_a_directory_relayd_cannot_write_names_the_uid(tmp_path):
    from support import ROOT
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)  # nobody but root may create the data directory in it
    tmp_path.chmod(0o755)
    as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.getuid() == 0 else []
    try:
        result = subprocess.run([*as_user, sys.executable, str(ROOT / "relayd.py"), "--storage", "sqlite", "--db",
                                 str(locked / "data" / "relayd.db"), "--port", "0", "--host", "127.0.0.1"],
                                cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=scaled(30))
    finally:
        locked.chmod(0o700)
    uid = 65534 if as_user else os.getuid()
    assert result.returncode == 2, result.stderr
    assert f"relayd runs as uid {uid}" in result.stderr and "chown" in result.stderr, result.stderr


def test_the_container_uid_is_told_how_to_fix_a_bind_mount(monkeypatch, tmp_path):
    from relayd.storage.sqlite.file import CONTAINER_UID, permission_hint
    monkeypatch.setattr(os, "getuid", lambda: CONTAINER_UID)
    assert f"chown -R {CONTAINER_UID}:{CONTAINER_UID}" in permission_hint(Path(tmp_path))


# Secrets


def test_relayd_config_and_check_config_redact_the_redis_password(tmp_path):
    conf = tmp_path / "relayd.conf"
    conf.write_text("[redis]\nurl = redis://relayd:hunter2@127.0.0.1:6379/0\n")
    shown = cli_ok(tmp_path, "config", "--config", str(conf), "--set", "redis.url=redis://:s3cret@10.0.0.1:6380/1",
                   env=clean_env(RELAYD_REDIS_URL="redis://:fromenv@127.0.0.1/0"))
    assert "url = redis://:***@10.0.0.1:6380/1  # command line --set redis.url=redis://:***@10.0.0.1:6380/1, " \
           "secret redacted" in shown.stdout
    checked = cli_ok(tmp_path, "--check-config", "--config", str(conf), "--storage", "memory")
    for out in (shown.stdout + shown.stderr, checked.stdout + checked.stderr):
        for secret in ("hunter2", "s3cret", "fromenv"):
            assert secret not in out


def test_redact_url_keeps_everything_but_the_password():
    from relayd.config import redact_url, redacted
    assert redact_url("rediss://user:pw@h:1/2") == "rediss://user:***@h:1/2"
    assert redact_url("redis://:pw@h/0") == "redis://:***@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("redis://user@h/0") == "redis://user@h/0"
    assert redacted("redis", "url", "redis://:pw@h/0") == "redis://:***@h/0"
    assert redacted("server", "port", 3000) == 3000
    assert redacted("access", "status_token", "t0ken") == "***" and redacted("access", "status_token", "") == ""


# --check-config checks what a start checks


@pytest.mark.parametrize("args,needle", [
    (("--host", "relay.invalid"), "[server] host: 'relay.invalid' does not resolve"),
    (("--host", "0.0.0.0:3000"), "without brackets or port"),
    (("--host", "[::1]"), "without brackets or port"),
    (("--host", "127.0.0.1,::1", "--port", "0"), "port = 0"),
    (("--set", "server.host=,"), "[server] host must name at least one address"),
    (("--db", "relayd.conf"), "is not a SQLite database"),
])
def test_check_config_refuses_what_a_start_would(tmp_path, args, needle):
    (tmp_path / "relayd.conf").write_text("[auth]\nmode = open\n")
    checked = run_cli(tmp_path, "--check-config", *args)
    assert checked.returncode == 2, checked.stdout
    assert needle in checked.stderr, checked.stderr
    started = run_cli(tmp_path, *args)  # a start fails too (a name that does not resolve: at bind, with exit 1)
    assert started.returncode in (1, 2) and "relayd listening" not in started.stderr, started.stderr


def test_check_config_refuses_the_redis_backend_without_its_extra(tmp_path):
    from support import without_modules
    env = clean_env(**without_modules(tmp_path, "redis"), RELAYD_STORAGE_BACKEND="redis")
    result = run_cli(tmp_path, "--check-config", env=env)
    assert result.returncode == 2, result.stdout
    assert "[storage] backend = redis" in result.stderr and "extra" in result.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_check_config_loads_the_certificate_and_key_together(tmp_path):
    one, _ = make_cert(tmp_path, "one")
    _, other_key = make_cert(tmp_path, "two")
    result = run_cli(tmp_path, "--check-config", "--set", f"tls.certfile={one}", "--set", f"tls.keyfile={other_key}")
    assert result.returncode == 2
    assert "[tls] certfile/keyfile do not load" in result.stderr, result.stderr
    ok = cli_ok(tmp_path, "--check-config", "--set", f"tls.certfile={one}", "--set", f"tls.keyfile={tmp_path / 'one.key'}")
    assert "TLS certificate and key: load and match" in ok.stdout


# Listening


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def live_on(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=scaled(2)) as s:
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return s.recv(64).startswith(b"HTTP/1.1 200")


@pytest.mark.skipif(not ipv6_loopback(), reason="needs IPv6 on the loopback interface")
@pytest.mark.parametrize("host", ["::", "127.0.0.1,::1"])
def test_double_colon_is_dual_stack_and_host_takes_a_list(process_relays, tmp_path, host):
    relay = process_relays(tmp_path, config_text=OPEN, env={"RELAYD_SERVER_HOST": host})  # ready on 127.0.0.1
    assert live_on("127.0.0.1", relay.port) and live_on("::1", relay.port)
    with relay.ws() as ipv4:
        ipv4.send({"type": "auth", "address": new_address()})
        assert ipv4.recv_type("auth_success")
    help_text = cli_ok(tmp_path, "example-config").stdout
    assert ":: for every interface, IPv6 and IPv4 together" in help_text


# A Redis password Redis does not expect


def test_an_unexpected_redis_password_is_not_ready_with_the_reason_and_warned_once(process_relays, tmp_path,
                                                                                 redis_server, redis_prefix):
    from support import cluster_env, http_request
    url = redis_server.url.replace("redis://", "redis://:not-expected@", 1)
    relay = process_relays(tmp_path, config_text=OPEN, env=cluster_env(url, redis_prefix, "node0"))

    def not_ready():
        reply = http_request(relay.port, "GET", "/health/ready")
        return reply.status == 503 and reply.json
    answer = wait_until(not_ready, "/health/ready to say not ready", timeout=15)
    assert answer["status"] == "not_ready" and "credentials" in answer["problem"], answer
    assert "cluster inbox" in answer["problem"] and "not-expected" not in answer["problem"]
    attempts = re.compile(r"\((\d+) failed attempts\)")
    wait_until(lambda: int(attempts.search(http_request(relay.port, "GET", "/health/ready").json["problem"])[1]) >= 6,
               "several more attempts to subscribe", timeout=15)
    # Many attempts (every 0.5 s at most), one warning until the reason changes or five minutes pass.
    assert relay.log().count("cluster inbox lost") == 1, relay.log()
    assert "not-expected" not in relay.log()


# relayd check leaves no ownership locks behind


def test_a_signed_check_locks_nothing_while_ordinary_signed_identities_are_locked(start_relay, tmp_path):
    relay = start_relay()  # mixed: a signed sign-in or key locks the address against unsigned claims
    result = cli_ok(tmp_path, "check", "--relay", relay.url, "--timeout", "10")
    assert "key round trip" in result.stdout and "signed" in result.stdout
    assert relay.server.store._locked == set()  # the memory store's locks

    async def sign_in_and_publish(identity: Identity) -> None:
        async with RelayClient(relay.url, identity, timeout=scaled(5)) as client:
            await client.put_key(base64_key())

    throwaway, kept = Identity.generate(throwaway=True), Identity.generate()
    asyncio.run(sign_in_and_publish(throwaway))
    asyncio.run(sign_in_and_publish(kept))
    assert relay.server.store._locked == {kept.address}
    with relay.ws() as ws:
        ws.recv_type("challenge")
        ws.send({"type": "auth", "address": throwaway.address})  # an unsigned claim is still welcome
        assert ws.recv_type("auth_success")["verified"] is False


# TLS on port 443 without a reverse proxy


def free_low_port() -> int:
    for port in range(990, 900, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port below 1024")


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run relayd as an unprivileged user with and without the capability")
def test_a_port_below_1024_needs_the_capability_the_drop_in_grants(tmp_path):
    from support import ROOT, http_request
    port = free_low_port()
    command = [sys.executable, str(ROOT / "relayd.py"), "--storage", "memory", "--host", "127.0.0.1", "--port",
               str(port)]
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    refused = subprocess.run([*as_nobody, "--inh-caps=-all", *command], cwd=tmp_path, env=clean_env(),
                             capture_output=True, text=True, timeout=scaled(30))
    assert refused.returncode == 1
    assert "permission denied" in refused.stderr.lower() and "relayd-low-port.conf" in refused.stderr

    drop_in = (ROOT / "deploy" / "relayd-low-port.conf").read_text()
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in drop_in
    granted = subprocess.Popen([*as_nobody, "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service",
                                *command], cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        def live() -> bool:
            assert granted.poll() is None
            try:
                return http_request(port, "GET", "/health/live", timeout=1).status == 200
            except OSError:
                return False
        wait_until(live, f"relayd with CAP_NET_BIND_SERVICE to listen on port {port}", timeout=15)
    finally:
        granted.terminate()
        granted.wait(scaled(10))


def test_systemd_accepts_the_unit_with_the_low_port_drop_in(tmp_path):
    from support import ROOT
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze not found on PATH: install it with `apt-get install systemd` (Debian package)"
    entry = Path(sys.executable).parent / "relayd"
    unit = tmp_path / "relayd.service"
    # The drop-in's [Service] lines after the unit's own: what systemd makes of the two files together.
    unit.write_text((ROOT / "relayd.service").read_text().replace("/opt/relayd/bin/relayd", str(entry))
                    + (ROOT / "deploy" / "relayd-low-port.conf").read_text())
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
