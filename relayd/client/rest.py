"""The REST half of the client: standard-library HTTP to the relay's API on the WebSocket's host and port."""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl as ssl_module
import time
import urllib.parse
from typing import Any

from ..identity.statements import key_statement
from .errors import (
    ClientError,
    ClientTimeout,
    HttpError,
    ProtocolViolation,
    RelayUnreachable,
    unreachable,
)
from .values import Frame, verify_key_record


class RestCalls:
    """REST calls of ``RelayClient``; needs ``host``, ``port``, ``tls``, ``timeout``, ``identity``, ``token``."""

    async def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                      timeout: float | None = None) -> Any:
        """One REST call; returns the parsed JSON answer.

        Raises HttpError for a status >= 400, RelayUnreachable when no HTTP
        conversation happened, ClientTimeout, or ProtocolViolation for a
        successful answer that is not JSON.
        """
        limit = self.timeout if timeout is None else timeout
        status, payload = await asyncio.to_thread(self._http, method, path, body, token, limit)
        if status >= 400:
            raise HttpError(method, path, status, payload)
        try:
            return json.loads(payload)
        except ValueError:
            raise ProtocolViolation(f"{method} {path}: HTTP {status} with a body that is not JSON: "
                                    f"{payload[:100]!r}") from None

    def _http(self, method: str, path: str, body: Any, token: str | None, timeout: float) -> tuple[int, bytes]:
        where = f"{self.host}:{self.port}"
        if self.tls:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=self._ssl or ssl_module.create_default_context())
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except TimeoutError:
            raise ClientTimeout(f"timeout on {method} {path} at {where} after {timeout:g} s") from None
        except OSError as exc:
            raise unreachable(where, exc, f"{method} {path} at {where} failed") from None
        except http.client.HTTPException as exc:
            raise RelayUnreachable(f"{method} {path} at {where} failed: {exc!r}") from None
        finally:
            conn.close()

    def _own_address(self) -> str:
        if self.identity is None:
            raise ClientError("this call needs an identity")
        return self.identity.address

    async def health(self) -> Frame:
        return await self.request("GET", "/health")

    async def status(self, address: str) -> Frame:
        """``{"address", "online", "timestamp"}`` of any address."""
        return await self.request("GET", f"/api/status/{urllib.parse.quote(address)}")

    async def queue_size(self, address: str) -> int:
        reply = await self.request("GET", f"/api/messages/{urllib.parse.quote(address)}/queue-size")
        return int(reply["queueSize"])

    async def get_key(self, address: str, *, verify: bool = False) -> Frame | None:
        """The published key record of ``address``, or None when it has none.

        With ``verify`` the record must be signed and check out locally
        (``verify_key_record``), or KeyVerificationError is raised.
        """
        try:
            record = await self.request("GET", f"/api/public-keys/{urllib.parse.quote(address)}")
        except HttpError as exc:
            if exc.status == 404 and exc.code in ("key_not_found", None):
                return None
            raise
        if verify:
            verify_key_record(record, address)
        return record

    async def put_key(self, public_key: str, *, signed: bool | None = None, issued_at: int | None = None) -> Frame:
        """Publish this identity's encryption key; signed (README "Signed keys") by default when it has a key."""
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
        return await self.request("POST", "/api/public-keys", body)

    async def delete_key(self) -> Frame:
        """Remove this identity's key (needs the sign-in token outside open mode)."""
        return await self.request("DELETE", f"/api/public-keys/{self._own_address()}", token=self.token)

    async def messages(self, limit: int | None = None) -> Frame:
        """This identity's stored messages over REST; with ``limit`` a peek, without it they are removed."""
        query = "" if limit is None else f"?limit={int(limit)}"
        return await self.request("GET", f"/api/messages/{self._own_address()}{query}", token=self.token)


