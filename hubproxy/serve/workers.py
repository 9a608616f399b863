"""`serve --workers N`: N processes serving one port (SO_REUSEPORT, the kernel spreads connections)
and one cache (single flight across them: cache/flightlocks.py), under a parent that starts them,
restarts one that dies, and passes its stop signals on.

Invariants: "listening" is announced once every worker accepts connections; each worker is a
fresh interpreter (spawn, never fork), so no lock, thread or sqlite handle is shared; a worker
heeds no signal (one sent to the whole process group reaches the parent too): it stops on its
parent's orders, each stop signal the parent gets passed on through a pipe whose write end only
the parent holds, so that the parent's end, however abrupt, stops the workers too; metrics are
the sum over the live workers (prometheus_client's multiprocess mode, in a directory of the
parent's that it removes at exit); a worker that fails before it listens stops them all, with its
one-line reason, and a worker that dies later is replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import signal
import socket
from collections.abc import Callable
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait

from .. import metrics
from ..config import Settings
from .drain import STOP_SIGNALS

log = logging.getLogger(__name__)

_spawn = multiprocessing.get_context("spawn")


class WorkerFailed(Exception):
    """A worker could not start; the message is its own one-line reason."""


@dataclasses.dataclass
class _Worker:
    """A worker process; `ready` brings its announcement, `orders` takes the parent's stop signals."""
    process: multiprocessing.Process
    ready: Connection
    orders: Connection

    def order(self, signum: int) -> None:
        """Pass a stop signal on: the first drains the worker, the next cuts its drain short."""
        with contextlib.suppress(OSError):  # it has ended already (or its orders are closed)
            self.orders.send(signum)

    def end(self) -> None:
        self.process.join()
        self.ready.close()
        self.orders.close()


def serve_with_workers(settings: Settings, announce: Callable[[str], None],
                       worker: Callable[[Settings, Callable[[str], None], Connection], None],
                       reservation: socket.socket) -> None:
    """Run settings.workers processes of worker(settings, tell, orders) until SIGINT/SIGTERM, then
    stop them and wait for them. worker (a module-level function: it is pickled) serves on a
    SO_REUSEPORT socket, tells the URL it listens on, or "error: " and why it cannot, and stops on
    the orders it reads from the pipe `orders` (drain.StopSignals). reservation: a socket bound with
    SO_REUSEPORT to settings.listen (runtime.reserved_socket), which holds the port for them all (and resolves
    port 0); closed at the end."""
    workers: dict[int, _Worker] = {}
    with contextlib.ExitStack() as undo:  # on the way out, last first: workers stopped, then the rest
        undo.enter_context(reservation)
        settings = _on_port(settings, *reservation.getsockname()[:2])  # port 0 resolved
        stop = _StopSignals(again=lambda signum: _order_all(workers, signum))
        undo.callback(stop.restore)
        undo.enter_context(metrics.shared_by_processes())
        undo.callback(_stop_all, workers, stop)
        for number in range(settings.workers):
            workers[number] = _started(worker, settings, number)
        url = ""
        for started in workers.values():
            url = _wait_until_listening(started)
        announce(url)
        _supervise(worker, settings, workers, stop)


def _on_port(settings: Settings, host: str, port: int) -> Settings:
    return dataclasses.replace(settings, listen=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def _started(worker, settings: Settings, number: int) -> _Worker:
    ready, ready_theirs = _spawn.Pipe(duplex=False)
    orders_theirs, orders = _spawn.Pipe(duplex=False)
    process = _spawn.Process(target=_run, args=(worker, settings, ready_theirs, orders_theirs),
                             name=f"hubproxy worker {number}")
    with _stop_signals_held():
        process.start()
    ready_theirs.close()
    orders_theirs.close()
    return _Worker(process, ready, orders)


@contextlib.contextmanager
def _stop_signals_held():
    """SIGTERM and SIGINT held back while a worker is started: it inherits the mask, so that one
    sent to the process group while it starts waits until it ignores them (here it comes after)."""
    resource_tracker.ensure_running()  # which unblocks them as it starts itself
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _wait_until_listening(worker: _Worker) -> str:
    """The URL the worker listens on, once it does; WorkerFailed with its reason when it exits first."""
    try:
        message = worker.ready.recv()
    except EOFError:
        worker.process.join()
        raise WorkerFailed(f"a worker exited with status {worker.process.exitcode} before it listened") from None
    if message.startswith("error: "):
        worker.process.join()
        raise WorkerFailed(message.removeprefix("error: "))
    return message


def _supervise(worker, settings: Settings, workers: dict[int, _Worker], stop: _StopSignals) -> None:
    """Until a stop signal: replace a worker that dies (it is the one it was: same number)."""
    while not stop.received:
        sentinels = {started.process.sentinel: number for number, started in workers.items()}
        for sentinel in wait([*sentinels, stop.reader], timeout=None):
            number = sentinels.get(sentinel)
            if number is None or stop.received:
                continue
            dead = workers[number]
            dead.end()
            metrics.process_gone(dead.process.pid)
            log.warning("worker %d (pid %d) exited with status %s; starting another", number, dead.process.pid,
                        dead.process.exitcode)
            workers[number] = _started(worker, settings, number)
            _wait_until_listening(workers[number])


def _stop_all(workers: dict[int, _Worker], stop: _StopSignals) -> None:
    """Every worker told to stop (drain) and waited for: with the parent's first stop signal, or,
    when the parent ends for another reason (a worker failed to start), by the end of its orders."""
    for started in workers.values():
        if stop.first is None:
            started.orders.close()
        else:
            started.order(stop.first)
    for started in workers.values():
        started.end()


def _order_all(workers: dict[int, _Worker], signum: int) -> None:
    for started in list(workers.values()):
        started.order(signum)


class _StopSignals:
    """SIGINT/SIGTERM noted (and the supervisor woken through a pipe) instead of raised; each one
    after the first is passed on at once (again(signum)), so a second Ctrl-C cuts the workers' drain."""

    def __init__(self, again: Callable[[int], None]) -> None:
        self.first: int | None = None
        self._again = again
        self.reader, self._writer = _spawn.Pipe(duplex=False)
        self._previous = {signum: signal.signal(signum, self._note) for signum in STOP_SIGNALS}

    @property
    def received(self) -> bool:
        return self.first is not None

    def _note(self, signum, frame) -> None:
        if self.received:
            self._again(signum)
            return
        self.first = signum
        self._writer.send(signum)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _run(worker, settings: Settings, ready: Connection, orders: Connection) -> None:
    """A worker process: SIGTERM and SIGINT ignored (they come held back, _stop_signals_held), for
    one sent to the whole process group (systemd's control-group kill, a terminal's Ctrl-C) reaches
    the parent too, which passes each one on as an order."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    worker(settings, ready.send, orders)
