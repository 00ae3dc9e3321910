from __future__ import annotations

import logging
import os
import socket
import sys
import time

import pytest
from support import NotifySocket, parse_datagram

from relayd.ops.sdnotify import Notifier

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets are Linux-only")


def _check_protocol(ns: NotifySocket) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": ns.env_value})
    assert n.enabled
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.ready()
    assert n.status("serving 3 peers")
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.ready(status="reloaded")
    assert n.stopping()
    n.close()

    got = ns.pending()
    assert got[0] == "READY=1"
    assert got[1] == "STATUS=serving 3 peers"
    reload = parse_datagram(got[2].encode())
    assert set(reload) == {"RELOADING", "MONOTONIC_USEC"}
    assert reload["RELOADING"] == "1"
    assert before <= int(reload["MONOTONIC_USEC"]) <= after
    assert got[3:] == ["READY=1\nSTATUS=reloaded", "STOPPING=1"]


def test_path_socket_datagrams(notify_socket):
    _check_protocol(notify_socket)


@linux_only
def test_abstract_socket_datagrams(notify_abstract):
    _check_protocol(notify_abstract)


def test_watchdog_ping(notify_socket):
    path = notify_socket.env_value
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval_s == 15.0
    assert n.watchdog()
    n.close()
    assert notify_socket.pending() == ["WATCHDOG=1"]


def test_notify_fields_and_send(notify_socket):
    path = notify_socket.env_value
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert n.notify(status="a\nb", errno=5)
    assert n.send("FDSTORE=1")
    n.close()
    assert notify_socket.pending() == ["STATUS=a b\nERRNO=5", "FDSTORE=1"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "500"}, 0.00025),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "self"}, 1.0),
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "junk"}, None),
    ],
)
def test_watchdog_interval(env, expected):
    env = {k: str(os.getpid()) if v == "self" else v for k, v in env.items()}
    n = Notifier.from_env({"NOTIFY_SOCKET": "/run/nonexistent/notify", **env})
    assert n.watchdog_interval_s == expected


def test_watchdog_pid_mismatch_disables_watchdog(notify_socket):
    path = notify_socket.env_value
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.enabled
    assert n.watchdog_interval_s is None
    assert not n.watchdog()
    assert n.ready()
    n.close()
    assert notify_socket.pending() == ["READY=1"]


def test_watchdog_without_socket_is_disabled():
    n = Notifier.from_env({"WATCHDOG_USEC": "2000000"})
    assert n.watchdog_interval_s is None


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"}])
def test_unset_socket_is_noop(env, monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("no socket should be created")

    monkeypatch.setattr(socket, "socket", boom)
    n = Notifier.from_env(env)
    assert not n.enabled
    assert n.watchdog_interval_s is None
    assert not any([n.ready(), n.status("x"), n.reloading(), n.stopping(), n.watchdog(), n.notify(A=1), n.send("B=2")])
    n.close()


def test_from_env_defaults_to_process_environment(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier.from_env().enabled


def test_missing_socket_path_does_not_raise(tmp_path, caplog):
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock"), "WATCHDOG_USEC": "1000000"})
    with caplog.at_level(logging.DEBUG, logger="relayd.sdnotify"):
        assert not n.ready()
        assert not n.status("x")
        assert not n.watchdog()
        assert not n.reloading()
        assert not n.stopping()
    warnings = [r for r in caplog.records if r.name == "relayd.sdnotify" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    n.close()


def test_full_receiver_does_not_block_or_raise(notify_socket):
    path = notify_socket.env_value
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    results = [n.status("x" * 1024) for _ in range(10_000)]
    assert results[0]
    assert not all(results)
    n.close()
