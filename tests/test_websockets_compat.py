"""Tripwire for the websockets internals relayd's REST support depends on.

relayd serves REST and WebSocket on one port through websockets' server,
whose HTTP parser refuses request bodies. ``relayd.net.http_framing.BodyReader``
replaces the protocol's stream reader to read bodies, and
``RelayConnection`` writes frames without awaiting. If a websockets release
changes those internals, these tests fail with a message naming the
installed websockets version and what changed.
"""

from __future__ import annotations

import inspect
import json

import pytest
import websockets
from support import A, chunked, http_head, raw_http
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from relayd.net.connection import RelayConnection
from relayd.net.http_framing import BodyReader

WS = f"websockets {websockets.__version__}"


def broken(what: str) -> str:
    return (f"{WS} broke relayd's request-body support: {what}. relayd.net.http_framing.BodyReader and relayd.net.connection.RelayConnection "
            f"must be adapted before upgrading (pyproject pins websockets>=17.4,<18).")


# End to end: the behaviour relayd needs


def test_post_with_content_length_gets_the_json_answer(open_relay):
    body = json.dumps({"address": A, "publicKey": "a2V5"}).encode()
    try:
        reply = raw_http(open_relay.port, http_head("POST", "/api/public-keys", {"Content-Type": "application/json"},
                                                    body))
    except (AssertionError, ConnectionError) as exc:
        pytest.fail(broken(f"a POST with Content-Length got no HTTP response ({exc!r})"))
    assert reply.status == 200, broken(f"a POST with Content-Length was answered {reply.status_line!r}")
    assert reply.json["success"] is True and reply.json["address"] == A, broken(
        f"the JSON body did not reach the API: {reply.body!r}")


def test_chunked_post_gets_the_json_answer(open_relay):
    body = json.dumps({"addresses": [A]}).encode()
    data = http_head("POST", "/api/status/batch", {"Content-Type": "application/json",
                                                   "Transfer-Encoding": "chunked"}) + chunked(body, (5, 9))
    try:
        reply = raw_http(open_relay.port, data)
    except (AssertionError, ConnectionError) as exc:
        pytest.fail(broken(f"a chunked POST got no HTTP response ({exc!r})"))
    assert reply.status == 200, broken(f"a chunked POST was answered {reply.status_line!r}")
    assert reply.json["statuses"] == {A: False}, broken(f"the chunked body did not reach the API: {reply.body!r}")


def test_websocket_upgrade_still_works_on_the_same_port(open_relay):
    with open_relay.ws() as ws:
        ws.send({"type": "auth", "address": A})
        assert ws.recv()["type"] == "auth_success", broken("the WebSocket handshake no longer completes")


# Sans-I/O: the exact substitution RelayConnection performs


def test_body_reader_substitution_parses_a_request_with_a_body():
    protocol = ServerProtocol()
    reader = BodyReader(1024)
    protocol.reader = reader
    protocol.parser = protocol.parse()
    next(protocol.parser)
    protocol.receive_data(b"POST /api/public-keys HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    events = protocol.events_received()
    assert len(events) == 1 and isinstance(events[0], Request), broken(
        f"ServerProtocol did not produce one Request after a body (events: {events!r})")
    assert events[0].method == "POST", broken("Request.method is missing or different")
    head = reader.release()
    assert head.body == b"{}" and head.error is None, broken("BodyReader did not receive the body")
    assert "Content-Length" not in events[0].headers, broken("the hidden Content-Length reached the parser")


def test_body_reader_substitution_parses_a_chunked_request():
    protocol = ServerProtocol()
    protocol.reader = reader = BodyReader(1024)
    protocol.parser = protocol.parse()
    next(protocol.parser)
    protocol.receive_data(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    protocol.receive_data(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
    events = protocol.events_received()
    assert len(events) == 1 and isinstance(events[0], Request), broken(
        f"ServerProtocol did not produce a Request for a chunked body (events: {events!r})")
    body = reader.release().body
    assert body == b"abcde", broken(f"chunked body decoded as {body!r}")


# The internals, one by one


def test_stream_reader_generator_methods_exist():
    for name in ("read_line", "read_exact"):
        method = getattr(StreamReader, name, None)
        assert method is not None, broken(f"websockets.streams.StreamReader.{name} is gone")
        assert inspect.isgeneratorfunction(method), broken(f"StreamReader.{name} is no longer a generator function")
    params = list(inspect.signature(StreamReader.read_line).parameters)
    assert params[:3] == ["self", "m", "too_long_exc_type"], broken(f"StreamReader.read_line(m, too_long_exc_type) "
                                                                    f"is now read_line{params}")
    assert list(inspect.signature(StreamReader.read_exact).parameters)[:2] == ["self", "n"], broken(
        "StreamReader.read_exact(n) changed its signature")
    assert issubclass(BodyReader, StreamReader)


def test_server_protocol_parse_is_a_generator_reading_through_self_reader():
    assert inspect.isgeneratorfunction(ServerProtocol.parse), broken("ServerProtocol.parse is not a generator "
                                                                     "function")
    protocol = ServerProtocol()
    assert isinstance(getattr(protocol, "reader", None), StreamReader), broken(
        "ServerProtocol instances have no StreamReader 'reader' attribute")
    assert inspect.isgenerator(getattr(protocol, "parser", None)), broken(
        "ServerProtocol instances have no running 'parser' generator attribute")
    source = inspect.getsource(ServerProtocol.parse)
    assert "self.reader.read_line" in source, broken("ServerProtocol.parse no longer reads the request head "
                                                     "through self.reader.read_line")


def test_connection_send_data_and_serve_create_connection_exist():
    assert callable(getattr(Connection, "send_data", None)), broken("websockets.asyncio.connection."
                                                                   "Connection.send_data is gone")
    assert not inspect.iscoroutinefunction(Connection.send_data), broken("Connection.send_data became a coroutine")
    assert "create_connection" in inspect.signature(serve).parameters, broken(
        "serve() no longer accepts create_connection=")
    assert issubclass(RelayConnection, ServerConnection)
    init = inspect.signature(ServerConnection.__init__).parameters
    assert list(init)[:3] == ["self", "protocol", "server"], broken(
        f"ServerConnection.__init__(protocol, server, ...) changed: {list(init)}")


def test_response_constructor_and_protocol_sans_io_calls_exist():
    response = Response(200, "OK", websockets.datastructures.Headers([("Content-Length", "2")]), b"{}")
    assert response.serialize().endswith(b"\r\n\r\n{}"), broken("Response(status, reason, headers, body) changed")
    protocol = ServerProtocol()
    for name in ("send_text", "receive_data", "events_received", "data_to_send"):
        assert callable(getattr(protocol, name, None)), broken(f"ServerProtocol.{name} is gone")


def test_flow_control_internals_used_by_the_backlog_flush_exist():
    assert callable(getattr(StreamReader, "discard", None)), broken("StreamReader.discard (used to swallow a "
                                                                   "refused body) is gone")
    assert inspect.iscoroutinefunction(getattr(Connection, "drain", None)), broken(
        "Connection.drain is no longer a coroutine (RelayConnection.congested awaits it)")
    assert "self.paused" in inspect.getsource(Connection.__init__), broken(
        "Connection no longer keeps a 'paused' flow-control flag (RelayConnection.congested reads it)")
    for name in ("pause_writing", "resume_writing"):
        assert callable(getattr(Connection, name, None)), broken(f"Connection.{name} is gone")
