"""``relayd check``: an end-to-end smoke test of a relay, one line per step with its time."""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ..client.display import shown, terminal_line
from .options import EXIT_FAILURE, EXIT_OK

if TYPE_CHECKING:
    from ..client import RelayClient


class RelayCheck:
    """``relayd check``: an end-to-end smoke test, one printed line per step.

    Each step is a coroutine returning a short detail for its line; any
    exception fails it with its message. A step whose prerequisites did not
    pass is skipped rather than run into the same failure again.
    """

    def __init__(self, url: str, timeout: float, *, plain: bool = False, tls: ssl.SSLContext | None = None,
                 out: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        from ..client import Identity, RelayClient
        self.url = url
        self.timeout = timeout
        self.plain = plain
        self.tls = tls
        self.out = out
        self.marks = _marks()
        make = (lambda: Identity(Identity.generate().address)) if plain else (
            lambda: Identity.generate(throwaway=True))
        self.a_id, self.b_id = make(), make()
        self.a = RelayClient(url, self.a_id, timeout=timeout, ssl=tls)
        self.b = RelayClient(url, self.b_id, timeout=timeout, ssl=tls)
        self.results: dict[str, bool] = {}

    async def run(self) -> int:
        steps: list[tuple[str, str, Callable[[], Awaitable[str]], tuple[str, ...]]] = [
            ("health", "relay answers GET /health", self.health, ()),
            ("a", "sign in A", lambda: self.sign_in(self.a), ("health",)),
            ("b", "sign in B", lambda: self.sign_in(self.b), ("health",)),
            ("key", "key round trip A -> relay -> B", self.key_round_trip, ("a", "b")),
            ("live", "live message A -> B", self.live_message, ("a", "b")),
            ("read", "read receipt B -> A", self.read_receipt, ("live",)),
            ("queued", "queued message A -> offline B", self.queued_message, ("a", "b")),
            ("cleanup", "clean up (delete A's key)", self.clean_up, ("key",)),
        ]
        self.out(f"relayd check {self.url} ({'plain' if self.plain else 'signed'} identities "
                 f"A={self.a_id.address}, B={self.b_id.address})")
        try:
            for name, title, step, needs in steps:
                missing = [n for n in needs if not self.results.get(n)]
                if missing:
                    self.results[name] = False
                    self.out(f"{self.marks[2]} {title:<34} {'':>8}  skipped: needs "
                             + ", ".join(t for n, t, _, _ in steps if n in missing))
                    continue
                started = time.perf_counter()
                try:
                    detail = await step()
                    ok = True
                except Exception as exc:  # every failure is reported on the step's line
                    detail, ok = _reason(exc), False
                ms = (time.perf_counter() - started) * 1000
                self.results[name] = ok
                self.out(f"{self.marks[0 if ok else 1]} {title:<34} {ms:>5.0f} ms  {terminal_line(detail)}")
        finally:
            await self.a.close()
            await self.b.close()
        passed = sum(self.results.values())
        self.out(f"relayd check: {passed} of {len(steps)} steps passed")
        return EXIT_OK if passed == len(steps) else EXIT_FAILURE

    async def health(self) -> str:
        reply = await self.a.health()
        if not isinstance(reply, dict) or "status" not in reply:
            raise ValueError(f"GET /health answered {shown(json.dumps(reply))} without a status: not a relay?")
        if reply["status"] != "ok":
            raise ValueError(f"the relay reports status {shown(json.dumps(reply['status']), 60)}: "
                             f"{shown(json.dumps(reply))}")
        storage = reply.get("storage")
        backend = storage.get("backend", "?") if isinstance(storage, dict) else "?"
        return f"status ok, version {shown(reply.get('version', '?'), 60)}, storage {shown(backend, 60)}"

    async def sign_in(self, client: RelayClient) -> str:
        result = await client.connect()
        if self.plain:
            return "plain sign-in accepted (unverified)"
        if result.verified:
            return "signed challenge accepted (verified, token issued)"
        return "accepted unverified: the relay sent no challenge (open mode)"

    async def key_round_trip(self) -> str:
        from ..client import random_public_key
        key = random_public_key()
        # Sign the key only where sessions are verified: an open relay evicts A's (unverified) session
        # once A's address has a signed key.
        signed = bool(self.a.sign_in and self.a.sign_in.verified)
        await self.a.put_key(key, signed=signed)
        record = await self.b.get_key(self.a_id.address, verify=signed)
        if record is None:
            raise ValueError("the key just published is not found (404)")
        if record.get("publicKey") != key:
            raise ValueError(f"B got publicKey {shown(json.dumps(record.get('publicKey')), 60)}, A published {key!r}")
        if signed:
            return "signed, published, fetched, signature verified locally"
        return "unsigned, published, fetched" + ("" if self.plain else " (the relay verifies no sign-in: open mode)")

    async def live_message(self) -> str:
        answer = await self.a.send(self.b_id.address, "relayd-check-live")
        if answer.get("type") != "delivered":
            raise ValueError(f"expected delivered, got {shown(json.dumps(answer))}")
        mid = answer["messageId"]
        frame = await self.b.recv_matching(lambda f: f.get("type") == "message" and f.get("messageId") == mid,
                                           "the live message at B")
        if frame.get("from") != self.a_id.address or frame.get("content") != "relayd-check-live":
            raise ValueError(f"B received a different message: {shown(json.dumps(frame))}")
        self.live_id = mid
        return "delivered and received"

    async def read_receipt(self) -> str:
        await self.b.read_receipt(self.a_id.address, self.live_id)
        await self.a.recv_matching(lambda f: f.get("type") == "read" and f.get("messageId") == self.live_id,
                                   "the read receipt at A")
        return "received"

    async def queued_message(self) -> str:
        await self.b.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while (await self.a.status(self.b_id.address)).get("online"):
            if loop.time() > deadline:
                raise TimeoutError(f"timeout waiting for B to be reported offline after {self.timeout:g} s")
            await asyncio.sleep(0.05)
        answer = await self.a.send(self.b_id.address, "relayd-check-queued")
        if answer.get("type") != "queued":
            raise ValueError(f"expected queued, got {shown(json.dumps(answer))}")
        mid = answer["messageId"]
        from ..client import RelayClient
        self.b = RelayClient(self.url, self.b_id, ack=True, timeout=self.timeout, ssl=self.tls)
        await self.b.connect()
        frame = await self.b.recv_matching(lambda f: f.get("type") == "message" and f.get("messageId") == mid,
                                           "the queued message at B after reconnecting")
        if frame.get("queued") is not True:
            raise ValueError(f"the stored message came without queued: true: {shown(json.dumps(frame))}")
        await self.b.ack([mid])
        await self.b.recv_matching(lambda f: f.get("type") == "queue_empty", "queue_empty at B")
        return "queued, delivered on reconnect, acknowledged"

    async def clean_up(self) -> str:
        from ..client import HttpError
        try:
            reply = await self.a.delete_key()
        except HttpError as exc:
            if self.plain and exc.status == 401:
                return "kept: deleting a key needs the token of a signed sign-in on this relay"
            raise
        if reply.get("success") is not True:
            raise ValueError(f"the key was not deleted: {shown(json.dumps(reply))}")
        return "deleted"


def _reason(exc: Exception) -> str:
    from ..client import ClientError
    if isinstance(exc, (ClientError, ValueError, TimeoutError)) and str(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _marks() -> tuple[str, str, str]:
    """Pass, fail and skip marks, in ASCII when stdout cannot encode the symbols."""
    try:
        "✔✘–".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "+", "x", "-"
    return "✔", "✘", "–"


