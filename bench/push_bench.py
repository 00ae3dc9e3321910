"""What a push costs relayd: the CPU of one Web Push (RFC 8291 encryption + a VAPID ES256 signature), the
message path's cost of handing an address to the sender, and pushes per second through the sender to a local
Web Push receiver over TLS (one connection per push, as relayd sends them).

    .venv/bin/python bench/push_bench.py [--pushes 300]

Needs the push extra and the test extra (the receiver is tests/push_receivers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from push_receivers import PushCA, WebPushService  # noqa: E402

from relayd.clock import SYSTEM_CLOCK  # noqa: E402
from relayd.config.schema import PushSection  # noqa: E402
from relayd.ops.metrics import RelayMetrics  # noqa: E402
from relayd.push.sender import PushSender  # noqa: E402
from relayd.push.subscriptions import check_url  # noqa: E402
from relayd.push.webpush import VapidKey, WebPush, encrypt  # noqa: E402
from relayd.storage.memory import MemoryStore  # noqa: E402
from relayd.storage.store import PushSubscription  # noqa: E402


def per_call_us(fn, rounds: int) -> float:
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds):
            fn()
        samples.append((time.perf_counter() - start) / rounds * 1e6)
    return statistics.median(samples)


async def throughput(tmp: Path, pushes: int, concurrency: int) -> float:
    tmp.mkdir(parents=True, exist_ok=True)
    ca = PushCA(tmp)
    receiver = WebPushService(ca)
    try:
        store = MemoryStore()
        config = PushSection(enabled=True, vapid_subject="mailto:bench@example.org", allow_private_endpoints=True,
                             min_interval_s=0, concurrency=concurrency, queue_size=pushes * 2)
        import ssl
        context = ssl.create_default_context(cafile=str(ca.ca_file))
        provider = WebPush(VapidKey.load_or_create(str(tmp / "vapid.pem"), config.vapid_subject),
                           allow_private=True, ssl_context=context, timeout_s=10, max_bytes=65536)
        now = int(time.time() * 1000)
        for i in range(pushes):
            sub = receiver.device().subscription()
            await store.put_push_subscription(PushSubscription(f"s{i}", f"a{i}", "webpush", sub["endpoint"],
                                                               sub["keys"]["p256dh"], sub["keys"]["auth"], now,
                                                               now + 86_400_000), 10)
        sender = PushSender(config, store, {"webpush": provider}, RelayMetrics(), SYSTEM_CLOCK)
        sender.start()
        start = time.perf_counter()
        for i in range(pushes):
            sender.notify(f"a{i}")
        while len(receiver.received) < pushes:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - start
        await sender.stop()
        assert not receiver.refusals, receiver.refusals[:3]
        return pushes / elapsed
    finally:
        receiver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pushes", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ca = PushCA(Path(tmp))
        receiver = WebPushService(ca)
        sub = receiver.device().subscription()
        receiver.stop()
        vapid = VapidKey.load_or_create(str(Path(tmp) / "v.pem"), "mailto:bench@example.org")
        endpoint = check_url(sub["endpoint"], True)
        body = b'{"type":"wake","queued":3}'
        enc = per_call_us(lambda: encrypt(body, sub["keys"]["p256dh"], sub["keys"]["auth"]), 200)
        jwt = per_call_us(lambda: vapid.authorization(endpoint), 200)
        sender = PushSender(PushSection(queue_size=1_000_000), MemoryStore(), {}, RelayMetrics(), SYSTEM_CLOCK)
        addresses = [f"0x{i:040x}" for i in range(100_000)]
        it = iter(addresses)
        notify = per_call_us(lambda: sender.notify(next(it)), 20_000)
        print(f"encrypt one Web Push payload (ECDH + HKDF + AES-GCM): {enc:.0f} us")
        print(f"sign one VAPID token (ES256):                         {jwt:.0f} us")
        print(f"notify() on the message path (queue an address):      {notify:.2f} us")
        for concurrency in (1, 8):
            rate = asyncio.run(throughput(Path(tmp) / f"c{concurrency}", args.pushes, concurrency))
            print(f"pushes/s to a local TLS receiver, concurrency {concurrency}:     {rate:.0f}")


if __name__ == "__main__":
    main()
