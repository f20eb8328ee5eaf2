"""Which worker gets the next connection: one worker while the server is nearly idle, any of
them once it is busy.

With ``workers`` > 1 every worker listens on its own copy of each endpoint (``SO_REUSEPORT``,
server/workers.py) and the kernel picks one copy per new connection. By default it picks by a
hash of the connection's addresses, so one client connecting again and again is served by
each worker in turn. Measured on the 2-CPU reference machine with smtp-source at one session
(one connection at a time, each with its own message): two workers served 330-400 msg/s while
one worker alone served 400-540, at 1.7-1.9 against 1.1-1.5 ms of CPU per message. A worker
that was idle since the connection before last starts cold; the same two workers with every
connection sent to one of them were as fast as one worker. Once several connections overlap,
spreading them is what the workers are for.

So the kernel is told what to do with a classic BPF program on the reuseport group
(``SO_ATTACH_REUSEPORT_CBPF``; its return value is the index of the socket that gets the
connection, in the order the sockets joined the group, which is the workers' order since
server/workers.py binds the copies in that order):

* **concentrate** (``return n-1``): every new connection goes to the last worker, while the
  whole server holds at most one connection. The last one, not the first: the first runs the
  queue scheduler, and a submitted message is then received by one process and sent on by
  the other.
* **spread** (``return random % n``): as the default hash, once the server holds
  :data:`SPREAD_AT` connections or more; back to concentrate when it holds at most one.

Only the last worker switches (it sees every connection while concentrating, and enough of
them while spreading): an attach is a ``setsockopt`` of about 25 µs per listening endpoint,
done at a switch only, never per connection. If the last worker dies, the supervisor sets
spread (:func:`spread_all`), so no connection waits for a worker that is being restarted
when another one could take it. Linux only; where the option is refused, nothing is done
and the kernel's hash stays in charge.
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Iterable

SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)  # <asm-generic/socket.h>
SPREAD_AT = 3  # connections held by the whole server from which they are spread
CONCENTRATE_AT = 1  # and back to one worker at this many or fewer

# Classic BPF (linux/filter.h): struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}.
_BPF_RET_K = 0x06  # BPF_RET | BPF_K: return k
_BPF_RET_A = 0x16  # BPF_RET | BPF_A: return the accumulator
_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS: A = word at k (here an ancillary value)
_BPF_ALU_MOD_K = 0x94  # BPF_ALU | BPF_MOD | BPF_K: A %= k
_SKF_AD_RANDOM = (-0x1000 + 56) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_RANDOM: a random u32


class _Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Filter))]


class Program:
    """A classic BPF program in memory, as ``setsockopt`` takes it (the kernel copies it)."""

    def __init__(self, instructions: list[tuple[int, int]]) -> None:
        self._code = (_Filter * len(instructions))(*[_Filter(code, 0, 0, k) for code, k in instructions])
        self.fprog = bytes(_Fprog(len(instructions), ctypes.cast(self._code, ctypes.POINTER(_Filter))))

    def attach(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, self.fprog)


def to_worker(index: int) -> Program:
    return Program([(_BPF_RET_K, index)])


def at_random(workers: int) -> Program:
    return Program([(_BPF_LD_W_ABS, _SKF_AD_RANDOM), (_BPF_ALU_MOD_K, workers), (_BPF_RET_A, 0)])


def spread_all(socks: Iterable[socket.socket], workers: int) -> None:
    """Spread connections over every worker's socket of the groups of ``socks`` (the
    supervisor, when the steering worker died). Errors are ignored: the program in place stays."""
    _attach_all(at_random(workers), socks)


def _attach_all(program: Program, socks: Iterable[socket.socket]) -> None:
    for sock in socks:
        try:
            program.attach(sock)
        except OSError:
            pass


class Steering:
    """Switches the reuseport groups of ``socks`` (one socket per listening endpoint, any of
    the group's) between "all to worker ``target``" and "spread over ``workers``"."""

    def __init__(self, socks: list[socket.socket], target: int, workers: int) -> None:
        self.socks = socks
        self.concentrate = to_worker(target)
        self.spread = at_random(workers)
        self.spreading: bool | None = None  # unknown until the first switch
        self.failed = False

    def release(self) -> None:
        """Spread again and let the sockets go (this worker is stopping)."""
        if not self.failed:
            _attach_all(self.spread, self.socks)
        for sock in self.socks:
            sock.close()

    def update(self, connections: int) -> None:
        """Called with the whole server's connection count whenever this worker's changes."""
        if self.failed:
            return
        if connections >= SPREAD_AT:
            if self.spreading is not True:
                self._attach(self.spread, True)
        elif connections <= CONCENTRATE_AT and self.spreading is not False:
            self._attach(self.concentrate, False)

    def _attach(self, program: Program, spreading: bool) -> None:
        try:
            for sock in self.socks:
                program.attach(sock)
        except OSError:  # not Linux, an old kernel, a sandbox refusing BPF: stop trying
            self.failed = True
            # Never leave some endpoint sending everything to one worker: spread what can be.
            _attach_all(self.spread, self.socks)
            return
        self.spreading = spreading
