"""A TCP proxy between AMQP clients and the broker, to lose the broker without stopping it.

The proxy's event loop runs in a thread of its own, so that a synchronous test drives it
while controller and worker subprocesses connect through it:

- ``cut()`` aborts every open connection on both sides at once (what was in flight is
  lost; client and broker each see the connection drop); new ones are accepted as usual.
- ``pause()`` blackholes: nothing is forwarded and nothing is closed, as in a network
  partition; it can hold one direction only. Bytes wait in the kernel's buffers; a
  connection opened meanwhile is accepted but reaches the broker only after ``resume()``,
  which lets everything held through.
- ``refuse()`` resets every new connection on arrival (the open ones go on), so that a
  client which loses its connection cannot get a new one, as from a broker that stopped;
  ``admit()`` accepts them again.
- ``down()`` is a broker that went away: ``refuse()`` and ``cut()`` at once, until
  ``admit()``.
- ``stop()`` closes the listener and every connection: clients then find nothing
  listening (connection refused), as when the broker is down. A new proxy on the same
  ``port`` brings it back.

Built on protocols and transports: no task per connection besides the short one that opens
the broker side, and the proxy owns every task it starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")

CALL_TIMEOUT_S = 30.0


class _Side(asyncio.Protocol):
    """One end of a proxied connection; what it receives goes to the other end."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.peer_full = False  # the other end's write buffer is above its high-water mark
        self.pending: list[bytes] = []  # received before the other end was connected
        self.eof = False
        self.gone: asyncio.Future[None] = link.core.loop.create_future()

    @property
    def is_client(self) -> bool:
        return self is self.link.client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        core = self.link.core
        core.live.add(self)
        if core.closing or (core.refusing and self.is_client):
            transport.abort()
            return
        core.update_reading(self)
        if self.is_client:
            core.open(self.link)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
        elif not peer.transport.is_closing():
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True  # half-closed: the other direction may still carry data
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.core.live.discard(self)
        if not self.gone.done():
            self.gone.set_result(None)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()
        elif self.is_client:
            self.link.abandon()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.peer_full = True
            self.link.core.update_reading(self.peer)

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.peer_full = False
            self.link.core.update_reading(self.peer)


class _Link:
    """A client connection and, once opened, its connection to the broker."""

    def __init__(self, core: _ProxyCore) -> None:
        self.core = core
        self.client = _Side(self)
        self.opening: asyncio.Task[None] | None = None

    def abandon(self) -> None:
        """The client went away before the broker side was open: stop opening it."""
        if self.opening is not None and not self.opening.done():
            self.opening.cancel()

    async def open_upstream(self) -> None:
        core = self.core
        client = self.client
        assert client.transport is not None
        upstream = _Side(self)
        try:
            await core.flowing.wait()  # a connection accepted during a pause waits for resume()
            if client.transport.is_closing():
                return
            await core.loop.create_connection(
                lambda: upstream, core.upstream_host, core.upstream_port
            )
        except OSError:  # the broker is not there: neither is the proxied connection
            client.transport.abort()
            return
        except asyncio.CancelledError:
            client.transport.abort()
            if upstream.transport is not None:
                upstream.transport.abort()
            raise
        assert upstream.transport is not None
        if client.transport.is_closing():
            upstream.transport.abort()
            return
        client.peer, upstream.peer = upstream, client
        for side, other in ((client, upstream), (upstream, client)):
            assert other.transport is not None
            for data in side.pending:
                other.transport.write(data)
            side.pending.clear()
            if side.eof and other.transport.can_write_eof():
                other.transport.write_eof()


