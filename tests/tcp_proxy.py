"""A TCP proxy on 127.0.0.1 that tests can cut or stall, to break one relayd instance's link to Redis.

It runs an asyncio loop in a daemon thread, so synchronous tests drive it with plain method calls:
``cut()`` closes every connection and refuses new ones until ``heal()``; ``stall(direction)`` stops forwarding
one direction ("client->server" or "server->client") while the connections stay open. Each direction buffers
at most ``buffer_bytes``: past that the proxy stops reading from that side (TCP backpressure), never grows.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from support import free_port, scaled

DIRECTIONS = ("client->server", "server->client")


class _Pipe:
    """One direction of one proxied connection: reads from ``reader``, writes to ``writer`` unless stalled."""

    def __init__(self, proxy: "TcpProxy", direction: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.direction = direction
        self.reader = reader
        self.writer = writer

    async def run(self) -> None:
        try:
            while True:
                # A stalled direction stops reading: what is in flight stays in the kernel buffers (bounded).
                await self.proxy._flowing[self.direction].wait()
                data = await self.reader.read(self.proxy.buffer_bytes)
                if not data:
                    break
                await self.proxy._flowing[self.direction].wait()
                self.writer.write(data)
                await self.writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self.writer.close()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host``:``target_port``; ``stop()`` at teardown."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", *, buffer_bytes: int = 64 << 10) -> None:
        self.target = (target_host, target_port)
        self.buffer_bytes = buffer_bytes
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._cut = False
        self._links: dict[int, tuple[asyncio.StreamWriter, asyncio.StreamWriter, list[asyncio.Task[None]]]] = {}
        self._ids = 0
        self._flowing: dict[str, asyncio.Event] = {}
        self._server: asyncio.base_events.Server | None = None
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self._flowing = {d: asyncio.Event() for d in DIRECTIONS}
            for event in self._flowing.values():
                event.set()
            self._server = self.loop.run_until_complete(
                asyncio.start_server(self._accept, "127.0.0.1", self.port))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True, name=f"tcp-proxy-{self.port}")
        self.thread.start()
        assert started.wait(scaled(5)), "the proxy did not start"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        tasks: list[asyncio.Task[None]] = []
        link = (writer, up_writer, tasks)
        tasks += [asyncio.ensure_future(_Pipe(self, "client->server", reader, up_writer).run()),
                  asyncio.ensure_future(_Pipe(self, "server->client", up_reader, writer).run())]
        self._ids += 1
        key = self._ids
        self._links[key] = link
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._links.pop(key, None)

    def _call(self, fn: Any) -> None:
        async def run() -> None:
            fn()
        asyncio.run_coroutine_threadsafe(run(), self.loop).result(scaled(5))

    def _abort_all(self) -> None:
        for client, upstream, tasks in list(self._links.values()):
            client.transport.abort()
            upstream.transport.abort()
            for task in tasks:
                task.cancel()

    def cut(self) -> None:
        """Close every connection (RST) and refuse new ones until ``heal()``."""
        def do() -> None:
            self._cut = True
            self._abort_all()
        self._call(do)

    def stall(self, direction: str) -> None:
        """Stop forwarding ``direction`` ("client->server" or "server->client"); connections stay open."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}")
        self._call(self._flowing[direction].clear)

    def heal(self) -> None:
        """Accept and forward everything again (connections cut earlier stay closed)."""
        def do() -> None:
            self._cut = False
            for event in self._flowing.values():
                event.set()
        self._call(do)

    def connections(self) -> int:
        return len(self._links)

    def stop(self) -> None:
        if not self.loop.is_running():
            return

        async def close() -> None:
            self._abort_all()
            if self._server is not None:
                self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(scaled(5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(scaled(5))
