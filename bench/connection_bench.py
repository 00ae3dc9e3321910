"""CPU of two pieces of every connection, relayd's way against websockets' own, in one process.

1. An inbound frame: the same masked text frame (a live message's size) fed to two open ``ServerProtocol``
   objects, one with websockets' ``Protocol.parse``, one with ``relayd.net.frame_parser.FrameParser``, one frame
   per ``receive_data`` (as live traffic arrives) and eight per call, taking the events each time as a
   connection does.
2. A request head's header section, all in one read: websockets' ``parse_headers`` (a generator per line) against
   ``http_framing.whole_headers`` (one pass, the same checks).
3. The answer to a valid upgrade request: websockets' ``accept`` + ``send_response`` (its ``Headers``, Date
   formatting and serialization) against ``http_connection.switching_protocols`` (websockets' own check, then the
   bytes written directly), beyond making the protocol and the request, which both pay.

Prints process CPU per operation, the best of ``--repeat`` runs of each, interleaved.

    .venv/bin/python bench/connection_bench.py [--frames 100000] [--upgrades 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.datastructures import Headers  # noqa: E402
from websockets.frames import Frame, Opcode  # noqa: E402
from websockets.http11 import Request, parse_headers  # noqa: E402
from websockets.protocol import OPEN, Protocol  # noqa: E402
from websockets.server import ServerProtocol  # noqa: E402

from relayd.net.frame_parser import FrameParser  # noqa: E402
from relayd.net.http_connection import switching_protocols  # noqa: E402
from relayd.net.http_framing import whole_headers  # noqa: E402
from websockets.streams import StreamReader  # noqa: E402

HANDSHAKE_HEADERS = (b"Host: 127.0.0.1:3000\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                     b"User-Agent: Python/3.11 websockets/17.4\r\n\r\n")

CONTENT = (b'{"type":"message","to":"0x' + b"a" * 40 + b'","content":"' + b"x" * 200
           + b'","messageId":"bench-0123456789"}')


def client_frame(payload: bytes) -> bytes:
    """A masked client text frame, as a phone sends it."""
    frame = Frame(Opcode.TEXT, payload)
    return frame.serialize(mask=True, extensions=[])


def cpu_per_frame(kind: str, data: bytes, frames: int, per_call: int) -> float:
    protocol = ServerProtocol(max_size=1 << 20)
    protocol.state = OPEN
    protocol.parser = Protocol.parse(protocol) if kind == "websockets" else FrameParser(protocol)
    next(protocol.parser)
    chunk = data * per_call
    started = time.process_time()
    for _ in range(frames // per_call):
        protocol.receive_data(chunk)
        protocol.events_received()
    return (time.process_time() - started) / frames * 1e6


def cpu_per_head(kind: str, heads: int) -> float:
    started = time.process_time()
    for _ in range(heads):
        reader = StreamReader()
        reader.feed_data(HANDSHAKE_HEADERS)
        if kind == "websockets":
            parser = parse_headers(reader.read_line)
            try:
                next(parser)
            except StopIteration:
                pass
        elif kind == "relayd":
            assert whole_headers(reader) is not None
    return (time.process_time() - started) / heads * 1e6


def upgrade_request() -> Request:
    return Request("/", Headers([("Host", "127.0.0.1:3000"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                 ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13"),
                                 ("User-Agent", "Python/3.11 websockets/17.4")]))


def cpu_per_upgrade(kind: str, upgrades: int) -> float:
    started = time.process_time()
    for _ in range(upgrades):
        protocol = ServerProtocol()
        request = upgrade_request()
        if kind == "websockets":
            response = protocol.accept(request)
            response.headers["Server"] = "relayd"
            protocol.send_response(response)
        elif kind == "relayd":
            answer = switching_protocols(protocol, request, "relayd")
            assert answer is not None
            protocol.writes.append(answer)
        protocol.data_to_send()
    return (time.process_time() - started) / upgrades * 1e6


def best_of(measure: Callable[[str], float], kinds: tuple[str, ...], repeat: int) -> dict[str, float]:
    """The least CPU per operation of each kind over ``repeat`` interleaved runs."""
    best = dict.fromkeys(kinds, float("inf"))
    for _ in range(repeat):
        for kind in kinds:
            best[kind] = min(best[kind], measure(kind))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--upgrades", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    data = client_frame(CONTENT)
    print(f"frame of {len(data)} bytes ({len(CONTENT)} of payload); best of {args.repeat} runs of "
          f"{args.frames:,} frames each; Python {sys.version.split()[0]}, pid {os.getpid()}")
    both, three = ("websockets", "relayd"), ("websockets", "relayd", "neither")
    for per_call in (1, 8):
        best = best_of(lambda kind: cpu_per_frame(kind, data, args.frames, per_call), both, args.repeat)
        w, r = best["websockets"], best["relayd"]
        print(f"{per_call} frame(s) per read: websockets' parser {w:.2f} us/frame, relayd's {r:.2f} us/frame "
              f"({r / w:.2f}x, {w - r:.2f} us less)")
    best = best_of(lambda kind: cpu_per_head(kind, args.upgrades), three, args.repeat)
    w, r = best["websockets"] - best["neither"], best["relayd"] - best["neither"]
    print(f"a handshake's 6 header lines: websockets' parse_headers {w:.2f} us, relayd's whole_headers {r:.2f} us "
          f"({r / w:.2f}x, {w - r:.2f} us less)")
    best = best_of(lambda kind: cpu_per_upgrade(kind, args.upgrades), three, args.repeat)
    w, r = best["websockets"] - best["neither"], best["relayd"] - best["neither"]
    print(f"upgrade answer (beyond making the protocol and request, {best['neither']:.2f} us): websockets' accept "
          f"{w:.2f} us, relayd's switching_protocols {r:.2f} us ({r / w:.2f}x, {w - r:.2f} us less)")


if __name__ == "__main__":
    main()
