"""The cluster bus alone: CPU per live offer across two instances, both sides, without Redis or sockets.

Two ``Bus``es with their ``ClusterPeers`` in one process, joined by a
backplane that hands each published envelope to the other bus in the next
loop iteration (what Redis Pub/Sub does, minus the network). The sender
offers N unstored messages, ``--per-turn`` per loop iteration as a busy
sender instance would; the receiver takes every one (its protocol is a stub
answering "one session took it") and replies. Reported: this process's CPU
per offer answered (encode, publish, decode, apply, reply, and the answer's
way back to the offer's callback). ``--relayd DIR`` measures another
checkout's relayd (e.g. main's) with this script.

Run from the repository root: ``python bench/bus_bench.py [--offers 20000] [--per-turn 64] [--rounds 3]
[--relayd DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class LoopbackBackplane:
    """Publishes reach the addressed bus in the next loop iteration, always heard."""

    deadline_s = 1.0

    def __init__(self) -> None:
        self.buses: dict[str, Any] = {}

    def publish(self, instance: str, data: str) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        sent: asyncio.Future[int] = loop.create_future()
        sent.set_result(1)
        loop.call_soon(self.buses[instance].received, data)
        return sent


class TakesAll:
    """The receiving instance's protocol: one ready session takes every offer."""

    def offered(self, msg: Any, **_: Any) -> tuple[int, bool]:
        return 1, False


class NoPresence:
    instance = "sender"

    def invalidate(self, address: str) -> None:
        pass


async def one_round(offers: int, per_turn: int) -> float:
    """CPU seconds per answered offer."""
    from relayd.cluster.bus import Bus
    from relayd.cluster.peers import ClusterPeers
    from relayd.cluster.presence import PeerSessions
    from relayd.storage.store import QueuedMessage

    backplane = LoopbackBackplane()
    sender, receiver = Bus(backplane, "inst-sender", 5.0), Bus(backplane, "inst-receiver", 5.0)  # type: ignore[arg-type]
    backplane.buses = {sender.instance: sender, receiver.instance: receiver}
    peers = ClusterPeers(backplane, NoPresence(), sender)  # type: ignore[arg-type]
    ClusterPeers(backplane, NoPresence(), receiver).bind(TakesAll())  # type: ignore[arg-type]
    where = PeerSessions((receiver.instance,), False)
    answered = 0
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def then(taken: Any) -> None:
        nonlocal answered
        answered += 1
        if answered == offers:
            done.set_result(None)
    content = "x" * 200
    started = time.process_time()
    for first in range(0, offers, per_turn):
        for i in range(first, min(offers, first + per_turn)):
            msg = QueuedMessage("0x" + "b" * 40, "0x" + "A" * 40, f"m-{i:08d}", content, 1765000000000 + i,
                                1765000000000 + i)
            peers.offer_soon(where, msg, 0, i + 1, then)
        await asyncio.sleep(0)
    await asyncio.wait_for(done, 60)
    return (time.process_time() - started) / offers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--offers", type=int, default=20000)
    ap.add_argument("--per-turn", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--relayd", metavar="DIR", default=str(ROOT), help="the checkout whose relayd is measured")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.relayd).resolve()))
    import relayd
    figures = [asyncio.run(one_round(args.offers, args.per_turn)) for _ in range(args.rounds)]
    print(f"relayd from {Path(relayd.__file__).parent}")
    print(f"bus CPU per offer answered (both sides): median {statistics.median(figures) * 1e6:.2f} us "
          f"[{min(figures) * 1e6:.2f}-{max(figures) * 1e6:.2f}] over {args.rounds} rounds of {args.offers:,}")


if __name__ == "__main__":
    main()
