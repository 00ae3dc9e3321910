"""relayd's frame parser against websockets' own: the same streams, split at every byte, must give the same
frames, answers, close codes, errors and states (``relayd.net.frame_parser``)."""

from __future__ import annotations

import gc
import os
import random
import struct
from collections.abc import Iterator

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN, Protocol
from websockets.server import ServerProtocol

from relayd.net.frame_parser import FrameParser

MAX_SIZE = 1000


def masked(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = True,
           length: int | None = None) -> bytes:
    """One client frame as bytes, with any header a test wants (reserved bits, no mask, a lying length)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = bytes([0x37, 0xFA, 0x21, 0x3D])
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close(code: int, reason: bytes = b"") -> bytes:
    return masked(Opcode.CLOSE, struct.pack("!H", code) + reason)


STREAMS: dict[str, bytes] = {
    "text": masked(Opcode.TEXT, b'{"type":"ping"}'),
    "empty text": masked(Opcode.TEXT, b""),
    "binary": masked(Opcode.BINARY, bytes(range(256)) * 3),
    "lengths at the edges": b"".join(masked(Opcode.TEXT, b"x" * n) for n in (0, 1, 125, 126, 127, 999, 1000)),
    "several at once": masked(Opcode.TEXT, b"a") + masked(Opcode.PING, b"p") + masked(Opcode.TEXT, b"b"),
    "fragmented": masked(Opcode.TEXT, b"ab", fin=False) + masked(Opcode.PING, b"") + masked(Opcode.CONT, b"cd"),
    "fragments past the message limit": (masked(Opcode.TEXT, b"x" * 600, fin=False)
                                         + masked(Opcode.CONT, b"y" * 600)),
    "pong": masked(Opcode.PONG, b"unsolicited"),
    "close": close(1000, b"bye") + masked(Opcode.TEXT, b"after the close"),
    "close without a code": masked(Opcode.CLOSE, b""),
    "close too short": masked(Opcode.CLOSE, b"\x03"),
    "close with an invalid code": close(1005),
    "close with a bad reason": close(1000, b"\xff\xfe"),
    "reserved bits": masked(Opcode.TEXT, b"x", rsv=0b100),
    "reserved opcode": masked(0x3, b"x"),
    "unmasked": masked(Opcode.TEXT, b"x", mask=False),
    "control frame too long": masked(Opcode.PING, b"p" * 126),
    "fragmented control frame": masked(Opcode.PING, b"p", fin=False),
    "continuation without a start": masked(Opcode.CONT, b"x"),
    "text inside a fragmented message": masked(Opcode.TEXT, b"a", fin=False) + masked(Opcode.TEXT, b"b"),
    "payload over the limit": masked(Opcode.TEXT, b"x" * (MAX_SIZE + 1)),
    "a 64-bit length over the limit": masked(Opcode.BINARY, b"", length=1 << 40)[:14],
    "a 16-bit length, cut": masked(Opcode.TEXT, b"x" * 300)[:3],
    "cut in the mask": masked(Opcode.TEXT, b"hello")[:4],
    "cut in the payload": masked(Opcode.TEXT, b"hello")[:8],
    "a frame then one byte": masked(Opcode.TEXT, b"ok") + b"\x81",
}


def opened(parser: str, max_size: int | None = MAX_SIZE) -> ServerProtocol:
    protocol = ServerProtocol(max_size=max_size)
    protocol.state = OPEN
    protocol.parser = Protocol.parse(protocol) if parser == "websockets" else FrameParser(protocol)
    next(protocol.parser)
    return protocol


def observe(protocol: ServerProtocol) -> tuple[object, ...]:
    """Everything a connection sees of its protocol after a step."""
    frames = [(f.opcode, bytes(f.data), f.fin, f.rsv1, f.rsv2, f.rsv3) for f in protocol.events_received()
              if isinstance(f, Frame)]
    error = protocol.parser_exc
    return (frames, protocol.data_to_send(), protocol.state, protocol.close_rcvd, protocol.close_sent,
            protocol.current_size, type(error).__name__, str(error) if error is not None else None,
            protocol.parser.__name__ if not isinstance(protocol.parser, FrameParser) else "parse")


def run(stream: bytes, cuts: list[int], parser: str, eof: bool, max_size: int | None = MAX_SIZE) -> list[object]:
    protocol = opened(parser, max_size)
    seen = []
    start = 0
    for cut in [*cuts, len(stream)]:
        if cut > start:
            try:
                protocol.receive_data(stream[start:cut])
            except EOFError:  # the reader ended (a failed connection): websockets raises the same
                seen.append("EOFError")
            start = cut
        seen.append(observe(protocol))
    if eof:
        protocol.receive_eof()
        seen.append(observe(protocol))
    return seen


def splits(stream: bytes) -> Iterator[list[int]]:
    yield []
    yield list(range(1, len(stream)))
    rng = random.Random(len(stream))
    for _ in range(5):
        yield sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(1, 6))))


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("eof", [False, True], ids=["open", "then eof"])
def test_the_flat_parser_does_what_websockets_parser_does(name: str, eof: bool) -> None:
    stream = STREAMS[name]
    for cuts in splits(stream):
        assert run(stream, cuts, "relayd", eof) == run(stream, cuts, "websockets", eof), (name, cuts)


def test_the_flat_parser_agrees_on_random_streams() -> None:
    """Valid frames with random bytes mixed in at random places, random splits, with and without a limit."""
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(1, 5)):
            if rng.random() < 0.2:
                parts.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 4))))
            else:
                opcode = rng.choice([Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PING, Opcode.PONG])
                parts.append(masked(opcode, os.urandom(rng.choice([0, 5, 125, 126, 300])), fin=rng.random() < 0.8))
        stream = b"".join(parts)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 4)))) if len(stream) > 1 \
            else []
        eof = rng.random() < 0.5
        limit = rng.choice([None, 200, MAX_SIZE])
        assert run(stream, cuts, "relayd", eof, limit) == run(stream, cuts, "websockets", eof, limit), (seed, stream)


def test_a_closed_parser_lets_its_protocol_go() -> None:
    """``close()`` (called at ``connection_lost``) cuts the parser's reference to its protocol, which holds it."""
    protocol = opened("relayd")
    parser = protocol.parser
    assert isinstance(parser, FrameParser)
    protocol.receive_data(masked(Opcode.TEXT, b"x"))
    parser.close()
    assert parser.protocol is None
    with pytest.raises(StopIteration):
        next(parser)
    gc.collect()
