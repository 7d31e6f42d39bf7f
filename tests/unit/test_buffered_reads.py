"""`BufferedClient` reads: one socket read per turn of the event loop, served to paho in pieces."""

from __future__ import annotations

import socket
import time

import paho.mqtt.client as paho
import pytest

from bridge.core.mqtt import BufferedClient


@pytest.fixture
def client_and_peer():  # type: ignore[no-untyped-def]
    a, b = socket.socketpair()
    a.setblocking(False)
    c = BufferedClient(paho.CallbackAPIVersion.VERSION2, client_id="t")
    c._sock = a  # the socket paho would have opened
    yield c, b
    a.close()
    b.close()


def test_one_read_per_turn_then_nothing_until_the_next_turn(client_and_peer) -> None:  # type: ignore[no-untyped-def]
    c, peer = client_and_peer
    peer.sendall(b"abcdef")
    c.read_turn()
    assert c._sock_recv(4) == b"abcd"  # what paho calls
    peer.sendall(b"ghij")  # arrives while this turn still serves its first read
    assert c._sock_recv(4) == b"ef"
    assert not c.buffered()
    with pytest.raises(BlockingIOError):
        c._sock_recv(4)  # the socket has more, but this turn read once
    c.read_turn()
    assert c._sock_recv(4) == b"ghij"


def test_an_empty_socket_is_blocking_io_as_paho_expects(client_and_peer) -> None:  # type: ignore[no-untyped-def]
    c, _peer = client_and_peer
    c.read_turn()
    with pytest.raises(BlockingIOError):
        c._sock_recv(1)


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux's")
def test_each_read_asks_the_kernel_to_acknowledge_at_once() -> None:
    """Against a broker with Nagle's algorithm on, a delayed acknowledgement held its
    next packet up to 40 ms (the stock broker's time to first chunk)."""
    server = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(server.getsockname())
    b, _ = server.accept()
    try:
        a.setblocking(False)
        a.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
        c = BufferedClient(paho.CallbackAPIVersion.VERSION2, client_id="t")
        c._sock = a
        b.sendall(b"x")
        deadline = time.monotonic() + 2
        while True:
            c.read_turn()
            try:
                assert c._sock_recv(1) == b"x"
                break
            except BlockingIOError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert a.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    finally:
        for s in (a, b, server):
            s.close()
