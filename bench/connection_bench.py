"""CPU per inbound frame: relayd's flat frame parser against websockets' generator chain, in one process.

Feeds the same masked text frame (a live message's size) to two open ``ServerProtocol`` objects, one with
websockets' ``Protocol.parse``, one with ``relayd.net.frame_parser.FrameParser``, one frame per
``receive_data`` (as live traffic arrives) and eight per call, and takes the events each time as a connection
does. Prints process CPU per frame, the best of ``--repeat`` runs of each, interleaved.

    .venv/bin/python bench/frame_parser_bench.py [--frames 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.frames import Frame, Opcode  # noqa: E402
from websockets.protocol import OPEN, Protocol  # noqa: E402
from websockets.server import ServerProtocol  # noqa: E402

from relayd.net.frame_parser import FrameParser  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    data = client_frame(CONTENT)
    print(f"frame of {len(data)} bytes ({len(CONTENT)} of payload); best of {args.repeat} runs of "
          f"{args.frames:,} frames each; Python {sys.version.split()[0]}, pid {os.getpid()}")
    for per_call in (1, 8):
        best = {"websockets": float("inf"), "relayd": float("inf")}
        for _ in range(args.repeat):
            for kind in best:
                best[kind] = min(best[kind], cpu_per_frame(kind, data, args.frames, per_call))
        w, r = best["websockets"], best["relayd"]
        print(f"{per_call} frame(s) per read: websockets' parser {w:.2f} us/frame, relayd's {r:.2f} us/frame "
              f"({r / w:.2f}x, {w - r:.2f} us less)")


if __name__ == "__main__":
    main()
