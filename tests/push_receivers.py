"""Push services and devices, written for the tests to do exactly what the real ones check.

No push service is reachable from a test machine, so these stand in for them over real TLS (a test CA that
the relay trusts through ``[push] ca_file``): a Web Push endpoint that verifies the VAPID JWT (ES256, ``aud``
the endpoint's origin, ``exp`` within 24 h) and decrypts the body with the subscription's private key using
``http_ece``, as a browser does; Google's OAuth2 token endpoint verifying the RS256 assertion of a generated
service-account key, and the FCM v1 endpoint checking the bearer token and the message's shape; and an
HTTP/2 APNs endpoint (TLS, ALPN h2) checking the provider token and the ``apns-*`` headers. Each records
what it received (``received``) and what it refused (``refusals``: a test expects none), and answers with
the statuses queued in ``answers`` (then 2xx).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import datetime
import ipaddress
import json
import secrets
import ssl
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import h2.config
import h2.connection
import h2.events
import http_ece
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_jwt(token: str, public_key: Any, alg: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a compact JWT whose signature ``public_key`` verifies; raises ValueError otherwise."""
    try:
        head, body, sig = token.split(".")
        header, claims = json.loads(unb64url(head)), json.loads(unb64url(body))
    except ValueError:
        raise ValueError("not a compact JWT") from None
    if header.get("alg") != alg:
        raise ValueError(f"alg is {header.get('alg')!r}, not {alg}")
    signed, raw = f"{head}.{body}".encode(), unb64url(sig)
    try:
        if alg == "ES256":
            if len(raw) != 64:
                raise ValueError("an ES256 signature is 64 bytes (r || s)")
            der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
            public_key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        else:
            public_key.verify(raw, signed, padding.PKCS1v15(), hashes.SHA256())
    except Exception as exc:
        raise ValueError(f"bad signature: {exc!r}") from None
    return header, claims


class PushCA:
    """A CA and one server certificate for 127.0.0.1 and localhost; ``ca_file`` is what the relay trusts."""

    def __init__(self, tmp: Path) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relayd push test CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        self.ca_file = tmp / "push-ca.pem"
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.cert_file = tmp / "push-server.pem"
        self.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.key_file = tmp / "push-server.key"
        self.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))

    def server_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        if alpn:
            context.set_alpn_protocols(alpn)
        return context


class Receiver:
    """A TLS server on 127.0.0.1 in its own thread and event loop."""

    def __init__(self, ca: PushCA, alpn: list[str] | None = None) -> None:
        self.received: list[dict[str, Any]] = []
        self.refusals: list[str] = []
        self.answers: collections.deque[tuple[int, dict[str, str]]] = collections.deque()
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ca.server_context(alpn)))
            ready.set()
            self.loop.run_forever()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)
        self.port = self.server.sockets[0].getsockname()[1]
        self.origin = f"https://127.0.0.1:{self.port}"

    def answer(self, status: int, **headers: str) -> None:
        """Answer the next request with ``status`` (and these headers) instead of success."""
        self.answers.append((status, {k.replace("_", "-"): v for k, v in headers.items()}))

    def _next_answer(self, default: int) -> tuple[int, dict[str, str]]:
        self.requests += 1
        return self.answers.popleft() if self.answers else (default, {})

    def refuse(self, why: str) -> tuple[int, dict[str, str]]:
        self.refusals.append(why)
        return 400, {}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP/1.1 request, answered with ``Connection: close``."""
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *lines = head.split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {}
        for line in lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        status, extra, payload = self.handle(method, path, headers, body)
        reason = {200: "OK", 201: "Created"}.get(status, "Status")
        out = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(payload)}", "Connection: close",
               *(f"{k}: {v}" for k, v in extra.items())]
        writer.write(("\r\n".join(out) + "\r\n\r\n").encode() + payload)
        await writer.drain()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    def wait_for(self, count: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.received)

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Device:
    """A browser's (or UnifiedPush distributor's) push subscription: the private half stays here."""

    def __init__(self, endpoint: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.auth = secrets.token_bytes(16)
        self.endpoint = endpoint

    def subscription(self) -> dict[str, Any]:
        """The W3C ``PushSubscription.toJSON()`` an app hands over."""
        public = self.key.public_key().public_bytes(serialization.Encoding.X962,
                                                    serialization.PublicFormat.UncompressedPoint)
        return {"endpoint": self.endpoint, "expirationTime": None,
                "keys": {"p256dh": b64url(public), "auth": b64url(self.auth)}}


class WebPushService(Receiver):
    """A Web Push service (RFC 8030) that checks VAPID (RFC 8292) and whose devices decrypt (RFC 8291)."""

    def __init__(self, ca: PushCA) -> None:
        super().__init__(ca)
        self.devices: dict[str, Device] = {}

    def device(self) -> Device:
        path = f"/push/{secrets.token_urlsafe(12)}"
        device = Device(self.origin + path)
        self.devices[path] = device
        return device

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        status, extra = self._next_answer(201)
        device = self.devices.get(path)
        if method != "POST" or device is None:
            return 404, {}, b""
        auth = headers.get("authorization", "")
        if not auth.startswith("vapid "):
            return (*self.refuse("no vapid Authorization"), b"")
        params = dict(part.strip().split("=", 1) for part in auth[6:].split(","))
        try:
            public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(params["k"]))
            _, claims = verify_jwt(params["t"], public, "ES256")
        except (KeyError, ValueError) as exc:
            return (*self.refuse(f"VAPID: {exc}"), b"")
        now = time.time()
        if claims.get("aud") != self.origin:
            return (*self.refuse(f"VAPID aud {claims.get('aud')!r} is not {self.origin}"), b"")
        if not now < claims.get("exp", 0) <= now + 24 * 3600:
            return (*self.refuse("VAPID exp is not within 24 hours"), b"")
        if not str(claims.get("sub", "")).startswith(("mailto:", "https:")):
            return (*self.refuse("VAPID sub is not a contact"), b"")
        if headers.get("content-encoding") != "aes128gcm" or "ttl" not in headers:
            return (*self.refuse("Content-Encoding aes128gcm and TTL are required"), b"")
        topic = headers.get("topic", "")
        if topic and (len(topic) > 32 or not all(c.isalnum() or c in "-_" for c in topic)):
            return (*self.refuse(f"bad Topic {topic!r}"), b"")
        try:
            plaintext = http_ece.decrypt(body, private_key=device.key, auth_secret=device.auth, version="aes128gcm")
        except Exception as exc:
            return (*self.refuse(f"cannot decrypt: {exc!r}"), b"")
        if 200 <= status < 300:
            self.received.append({"path": path, "payload": json.loads(plaintext), "topic": topic,
                                  "urgency": headers.get("urgency"), "key": params["k"]})
        return status, extra, b""


FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"


def fcm_error(code: int, status: str, message: str, *details: dict[str, Any]) -> bytes:
    """An FCM v1 error body, as Google's documentation of its error codes shows them."""
    return json.dumps({"error": {"code": code, "message": message, "status": status,
                                 "details": list(details)}}).encode()


