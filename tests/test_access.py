"""The operator's deny list, ``[access] deny``: IPs, networks and addresses refused with a clear code, counted
in a metric, and reloaded with SIGHUP (closing the sessions it newly denies)."""

from __future__ import annotations

import json
import signal

import pytest
from support import (assert_closed_with, assert_refused, base64_key, metric_families, new_address, pong_next,
                     cli_ok, run_cli, start_open, wait_until)

from relayd.access import DenyList
from relayd.config import ConfigError, load_config

OPEN = "[auth]\nmode = open\n"


def denied_count(relay, kind: str) -> float:
    families = metric_families(relay.http("GET", "/metrics").body.decode())
    samples = families.get("relayd_access_denied_total", {}).get("samples", [])
    return sum(v for name, labels, v in samples if name == "relayd_access_denied_total" and labels == {"kind": kind})


def test_deny_list_matches_ips_networks_and_addresses():
    address = new_address()
    deny = DenyList(["203.0.113.7", "198.51.100.0/24", "2001:db8::/32", address.upper().replace("0X", "0x")])
    assert deny.denies_ip("203.0.113.7") and not deny.denies_ip("203.0.113.8")
    assert deny.denies_ip("198.51.100.200") and deny.denies_ip("::ffff:198.51.100.1")  # dual-stack socket
    assert deny.denies_ip("2001:db8:1::5") and not deny.denies_ip("2001:db9::1")
    assert deny.denies_address(address) and not deny.denies_address(new_address())
    assert not deny.denies_ip("not an ip")


@pytest.mark.parametrize("entry", ["203.0.113.300", "example.org", "0x1234", "10.0.0.0/33"])
def test_a_bad_entry_is_a_config_error_naming_the_key(entry):
    with pytest.raises(ConfigError, match=r"\[access\] deny: .* is not an IP address, a network"):
        load_config(overrides=[("access", "deny", f"10.0.0.1,{entry}")])


def test_a_denied_ip_gets_403_access_denied_on_requests_and_upgrades(start_relay):
    relay = start_open(start_relay, access={"deny": "127.0.0.0/8"})
    assert_refused(relay.http("GET", "/api/public-keys/stats/all"), 403, "access_denied")
    with pytest.raises(Exception) as refused:
        relay.ws()
    assert "403" in str(refused.value)
    # the metrics and health routes are refused too: only the operator's own machines should be let in
    assert relay.http("GET", "/health").status == 403


def test_a_denied_address_cannot_sign_in_or_publish_a_key(start_relay):
    bad, good = new_address(), new_address()
    relay = start_open(start_relay, access={"deny": bad})
    with relay.ws() as ws:
        ws.send({"type": "auth", "address": bad})
        frames = assert_closed_with(ws, 4003)
        assert frames and frames[-1]["type"] == "error" and frames[-1]["code"] == "access_denied", frames
    assert_refused(relay.http("POST", "/api/public-keys", {"address": bad, "publicKey": base64_key()}), 403,
                   "access_denied")
    assert relay.http("POST", "/api/public-keys", {"address": good, "publicKey": base64_key()}).status == 200
    with relay.ws() as ws:
        ws.send({"type": "auth", "address": good})
        assert ws.recv_type("auth_success")
    assert denied_count(relay, "address") == 2


def test_sighup_applies_the_deny_list_and_closes_newly_denied_sessions(process_relays, tmp_path):
    bad, good = new_address(), new_address()
    relay = process_relays(tmp_path, config_text=OPEN)
    with relay.ws() as victim, relay.ws() as bystander:
        for ws, address in ((victim, bad), (bystander, good)):
            ws.send({"type": "auth", "address": address})
            assert ws.recv_type("auth_success")
        relay.config_path.write_text(OPEN + f"[access]\ndeny = {bad}, 192.0.2.0/24\n")
        relay.signal(signal.SIGHUP)
        relay.wait_log("configuration reloaded: applied [access] deny")
        frames = assert_closed_with(victim, 4003)
        assert frames[-1]["code"] == "access_denied"
        pong_next(bystander)
    assert denied_count(relay, "address") == 1
    shown = run_cli(tmp_path, "config", "--config", str(relay.config_path))
    assert f"deny = {bad},192.0.2.0/24" in shown.stdout


# Connection counts per instance, behind a token


def test_instances_route_and_command_need_the_status_token(start_relay, tmp_path):
    off = start_open(start_relay)
    assert_refused(off.http("GET", "/health/instances"), 404, "disabled")
    relay = start_open(start_relay, access={"status_token": "t0ken-of-the-operator"})
    assert_refused(relay.http("GET", "/health/instances"), 401, "unauthorized")
    assert_refused(relay.http("GET", "/health/instances", headers={"Authorization": "Bearer wrong"}), 401,
                   "unauthorized")
    with relay.ws() as ws:
        ws.send({"type": "auth", "address": new_address()})
        ws.recv_type("auth_success")
        reply = relay.http("GET", "/health/instances", headers={"Authorization": "Bearer t0ken-of-the-operator"})
        assert reply.status == 200, reply
        assert reply.json == {"instances": {"this": {"connections": 1, "sessions": 1}},
                              "total": {"connections": 1, "sessions": 1}}
        token_file = tmp_path / "status.token"
        token_file.write_text("t0ken-of-the-operator\n")
        shown = cli_ok(tmp_path, "instances", "--relay", relay.url, "--token-file", str(token_file))
        assert json.loads(shown.stdout) == reply.json
    token_file.write_text("wrong")
    refused = run_cli(tmp_path, "instances", "--relay", relay.url, "--token-file", str(token_file))
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr and "wrong" not in refused.stderr


def test_instances_route_counts_every_instance_on_redis(relay_cluster, redis_server):
    token = {"Authorization": "Bearer s3cret-status"}
    x, y = relay_cluster(redis_server, 2, RELAYD_AUTH_MODE="open", RELAYD_ACCESS_STATUS_TOKEN="s3cret-status")
    with x.ws() as a, y.ws() as b, y.ws() as c:
        for ws in (a, b, c):
            ws.send({"type": "auth", "address": new_address()})
            ws.recv_type("auth_success")

        def counted():
            reply = x.http("GET", "/health/instances", headers=token).json
            by_node = {name.partition("#")[0]: counts for name, counts in reply["instances"].items()}
            return by_node == {"node0": {"connections": 1, "sessions": 1},
                               "node1": {"connections": 2, "sessions": 2}} and reply
        reply = wait_until(counted, "both instances' counts", timeout=10)
        assert reply["total"] == {"connections": 3, "sessions": 3}
    y.stop()
    wait_until(lambda: [n.partition("#")[0] for n in x.http("GET", "/health/instances", headers=token)
                        .json["instances"]] == ["node0"], "the stopped instance to leave", timeout=10)
    assert "s3cret-status" not in x.log()
