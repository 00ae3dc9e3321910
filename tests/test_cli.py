"""``python relayd.py`` as a real process: strict parsing, exit codes, configuration sources, admin
commands, the client commands against real relays, SIGTERM."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import (A, B, LEGACY_ENV, ROOT, assert_auth_success, assert_closed_with, clean_env, cli_ok, free_port, msg,
                     run_cli, scaled, wait_until)


from relayd.config import SECTIONS
from relayd.identity.signing import SigningKey, load_key_file
from relayd.storage.sqlite.store import SQLiteStore
from relayd.storage.store import KeyRecord


def conf(tmp_path: Path, text: str, name: str = "relayd.conf") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text", [
    "[server]\nport = 3002\n[storage]\nbackend = memory\n",
    "[auth]\nmode = open\n[limits]\nrate_limit_max_requests = 5\n[log]\nformat = json\n",
])
def test_check_config_ok_exits_0(tmp_path, text):
    path = conf(tmp_path, text)
    result = cli_ok(tmp_path, "--config", path, "--check-config")
    assert "configuration OK" in result.stdout
    assert result.stderr == ""


def test_check_config_with_defaults_only_exits_0(tmp_path):
    result = cli_ok(tmp_path, "--check-config")
    assert "configuration OK" in result.stdout


@pytest.mark.parametrize("text,needle", [
    ("[server]\nport = 99999\n", "[server] port"),
    ("[server]\nport = abc\n", "[server] port"),
    ("[queue]\noverflow = maybe\n", "[queue] overflow"),
    ("[server]\nwhatever = 1\n", "[server] whatever"),
    ("[mystery]\nx = 1\n", "[mystery]"),
    ("[limits]\nrate_limit_max_requests = lots\n", "[limits] rate_limit_max_requests"),
    ("[tls]\ncertfile = /nonexistent/cert.pem\nkeyfile = /nonexistent/key.pem\n", "[tls] certfile"),
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


def test_sigterm_closes_clients_with_1001_and_exits_0(tmp_path, process_relays):
    relay = process_relays(tmp_path, config_text="[storage]\nbackend = memory\n[auth]\nmode = open\n")
    with relay.ws() as a, relay.ws() as b:
        assert_auth_success(a.auth(A), A)
        assert_auth_success(b.auth(B), B)
        a.send(msg(B, "before-term", "x", timestamp=1))
        assert a.recv()["type"] == "delivered"
        assert b.recv()["messageId"] == "before-term"
        relay.signal(signal.SIGTERM)
        assert_closed_with(a, 1001, timeout=10)
        assert_closed_with(b, 1001, timeout=10)
        assert relay.proc.wait(10) == 0, relay.log()


def test_sigterm_without_clients_exits_0(tmp_path, process_relays):
    relay = process_relays(tmp_path, config_text="[storage]\nbackend = memory\n")
    assert relay.http("GET", "/health").status == 200
    relay.signal(signal.SIGTERM)
    assert relay.proc.wait(10) == 0, relay.log()


def test_package_version_matches_pyproject():
    import tomllib
    from pathlib import Path

    import relayd
    meta = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert meta["project"]["version"] == relayd.__version__


# Strict, self-describing command line


def cli_json(result: subprocess.CompletedProcess) -> Any:
    return json.loads(result.stdout)


def make_database(path: Path, keys: int = 1) -> None:
    """A relayd SQLite database (WAL mode) holding ``keys`` public keys, closed again."""
    async def build() -> None:
        store = SQLiteStore(str(path))
        await store.open()
        for i in range(keys):
            await store.put_key(KeyRecord(f"0x{i:040x}", f"key-{i}", 1, 1))
        await store.close()
    asyncio.run(build())


@pytest.mark.parametrize("args,needle", [
    (("run", "foo"), "unrecognized arguments: foo"),
    (("foo",), "invalid choice: 'foo'"),
    (("backup", "a.db", "b.db"), "unrecognized arguments: b.db"),
    (("stats", "extra"), "unrecognized arguments: extra"),
    (("config", "x"), "unrecognized arguments: x"),
    (("example-config", "x"), "unrecognized arguments: x"),
    (("keygen", "x"), "unrecognized arguments: x"),
    (("send", "--from", "0x" + "a1" * 20, "--to", "0x" + "b2" * 20, "two", "words"), "unrecognized arguments: words"),
    (("--check-config", "backup", "x.db"), "--check-config goes with run only"),
    (("--port", "3001", "status", "0x" + "a1" * 20), "--port: configure the relay daemon"),
    (("--config", "x.conf", "check"), "--config: configure the relay daemon"),
    (("listen", "--as", "0x" + "a1" * 20, "--count", "0"), "expected at least 1"),
    (("send", "--from", "0x" + "a1" * 20, "--to", "0x1234", "hi"), "--to: not an Idena address"),
    (("send", "--from", "0x1234", "--to", "0x" + "b2" * 20, "hi"), "neither an Idena address"),
    (("send", "--from", "missing.key", "--to", "0x" + "b2" * 20, "hi"), "missing.key does not exist"),
    (("status", "0x" + "a1" * 20, "--relay", "http://127.0.0.1:1"), "--relay: relay URL must be ws://"),
    (("status", "nobody"), "ADDRESS: not an Idena address"),
])
def test_extra_or_misplaced_words_exit_2(tmp_path, args, needle):
    result = run_cli(tmp_path, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version(tmp_path, flag):
    import relayd
    result = run_cli(tmp_path, flag)
    assert result.returncode == 0
    assert result.stdout.strip() == f"relayd {relayd.__version__}"


def test_help_lists_commands_environment_paths_and_examples(tmp_path):
    result = run_cli(tmp_path, "--help")
    assert result.returncode == 0
    for word in ("run", "config", "example-config", "backup", "stats", "send", "listen", "status", "keygen",
                 "check", "RELAYD_<SECTION>_<KEY>", *LEGACY_ENV, "./relayd-data/relayd.db",
                 "configuration file", "examples:", "relayd check --relay"):
        assert word in result.stdout, word


def test_check_config_lists_every_source(tmp_path):
    path = conf(tmp_path, "[server]\nport = 3002\n")
    result = cli_ok(tmp_path, "--check-config", "--config", path, "--db", "x.db", "--set", "limits.frame_burst=5",
                    env=clean_env(LOG_LEVEL="debug", RELAYD_QUEUE_OVERFLOW="drop_oldest"))
    lines = result.stdout.splitlines()
    assert "configuration OK" in lines[0]
    assert f"file {path}" in result.stdout
    assert "environment LOG_LEVEL, RELAYD_QUEUE_OVERFLOW" in result.stdout
    assert "command line --db x.db, --set limits.frame_burst=5" in result.stdout
    assert "(defaults)" not in result.stdout


def test_check_config_after_run_and_with_defaults_only(tmp_path):
    result = cli_ok(tmp_path, "run", "--check-config")
    lines = result.stdout.splitlines()
    assert lines[1:lines.index("checked as a start would, short of opening sockets:")] == [
        "  defaults (for every key not set below)"]


def test_config_prints_each_value_with_its_source_and_loads_back(tmp_path):
    path = conf(tmp_path, "[server]\nport = 3002\n[queue]\noverflow = drop_oldest\n")
    result = cli_ok(tmp_path, "config", "--config", path, "--port", "3005", "--set", "auth.mode=signed",
                    env=clean_env(LOG_LEVEL="debug", RELAYD_LIMITS_FRAME_BURST="7"))
    lines = result.stdout.splitlines()
    assert "port = 3005  # command line --port 3005" in lines
    assert "mode = signed  # command line --set auth.mode=signed" in lines
    assert f"overflow = drop_oldest  # file {path}" in lines
    assert "level = debug  # environment LOG_LEVEL" in lines
    assert "frame_burst = 7  # environment RELAYD_LIMITS_FRAME_BURST" in lines
    assert "host = 0.0.0.0  # default" in lines
    assert "allowed_origins = *  # default" in lines
    keys = [line for line in lines if " = " in line and not line.startswith("#")]
    assert len(keys) == sum(len(dataclasses.fields(cls)) for cls in SECTIONS.values())

    saved = tmp_path / "effective.conf"
    saved.write_text(result.stdout)
    again = cli_ok(tmp_path, "config", "--config", str(saved))
    values = [line.split("  # ")[0] for line in keys]
    assert [line.split("  # ")[0] for line in again.stdout.splitlines()
            if " = " in line and not line.startswith("#")] == values


def test_relayd_config_names_the_file_of_commands_that_read_one_and_a_flag_wins(tmp_path):
    path = conf(tmp_path, "[server]\nport = 3002\n")
    other = conf(tmp_path, "[server]\nport = 3004\n", name="other.conf")
    env = clean_env(RELAYD_CONFIG=path)
    assert "port = 3002  # file " + path in cli_ok(tmp_path, "config", env=env).stdout.splitlines()
    assert f"file {path}" in cli_ok(tmp_path, "--check-config", env=env).stdout
    assert "port = 3004  # file " + other in cli_ok(tmp_path, "config", "--config", other, env=env).stdout.splitlines()
    # Client commands read no configuration: the variable does not make them refuse to run.
    result = run_cli(tmp_path, "keygen", "--out", str(tmp_path / "k.key"), env=env)
    assert result.returncode == 0, result.stderr


def test_config_command_reports_configuration_errors_with_exit_2(tmp_path):
    result = run_cli(tmp_path, "config", env=clean_env(RELAYD_SERVER_PORT="lots"))
    assert result.returncode == 2
    assert "[server] port (from environment RELAYD_SERVER_PORT)" in result.stderr


def test_example_config_is_relayd_conf_example(tmp_path):
    result = cli_ok(tmp_path, "example-config")
    assert result.stdout == (ROOT / "relayd.conf.example").read_text()


def test_relayd_py_without_websockets_says_how_to_install(tmp_path):
    result = subprocess.run([sys.executable, "-S", str(ROOT / "relayd.py"), "--config",
                             str(ROOT / "relayd.conf.example")], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=scaled(30))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "websockets" in result.stderr and "Python 3.11" in result.stderr
    assert "pip install -e" in result.stderr


# Backup and stats


def test_backup_refuses_an_existing_file_without_force(tmp_path):
    make_database(tmp_path / "live.db", keys=2)
    dest = tmp_path / "copy.db"
    dest.write_bytes(b"precious")
    result = run_cli(tmp_path, "backup", "--db", "live.db", str(dest))
    assert result.returncode == 2
    assert str(dest) in result.stderr and "--force" in result.stderr
    assert dest.read_bytes() == b"precious"
    cli_ok(tmp_path, "backup", "--db", "live.db", str(dest), "--force")
    stats = run_cli(tmp_path, "stats", "--db", str(dest))
    assert cli_json(stats)["keys"] == 2
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []


@pytest.mark.parametrize("case", ["no database", "no directory", "memory backend", "directory"])
def test_backup_errors_name_the_paths(tmp_path, case):
    make_database(tmp_path / "live.db")
    args = {"no database": ("--db", "absent.db", "copy.db"),
            "no directory": ("--db", "live.db", "nowhere/copy.db"),
            "memory backend": ("--storage", "memory", "copy.db"),
            "directory": ("--db", "live.db", str(tmp_path))}[case]
    result = run_cli(tmp_path, "backup", *args)
    expected_code = 2 if case in ("memory backend", "directory") else 1
    assert result.returncode == expected_code, result.stderr
    needles = {"no database": ["absent.db", "copy.db"], "no directory": ["live.db", "nowhere/copy.db"],
               "memory backend": ["backend = sqlite"], "directory": [str(tmp_path)]}[case]
    for needle in needles:
        assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "copy.db").exists()


def test_stats_on_a_backup_leaves_no_wal_or_shm(tmp_path):
    make_database(tmp_path / "live.db", keys=3)
    assert run_cli(tmp_path, "backup", "--db", "live.db", "copy.db").returncode == 0
    assert (tmp_path / "copy.db").read_bytes()[18:20] == b"\x02\x02"  # the copy says WAL mode too
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli_ok(tmp_path, "stats", "--db", "copy.db")
    assert cli_json(result)["keys"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / "copy.db-wal").exists() and not (tmp_path / "copy.db-shm").exists()


@pytest.mark.parametrize("content,needle", [(b"", "no database at"), (b"not sqlite at all" * 10, "copy.db"),
                                            (None, "no database at")])
def test_stats_errors_name_the_file(tmp_path, content, needle):
    if content is not None:
        (tmp_path / "copy.db").write_bytes(content)
    result = run_cli(tmp_path, "stats", "--db", "copy.db")
    assert result.returncode == 1
    assert needle in result.stderr and "copy.db" in result.stderr


def test_stats_and_backup_of_a_live_database(tmp_path, process_relays):
    relay = process_relays(tmp_path, config_text="[auth]\nmode = open\n")
    assert relay.http("POST", "/api/public-keys", {"address": A, "publicKey": "k"}).status == 200
    db = tmp_path / "relayd-data" / "relayd.db"
    assert (tmp_path / "relayd-data" / "relayd.db-wal").exists()

    def stats_see_the_key() -> bool:
        return cli_json(cli_ok(tmp_path, "stats", "--db", str(db)))["keys"] == 1
    wait_until(stats_see_the_key, "stats to count the key", timeout=10)
    cli_ok(tmp_path, "backup", "--db", str(db), "copy.db")
    assert cli_json(run_cli(tmp_path, "stats", "--db", "copy.db"))["keys"] == 1


# Keys and the client commands


def test_keygen_writes_a_private_key_file(tmp_path):
    result = cli_ok(tmp_path, "keygen", "--out", "alice.key")
    path = tmp_path / "alice.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert cli_json(result)["address"] == load_key_file(str(path)).address
    again = run_cli(tmp_path, "keygen", "--out", "alice.key")
    assert again.returncode == 2 and "alice.key already exists" in again.stderr
    printed = cli_json(run_cli(tmp_path, "keygen"))
    assert SigningKey.from_hex(printed["privateKey"]).address == printed["address"]


def test_send_listen_and_status(tmp_path, start_relay):
    relay = start_relay(auth={"mode": "mixed"})
    assert run_cli(tmp_path, "keygen", "--out", "alice.key").returncode == 0
    alice = load_key_file(str(tmp_path / "alice.key")).address
    sent = cli_ok(tmp_path, "send", "--relay", relay.url, "--from", "alice.key", "--to", B, "hello bob")
    answer = cli_json(sent)
    assert answer["type"] == "queued" and answer["to"] == B
    status = cli_ok(tmp_path, "status", B, "--relay", relay.url)
    assert cli_json(status) == {"address": B, "online": False, "queueSize": 1, "key": None}

    listened = cli_ok(tmp_path, "listen", "--relay", relay.url, "--as", B, "--ack", "--count", "1",
                      "--timeout", "20")
    frames = [json.loads(line) for line in listened.stdout.splitlines()]
    assert frames[0]["type"] == "message" and frames[0]["from"] == alice
    assert frames[0]["content"] == "hello bob" and frames[0]["messageId"] == answer["messageId"]
    assert cli_json(run_cli(tmp_path, "status", B, "--relay", relay.url))["queueSize"] == 0

    waited = run_cli(tmp_path, "listen", "--relay", relay.url, "--as", B, "--count", "1", "--timeout", "0.2")
    assert waited.returncode == 1 and "0 of 1 messages" in waited.stderr


def test_send_exits_1_on_an_error_answer_or_an_unreachable_relay(tmp_path, start_relay):
    relay = start_relay(limits={"max_message_bytes": 16})
    refused = run_cli(tmp_path, "send", "--relay", relay.url, "--from", A, "--to", B, "x" * 17)
    assert refused.returncode == 1
    assert cli_json(refused)["code"] == "message_too_large"
    port = free_port()
    unreachable = run_cli(tmp_path, "send", "--relay", f"ws://127.0.0.1:{port}", "--from", A, "--to", B, "hi")
    assert unreachable.returncode == 1
    assert f"connection refused by 127.0.0.1:{port}" in unreachable.stderr


def check_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if line[:1] in ("✔", "✘", "–")]


@pytest.mark.parametrize("mode", ["open", "mixed", "signed"])
def test_check_passes_against_a_relay(tmp_path, start_relay, mode):
    relay = start_relay(auth={"mode": mode})
    result = run_cli(tmp_path, "check", "--relay", relay.url)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = check_lines(result)
    assert len(lines) == 8 and all(line.startswith("✔") for line in lines), result.stdout
    assert all(re.search(r" \d+ ms ", line) for line in lines)
    assert "8 of 8 steps passed" in result.stdout


def test_check_plain_against_the_default_mode_passes(tmp_path, start_relay):
    relay = start_relay()
    result = run_cli(tmp_path, "check", "--relay", relay.url, "--plain")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kept: deleting a key needs the token" in result.stdout


def test_check_fails_precisely_on_a_closed_port(tmp_path):
    port = free_port()
    result = run_cli(tmp_path, "check", "--relay", f"ws://127.0.0.1:{port}")
    assert result.returncode == 1
    lines = check_lines(result)
    assert lines[0].startswith("✘") and f"connection refused by 127.0.0.1:{port}" in lines[0]
    assert all(line.startswith("–") and "skipped" in line for line in lines[1:])


def test_check_fails_precisely_against_a_server_that_is_not_a_relay(tmp_path, not_a_relay_url):
    result = run_cli(tmp_path, "check", "--relay", not_a_relay_url)
    assert result.returncode == 1
    first = check_lines(result)[0]
    assert first.startswith("✘") and "GET /health: HTTP 404" in first


def test_check_plain_fails_precisely_against_a_signed_relay(tmp_path, start_relay):
    relay = start_relay(auth={"mode": "signed"})
    result = run_cli(tmp_path, "check", "--relay", relay.url, "--plain")
    assert result.returncode == 1
    lines = check_lines(result)
    assert lines[0].startswith("✔")
    assert lines[1].startswith("✘") and "sign-in refused: auth_required" in lines[1]
    assert "0 of 8" not in result.stdout and "1 of 8 steps passed" in result.stdout


# A hostile relay against ``relayd check`` and ``relayd send`` (the servers are support's ``HostileRelay``)

HOSTILE_CLI_TIMEOUT = 1.0
PEAK_RSS = ("import atexit, os, resource, runpy, sys\n"
            "atexit.register(lambda: print('peak-rss-kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "file=sys.stderr))\n"
            "sys.argv = sys.argv[1:]\n"
            "sys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def run_cli_with_peak_rss(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """``run_cli`` that also gives the command's peak RSS in bytes."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(ROOT / "relayd.py"), *args], cwd=cwd,
                            env=clean_env(), capture_output=True, text=True, encoding="utf-8", timeout=scaled(60))
    peak = re.search(r"peak-rss-kib (\d+)", result.stderr)
    assert peak, result.stderr[-2000:]
    return result, int(peak.group(1)) * 1024


