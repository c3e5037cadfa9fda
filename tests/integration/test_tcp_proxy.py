"""The TCP proxy of the broker-loss tests, against a small echo server (no broker needed)."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tests.integration.tcp_proxy import TcpProxy, tcp_proxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False


@pytest.fixture
def echo_port() -> Iterator[int]:
    with _EchoServer(("127.0.0.1", 0), _Echo) as server:
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            thread.join(10)


@pytest.fixture
def proxy(echo_port: int) -> Iterator[TcpProxy]:
    with tcp_proxy(upstream_port=echo_port) as running:
        yield running


def _connect(proxy: TcpProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=10)


def _echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    received = b""
    while len(received) < len(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def test_forwards_both_ways_and_counts_connections(proxy: TcpProxy) -> None:
    with _connect(proxy) as first, _connect(proxy) as second:
        assert _echo(first, b"hello") == b"hello"
        assert _echo(second, b"x" * 200_000) == b"x" * 200_000
        assert proxy.accepted == 2 and proxy.connections == 2


def test_cut_closes_open_connections_and_accepts_new_ones(proxy: TcpProxy) -> None:
    with _connect(proxy) as sock:
        assert _echo(sock, b"before") == b"before"
        assert proxy.cut() == 1
        with pytest.raises(OSError):
            if not _echo(sock, b"after"):
                raise ConnectionResetError("closed")
    assert proxy.connections == 0
    with _connect(proxy) as again:
        assert _echo(again, b"again") == b"again"


def test_pause_holds_data_until_resume_also_for_new_connections(proxy: TcpProxy) -> None:
    with _connect(proxy) as sock:
        assert _echo(sock, b"one") == b"one"
        proxy.pause()
        sock.sendall(b"held")
        with _connect(proxy) as late:  # accepted, but reaches the server only on resume
            late.sendall(b"late")
            for held in (sock, late):
                held.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    held.recv(10)
                held.settimeout(10)
            proxy.resume()
            assert sock.recv(10) == b"held"
            assert late.recv(10) == b"late"


def test_down_cuts_open_connections_and_resets_new_ones_until_admitted(proxy: TcpProxy) -> None:
    with _connect(proxy) as sock:
        assert _echo(sock, b"before") == b"before"
        assert proxy.down() == 1
        assert _gone(sock)
    with _connect(proxy) as refused:  # accepted by the kernel, then reset by the proxy
        assert _gone(refused)
    assert proxy.connections == 0
    proxy.admit()
    with _connect(proxy) as again:
        assert _echo(again, b"again") == b"again"


def _gone(sock: socket.socket) -> bool:
    """Whether the connection is closed or reset from the other end."""
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def test_stop_closes_everything_and_is_idempotent(echo_port: int) -> None:
    proxy = TcpProxy(upstream_port=echo_port).start()
    sock = _connect(proxy)
    try:
        assert _echo(sock, b"x") == b"x"
        proxy.pause()
        with _connect(proxy):
            proxy.stop()
        assert sock.recv(10) == b""
    finally:
        sock.close()
    proxy.stop()
    with pytest.raises(RuntimeError):
        proxy.cut()


def test_an_unreachable_upstream_closes_the_client_connection() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connections are refused
        with tcp_proxy(upstream_port=port) as proxy, _connect(proxy) as sock:
            assert sock.recv(10) == b""


def test_pause_of_one_direction_holds_only_that_one(proxy: TcpProxy) -> None:
    with _connect(proxy) as sock:
        assert _echo(sock, b"one") == b"one"
        proxy.pause(to_client=False)  # what the client sends is held
        sock.sendall(b"held")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        sock.settimeout(10)
        proxy.resume()
        assert sock.recv(10) == b"held"
        proxy.pause(to_upstream=False)  # what the server sends back is held
        sock.sendall(b"back")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        sock.settimeout(10)
        proxy.resume()
        assert sock.recv(10) == b"back"
