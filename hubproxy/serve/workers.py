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
one-line reason, and a worker that dies later is replaced (its replacement, if it cannot start,
tried again and again, while the others serve).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait

from .. import metrics
from ..config import Settings
from .drain import STOP_SIGNALS

log = logging.getLogger(__name__)

_spawn = multiprocessing.get_context("spawn")
RETRY_FIRST_SECONDS = 1.0  # a replacement that cannot start is tried again this much later,
RETRY_MAX_SECONDS = 60.0  # then twice as long each time, up to this


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
    SO_REUSEPORT to settings.listen (runtime.reserved_socket), which holds the port for them all
    (and resolves port 0); closed at the end."""
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
        urls = [_wait_until_listening(started, stop) for started in workers.values()]
        if not stop.received:  # else the workers stop, those still starting as soon as they can
            announce(urls[-1])
            _Supervisor(worker, settings, workers, stop).run()


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
    sent to the process group as it starts waits until it ignores them (_run); the parent's own
    copy is delivered once they are unblocked here."""
    resource_tracker.ensure_running()  # which unblocks them as it starts itself
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _wait_until_listening(worker: _Worker, stop: _StopSignals) -> str | None:
    """The URL the worker listens on, once it does, or None when a stop signal comes first;
    WorkerFailed with its reason when it exits first."""
    wait([worker.ready, stop.reader])
    return None if stop.received else _announcement(worker)


def _announcement(worker: _Worker) -> str:
    """The URL a worker that has spoken (or exited) announced; WorkerFailed with its reason if none."""
    try:
        message = worker.ready.recv()
    except EOFError:
        worker.process.join()
        raise WorkerFailed(f"a worker exited with status {worker.process.exitcode} before it listened") from None
    if message.startswith("error: "):
        worker.process.join()
        raise WorkerFailed(message.removeprefix("error: "))
    return message


class _Supervisor:
    """Until a stop signal: a worker that dies is replaced (it is the one it was: same number); a
    replacement that cannot start is logged and tried again RETRY_FIRST_SECONDS later, then twice
    as long each time up to RETRY_MAX_SECONDS, the others serving meanwhile. It waits on them all
    and on the stop signal at once: a stop is never held up by a worker still starting."""

    def __init__(self, worker, settings: Settings, workers: dict[int, _Worker], stop: _StopSignals) -> None:
        self.worker, self.settings, self.workers, self.stop = worker, settings, workers, stop
        self.starting: set[int] = set()
        self.delays: dict[int, float] = {}  # number → how long after its next failure it is tried again
        self.due: dict[int, float] = {}  # number → when (time.monotonic) it is tried again

    def run(self) -> None:
        while not self.stop.received:
            events = {self.stop.reader: None}
            for number, started in self.workers.items():
                events[started.ready if number in self.starting else started.process.sentinel] = number
            for event in wait(list(events), self._until_due()):
                number = events[event]
                if number is None or self.stop.received:
                    continue
                if number in self.starting:
                    self._heard_from(number)
                else:
                    self._died(number)
            for number in [number for number, when in self.due.items() if when <= time.monotonic()]:
                if not self.stop.received:
                    del self.due[number]
                    self._start(number)

    def _until_due(self) -> float | None:
        return max(0.0, min(self.due.values()) - time.monotonic()) if self.due else None

    def _start(self, number: int) -> None:
        self.workers[number] = _started(self.worker, self.settings, number)
        self.starting.add(number)

    def _ended(self, number: int) -> _Worker:
        ended = self.workers.pop(number)
        ended.end()
        metrics.process_gone(ended.process.pid)
        return ended

    def _died(self, number: int) -> None:
        dead = self._ended(number)
        log.warning("worker %d (pid %d) exited with status %s; starting another", number, dead.process.pid,
                    dead.process.exitcode)
        self._start(number)

    def _heard_from(self, number: int) -> None:
        self.starting.discard(number)
        try:
            _announcement(self.workers[number])
        except WorkerFailed as e:
            self._ended(number)
            delay = self.delays.get(number, RETRY_FIRST_SECONDS)
            self.delays[number] = min(delay * 2, RETRY_MAX_SECONDS)
            self.due[number] = time.monotonic() + delay
            log.warning("worker %d could not start: %s; trying again in %gs", number, e, delay)
            return
        self.delays.pop(number, None)
        log.info("worker %d (pid %d) listening again", number, self.workers[number].process.pid)


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
