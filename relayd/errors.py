"""Every error relayd reports, in one place.

An error is a value: a stable machine-readable ``code``, a human message and,
for the REST API, an HTTP status. WebSocket errors become ``error`` frames,
HTTP errors become ``{"error": ..., "code": ...}`` bodies.
"""

from __future__ import annotations

import enum
from http import HTTPStatus
from typing import Any


class ErrorCode(str, enum.Enum):
    """Stable error codes; clients may switch on them."""

    # Frames and bodies
    INVALID_JSON = "invalid_json"
    INVALID_FRAME = "invalid_frame"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    INVALID_ADDRESS = "invalid_address"
    MESSAGE_TOO_LARGE = "message_too_large"
    # Sessions
    NOT_AUTHENTICATED = "not_authenticated"
    ALREADY_AUTHENTICATED = "already_authenticated"
    AUTH_TIMEOUT = "auth_timeout"
    AUTH_FAILED = "auth_failed"
    AUTH_REQUIRED = "auth_required"
    STALE_STATEMENT = "stale_statement"
    NOT_VERIFIED = "not_verified"
    # Delivery
    QUEUE_FULL = "queue_full"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    STORAGE_TIMEOUT = "storage_timeout"
    RATE_LIMITED = "rate_limited"
    # Push subscriptions
    PUSH_DISABLED = "push_disabled"
    PUSH_PROVIDER_UNAVAILABLE = "push_provider_unavailable"
    PUSH_VERIFIED_ONLY = "push_verified_only"
    INVALID_SUBSCRIPTION = "invalid_subscription"
    ENDPOINT_NOT_ALLOWED = "endpoint_not_allowed"
    SUBSCRIPTION_NOT_FOUND = "subscription_not_found"
    # HTTP
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    KEY_NOT_FOUND = "key_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    LENGTH_REQUIRED = "length_required"
    URI_TOO_LONG = "uri_too_long"
    HEADERS_TOO_LARGE = "headers_too_large"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    ACCESS_DENIED = "access_denied"
    DISABLED = "disabled"
    INTERNAL_ERROR = "internal_error"