FCM_UNREGISTERED = fcm_error(404, "NOT_FOUND", "Requested entity was not found.",
                             {"@type": FCM_ERROR, "errorCode": "UNREGISTERED"})
FCM_INVALID_TOKEN = fcm_error(400, "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token",
                              {"@type": FCM_ERROR, "errorCode": "INVALID_ARGUMENT"})
FCM_BAD_PAYLOAD = fcm_error(400, "INVALID_ARGUMENT", "Invalid value at 'message.data[0].value' (TYPE_STRING), 12",
                            {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [
                                {"field": "message.data[0].value",
                                 "description": "Invalid value at 'message.data[0].value' (TYPE_STRING), 12"}]})


class FcmService(Receiver):
    """Google's OAuth2 token endpoint and FCM HTTP v1, for one project and one generated service account.

    A token in ``unregistered`` (the app was uninstalled) is answered 404 ``UNREGISTERED``, one in ``invalid``
    400 ``INVALID_ARGUMENT`` about the registration token, as FCM does; a queued 404 is ``UNREGISTERED`` too,
    a queued 400 the error FCM gives a payload it refuses (a ``BadRequest`` naming the field), and a wrong
    project in the path a plain 404."""

    project = "relayd-test"

    def __init__(self, ca: PushCA, tmp: Path) -> None:
        super().__init__(ca)
        self.account_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.token_uri = f"{self.origin}/token"
        self.key_file = tmp / "service-account.json"
        self.key_file.write_text(json.dumps({
            "type": "service_account", "project_id": self.project, "private_key_id": "k1",
            "private_key": self.account_key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()).decode(),
            "client_email": f"relayd@{self.project}.iam.gserviceaccount.com", "token_uri": self.token_uri}))
        self.tokens: set[str] = set()
        self.grants = 0
        self.unregistered: set[str] = set()
        self.invalid: set[str] = set()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        if path == "/token":
            return self._grant(headers, body)
        if path != f"/v1/projects/{self.project}/messages:send" or method != "POST":
            return 404, {}, b""
        bearer = headers.get("authorization", "").removeprefix("Bearer ")
        if bearer not in self.tokens:
            return 401, {}, b'{"error": {"status": "UNAUTHENTICATED"}}'
        status, extra = self._next_answer(200)
        try:
            message = json.loads(body)["message"]
            token, data, android = message["token"], message["data"], message["android"]
        except (ValueError, KeyError, TypeError):
            return (*self.refuse("not an FCM v1 message"), b"")
        if set(message) != {"token", "data", "android"} or not all(isinstance(v, str) for v in data.values()):
            return (*self.refuse(f"not a data-only message with string values: {message}"), b"")
        if android.get("priority") != "HIGH" or not android.get("collapse_key"):
            return (*self.refuse(f"android options {android}"), b"")
        if token in self.invalid:
            return 400, {}, FCM_INVALID_TOKEN
        if token in self.unregistered:
            return 404, {}, FCM_UNREGISTERED
        if 200 <= status < 300:
            self.received.append({"token": token, "data": data, "collapse_key": android["collapse_key"]})
            return status, extra, json.dumps({"name": f"projects/{self.project}/messages/1"}).encode()
        return status, extra, {404: FCM_UNREGISTERED, 400: FCM_BAD_PAYLOAD}.get(status, b"")

    def _grant(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return (*self.refuse(f"grant_type {form.get('grant_type')!r}"), b"")
        try:
            header, claims = verify_jwt(form.get("assertion", ""), self.account_key.public_key(), "RS256")
        except ValueError as exc:
            return (*self.refuse(f"assertion: {exc}"), b"")
        now = time.time()
        if (claims.get("iss") != f"relayd@{self.project}.iam.gserviceaccount.com" or claims.get("aud") != self.token_uri
                or claims.get("scope") != "https://www.googleapis.com/auth/firebase.messaging"
                or not claims.get("iat", 0) - 60 <= now < claims.get("exp", 0) <= claims["iat"] + 3600
                or header.get("kid") != "k1"):
            return (*self.refuse(f"assertion claims {header} {claims}"), b"")
        token = secrets.token_urlsafe(24)
        self.tokens.add(token)
        self.grants += 1
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}).encode()


