"""The listening socket's accept loop: each new connection is offered first to a quick answer
(quickhits.py), and otherwise becomes an asyncio transport with the front's protocol, as
loop.create_server would make it.

Invariants: the kernel hands over a connection only once its first bytes have arrived, or after
DEFER_SECONDS of silence (TCP_DEFER_ACCEPT, nginx's `deferred`), so a connection's first request
is usually readable at accept; a connection the quick answer declines is passed on with nothing
read from it; accept() failing for want of descriptors or memory pauses accepting for
RETRY_SECONDS and is logged once per burst; after close() no connection is accepted.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Callable

from .fdtable import Burst

DEFER_SECONDS = 1  # the kernel rounds it to whole SYN-ACK retransmissions: one, about a second
RETRY_SECONDS = 1.0  # asyncio's own pause after such a failure (constants.ACCEPT_RETRY_DELAY)
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Door:
    """Accepts on a listening, non-blocking socket until closed. `quick(sock, peer)` answers the
    connection itself and returns True, or returns False having read nothing; it gets the socket as
    accepted, in blocking mode, so it must not wait (MSG_DONTWAIT) until it has made it non-blocking
    (one system call fewer before the answer's first bytes). `factory` makes the protocol of every
    connection it declines."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol], backlog: int,
                 quick: Callable[[socket.socket, tuple], bool]):
        self._sock, self._factory, self._backlog, self._quick = sock, factory, backlog, quick
        self._loop = asyncio.get_running_loop()
        self._trouble = Burst("cannot accept connections")
        self._retry: asyncio.TimerHandle | None = None
        self._handovers: set[asyncio.Task] = set()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_SECONDS)
        self._loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        """Accept no more: the socket closes, so new connections are refused."""
        if self._sock.fileno() < 0:
            return
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def _accept(self) -> None:
        for _ in range(self._backlog):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                if e.errno not in _OUT_OF_RESOURCES:
                    raise
                self._pause(e)
                return
            if not self._quick(conn, peer):
                conn.setblocking(False)
                self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        task = self._loop.create_task(self._become_transport(conn))
        self._handovers.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._handovers.discard)

    async def _become_transport(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:
            conn.close()  # the client left before its transport was made

    def _pause(self, error: OSError) -> None:
        self._trouble.happened(f"{error.strerror or error}; retrying")
        self._loop.remove_reader(self._sock.fileno())
        self._retry = self._loop.call_later(RETRY_SECONDS, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if self._sock.fileno() >= 0:
            self._loop.add_reader(self._sock.fileno(), self._accept)
