"""What operators watch relayd with: the Prometheus alert rules (deploy/prometheus), checked and unit-tested by
promtool, the Grafana dashboard (deploy/grafana), whose every metric a real relay exports, and the certificate
expiry metric the certificate alerts read.

promtool comes with Debian's ``prometheus`` package (.ci/run installs it); the test fails, never
skips, without it.
"""

from __future__ import annotations

import calendar
import json
import re
import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from support import ROOT, ProcessRelay, free_port, http_request, make_cert, metric_families, wait_until

from relayd.ops.certificate import CertificateError, certificate_not_after, not_after

RULES = ROOT / "deploy" / "prometheus" / "relayd-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "relayd-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "relayd-dashboard.json"
# Series Prometheus makes itself rather than relayd.
PROMETHEUS_OWN = {"up"}
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
                "bool", "inf", "nan"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: apt-get install prometheus (.ci/run does)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=RULES.parent)


def metric_names(expr: str) -> set[str]:
    """The series an expression (PromQL, or Grafana's with $variables) selects, by name."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                    # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)                               # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                              # ranges, [$__rate_interval]
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\boffset\s+\w+", "", expr)
    names = set()
    for found in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(?!\s*\()", expr):
        name = found.group(1)
        if name.lower() not in PROMQL_WORDS and not re.fullmatch(r"\d+[smhdwy]", name):
            names.add(name)
    return names


def rule_expressions() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard_expressions() -> list[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    yield value.removeprefix("label_values(").rsplit(",", 1)[0] if key == "definition" else value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
    return list(walk(json.loads(DASHBOARD.read_text())))


def test_metric_names_are_read_out_of_promql() -> None:
    assert metric_names('sum by (job, code) (rate(a_total{code="x", job=~"$job"}[10m] offset 10m)) > 3 * '
                        'b / on (instance) group_left (version) c_bucket') == {"a_total", "b", "c_bucket"}
    assert metric_names("relayd_x - time() < 14 * 86400 and up == 0") == {"relayd_x", "up"}


def test_alert_rules_pass_promtool_check() -> None:
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in done.stdout, done.stdout


def test_every_alert_has_a_promtool_unit_test_and_they_pass() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")}
    quiet = {case["alertname"] for test in tests for case in test["alert_rule_test"] if not case.get("exp_alerts")}
    alerts = set(rule_expressions())
    assert alerts - fired == set(), "alerts no unit test fires"
    assert alerts - quiet == set(), "alerts no unit test checks for silence"
    done = promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """The family and sample names a real relay serving TLS exports (metrics on their own plain listener)."""
    tmp = tmp_path_factory.mktemp("metrics")
    cert, key = make_cert(tmp, "relay", days=30)
    metrics_port = free_port()
    relay = ProcessRelay(tmp, wait=False, config_text=(
        f"[auth]\nmode = open\n[tls]\ncertfile = {cert}\nkeyfile = {key}\n"
        f"[metrics]\nlisten = 127.0.0.1:{metrics_port}\n"))
    try:
        text = scrape_when_up(relay, metrics_port)
    finally:
        relay.stop()
    families = metric_families(text)
    yield set(families) | {name for family in families.values() for name, _, _ in family["samples"]}


def scrape_when_up(relay: Any, metrics_port: int) -> str:
    def scraped() -> str | None:
        if relay.proc.poll() is not None:
            raise AssertionError(relay.log())
        try:
            reply = http_request(metrics_port, "GET", "/metrics", timeout=1)
        except OSError:
            return None
        return reply.body.decode() if reply.status == 200 else None
    return wait_until(scraped, "the relay's metrics listener", timeout=15, interval=0.05)


def test_every_metric_the_alert_rules_name_is_exported(exported: set[str]) -> None:
    named = {alert: metric_names(expr) for alert, expr in rule_expressions().items()}
    assert all(named.values()), named
    missing = {alert: names - exported - PROMETHEUS_OWN for alert, names in named.items()
               if names - exported - PROMETHEUS_OWN}
    assert not missing, f"rules name metrics relayd does not export: {missing}"


def test_every_metric_the_dashboard_names_is_exported(exported: set[str]) -> None:
    expressions = dashboard_expressions()
    assert len(expressions) > 20, expressions
    names = set().union(*(metric_names(expr) for expr in expressions))
    assert names - exported - PROMETHEUS_OWN == set(), "the dashboard names metrics relayd does not export"
    # Every alert's metrics are on the dashboard, so an alert can be looked at.
    alerting = set().union(*(metric_names(expr) for expr in rule_expressions().values()))
    assert alerting - names == set()


# The certificate expiry metric


def openssl_not_after(cert: Path) -> float:
    done = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(cert)], capture_output=True,
                          text=True, check=True, timeout=30)
    return float(ssl.cert_time_to_seconds(done.stdout.strip().removeprefix("notAfter=")))


@pytest.mark.parametrize("days", [1, 400, 20000])  # 20000 days ends after 2049: GeneralizedTime, not UTCTime
def test_certificate_not_after_matches_openssl(tmp_path: Path, days: int) -> None:
    cert, _ = make_cert(tmp_path, "c", days=days)
    assert certificate_not_after(str(cert)) == openssl_not_after(cert)
    # The server's own certificate comes first in a chain file.
    other, _ = make_cert(tmp_path, "other", days=3)
    chain = tmp_path / "chain.pem"
    chain.write_text(cert.read_text() + other.read_text())
    assert certificate_not_after(str(chain)) == openssl_not_after(cert)


def test_certificate_without_a_certificate_is_a_clear_error(tmp_path: Path) -> None:
    _, key = make_cert(tmp_path, "c")
    with pytest.raises(CertificateError, match="no PEM certificate"):
        certificate_not_after(str(key))
    with pytest.raises(CertificateError):
        not_after(b"\x30\x82\x01")
    with pytest.raises(CertificateError, match="not YYYYMMDDHHMMSSZ"):
        not_after(der_certificate(b"20491231235959"))
    # A v1 certificate (no version field); UTCTime years below 50 are 20xx.
    assert not_after(der_certificate(b"491231235959Z")) == calendar.timegm((2049, 12, 31, 23, 59, 59))


def der_certificate(not_after_time: bytes) -> bytes:
    """The DER skeleton of a v1 certificate: serial, signature, issuer, validity, nothing else."""
    def tlv(tag: int, content: bytes) -> bytes:
        return bytes([tag, len(content)]) + content
    time_tag = 0x17 if len(not_after_time) == 13 else 0x18
    validity = tlv(0x30, tlv(0x17, b"500101000000Z") + tlv(time_tag, not_after_time))
    return tlv(0x30, tlv(0x30, tlv(0x02, b"\x01") + tlv(0x30, b"") + tlv(0x30, b"") + validity))


def test_certificate_expiry_metric_follows_the_served_certificate_and_reload(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    cert, key = make_cert(tmp_path, "first", days=30)
    shutil.copy(cert, served / "cert.pem")
    shutil.copy(key, served / "key.pem")
    metrics_port = free_port()
    relay = ProcessRelay(tmp_path, wait=False, config_text=(
        f"[auth]\nmode = open\n[tls]\ncertfile = {served / 'cert.pem'}\nkeyfile = {served / 'key.pem'}\n"
        f"[metrics]\nlisten = 127.0.0.1:{metrics_port}\n"))
    try:
        def expiry() -> float:
            families = metric_families(scrape_when_up(relay, metrics_port))
            [(_, _, value)] = families["relayd_tls_certificate_expiry_timestamp_seconds"]["samples"]
            return value

        assert expiry() == openssl_not_after(cert)
        assert 29 * 86400 < expiry() - time.time() <= 30 * 86400

        renewed, renewed_key = make_cert(tmp_path, "renewed", days=90)
        shutil.copy(renewed_key, served / "key.pem")
        shutil.copy(renewed, served / "cert.pem")
        relay.signal(signal.SIGHUP)
        relay.wait_log("configuration reloaded")
        assert expiry() == openssl_not_after(renewed)
    finally:
        relay.stop()


def test_no_certificate_metric_without_tls(tmp_path: Path) -> None:
    relay = ProcessRelay(tmp_path, config_text="[auth]\nmode = open\n")
    try:
        families = metric_families(http_request(relay.port, "GET", "/metrics").body.decode())
    finally:
        relay.stop()
    assert families["relayd_tls_certificate_expiry_timestamp_seconds"]["samples"] == []
    assert families["relayd_ready"]["samples"] == [("relayd_ready", {}, 1.0)]