_DEFAULTS: dict[ErrorCode, tuple[str, HTTPStatus]] = {
    ErrorCode.INVALID_JSON: ("Body is not valid JSON", HTTPStatus.BAD_REQUEST),
    ErrorCode.INVALID_FRAME: ("Frame must be a JSON object", HTTPStatus.BAD_REQUEST),
    ErrorCode.UNKNOWN_TYPE: ("Unknown frame type", HTTPStatus.BAD_REQUEST),
    ErrorCode.MISSING_FIELD: ("A required field is missing", HTTPStatus.BAD_REQUEST),
    ErrorCode.INVALID_FIELD: ("A field has the wrong type or value", HTTPStatus.BAD_REQUEST),
    ErrorCode.INVALID_ADDRESS: ("Invalid Idena address format", HTTPStatus.BAD_REQUEST),
    ErrorCode.MESSAGE_TOO_LARGE: ("Message content is too large", HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
    ErrorCode.NOT_AUTHENTICATED: ("Authentication required: send auth first", HTTPStatus.UNAUTHORIZED),
    ErrorCode.ALREADY_AUTHENTICATED: ("This connection is already authenticated as another address", HTTPStatus.CONFLICT),
    ErrorCode.AUTH_TIMEOUT: ("Authentication timed out", HTTPStatus.REQUEST_TIMEOUT),
    ErrorCode.AUTH_FAILED: ("Authentication failed", HTTPStatus.UNAUTHORIZED),
    ErrorCode.AUTH_REQUIRED: ("A signed authentication is required", HTTPStatus.UNAUTHORIZED),
    ErrorCode.STALE_STATEMENT: ("The signed statement is not newer than the stored one", HTTPStatus.CONFLICT),
    ErrorCode.QUEUE_FULL: ("The recipient's offline queue is full; retry later", HTTPStatus.INSUFFICIENT_STORAGE),
    ErrorCode.STORAGE_UNAVAILABLE: ("Storage is unavailable; the message was not stored", HTTPStatus.SERVICE_UNAVAILABLE),
    ErrorCode.STORAGE_TIMEOUT: ("Storage did not confirm the write in time; the message may have been stored: "
                                "resend it with the same messageId", HTTPStatus.SERVICE_UNAVAILABLE),
    ErrorCode.RATE_LIMITED: ("Too many requests", HTTPStatus.TOO_MANY_REQUESTS),
    ErrorCode.PUSH_DISABLED: ("Push notifications are not enabled on this relay", HTTPStatus.NOT_FOUND),
    ErrorCode.PUSH_PROVIDER_UNAVAILABLE: ("This push provider is not configured on this relay",
                                          HTTPStatus.NOT_FOUND),
    ErrorCode.PUSH_VERIFIED_ONLY: ("Only a signed-in (verified) session may subscribe to pushes",
                                   HTTPStatus.FORBIDDEN),
    ErrorCode.INVALID_SUBSCRIPTION: ("The push subscription is malformed", HTTPStatus.BAD_REQUEST),
    ErrorCode.ENDPOINT_NOT_ALLOWED: ("The push endpoint is not allowed: https on a public address only",
                                     HTTPStatus.BAD_REQUEST),
    ErrorCode.SUBSCRIPTION_NOT_FOUND: ("No push subscription with this id", HTTPStatus.NOT_FOUND),
    ErrorCode.BAD_REQUEST: ("Bad request", HTTPStatus.BAD_REQUEST),
    ErrorCode.NOT_FOUND: ("Endpoint not found", HTTPStatus.NOT_FOUND),
    ErrorCode.KEY_NOT_FOUND: ("Public key not found for this address", HTTPStatus.NOT_FOUND),
    ErrorCode.METHOD_NOT_ALLOWED: ("Method not allowed", HTTPStatus.METHOD_NOT_ALLOWED),
    ErrorCode.PAYLOAD_TOO_LARGE: ("Request body is too large", HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
    ErrorCode.LENGTH_REQUIRED: ("Request body needs Content-Length or chunked encoding", HTTPStatus.LENGTH_REQUIRED),
    ErrorCode.URI_TOO_LONG: ("The request line is too long", HTTPStatus.REQUEST_URI_TOO_LONG),
    ErrorCode.HEADERS_TOO_LARGE: ("Too many or too long header lines", HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE),
    ErrorCode.UNAUTHORIZED: ("A bearer token of this address is required", HTTPStatus.UNAUTHORIZED),
    ErrorCode.FORBIDDEN: ("This token does not grant access to this address", HTTPStatus.FORBIDDEN),
    ErrorCode.ORIGIN_NOT_ALLOWED: ("Origin not allowed", HTTPStatus.FORBIDDEN),
    ErrorCode.ACCESS_DENIED: ("Access denied by this relay's operator", HTTPStatus.FORBIDDEN),
    ErrorCode.DISABLED: ("This endpoint is disabled on this relay", HTTPStatus.NOT_FOUND),
    ErrorCode.NOT_VERIFIED: ("Sign in with a signature first: only a verified session reads or deletes its "
                             "history", HTTPStatus.FORBIDDEN),
    ErrorCode.INTERNAL_ERROR: ("Internal server error", HTTPStatus.INTERNAL_SERVER_ERROR),
}


class CloseCode(enum.IntEnum):
    """WebSocket close codes relayd sends (RFC 6455 section 7.4, and 4xxx for its own)."""

    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    ACCESS_DENIED = 4003
    """The operator's deny list (``[access] deny``) names this client's IP or address."""
    AUTH_FAILED = 4401
    AUTH_REQUIRED = 4403


CLOSE_CODES: dict[ErrorCode, CloseCode] = {
    ErrorCode.AUTH_FAILED: CloseCode.AUTH_FAILED,
    ErrorCode.AUTH_REQUIRED: CloseCode.AUTH_REQUIRED,
    ErrorCode.AUTH_TIMEOUT: CloseCode.POLICY_VIOLATION,
    ErrorCode.ACCESS_DENIED: CloseCode.ACCESS_DENIED,
}
"""Errors that always end the connection, with the close code each ends it with."""


class RelayError(Exception):
    """A refusal that the peer is told about, as a frame or an HTTP answer."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        *,
        message_id: Any = None,
        status: HTTPStatus | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        default_message, default_status = _DEFAULTS[code]
        self.code = code
        self.message = message or default_message
        self.message_id = message_id
        self.status = status or default_status
        self.headers = headers
        super().__init__(f"{code.value}: {self.message}")

    def frame(self) -> dict[str, Any]:
        """The WebSocket ``error`` frame for this refusal."""
        out: dict[str, Any] = {"type": "error", "code": self.code.value, "message": self.message}
        if self.message_id is not None:
            out["messageId"] = self.message_id
        return out

    def body(self) -> dict[str, Any]:
        """The REST error body for this refusal."""
        return {"error": self.message, "code": self.code.value}
