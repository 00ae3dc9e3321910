"""Tripwire for the websockets internals relayd's one-port design depends on.

``relayd.net.http_connection.HttpConnection`` replaces the protocol's handshake
parser with ``relayd.net.http_framing.read_request`` (request bodies, kept-alive
and pipelined requests), runs its own handshake loop, counts every frame and
writes frames without awaiting. Every seam is listed, with the test here that
guards it, in ``relayd/net/__init__.py``. If a websockets release moves one,
these tests fail with a message naming the installed websockets version and
what changed.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import socket

import pytest
import websockets
from support import A, chunked, http_head, raw_http
from websockets.asyncio.connection import Connection
from websockets.asyncio.messages import Assembler, SimpleQueue
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import DATA_OPCODES, Frame, Opcode
from websockets.datastructures import Headers
from websockets.http11 import MAX_LINE_LENGTH, Request, Response, parse_headers
from websockets.protocol import Protocol
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from relayd.errors import ErrorCode
from relayd.net.connection import RelayConnection
from relayd.net.http_framing import BadRequest, read_request
from relayd.net.outbox import text_frame

WS = f"websockets {websockets.__version__}"


def broken(what: str) -> str:
    return (f"{WS} broke relayd's one-port support: {what}. The seams listed in relayd/net/__init__.py must be "
            f"adapted before upgrading (pyproject pins websockets>=17.4,<18).")


def frame(reader: StreamReader, data: bytes, max_body: int = 1024) -> object:
    """Run read_request over ``data``: the request, or the BadRequest it raised."""
    reader.feed_data(data)
    parser = read_request(reader, max_body)
    try:
        while True:
            next(parser)
    except StopIteration as stop:
        return stop.value
    except BadRequest as exc:
        return exc


# End to end: the behaviour relayd needs


def test_post_with_content_length_gets_the_json_answer(open_relay):
    body = json.dumps({"address": A, "publicKey": "a2V5"}).encode()
    reply = raw_http(open_relay.port, http_head("POST", "/api/public-keys", {"Content-Type": "application/json"},
                                                body))
    assert reply.status == 200, broken(f"a POST with Content-Length was answered {reply.status_line!r}")
    assert reply.json["success"] is True and reply.json["address"] == A, broken(
        f"the JSON body did not reach the API: {reply.body!r}")


def test_chunked_post_gets_the_json_answer(open_relay):
    body = json.dumps({"addresses": [A]}).encode()
    data = http_head("POST", "/api/status/batch", {"Content-Type": "application/json",
                                                   "Transfer-Encoding": "chunked"}) + chunked(body, (5, 9))
    reply = raw_http(open_relay.port, data)
    assert reply.status == 200, broken(f"a chunked POST was answered {reply.status_line!r}")
    assert reply.json["statuses"] == {A: False}, broken(f"the chunked body did not reach the API: {reply.body!r}")


def test_kept_alive_rest_requests_then_an_upgrade_on_one_connection(open_relay):
    """Two REST answers on one connection, then the same connection becomes a WebSocket."""
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    with socket.create_connection(("127.0.0.1", open_relay.port), timeout=5) as s:
        s.sendall(http_head("GET", "/health/live", {"Connection": "keep-alive"})
                  + http_head("GET", f"/api/status/{A}", {"Connection": "keep-alive"}))
        data = b""
        while data.count(b"HTTP/1.1 200 OK") < 2 or not data.endswith(b"}"):
            block = s.recv(65536)
            assert block, broken(f"a kept-alive connection was closed after {data!r}")
            data += block
        assert b'"online":false' in data, broken(f"the second pipelined answer is wrong: {data!r}")
        s.sendall(http_head("GET", "/", {"Connection": "Upgrade", "Upgrade": "websocket",
                                         "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"}))
        head = b""
        while b"\r\n\r\n" not in head:
            block = s.recv(65536)
            assert block, broken("the upgrade after REST requests got no answer")
            head += block
        assert head.startswith(b"HTTP/1.1 101"), broken(f"the upgrade was answered {head[:80]!r}")


def test_websocket_upgrade_still_works_on_the_same_port(open_relay):
    with open_relay.ws() as ws:
        ws.send({"type": "auth", "address": A})
        assert ws.recv()["type"] == "auth_success", broken("the WebSocket handshake no longer completes")


# Sans-I/O: the framing relayd puts under websockets' protocol


def test_read_request_frames_a_body_with_websockets_request_and_headers():
    parsed = frame(StreamReader(), b"POST /api/public-keys HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    assert not isinstance(parsed, BadRequest), parsed
    assert isinstance(parsed.request, Request) and parsed.request.method == "POST", broken(
        "websockets.http11.Request(path, headers, method, protocol) changed")
    assert parsed.body == b"{}" and parsed.keep_alive and not parsed.upgrade


def test_read_request_refuses_what_rfc_9112_refuses():
    for raw in (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}",
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY0\r\n\r\n"):
        result = frame(StreamReader(), raw)
        assert isinstance(result, BadRequest) and result.code is ErrorCode.BAD_REQUEST, (raw, result)


def test_parse_headers_counts_every_line():
    raw = b"GET / HTTP/1.1\r\n" + b"Content-Length: 0\r\n" * 200 + b"\r\n"
    result = frame(StreamReader(), raw)
    assert isinstance(result, BadRequest) and result.code is ErrorCode.HEADERS_TOO_LARGE, broken(
        f"parse_headers no longer refuses more than 128 header lines ({result!r})")


# The internals, one by one


def test_stream_reader_and_parse_headers_are_generators():
    for name in ("read_line", "read_exact", "at_eof", "discard", "feed_data"):
        assert callable(getattr(StreamReader, name, None)), broken(f"StreamReader.{name} is gone")
    assert inspect.isgeneratorfunction(StreamReader.read_line), broken("StreamReader.read_line is not a generator")
    assert inspect.isgeneratorfunction(parse_headers), broken("http11.parse_headers is not a generator")
    assert isinstance(StreamReader().buffer, bytearray), broken("StreamReader.buffer is not a bytearray")


def test_protocol_seams_relay_connection_uses():
    protocol = ServerProtocol()
    assert isinstance(getattr(protocol, "reader", None), StreamReader), broken("ServerProtocol.reader is gone")
    assert inspect.isgenerator(getattr(protocol, "parser", None)), broken("ServerProtocol.parser is gone")
    assert isinstance(getattr(protocol, "events", None), list), broken("ServerProtocol.events is not a list")
    assert isinstance(getattr(protocol, "writes", None), list), broken("ServerProtocol.writes is not a list")
    for name in ("accept", "reject", "send_response", "send_eof", "discard", "send_ping", "fail",
                 "events_received", "receive_data"):
        assert callable(getattr(protocol, name, None)), broken(f"ServerProtocol.{name} is gone")
    assert inspect.isgeneratorfunction(Protocol.parse), broken("Protocol.parse (the frame parser) is not a "
                                                               "generator function")


def test_websockets_writes_only_through_send_data():
    """relayd counts what websockets writes in its ``send_data`` override: no other write may bypass it."""
    import websockets.asyncio.connection as connection_module
    import websockets.asyncio.server as server_module
    writes = [line.strip() for module in (connection_module, server_module)
              for line in inspect.getsource(module).splitlines() if "transport.write(" in line]
    assert writes == ["self.transport.write(data)"], broken(f"websockets writes to its transport elsewhere: {writes}")
    assert "self.transport.write(data)" in inspect.getsource(Connection.send_data), broken("send_data moved")


def test_connection_seams_relay_connection_overrides_or_calls():
    assert issubclass(RelayConnection, ServerConnection)
    assert list(inspect.signature(ServerConnection.__init__).parameters)[:3] == ["self", "protocol", "server"]
    for name in ("handshake", "process_event", "data_received", "connection_made", "connection_lost",
                 "pause_writing", "resume_writing", "send_data", "send_context"):
        assert callable(getattr(ServerConnection, name, None)), broken(f"ServerConnection.{name} is gone")
    assert inspect.iscoroutinefunction(ServerConnection.handshake), broken("handshake is no longer a coroutine")
    assert inspect.iscoroutinefunction(Connection.drain), broken("Connection.drain is no longer a coroutine")
    source = inspect.getsource(Connection.__init__)
    for attr in ("self.paused", "self.max_queue_high", "self.connection_lost_waiter"):
        assert attr in source, broken(f"Connection no longer sets {attr}")
    assert "request_rcvd" in inspect.getsource(ServerConnection.__init__), broken("request_rcvd is gone")
    assert "self.closed = True" in inspect.getsource(Assembler.close), broken("Assembler.close no longer sets closed")
    assert "recv_messages.close()" in inspect.getsource(Connection.connection_lost), \
        broken("connection_lost no longer closes recv_messages (RelayConnection.idle waits for it)")
    params = inspect.signature(Assembler.__init__).parameters
    assert {"pause", "resume"} <= set(params), broken(f"Assembler(pause=, resume=) changed: {list(params)}")
    serve_params = inspect.signature(serve).parameters
    for name in ("create_connection", "open_timeout", "ping_interval", "max_queue", "write_limit"):
        assert name in serve_params, broken(f"serve() no longer accepts {name}=")


def test_websockets_uses_a_connections_id_only_where_relayd_replaces_it():
    """relayd gives every connection the same ``id`` (websockets' fresh UUID costs about 110 bytes per connection):
    websockets must only set it, in ``Protocol.__init__`` and ``Connection.__init__``, and name connections in logs
    that relayd replaced."""
    import websockets.asyncio.connection as connection_module
    import websockets.asyncio.server as server_module
    import websockets.protocol as protocol_module
    import websockets.server as sans_io_server_module
    uses = [line.strip() for module in (connection_module, server_module, protocol_module, sans_io_server_module)
            for line in inspect.getsource(module).splitlines() if re.search(r"\.id\b", line)]
    assert uses == ["self.id: uuid.UUID = self.protocol.id", "self.id: uuid.UUID = uuid.uuid4()"], \
        broken(f"websockets reads a connection's id elsewhere now: {uses}")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 300_000])
def test_relayd_builds_text_frames_as_websockets_does(size):
    text = "é" * (size // 2) + "x" * (size % 2)
    expected = Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])
    assert text_frame(text) == expected, broken(f"a {size}-byte unmasked text frame no longer serializes alike")


def test_frames_and_responses_serialize_as_relayd_writes_them():
    data = text_frame('{"type":"pong"}')
    assert data == b"\x81\x0f" + b'{"type":"pong"}', broken(f"an unmasked text frame serializes as {data!r}")
    assert Frame(Opcode.TEXT, b"x").opcode in DATA_OPCODES
    response = Response(200, "OK", websockets.datastructures.Headers([("Content-Length", "2")]), b"{}")
    assert response.serialize().endswith(b"\r\n\r\n{}"), broken("Response(status, reason, headers, body) changed")


@pytest.mark.parametrize("name", ["pause_reading", "resume_reading", "get_write_buffer_size", "abort"])
def test_transport_methods_relayd_calls_exist(name):
    import asyncio
    assert callable(getattr(asyncio.Transport, name, None))


def test_the_containers_relayd_replaces_are_used_only_as_it_assumes():
    # RelayConnection swaps two per-connection deques for lists (an idle connection's cost): the frames queue of
    # the Assembler's SimpleQueue (append, popleft, extendleft) and drain_waiters (append, remove, iteration).
    from websockets.asyncio import messages
    queue_calls = set(re.findall(r"self\.queue\.(\w+)", inspect.getsource(messages.SimpleQueue)))
    assert queue_calls <= {"append", "popleft", "extendleft"}, broken(f"SimpleQueue calls queue.{queue_calls}")
    source = inspect.getsource(Connection)
    waiter_calls = set(re.findall(r"self\.drain_waiters\.(\w+)", source))
    assert waiter_calls <= {"append", "remove"}, broken(f"Connection calls drain_waiters.{waiter_calls}")
    assert "self.drain_waiters[" not in source, broken("Connection indexes drain_waiters")


def test_events_received_hands_over_the_list_relayd_appends_to():
    protocol = ServerProtocol()
    own = object()
    protocol.events.append(own)  # what HttpConnection._parse_requests does with a framed request
    events = protocol.events_received()
    assert events == [own], broken(f"events_received() returned {events!r} for an appended event")
    assert protocol.events == [] and protocol.events is not events, broken(
        "events_received() no longer hands over the events list and starts a new one")


def test_received_events_go_through_process_event():
    for name in ("data_received", "eof_received"):
        source = inspect.getsource(getattr(Connection, name))
        assert "self.process_event(event)" in source, broken(f"Connection.{name} no longer calls process_event")


def test_a_refusal_sends_eof_and_discards_the_rest():
    """A malformed request's parser waits for the answer to replace it by discard() (after EOF)."""
    protocol = ServerProtocol()
    before = protocol.parser
    protocol.send_response(Response(400, "Bad Request", Headers([("Content-Length", "0")]), b""))
    assert protocol.parser is not before and protocol.parser.gi_code.co_name == "discard", broken(
        "send_response of a non-101 answer no longer replaces the parser by discard()")
    sent = protocol.data_to_send()
    assert sent[0].startswith(b"HTTP/1.1 400") and sent[-1] == b"", broken(
        f"send_response of a non-101 answer no longer sends the answer then EOF: {sent!r}")


def test_serve_makes_the_asyncio_protocol_with_create_connection_and_returns_it_as_is():
    # Gateway._accept hands serve() a PlainRequest for every accepted connection (a full RelayConnection only when
    # the first request needs one): serve() must call create_connection(protocol, server, **options) and give asyncio
    # its result, touching nothing of it in between.
    from websockets.asyncio import server
    factory = inspect.getsource(server).split("def protocol_factory", 1)[1].split("\n    async def ", 1)[0]
    made = re.search(r"connection = create_connection\(\s*protocol,\s*server,", factory)
    assert made and factory.rstrip().endswith("return connection"), broken(
        "serve()'s protocol factory no longer returns create_connection(protocol, server, ...) as is")
    assert "connection." not in factory[made.end():], broken("serve()'s protocol factory now uses the connection")


def test_handshake_is_called_as_relayd_overrides_it():
    params = list(inspect.signature(ServerConnection.handshake).parameters)
    assert params == ["self", "process_request", "process_response", "server_header"], broken(
        f"ServerConnection.handshake takes {params}")
    from websockets.asyncio import server
    call = r"connection\.handshake\(\s*process_request,\s*process_response,\s*server_header,?\s*\)"
    assert re.search(call, inspect.getsource(server)), broken(
        "serve() no longer calls handshake(process_request, process_response, server_header)")
    assert "expected_state" in inspect.signature(Connection.send_context).parameters, broken(
        "send_context() no longer takes expected_state=")
    source = inspect.getsource(ServerConnection.__init__) + inspect.getsource(Connection.__init__)
    for name in ("request", "response"):
        assert re.search(rf"self\.{name}\b(: [^=]+)? =", source), broken(f"the connection no longer sets {name}")


def test_the_assembler_relayd_rebuilds_is_as_it_assumes():
    source = inspect.getsource(Connection.__init__)
    for attr in ("self.max_queue_low", "self.drain_waiters"):
        assert attr in source, broken(f"Connection no longer sets {attr}")
    assert "self.recv_messages = Assembler(" in inspect.getsource(Connection.connection_made), broken(
        "Connection.connection_made no longer builds the Assembler (RelayConnection replaces it after)")

    async def build() -> None:
        assembler = Assembler(4, 2, pause=lambda: None, resume=lambda: None)
        assert isinstance(assembler.frames, SimpleQueue), broken("Assembler.frames is not a SimpleQueue")
        assert type(assembler.frames.queue).__name__ == "deque", broken(
            f"Assembler.frames.queue is a {type(assembler.frames.queue)}")

    asyncio.run(build())


def test_stream_reader_tells_its_end():
    reader = StreamReader()
    assert reader.eof is False
    reader.feed_eof()
    assert reader.eof is True, broken("StreamReader.eof no longer tells the end of the stream")


def test_expect_100_continue_is_answered_before_the_body(open_relay):
    """The interim answer goes out through protocol.writes, before the client sends its body."""
    body = json.dumps({"addresses": [A]}).encode()
    head = http_head("POST", "/api/status/batch", {"Content-Type": "application/json",
                                                   "Content-Length": str(len(body)), "Expect": "100-continue"})
    with socket.create_connection(("127.0.0.1", open_relay.port), timeout=5) as s:
        s.sendall(head)
        interim = b""
        while b"\r\n\r\n" not in interim:
            block = s.recv(65536)
            assert block, broken("the connection closed instead of answering 100 Continue")
            interim += block
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), broken(f"Expect got {interim[:80]!r}")
        s.sendall(body)
        data = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        while b'"statuses"' not in data:
            block = s.recv(65536)
            assert block, broken(f"no answer after the body: {data!r}")
            data += block
        assert data.startswith(b"HTTP/1.1 200"), broken(f"the body after 100 Continue was answered {data[:80]!r}")


