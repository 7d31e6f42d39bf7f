"""`BufferedClient` reads: one socket read per turn of the event loop, served to paho in pieces."""

from __future__ import annotations

import socket

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
