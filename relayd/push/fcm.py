"""Firebase Cloud Messaging HTTP v1: a data-only message to a registration token, authorised by an OAuth2
access token that a service-account key obtains through the JWT bearer grant (RFC 7523), cached until it
is about to expire."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..storage.store import PushSubscription
from .http import Response, request
from .subscriptions import check_url, resolve
from .tokens import rs256

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME_S = 3600
REFRESH_MARGIN_S = 120.0


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """The fields of a Google service-account key file relayd uses."""

    client_email: str
    private_key: rsa.RSAPrivateKey
    private_key_id: str
    token_uri: str

    @classmethod
    def load(cls, path: str) -> ServiceAccount:
        """Raises ValueError naming what is wrong with the file."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        missing = [k for k in ("client_email", "private_key", "token_uri") if not isinstance(data.get(k), str)]
        if missing:
            raise ValueError(f"{path}: not a service-account key file (missing {', '.join(missing)})")
        key = serialization.load_pem_private_key(data["private_key"].encode(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{path}: private_key is not an RSA key")
        return cls(data["client_email"], key, str(data.get("private_key_id", "")), data["token_uri"])


class Fcm:
    """Sends FCM v1 messages for one project."""

    name = "fcm"

    def __init__(self, project: str, account: ServiceAccount, base_url: str, *, ssl_context: ssl.SSLContext,
                 timeout_s: float, max_bytes: int) -> None:
        self.account = account
        self.send_url = f"{base_url.rstrip('/')}/v1/projects/{quote(project, safe='')}/messages:send"
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._token = ""
        self._token_until = 0.0
        self._refreshing = asyncio.Lock()

    async def _post(self, url: str, headers: list[tuple[str, str]], body: bytes) -> Response:
        """The URL is the operator's (configuration or key file): no public-address rule applies."""
        endpoint = check_url(url, allow_private=True)
        address = await resolve(endpoint, True, self.timeout_s)
        return await request("POST", endpoint, address, headers, body, ssl_context=self.ssl_context,
                             timeout_s=self.timeout_s, max_bytes=self.max_bytes)

    async def access_token(self) -> str:
        """A cached access token, or a new one from the token endpoint; raises OSError when refused."""
        async with self._refreshing:
            if self._token and time.monotonic() < self._token_until - REFRESH_MARGIN_S:
                return self._token
            now = int(time.time())
            claims = {"iss": self.account.client_email, "scope": SCOPE, "aud": self.account.token_uri,
                      "iat": now, "exp": now + ASSERTION_LIFETIME_S}
            header = {"kid": self.account.private_key_id} if self.account.private_key_id else {}
            form = urlencode({"grant_type": GRANT_TYPE, "assertion": rs256(self.account.private_key, claims, **header)})
            answer = await self._post(self.account.token_uri, [("Content-Type", "application/x-www-form-urlencoded")],
                                      form.encode())
            try:
                body = json.loads(answer.body)
                token, lifetime = body["access_token"], float(body.get("expires_in", 3600))
            except (ValueError, KeyError, TypeError):
                token, lifetime = None, 0.0
            if answer.status != 200 or not isinstance(token, str):
                raise OSError(f"the OAuth2 token endpoint answered {answer.status}")
            self._token, self._token_until = token, time.monotonic() + lifetime
            return token

    def gone(self, answer: Response) -> bool:
        """What Firebase documents as a stale or invalid token: 404 with the FCM error ``UNREGISTERED``, or 400
        ``INVALID_ARGUMENT`` about the registration token (the same status for a bad payload carries a
        ``BadRequest`` naming another field: the token then stays). A 404 without ``UNREGISTERED`` (a wrong
        project in the URL) removes nothing."""
        if answer.status not in (400, 404):
            return False
        try:
            error = json.loads(answer.body)["error"]
            details = [d for d in error.get("details", []) if isinstance(d, dict)]
            message = str(error.get("message", ""))
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
        codes = {d.get("errorCode") for d in details}  # only FCM's own FcmError detail has an errorCode
        if answer.status == 404:
            return "UNREGISTERED" in codes
        fields = {v.get("field") for d in details if isinstance(d.get("fieldViolations"), list)
                  for v in d["fieldViolations"] if isinstance(v, dict)}
        return "message.token" in fields or ("INVALID_ARGUMENT" in codes and "registration token" in message)

    async def close(self) -> None:
        """Nothing stays open: each push is one request on its own connection."""

    async def send(self, sub: PushSubscription, payload: dict[str, Any], collapse: str) -> Response:
        message = {"message": {"token": sub.target, "data": {k: str(v) for k, v in payload.items()},
                               "android": {"priority": "HIGH", "collapse_key": collapse, "ttl": "86400s"}}}
        body = json.dumps(message, separators=(",", ":")).encode()
        for attempt in range(2):
            headers = [("Authorization", f"Bearer {await self.access_token()}"),
                       ("Content-Type", "application/json; charset=UTF-8")]
            answer = await self._post(self.send_url, headers, body)
            if answer.status != 401 or attempt:
                return answer
            self._token = ""  # revoked or expired early: one more try with a new token
        raise AssertionError("unreachable")