@pytest.mark.parametrize("subprotocol", [None, "relay"])
@pytest.mark.parametrize("server_header", [None, "relayd/0.1"])
def test_relayd_builds_the_upgrade_answer_as_websockets_accept_does(subprotocol, server_header):
    # HttpConnection answers a valid upgrade with switching_protocols(), which runs websockets' own check
    # (process_request) and writes the 101 answer itself: byte for byte what accept() + serialize() write.
    from relayd.net import http_connection

    def request():
        headers = Headers([("Host", "relay.example"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
                           ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")])
        if subprotocol:
            headers["Sec-WebSocket-Protocol"] = subprotocol
        return Request("/", headers)

    options = {"subprotocols": [subprotocol]} if subprotocol else {}
    ours = http_connection.switching_protocols(ServerProtocol(**options), request(), server_header)
    response = ServerProtocol(**options).accept(request())
    if server_header is not None:
        response.headers["Server"] = server_header
    theirs = response.serialize()
    date = re.compile(rb"Date: [^\r]*\r\n")
    assert ours is not None and date.sub(b"", ours) == date.sub(b"", theirs), broken(
        f"accept() now answers {theirs!r}, relayd writes {ours!r}")
    found = date.search(ours)
    assert found is not None and re.fullmatch(rb"Date: \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} GMT\r\n",
                                              found.group())
    bad = request()
    del bad.headers["Sec-WebSocket-Key"]
    assert http_connection.switching_protocols(ServerProtocol(), bad, None) is None


HEADER_SECTIONS = {
    "a handshake's": (b"Host: 127.0.0.1:3000\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                      b"User-Agent: Python/3.11 websockets/17.4\r\n\r\n"),
    "none": b"\r\n",
    "spaces, tabs, empty and repeated values, obs-text": (b"A:  x \t\r\nB:\r\nA: y\r\nC: caf\xe9\r\n"
                                                          b"X-Token: !#$%&'*+-.^_`|~09azAZ\r\n\r\n"),
    "128 fields": b"".join(b"F%d: v\r\n" % i for i in range(128)) + b"\r\n",
    "129 fields": b"".join(b"F%d: v\r\n" % i for i in range(129)) + b"\r\n",
    "the longest line": b"A: " + b"x" * (MAX_LINE_LENGTH - 5) + b"\r\n\r\n",
    "a line too long": b"A: " + b"x" * (MAX_LINE_LENGTH - 4) + b"\r\n\r\n",
    "a bare LF": b"A: x\nB: y\r\n\r\n",
    "no colon": b"A x\r\n\r\n",
    "space before the colon": b"A : x\r\n\r\n",
    "obs-fold": b"A: x\r\n y\r\n\r\n",
    "a NUL": b"A: x\x00y\r\n\r\n",
    "a CR": b"A: x\ry\r\n\r\n",
    "a body after it": b"Content-Length: 2\r\n\r\n{}",
    "not all in": b"A: x\r\nB: y\r\n",
}


@pytest.mark.parametrize("name", sorted(HEADER_SECTIONS))
def test_whole_headers_reads_what_parse_headers_reads(name):
    # http_framing reads a header section that is all in the buffer in one pass (whole_headers), or leaves it
    # to websockets' parse_headers: where it reads one, it must read what parse_headers reads, to the byte.
    from relayd.net.http_framing import whole_headers
    data = HEADER_SECTIONS[name]
    ours = StreamReader()
    ours.feed_data(data)
    fast = whole_headers(ours)
    theirs = StreamReader()
    theirs.feed_data(data)
    parser = parse_headers(theirs.read_line)
    expected: object = "waits for more"
    try:
        for _ in range(200):  # every line is in: it ends or waits
            next(parser)
    except StopIteration as stop:
        expected = list(stop.value.raw_items())
    except Exception as exc:  # noqa: BLE001
        expected = exc
    if fast is None:
        assert bytes(ours.buffer) == data, "a section left to parse_headers must stay unread"
        assert name not in ("a handshake's", "none", "spaces, tabs, empty and repeated values, obs-text",
                            "128 fields", "the longest line", "a body after it"), "a plain section went the slow way"
        return
    assert list(fast.raw_items()) == expected, broken(f"parse_headers now reads {name} as {expected!r}")
    assert bytes(ours.buffer) == bytes(theirs.buffer)
