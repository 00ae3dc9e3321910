"""Opening the WebSocket and signing in: answering the relay's challenge, plain or signed."""

from __future__ import annotations

import ssl as ssl_module
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import (
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)

from ..identity.statements import auth_statement
from .errors import (
    AuthRefused,
    ClientTimeout,
    ProtocolViolation,
    RelayUnreachable,
    unreachable,
)
from .values import (
    MAX_FRAME_BYTES,
    Frame,
    SignIn,
)


class SignInSteps:
    """The sign-in half of ``RelayClient``: its ``_open`` and ``_sign_in`` steps."""

    async def _open(self) -> ClientConnection:
        where = f"{self.host}:{self.port}"
        extra: dict[str, Any] = {}
        if self.tls:
            extra["ssl"] = self._ssl or ssl_module.create_default_context()
        try:
            return await ws_connect(self.url, compression=None, open_timeout=self.timeout,
                                    close_timeout=self.timeout, max_size=MAX_FRAME_BYTES, proxy=None, **extra)
        except InvalidStatus as exc:
            response = exc.response
            body = response.body.decode("utf-8", "replace").strip()[:200] if response.body else ""
            raise RelayUnreachable(f"{where} answered HTTP {response.status_code} {response.reason_phrase} "
                                   f"instead of a WebSocket upgrade (not a relay?)"
                                   + (f": {body}" if body else ""), status=response.status_code) from None
        except (InvalidHandshake, InvalidURI) as exc:
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            raise RelayUnreachable(f"{where} did not answer like a WebSocket server (not a relay?): "
                                   f"{exc}{cause}") from None
        except TimeoutError:
            raise ClientTimeout(f"timeout opening a WebSocket to {where} after {self.timeout:g} s") from None
        except OSError as exc:
            raise unreachable(where, exc, f"cannot connect to {where}") from None

    async def _sign_in(self, ws: ClientConnection, deadline: float) -> SignIn:
        """Answer the challenge if the relay sends one, then authenticate.

        A signed identity must know whether a challenge is coming (open-mode
        relays send none). The relay sends its challenge as soon as the
        connection opens, before it reads anything, so the client sends a
        ``ping`` first: if a challenge exists it arrives before the
        ``not_authenticated`` answer to that ping. A plain identity skips the
        challenge and authenticates at once, as today's app does.
        """
        identity = self.identity
        assert identity is not None
        challenge: Frame | None = None
        probing = False
        if identity.key is not None:
            await self._send_on(ws, {"type": "ping"})
            first = await self._read_on(ws, deadline, "the sign-in challenge")
            if first.get("type") == "challenge":
                challenge = self._check_challenge(first)
                probing = True
            elif not (first.get("type") == "pong"  # the original relay answers pings before auth
                      or first.get("type") == "error" and first.get("code") == "not_authenticated"):
                raise ProtocolViolation(f"expected a challenge or not_authenticated before auth, got {first}")
        auth: Frame = {"type": "auth", "address": identity.address}
        if self.ack_mode:
            auth["ack"] = True
        if challenge is not None and identity.key is not None:
            text = auth_statement(challenge["relay"], identity.address, challenge["nonce"], challenge["issuedAt"])
            auth.update(nonce=challenge["nonce"], signature=identity.key.sign(text, self.signature_format),
                        format=self.signature_format)
        await self._send_on(ws, auth)
        while True:
            frame = await self._read_on(ws, deadline, "auth_success")
            ftype = frame.get("type")
            if ftype == "auth_success":
                break
            if ftype == "challenge" and identity.key is None:
                continue
            if ftype == "error" and probing and frame.get("code") == "not_authenticated":
                probing = False
                continue
            if ftype == "error":
                raise AuthRefused(str(frame.get("code")), str(frame.get("message", "")))
            raise ProtocolViolation(f"expected auth_success, got {frame}")
        token = frame.get("token")
        expires = frame.get("tokenExpiresAt")
        return SignIn(address=str(frame.get("address", identity.address)), verified=frame.get("verified") is True,
                      token=token if isinstance(token, str) else None,
                      token_expires_at=expires if isinstance(expires, int) else None,
                      challenge=challenge, frame=frame)

    def _check_challenge(self, frame: Frame) -> Frame:
        nonce, relay, issued = frame.get("nonce"), frame.get("relay"), frame.get("issuedAt")
        if not isinstance(nonce, str) or not isinstance(relay, str) or isinstance(issued, bool) \
                or not isinstance(issued, int):
            raise ProtocolViolation(f"malformed challenge (needs nonce, relay, issuedAt): {frame}")
        formats = frame.get("formats")
        if isinstance(formats, list) and self.signature_format not in formats:
            raise ProtocolViolation(f"the relay accepts signature formats {formats}, "
                                    f"not {self.signature_format}")
        return frame