class _ProxyCore:
    """The proxy's state; used from its own event loop only."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, upstream_host: str, upstream_port: int
    ) -> None:
        self.loop = loop
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.live: set[_Side] = set()
        self.opening: set[asyncio.Task[None]] = set()
        self.flowing = asyncio.Event()  # set while nothing is held, in either direction
        self.flowing.set()
        self.held_to_upstream = False
        self.held_to_client = False
        self.accepted = 0
        self.closing = False
        self.refusing = False  # new client connections are reset at once

    def accept(self) -> _Side:
        self.accepted += 1
        return _Link(self).client

    def open(self, link: _Link) -> None:
        task = self.loop.create_task(link.open_upstream(), name="proxy:open-upstream")
        link.opening = task
        self.opening.add(task)
        task.add_done_callback(self.opening.discard)

    def update_reading(self, side: _Side) -> None:
        transport = side.transport
        if transport is None or transport.is_closing():
            return
        held = self.held_to_upstream if side.is_client else self.held_to_client
        should_read = not held and not side.peer_full
        if should_read and not transport.is_reading():
            transport.resume_reading()
        elif not should_read and transport.is_reading():
            transport.pause_reading()

    async def pause(self, to_upstream: bool, to_client: bool) -> None:
        self.held_to_upstream = self.held_to_upstream or to_upstream
        self.held_to_client = self.held_to_client or to_client
        if self.held_to_upstream or self.held_to_client:
            self.flowing.clear()
        for side in list(self.live):
            self.update_reading(side)

    async def resume(self) -> None:
        self.held_to_upstream = self.held_to_client = False
        self.flowing.set()
        for side in list(self.live):
            self.update_reading(side)

    async def refuse(self, refusing: bool) -> None:
        self.refusing = refusing

    async def cut(self) -> int:
        """Abort every open connection; how many client connections were cut."""
        opening = list(self.opening)
        for task in opening:
            task.cancel()
        await asyncio.gather(*opening, return_exceptions=True)
        sides = list(self.live)
        for side in sides:
            assert side.transport is not None
            side.transport.abort()
        # Connections accepted from here on are not waited for, nor cut.
        await asyncio.gather(*(side.gone for side in sides))
        return sum(1 for side in sides if side.is_client)

    async def down(self) -> int:
        """Refuse new connections and abort the open ones; how many clients were cut."""
        self.refusing = True
        return await self.cut()

    async def close(self) -> None:
        """Abort every connection, and those still being accepted; then the listener may close.

        Python 3.11 leaks the transport of a connection accepted while its server closes
        (an assertion fails in ``Server._attach``), so connections are refused first, by
        aborting them on arrival (see ``connection_made``), until asyncio's accepting tasks
        are done. The caller closes the listener right after, with no ``await`` between.
        """
        self.closing = True
        await self.cut()
        current = asyncio.current_task()
        deadline = self.loop.time() + CALL_TIMEOUT_S
        while self.live or len(asyncio.all_tasks() - {current}) > 0:
            if self.loop.time() > deadline:
                raise RuntimeError(f"the proxy did not close: {asyncio.all_tasks()}")
            await asyncio.sleep(0.01)

    async def counts(self) -> tuple[int, int]:
        """(client connections accepted so far, client connections open now)."""
        return self.accepted, sum(1 for side in self.live if side.is_client)


class TcpProxy:
    """A proxy on 127.0.0.1 (a free port) to the upstream broker, driven from any thread."""

    def __init__(
        self, upstream_host: str = "127.0.0.1", upstream_port: int = 5672, *, port: int = 0
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._listen_port = port  # 0: any free port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._core: _ProxyCore | None = None
        self._stopping: asyncio.Event | None = None
        self._port: int | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    def start(self) -> TcpProxy:
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        self._thread = threading.Thread(target=self._serve, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(CALL_TIMEOUT_S):
            raise RuntimeError("the proxy did not start in time")
        if self._failure is not None:
            self.stop()
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then end the thread; idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # its loop already ended
                loop.call_soon_threadsafe(stopping.set)
        thread.join(CALL_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError("the proxy's thread did not end in time")
        failure, self._failure = self._failure, None
        if failure is not None:
            raise RuntimeError("the proxy failed") from failure

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what a test does, from its own thread ---

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the proxy is not started")
        return self._port

    def url(self, url: str) -> str:
        """The AMQP ``url`` of the upstream broker, pointed at this proxy instead."""
        parts = urlsplit(url)
        credentials, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{credentials}{at}127.0.0.1:{self.port}"))

    def cut(self) -> int:
        """Abort every open connection, both sides; how many client connections it cut."""
        return self._call(self._running().cut())

    def pause(self, *, to_upstream: bool = True, to_client: bool = True) -> None:
        """Blackhole: forward nothing and close nothing until :meth:`resume`.

        ``to_client=False`` holds only what clients send (they still hear the broker), and
        ``to_upstream=False`` only what the broker sends; a second call can hold the rest.
        """
        self._call(self._running().pause(to_upstream, to_client))

    def resume(self) -> None:
        """Forward again, starting with what was held."""
        self._call(self._running().resume())

    def refuse(self) -> None:
        """Reset every new connection as it arrives, until :meth:`admit`."""
        self._call(self._running().refuse(True))

    def admit(self) -> None:
        """Accept new connections again."""
        self._call(self._running().refuse(False))

    def down(self) -> int:
        """The broker is gone: cut every connection, reset new ones until :meth:`admit`."""
        return self._call(self._running().down())

    @property
    def accepted(self) -> int:
        """Client connections accepted since the start, reconnections included."""
        return self._call(self._running().counts())[0]

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return self._call(self._running().counts())[1]

    # --- the proxy's thread ---

    def _running(self) -> _ProxyCore:
        if self._core is None or self._loop is None:
            raise RuntimeError("the proxy is not running")
        return self._core

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        try:
            if loop is None:
                raise RuntimeError("the proxy is not running")
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:
            coro.close()  # never scheduled: not "never awaited" either
            raise
        try:
            return future.result(CALL_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RuntimeError("the proxy did not answer in time") from None

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # raised again by stop(), in the test's thread
            self._failure = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        core = _ProxyCore(loop, self.upstream_host, self.upstream_port)
        stopping = asyncio.Event()
        server = await loop.create_server(core.accept, "127.0.0.1", self._listen_port)
        try:
            self._port = server.sockets[0].getsockname()[1]
            self._core, self._stopping, self._loop = core, stopping, loop
            self._ready.set()
            await stopping.wait()
        finally:
            self._loop = None
            await core.close()
            server.close()
            await server.wait_closed()


@contextlib.contextmanager
def tcp_proxy(
    upstream_host: str = "127.0.0.1", upstream_port: int = 5672, *, port: int = 0
) -> Iterator[TcpProxy]:
    """A started :class:`TcpProxy` (on ``port``, or any free one), stopped on exit."""
    with TcpProxy(upstream_host, upstream_port, port=port) as proxy:
        yield proxy
