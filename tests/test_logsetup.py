from __future__ import annotations

import io
import json
import logging
import os
import re

import pytest

from relayd.ops.logsetup import JournalFormatter, TextFormatter, configure_logging, parse_level, set_level

TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<rest>.*)")


pytestmark = pytest.mark.usefixtures("restore_logging")


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_text_format():
    out = io.StringIO()
    configure_logging("info", "text", stream=out, environ={})
    logging.getLogger("relayd.server").info("listening on %s", "[::]:8080")
    logging.getLogger("relayd.server").info("peer joined", extra={"fields": {"peer": "p1", "room": "a b", "n": 2}})
    got = lines(out)
    assert [TEXT_LINE.fullmatch(line)["rest"] for line in got] == [
        "INFO relayd.server: listening on [::]:8080",
        'INFO relayd.server: peer joined peer=p1 room="a b" n=2',
    ]


def test_timestamp_is_utc_with_millis():
    record = logging.makeLogRecord(
        {"name": "relayd.server", "levelno": logging.WARNING, "levelname": "WARNING", "msg": "m"}
    )
    record.created = 1795641832.1239
    record.msecs = 123.9
    assert TextFormatter().format(record) == "2026-11-25T21:23:52.123Z WARNING relayd.server: m"


def test_text_exception_is_multiline():
    out = io.StringIO()
    configure_logging("info", stream=out, environ={})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("relayd.x").exception("failed")
    text = out.getvalue()
    assert TEXT_LINE.match(text)["rest"].startswith("ERROR relayd.x: failed")
    assert "Traceback (most recent call last):" in text
    assert text.rstrip().endswith("RuntimeError: boom")


@pytest.mark.parametrize(
    ("method", "prio", "name"),
    [("debug", 7, "DEBUG"), ("info", 6, "INFO"), ("warning", 4, "WARNING"), ("error", 3, "ERROR"), ("critical", 2, "CRITICAL")],
)
def test_journald_priority_prefix(method, prio, name):
    out = io.StringIO()
    configure_logging("debug", "text", stream=out, environ={"JOURNAL_STREAM": "8:12345"})
    getattr(logging.getLogger("relayd.server"), method)("hello")
    assert lines(out) == [f"<{prio}>{name} relayd.server: hello"]


def test_journald_prefixes_every_line():
    out = io.StringIO()
    configure_logging("info", stream=out, environ={"JOURNAL_STREAM": "8:12345"})
    try:
        raise ValueError("bad")
    except ValueError:
        logging.getLogger("relayd.server").exception("two\nlines")
    got = lines(out)
    assert got[:2] == ["<3>ERROR relayd.server: two", "<3>lines"]
    assert len(got) > 3
    assert all(line.startswith("<3>") for line in got)
    assert got[-1] == "<3>ValueError: bad"


def test_journal_stream_checked_against_real_fd(tmp_path):
    with open(tmp_path / "log", "w") as f:
        st = os.fstat(f.fileno())
        configure_logging("info", stream=f, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        logging.getLogger("relayd").info("to journal")
        configure_logging("info", stream=f, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        logging.getLogger("relayd").info("redirected elsewhere")
        configure_logging("info", stream=f, environ={"JOURNAL_STREAM": "garbage"})
        logging.getLogger("relayd").info("garbage")
    got = (tmp_path / "log").read_text().splitlines()
    assert got[0] == "<6>INFO relayd: to journal"
    assert TEXT_LINE.fullmatch(got[1])["rest"] == "INFO relayd: redirected elsewhere"
    assert TEXT_LINE.fullmatch(got[2])["rest"] == "INFO relayd: garbage"


def test_json_format():
    out = io.StringIO()
    configure_logging("info", "json", stream=out, environ={"JOURNAL_STREAM": "8:1"})
    log = logging.getLogger("relayd.protocol.router")
    log.info("routed %d", 3, extra={"fields": {"peer": "p1", "bytes": 12, "obj": object(), "msg": "nope"}})
    try:
        1 / 0
    except ZeroDivisionError:
        log.error("oops\nmultiline", exc_info=True)
    got = lines(out)
    assert len(got) == 2
    first, second = (json.loads(line) for line in got)
    assert TEXT_LINE.fullmatch(first["ts"] + " x")
    assert first["level"] == "INFO"
    assert first["logger"] == "relayd.protocol.router"
    assert first["msg"] == "routed 3"
    assert first["peer"] == "p1" and first["bytes"] == 12
    assert first["obj"].startswith("<object object")
    assert "exc" not in first
    assert second["msg"] == "oops\nmultiline"
    assert second["level"] == "ERROR"
    assert "ZeroDivisionError" in second["exc"]


def test_level_change_at_run_time():
    out = io.StringIO()
    configure_logging("info", stream=out, environ={})
    log = logging.getLogger("relayd.server")
    log.debug("hidden")
    set_level("debug")
    log.debug("shown")
    set_level("WARN")
    log.info("hidden again")
    log.warning("warned")
    assert [TEXT_LINE.fullmatch(line)["rest"] for line in lines(out)] == [
        "DEBUG relayd.server: shown",
        "WARNING relayd.server: warned",
    ]


def test_third_party_loggers_stay_quiet_at_debug():
    out = io.StringIO()
    configure_logging("debug", stream=out, environ={})
    logging.getLogger("websockets.server").debug("frame dump")
    logging.getLogger("websockets.server").info("connection open")
    logging.getLogger("asyncio").error("Task exception was never retrieved")
    logging.getLogger("relayd").debug("ours")
    assert [TEXT_LINE.fullmatch(line)["rest"] for line in lines(out)] == [
        "ERROR asyncio: Task exception was never retrieved",
        "DEBUG relayd: ours",
    ]


def test_reconfigure_replaces_handler():
    root = logging.getLogger()
    before = len(root.handlers)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "text", stream=first, environ={})
    configure_logging("debug", "json", stream=second, environ={})
    assert len(root.handlers) == before + 1
    logging.getLogger("relayd").debug("after reload")
    assert first.getvalue() == ""
    assert json.loads(second.getvalue())["msg"] == "after reload"


def test_defaults_use_current_stderr(capsys, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    configure_logging("info")
    logging.getLogger("relayd").info("to stderr")
    err = capsys.readouterr().err
    assert TEXT_LINE.fullmatch(err.strip())["rest"] == "INFO relayd: to stderr"


def test_bad_arguments():
    with pytest.raises(ValueError):
        configure_logging("loud", stream=io.StringIO(), environ={})
    with pytest.raises(ValueError):
        configure_logging("info", "xml", stream=io.StringIO(), environ={})
    with pytest.raises(ValueError):
        set_level("verbose")


@pytest.mark.parametrize(
    ("text", "level"),
    [("debug", 10), ("INFO", 20), (" Warning ", 30), ("warn", 30), ("error", 40), ("fatal", 50), ("critical", 50), ("5", 5), (15, 15)],
)
def test_parse_level(text, level):
    assert parse_level(text) == level


def test_journal_formatter_unknown_low_level():
    record = logging.makeLogRecord({"name": "relayd", "levelno": 5, "levelname": "TRACE", "msg": "x"})
    assert JournalFormatter().format(record) == "<7>TRACE relayd: x"
