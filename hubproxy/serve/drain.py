"""Stopping on SIGTERM or SIGINT: the first signal starts a drain, the next one cuts it short.

Invariants: from the first signal, /readyz says 503 and the listener is closed (a new connection is
refused); idle connections close at once and busy ones after their current response, each
transfer running to its end (a miss's flight with it) until drain_timeout, when what is left is
cut, as it is at once by a second signal; either way one line says how many were cut, the caller
then stops the components, and the exit status is 0: the stop was asked for. A process needs
nothing else to drain: a worker (serve --workers) heeds no signal, only its parent's orders (each
one a stop signal the parent got, passed on through a pipe), and stops as well when that pipe ends.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from multiprocessing.connection import Connection

from .front import Table
from .lifecycle import Lifecycle

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PARENT_GONE = "the parent's exit"  # what a worker stops on when its orders end


class StopSignals:
    """SIGTERM and SIGINT as they arrive, counted; installed before anything is served, so a stop
    asked for during start-up is a drain of nothing rather than death by the default handler.
    orders: instead, the read end of a pipe from serve --workers' parent, which sends each stop
    signal it gets there (its number); its end (the parent is gone) is a stop too, unless one came
    first."""

    def __init__(self, orders: Connection | None = None) -> None:
        self.received: list[str] = []
        self._arrived = asyncio.Event()
        loop = asyncio.get_running_loop()
        if orders is not None:
            loop.add_reader(orders.fileno(), self._read_order, loop, orders)
            return
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._arrive, signal.Signals(signum).name)

    def _read_order(self, loop: asyncio.AbstractEventLoop, orders: Connection) -> None:
        try:
            self._arrive(signal.Signals(orders.recv()).name)
        except EOFError:  # only the parent holds the write end: it has ended, however abruptly
            loop.remove_reader(orders.fileno())
            if not self.received:
                self._arrive(PARENT_GONE)

    def _arrive(self, name: str) -> None:
        self.received.append(name)
        self._arrived.set()

    async def count(self, n: int) -> str:
        """The name of the n-th signal, once it has arrived."""
        while len(self.received) < n:
            await self._arrived.wait()
            self._arrived.clear()
        return self.received[n - 1]


async def drain_when_signalled(signals: StopSignals, listener: asyncio.Server, table: Table,
                               lifecycle: Lifecycle, timeout: float) -> None:
    """After the first stop signal: refuse new connections, let busy ones finish within timeout (or
    until the next signal), then cut what is left."""
    first = await signals.count(1)
    lifecycle.drain(f"stopping on {first}")
    listener.close()
    busy = table.drain()
    log.info("stopping on %s: new connections refused, %d busy connections may finish within %gs "
             "(drain_timeout; a second signal cuts them now)", first, busy, timeout)
    finished = asyncio.ensure_future(table.all_closed())
    again = asyncio.ensure_future(signals.count(2))
    try:
        done, _ = await asyncio.wait((finished, again), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in (finished, again):
            waiter.cancel()
    if finished in done:
        log.info("drained: every connection finished")
    elif again in done:
        log.warning("second stop signal (%s): cut %d busy connections", again.result(), table.cut())
    else:
        log.warning("drain_timeout (%gs) passed: cut %d busy connections", timeout, table.cut())
