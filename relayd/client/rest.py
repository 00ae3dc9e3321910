"""The REST half of the client: the relay's HTTP API on the WebSocket's host and port, each call bounded."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from typing import Any, Callable

from ..identity.statements import key_statement
from .decoding import parse_json
from .display import shown
from .endpoint import Endpoint
from .errors import (
    ClientError,
    ClientTimeout,
    HttpError,
    ProtocolViolation,
    unreachable,
)
from .http_exchange import exchange
from .values import Frame, Identity, Limits, verify_key_record


class RestApi:
    """The REST calls of one identity (or none, for public routes) against one relay.

    ``token`` gives the bearer token of the current signed sign-in, if any,
    for the private routes; ``signature_format`` signs published keys.
    """

    def __init__(self, endpoint: Endpoint, limits: Limits, identity: Identity | None, signature_format: str,
                 token: Callable[[], str | None]) -> None:
        self.endpoint = endpoint
        self.limits = limits
        self.identity = identity
        self.signature_format = signature_format
        self._token = token

    async def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                      timeout: float | None = None) -> Any:
        """One REST call, bounded as a whole by ``timeout`` (default: the client's); returns the parsed JSON.

        Raises HttpError for a status >= 400, RelayUnreachable when no HTTP
        conversation happened, ClientTimeout, or ProtocolViolation for an
        answer over ``max_body_bytes`` or a successful one that is not JSON.
        """
        limit = self.limits.timeout if timeout is None else timeout
        where = self.endpoint.where
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with asyncio.timeout(limit):
                answer = await exchange(self.endpoint, method, path, data, headers, self.limits.max_body_bytes)
        except TimeoutError:
            raise ClientTimeout(f"timeout on {method} {path} at {where} after {limit:g} s") from None
        except OSError as exc:
            raise unreachable(where, exc, f"{method} {path} at {where} failed") from None
        except ProtocolViolation as exc:
            raise ProtocolViolation(f"{method} {path}: {exc}") from None
        if answer.status >= 400:
            raise HttpError(method, path, answer.status, answer.body)
        try:
            return parse_json(answer.body)
        except ProtocolViolation as exc:
            raise ProtocolViolation(f"{method} {path}: HTTP {answer.status}: {exc}") from None

    async def _object(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Frame:
        reply = await self.request(method, path, body, token=token)
        if not isinstance(reply, dict):
            raise ProtocolViolation(f"{method} {path}: the relay answered JSON that is not an object: "
                                    f"{shown(json.dumps(reply))}")
        return reply

    def _own_address(self) -> str:
        if self.identity is None:
            raise ClientError("this call needs an identity")
        return self.identity.address

    async def health(self) -> Frame:
        return await self._object("GET", "/health")

    async def status(self, address: str) -> Frame:
        """``{"address", "online", "timestamp"}`` of any address."""
        return await self._object("GET", f"/api/status/{urllib.parse.quote(address)}")

    async def queue_size(self, address: str) -> int:
        path = f"/api/messages/{urllib.parse.quote(address)}/queue-size"
        reply = await self._object("GET", path)
        size = reply.get("queueSize")
        if isinstance(size, bool) or not isinstance(size, int):
            raise ProtocolViolation(f"GET {path}: queueSize is not an integer: {shown(json.dumps(reply))}")
        return size

    async def get_key(self, address: str, *, verify: bool = False) -> Frame | None:
        """The published key record of ``address``, or None when it has none.

        With ``verify`` the record must be signed and check out locally
        (``verify_key_record``), or KeyVerificationError is raised.
        """
        try:
            record = await self._object("GET", f"/api/public-keys/{urllib.parse.quote(address)}")
        except HttpError as exc:
            if exc.status == 404 and exc.code in ("key_not_found", None):
                return None
            raise
        if verify:
            verify_key_record(record, address)
        return record

    async def put_key(self, public_key: str, *, signed: bool | None = None, issued_at: int | None = None) -> Frame:
        """Publish this identity's encryption key; signed (docs/protocol.md, "Signed keys") by default when it has a key."""
        identity = self.identity
        if identity is None:
            raise ClientError("publishing a key needs an identity")
        signed = identity.signed if signed is None else signed
        body: Frame = {"address": identity.address, "publicKey": public_key}
        if signed:
            if identity.key is None:
                raise ClientError("a signed key needs a private key, not just an address")
            issued = int(time.time()) if issued_at is None else issued_at
            statement = key_statement(identity.address, "x25519", public_key, issued)
            body.update(keyType="x25519", issuedAt=issued, format=self.signature_format,
                        signature=identity.key.sign(statement, self.signature_format))
            if identity.throwaway:
                body["throwaway"] = True
        return await self._object("POST", "/api/public-keys", body)

    async def delete_key(self) -> Frame:
        """Remove this identity's key (needs the sign-in token outside open mode)."""
        return await self._object("DELETE", f"/api/public-keys/{self._own_address()}", token=self._token())

    async def messages(self, limit: int | None = None) -> Frame:
        """This identity's stored messages over REST; with ``limit`` a peek, without it they are removed."""
        query = "" if limit is None else f"?limit={int(limit)}"
        return await self._object("GET", f"/api/messages/{self._own_address()}{query}", token=self._token())
