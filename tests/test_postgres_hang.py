"""PostgreSQL hung, without load: relayd's link to it stalled (a TcpProxy that stops forwarding both ways without
closing), or the postmaster and all its backends SIGSTOPped.

A hang is worse than an outage: nothing is refused, nothing answers. With ``connect_timeout_s`` and
``command_timeout_s`` of 1 s each, every WebSocket send and REST call must still get an answer (a storage error,
503) within their sum (plus the machine's slack), ``/health/ready`` must answer 503 about a second into the hang
(and never hang itself), and after the heal the relay serves again without a restart, losing nothing it answered
``queued``. The same hangs under load, on a cluster, are in test_faults_postgres.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from support import A, B, C, ProcessRelay, msg, pg_cluster_env, received_once, scaled, wait_until
from tcp_proxy import TcpProxy

pytest.importorskip("asyncpg", reason="the PostgreSQL backend needs asyncpg (pip install 'relayd[postgres]')")

CONNECT_S = 1.0
COMMAND_S = 1.0
BOUND_S = CONNECT_S + COMMAND_S + scaled(1.0)
"""Longest wait for any answer while PostgreSQL hangs."""
READY_S = 1.0 + scaled(1.5)
"""Longest time from the hang to /health/ready answering 503."""
ERRORS = ("storage_unavailable", "storage_timeout")


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def _probe_ready(relay: ProcessRelay, probes: list[tuple[float, int | None, float]], done: threading.Event) -> None:
    """GET /health/ready every 0.1 s until ``done``: (when, status or None when it did not answer, how long)."""
    while not done.is_set():
        started = time.monotonic()
        try:
            status: int | None = relay.http("GET", "/health/ready", timeout=BOUND_S).status
        except OSError:
            status = None
        probes.append((started, status, time.monotonic() - started))
        done.wait(0.1)


def _answer(client: Any, mid: str) -> str:
    """The answer to ``mid``: queued, delivered, or the error's code. Answers must come in send order: one to a
    later message arriving first fails here."""
    while True:
        frame = client.recv(timeout=BOUND_S + 1)
        if frame["type"] not in ("queued", "delivered", "error") or "messageId" not in frame:
            continue
        assert frame["messageId"] == mid, f"the answer to {frame['messageId']} came before {mid}'s: {frame}"
        return str(frame["type"] if frame["type"] != "error" else frame["code"])


@pytest.mark.parametrize("hang", ["link stalled", "postmaster stopped"])
def test_every_call_is_answered_in_bounded_time_while_postgres_hangs_and_all_recovers(tmp_path, fresh_pg, hang):
    proxy = TcpProxy(fresh_pg.port)
    database = fresh_pg.new_database().rsplit("/", 1)[1]
    relay = ProcessRelay(tmp_path, env={
        "RELAYD_STORAGE_BACKEND": "postgres",
        "RELAYD_POSTGRES_URL": f"postgresql://postgres@127.0.0.1:{proxy.port}/{database}",
        "RELAYD_POSTGRES_CONNECT_TIMEOUT_S": str(CONNECT_S), "RELAYD_POSTGRES_COMMAND_TIMEOUT_S": str(COMMAND_S),
        "RELAYD_LIMITS_FRAMES_PER_S": "0"})
    answers: dict[str, str] = {}
    hung = False

    def heal() -> None:
        if hang == "link stalled":
            proxy.heal()
        else:
            fresh_pg.thaw()

    try:
        with relay.ws() as sender:
            sender.auth(A)
            for i in range(5):
                sender.send(msg(B, f"before{i}"))
                answers[f"before{i}"] = _answer(sender, f"before{i}")
            assert set(answers.values()) == {"queued"}, answers

            hung = True
            probes: list[tuple[float, int | None, float]] = []
            probing = threading.Event()
            prober = threading.Thread(target=_probe_ready, args=(relay, probes, probing), daemon=True)
            prober.start()
            started = time.monotonic()
            if hang == "link stalled":
                proxy.stall("client->server")
                proxy.stall("server->client")
            else:
                fresh_pg.freeze()

            sent_at = {}  # first pipelined, on connections that worked a moment ago; then one at a time
            for i in range(3):
                sender.send(msg(B, f"piped{i}"))
                sent_at[f"piped{i}"] = time.monotonic()
            for mid in sent_at:
                answers[mid] = _answer(sender, mid)
                took = time.monotonic() - sent_at[mid]
                assert took < BOUND_S, f"{mid} answered {answers[mid]} after {took:.2f} s"
            for i in range(3):
                mid = f"during{i}"
                sender.send(msg(B, mid))
                answers[mid], took = _timed(lambda: _answer(sender, mid))
                assert took < BOUND_S, f"{mid} answered {answers[mid]} after {took:.2f} s"
            during = {mid: a for mid, a in answers.items() if not mid.startswith("before")}
            assert set(during.values()) <= set(ERRORS), during

            for path in (f"/api/messages/{B}/queue-size", f"/api/public-keys/{A}", f"/api/status/{B}"):
                reply, took = _timed(lambda: relay.http("GET", path, timeout=BOUND_S + 1))
                assert took < BOUND_S, f"GET {path} answered {reply.status} after {took:.2f} s"
                assert reply.status in ((503,) if "queue-size" in path else (200, 404, 503)), (path, reply.status)

            with relay.ws() as late:  # a session opened during the hang gets its answer too
                late.send({"type": "auth", "address": C})
                frame, took = _timed(lambda: late.recv(timeout=BOUND_S + 1))
                assert took < BOUND_S, f"auth answered {frame} after {took:.2f} s"

            wait_until(lambda: any(status == 503 for _, status, _ in probes), "/health/ready 503 while PostgreSQL "
                       "hangs", timeout=READY_S)
            probing.set()
            prober.join(scaled(5))
            first = min(at for at, status, _ in probes if status == 503)
            assert first - started < READY_S, f"/health/ready turned 503 {first - started:.2f} s into the hang"
            slowest = max(took for *_, took in probes)
            assert slowest < scaled(0.5), f"/health/ready took {slowest:.2f} s to answer while PostgreSQL hangs"

            heal()
            hung = False
            wait_until(lambda: relay.http("GET", "/health/ready").status == 200, "ready after the heal",
                       timeout=scaled(10))
            for i in range(5):
                sender.send(msg(B, f"after{i}"))
                answers[f"after{i}"] = _answer(sender, f"after{i}")
            assert all(answers[f"after{i}"] == "queued" for i in range(5)), answers

        queued = {mid for mid, a in answers.items() if a == "queued"}
        unknown = {mid for mid, a in answers.items() if a == "storage_timeout"}
        received_once(relay, B, queued, unknown)
        assert relay.proc.poll() is None, "no restart"
    finally:
        if hung:
            heal()
        relay.stop()
        proxy.stop()



def test_the_cluster_inbox_notices_its_stalled_link_and_is_back_after_the_heal(tmp_path, fresh_pg, process_relays):
    """A LISTEN connection on a stalled link never closes: node0 must ask (a ping within command_timeout_s), give
    the inbox up, and subscribe again once the link works, without a restart; a message from node1 to a session
    on node0 arrives before and after."""
    proxy = TcpProxy(fresh_pg.port)
    url = fresh_pg.new_database()
    proxied = f"postgresql://postgres@127.0.0.1:{proxy.port}/{url.rsplit('/', 1)[1]}"
    envs = [pg_cluster_env(proxied, "node0"), pg_cluster_env(url, "node1")]
    command_s = float(envs[0]["RELAYD_POSTGRES_COMMAND_TIMEOUT_S"])
    nodes = [process_relays(tmp_path / f"node{i}", env=env, wait=False) for i, env in enumerate(envs)]
    try:
        for node in nodes:
            node.wait_ready()
        with nodes[0].ws() as receiver, nodes[1].ws() as sender:
            receiver.auth(B)
            sender.auth(A)
            sender.send(msg(B, "m0"))
            assert _answer(sender, "m0") in ("delivered", "queued")
            assert receiver.recv_type("message")["messageId"] == "m0"

            proxy.stall("client->server")
            proxy.stall("server->client")
            try:
                nodes[0].wait_log("cluster inbox lost (the cluster inbox's PostgreSQL connection did not answer",
                                  timeout=1.0 + command_s + scaled(2.0))
            finally:
                proxy.heal()
            wait_until(lambda: nodes[0].http("GET", "/health/ready").status == 200, "node0 ready after the heal",
                       timeout=scaled(10))

            sender.send(msg(B, "m1"))
            assert _answer(sender, "m1") in ("delivered", "queued")
            assert receiver.recv_type("message", timeout=5)["messageId"] == "m1"
        assert all(node.proc.poll() is None for node in nodes), "no restart"
    finally:
        proxy.stop()



class _HeldLink:
    """A ``PgLink`` stand-in whose operations each wait until the test lets them through (``gates``, in
    submission order), then record the presence kind they write."""

    connect_timeout_s = command_timeout_s = 1.0
    health = SimpleNamespace(failure=None)

    def __init__(self) -> None:
        self.gates: list[asyncio.Future[None]] = []
        self.written: list[str] = []

    @contextmanager
    def bounded(self) -> Iterator[float]:
        yield 0.0

    async def run(self, job: Any, *, write: bool, transaction: bool = False) -> Any:
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        await gate
        return await job(self)

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any]:
        self.written.append(args[2])
        return {"o_watchers": [], "o_presence": []}


def test_an_instances_presence_writes_of_one_address_land_in_the_order_they_were_made():
    """The last session of B left during a hang (its entry's removal waits for the server) and a new one signed in
    just after the heal: on two pooled connections the removal could land last and leave B without its entry
    here, so nothing stored for B would be offered or hinted to this instance (a late finding of pg_freeze)."""
    from relayd.cluster.postgres_backplane import PostgresBackplane

    async def scenario() -> list[str]:
        link = _HeldLink()
        backplane = PostgresBackplane(SimpleNamespace(link=link))  # type: ignore[arg-type]
        left = backplane.join(B, "node0#1", "", 1000)
        joined = backplane.join(B, "node0#1", "a", 1000)
        while not (left.done() and joined.done()):
            await asyncio.sleep(0)
            for gate in reversed(link.gates):  # the server answers the newest first
                if not gate.done():
                    gate.set_result(None)
                    break
        return link.written

    assert asyncio.run(scenario()) == ["", "a"]