class ApnsService(Receiver):
    """APNs over HTTP/2 (TLS with ALPN h2, as Apple's): checks the provider token and the headers, answers any
    number of requests on a connection, counts connections (``connections``) and can close the open ones
    (``hang_up``), as Apple does with connections idle for long."""

    topic = "org.idena.messenger"
    team_id = "TEAM123456"
    key_id = "KEY1234567"

    def __init__(self, ca: PushCA, tmp: Path) -> None:
        super().__init__(ca, alpn=["h2"])
        self.team_key = ec.generate_private_key(ec.SECP256R1())
        self.key_file = tmp / "AuthKey.p8"
        self.key_file.write_bytes(self.team_key.private_bytes(serialization.Encoding.PEM,
                                                              serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
        self.connections = 0
        self._open: set[asyncio.StreamWriter] = set()

    def hang_up(self) -> None:
        """Close every open connection (from the test's thread)."""
        def close() -> None:
            for writer in self._open:
                writer.close()
        self.loop.call_soon_threadsafe(close)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object.selected_alpn_protocol() != "h2":
            self.refusals.append("no h2 ALPN")
            return
        self.connections += 1
        self._open.add(writer)
        try:
            await self._serve_h2(reader, writer)
        finally:
            self._open.discard(writer)

    async def _serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    streams[event.stream_id] = ({str(k): str(v) for k, v in event.headers or []}, bytearray())
                elif isinstance(event, h2.events.DataReceived):
                    streams[event.stream_id][1].extend(event.data)
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    headers, body = streams.pop(event.stream_id)
                    status, extra, payload = self.handle_h2(headers, bytes(body))
                    conn.send_headers(event.stream_id, [(":status", str(status)), *extra.items(),
                                                        ("content-length", str(len(payload)))],
                                      end_stream=not payload)
                    if payload:
                        conn.send_data(event.stream_id, payload, end_stream=True)
            writer.write(conn.data_to_send())
            await writer.drain()

    def handle_h2(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        status, extra = self._next_answer(200)
        path = headers.get(":path", "")
        if headers.get(":method") != "POST" or not path.startswith("/3/device/"):
            return 404, {}, b""
        try:
            header, claims = verify_jwt(headers.get("authorization", "").removeprefix("bearer "),
                                        self.team_key.public_key(), "ES256")
        except ValueError as exc:
            return 403, {}, json.dumps({"reason": "InvalidProviderToken", "why": str(exc)}).encode()
        if header.get("kid") != self.key_id or claims.get("iss") != self.team_id or \
                not time.time() - 3600 < claims.get("iat", 0) <= time.time() + 60:
            return (*self.refuse(f"provider token {header} {claims}"), b"")
        want = {"apns-topic": self.topic, "apns-push-type": "background", "apns-priority": "5"}
        if any(headers.get(k) != v for k, v in want.items()) or not headers.get("apns-collapse-id"):
            return (*self.refuse(f"headers {headers}"), b"")
        payload = json.loads(body)
        if payload.get("aps") != {"content-available": 1}:
            return (*self.refuse(f"not a background push: {payload}"), b"")
        if status == 200:
            self.received.append({"token": path.removeprefix("/3/device/"), "payload": payload,
                                  "collapse_id": headers["apns-collapse-id"]})
            return 200, {"apns-id": "6E2B7B1C-0000-0000-0000-000000000001"}, b""
        return status, extra, json.dumps({"reason": "Unregistered" if status == 410 else "Error"}).encode()
