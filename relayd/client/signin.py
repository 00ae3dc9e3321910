"""Signing in on an open WebSocket: answering the relay's challenge, plain or signed."""

from __future__ import annotations

import json

from ..identity.statements import auth_statement
from .display import shown
from .errors import (
    AuthRefused,
    ProtocolViolation,
)
from .transport import FrameStream
from .values import (
    Deadline,
    Frame,
    Identity,
    SignIn,
)


class SignInExchange:
    """How ``identity`` signs in: with ``ack`` opting in to acknowledged delivery, signing in ``signature_format``."""

    def __init__(self, identity: Identity, *, ack: bool, signature_format: str) -> None:
        self.identity = identity
        self.ack = ack
        self.signature_format = signature_format

    async def run(self, stream: FrameStream, deadline: Deadline) -> SignIn:
        """Answer the challenge if the relay sends one, then authenticate.

        A signed identity must know whether a challenge is coming (open-mode
        relays send none). The relay sends its challenge as soon as the
        connection opens, before it reads anything, so the client sends a
        ``ping`` first: if a challenge exists it arrives before the
        ``not_authenticated`` answer to that ping. A plain identity skips the
        challenge and authenticates at once, as today's app does.
        """
        identity = self.identity
        challenge: Frame | None = None
        probing = False
        if identity.key is not None:
            await stream.send({"type": "ping"}, deadline)
            first = await stream.read(deadline, "the sign-in challenge")
            if first.get("type") == "challenge":
                challenge = self._check_challenge(first)
                probing = True
            elif first.get("type") == "error" and first.get("code") != "not_authenticated":
                raise AuthRefused(str(first.get("code")), str(first.get("message", "")))  # e.g. rate_limited
            elif not (first.get("type") == "pong"  # the original relay answers pings before auth
                      or first.get("type") == "error"):
                raise ProtocolViolation(f"expected a challenge or not_authenticated before auth, "
                                        f"got {shown(json.dumps(first))}")
        auth: Frame = {"type": "auth", "address": identity.address}
        if self.ack:
            auth["ack"] = True
        if challenge is not None and identity.key is not None:
            text = auth_statement(challenge["relay"], identity.address, challenge["nonce"], challenge["issuedAt"])
            auth.update(nonce=challenge["nonce"], signature=identity.key.sign(text, self.signature_format),
                        format=self.signature_format)
            if identity.throwaway:
                auth["throwaway"] = True
        await stream.send(auth, deadline)
        while True:
            frame = await stream.read(deadline, "auth_success")
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
            raise ProtocolViolation(f"expected auth_success, got {shown(json.dumps(frame))}")
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
            raise ProtocolViolation(f"malformed challenge (needs nonce, relay, issuedAt): "
                                    f"{shown(json.dumps(frame))}")
        formats = frame.get("formats")
        if isinstance(formats, list) and self.signature_format not in formats:
            raise ProtocolViolation(f"the relay accepts signature formats {shown(json.dumps(formats))}, "
                                    f"not {self.signature_format}")
        return frame

