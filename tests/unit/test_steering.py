"""Connection steering between workers (server/steering.py) on real SO_REUSEPORT sockets on
127.0.16.1: while the server holds at most one connection every new one goes to the chosen
worker's socket; from three on they are spread over all of them; a refused attach is
neither an error nor retried."""

from __future__ import annotations

import selectors
import socket
from collections.abc import Iterator

import pytest

from serpentmail.server.steering import CONCENTRATE_AT, SPREAD_AT, Steering, spread_all
from tests.helpers import free_port

HOST = "127.0.16.1"


@pytest.fixture
def group() -> Iterator[tuple[list[socket.socket], int]]:
    """Two listening sockets on one port, in the order two workers' copies are made."""
    port = free_port(HOST)
    socks = []
    for _ in range(2):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((HOST, port))
        s.listen(64)
        s.setblocking(False)
        socks.append(s)
    yield socks, port
    for s in socks:
        s.close()


def connect_many(socks: list[socket.socket], port: int, n: int) -> list[int]:
    """Open ``n`` connections one after the other; how many each socket accepted."""
    counts = [0] * len(socks)
    # A selector, not select.select: that refuses descriptors past 1023, and a whole test run
    # in one process may have that many open by the time this runs.
    with selectors.DefaultSelector() as sel:
        for i, s in enumerate(socks):
            sel.register(s, selectors.EVENT_READ, i)
        for _ in range(n):
            with socket.create_connection((HOST, port), timeout=5):
                ready = sel.select(5)
                assert ready, "the connection was accepted by no socket"
                for key, _ in ready:
                    try:
                        conn, _ = socks[key.data].accept()
                    except BlockingIOError:
                        continue
                    conn.close()
                    counts[key.data] += 1
    return counts


def test_one_worker_while_nearly_idle_all_of_them_when_busy(group: tuple[list[socket.socket], int]) -> None:
    socks, port = group
    steering = Steering([socks[1]], target=1, workers=2)  # the last worker steers to itself
    steering.update(0)
    if steering.failed:
        pytest.skip("this kernel refuses SO_ATTACH_REUSEPORT_CBPF")
    assert connect_many(socks, port, 20) == [0, 20]
    steering.update(SPREAD_AT - 1)  # not busy enough yet: unchanged
    assert connect_many(socks, port, 10) == [0, 10]
    steering.update(SPREAD_AT)
    spread = connect_many(socks, port, 60)
    assert sum(spread) == 60 and min(spread) > 0  # all on one: 2**-59 by chance
    steering.update(CONCENTRATE_AT + 1)  # hysteresis: still spreading
    assert min(connect_many(socks, port, 40)) > 0
    steering.update(CONCENTRATE_AT)
    assert connect_many(socks, port, 20) == [0, 20]


def test_the_supervisor_spreads_when_the_steering_worker_is_gone(group: tuple[list[socket.socket], int]) -> None:
    socks, port = group
    steering = Steering([socks[1]], target=1, workers=2)
    steering.update(0)
    if steering.failed:
        pytest.skip("this kernel refuses SO_ATTACH_REUSEPORT_CBPF")
    spread_all([socks[1]], 2)  # the parent holds the dead worker's copy of the socket
    assert min(connect_many(socks, port, 60)) > 0


def test_a_refused_attach_is_neither_an_error_nor_retried() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as not_tcp:
        steering = Steering([not_tcp], target=1, workers=2)
        steering.update(0)
        assert steering.failed
        steering.update(SPREAD_AT)  # nothing raised, nothing tried
        assert steering.spreading is None
