"""Load clients written for the benchmark (where Postfix's smtp-source does not measure it).

* :func:`smtp_latency`: N one-message SMTP transactions over C concurrent sessions, timing each
  from ``connect`` to the 250 after the data (the moment the server says "it is safe").
* :func:`hold_idle`: open N connections, read each greeting, and keep them idle.
* :func:`pop3_download`: poplib: login, LIST, RETR all, DELE all, QUIT.

The same client code runs against serpentmail and the peer, so its own cost cancels out of
the ratio.
"""

from __future__ import annotations

import asyncio
import poplib
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def make_message(size: int, sender: str, rcpt: str, *, crlf: bool = True) -> bytes:
    """A plain RFC 5322 message of about ``size`` bytes, lines of 78 characters."""
    eol = "\r\n" if crlf else "\n"
    head = (f"From: <{sender}>{eol}To: <{rcpt}>{eol}Subject: benchmark{eol}"
            f"Message-ID: <bench.{time.monotonic_ns()}@bench.test>{eol}{eol}")
    lines = []
    n = len(head)
    i = 0
    while n < size:
        line = f"{i:06d}" + "x" * 72
        lines.append(line)
        n += len(line) + len(eol)
        i += 1
    return (head + eol.join(lines) + eol).encode()


async def _expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            if not line.startswith(code):
                raise ConnectionError(f"unexpected reply {line[:80]!r}")
            return


async def _one_transaction(host: str, port: int, sender: str, rcpt: str, body: bytes) -> float:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await _expect(reader, b"220")
        writer.write(b"EHLO client.bench.test\r\n")
        await _expect(reader, b"250")
        writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
        await _expect(reader, b"250")
        writer.write(f"RCPT TO:<{rcpt}>\r\n".encode())
        await _expect(reader, b"250")
        writer.write(b"DATA\r\n")
        await _expect(reader, b"354")
        writer.write(body + b".\r\n")
        await _expect(reader, b"250")
        elapsed = time.perf_counter() - t0
        writer.write(b"QUIT\r\n")
        await _expect(reader, b"221")
        return elapsed
    finally:
        writer.close()


def smtp_latency(host: str, port: int, *, sessions: int, total: int, size: int,
                 sender: str, rcpt: str) -> list[float]:
    """Per-transaction latencies (seconds) of ``total`` transactions over ``sessions`` workers."""
    body = make_message(size, sender, rcpt)

    async def main() -> list[float]:
        out: list[float] = []
        remaining = [total]

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                out.append(await _one_transaction(host, port, sender, rcpt, body))

        await asyncio.gather(*(worker() for _ in range(sessions)))
        return out

    return _run(main)


def hold_idle(host: str, port: int, count: int, measure: Callable[[], int], *, settle: float = 1.5) -> tuple[int, int]:
    """Open ``count`` connections, read each greeting, wait ``settle`` s, call ``measure()``.

    Returns (connections that got a 220 and were still open, measure())."""

    async def main() -> tuple[int, int]:
        sem = asyncio.Semaphore(200)
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def one() -> None:
            async with sem:
                try:
                    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
                    line = await asyncio.wait_for(r.readline(), 30)
                except (OSError, TimeoutError):
                    return
                if line.startswith(b"220"):
                    conns.append((r, w))
                else:
                    w.close()

        await asyncio.gather(*(one() for _ in range(count)))
        await asyncio.sleep(settle)
        alive = sum(1 for r, _w in conns if not r.at_eof())
        value = await asyncio.get_running_loop().run_in_executor(None, measure)
        for _r, w in conns:
            w.transport.abort()
        await asyncio.sleep(0.5)
        return alive, value

    return _run(main)


def pop3_download(host: str, port: int, user: str, password: str) -> tuple[int, int, float]:
    """(messages, bytes received, seconds) for login, LIST, RETR all, DELE all, QUIT."""
    t0 = time.perf_counter()
    pop = poplib.POP3(host, port, timeout=120)
    pop.user(user)
    pop.pass_(password)
    _resp, listing, _ = pop.list()
    nums = [int(line.split()[0]) for line in listing]
    total = 0
    for n in nums:
        _r, _lines, octets = pop.retr(n)
        total += octets
    for n in nums:
        pop.dele(n)
    pop.quit()
    return len(nums), total, time.perf_counter() - t0


def _run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False