def hostile_cli(tmp_path: Path, command: str, url: str) -> tuple[subprocess.CompletedProcess, str, int]:
    """``relayd check`` or ``relayd send`` against ``url``: the process, its failure line, its peak RSS."""
    if command == "check":
        args = ("check", "--relay", url, "--timeout", str(HOSTILE_CLI_TIMEOUT))
    else:
        args = ("send", "--relay", url, "--from", A, "--to", B, "hi", "--timeout", str(HOSTILE_CLI_TIMEOUT))
    result, peak = run_cli_with_peak_rss(tmp_path, *args)
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    if command == "check":
        lines = check_lines(result)
        assert lines[0].startswith("✘") and all("skipped" in line for line in lines[1:]), result.stdout[-2000:]
        return result, lines[0], peak
    return result, result.stderr.splitlines()[0], peak


@pytest.mark.parametrize("command", ["check", "send"])
@pytest.mark.parametrize("scenario, expected", [
    ("trickle", {"check": "timeout on GET /health", "send": "timeout waiting for auth_success after 1 s"}),
    ("huge", {"check": "limit of 8388608 bytes (max_body_bytes)", "send": "limit of 4194304 bytes (max_frame_bytes)"}),
    ("long_error", {"check": "in all)", "send": "sign-in refused: auth_failed: mmmm"}),
    ("escapes", {"check": "\\x1b[2J\\x1b]0;pwned\\x07\\x9b31m\\u202e", "send": "\\x1b[2J\\x1b]0;pwned\\x07"}),
    ("nested", {"check": "invalid JSON from the relay: nesting too deep",
                "send": "invalid JSON from the relay: nesting too deep"}),
])
def test_a_hostile_relay_fails_check_and_send_precisely_briefly_and_safely(tmp_path, hostile_relay, command,
                                                                          scenario, expected):
    relay = hostile_relay(scenario)
    _, baseline = run_cli_with_peak_rss(tmp_path, "send", "--relay", f"ws://127.0.0.1:{free_port()}",
                                        "--from", A, "--to", B, "hi")
    result, line, peak = hostile_cli(tmp_path, command, relay.url)
    assert expected[command] in line, line[:2000]
    output = result.stdout + result.stderr
    assert not any(ch in output for ch in "\x1b\x07\x9b\u202e"), repr(output[:2000])
    assert max(len(text) for text in output.splitlines()) < 1200, "a line of the relay's text was printed whole"
    assert peak - baseline < 50 * 1024 * 1024, f"peak RSS {peak >> 20} MiB, {baseline >> 20} MiB without the relay"
