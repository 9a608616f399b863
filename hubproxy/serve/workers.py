"""`serve --workers N`: N processes serving one port (SO_REUSEPORT, the kernel spreads connections)
and one cache (single flight across them: cache/flightlocks.py), under a parent that starts them,
restarts one that dies, and passes a stop signal on.

Invariants: "listening" is announced once every worker accepts connections; each worker is a
fresh interpreter (spawn, never fork), so no lock, thread or sqlite handle is shared; metrics are
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
from multiprocessing.connection import Connection, wait
from typing import Callable

from .. import metrics
from ..config import Settings

log = logging.getLogger(__name__)

_spawn = multiprocessing.get_context("spawn")


class WorkerFailed(Exception):
    """A worker could not start; the message is its own one-line reason."""


def serve_with_workers(settings: Settings, announce: Callable[[str], None],
                       worker: Callable[[Settings, Callable[[str], None]], None], reservation: socket.socket) -> None:
    """Run settings.workers processes of worker(settings, tell) until SIGINT/SIGTERM, then stop them
    and wait for them. worker (a module-level function: it is pickled) serves on a SO_REUSEPORT
    socket and tells the URL it listens on, or "error: " and why it cannot. reservation: a socket
    bound with SO_REUSEPORT to settings.listen (bound_socket), which holds the port for them all
    (and resolves port 0); closed at the end."""
    workers: dict[int, tuple[multiprocessing.Process, Connection]] = {}
    with contextlib.ExitStack() as undo:  # on the way out, last first: workers stopped, then the rest
        undo.enter_context(reservation)
        settings = _on_port(settings, *reservation.getsockname()[:2])  # port 0 resolved
        stop = _StopSignals(again=lambda: _signal_all(workers))
        undo.callback(stop.restore)
        undo.enter_context(metrics.shared_by_processes())
        undo.callback(_stop_all, workers)
        for number in range(settings.workers):
            workers[number] = _started(worker, settings, number)
        url = ""
        for process, ready in workers.values():
            url = _wait_until_listening(process, ready)
        announce(url)
        _supervise(worker, settings, workers, stop)


def _on_port(settings: Settings, host: str, port: int) -> Settings:
    return dataclasses.replace(settings, listen=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def _started(worker, settings: Settings, number: int) -> tuple[multiprocessing.Process, Connection]:
    ours, theirs = _spawn.Pipe(duplex=False)
    process = _spawn.Process(target=_run, args=(worker, settings, theirs), name=f"hubproxy worker {number}")
    process.start()
    theirs.close()
    return process, ours


def _wait_until_listening(process: multiprocessing.Process, ready: Connection) -> str:
    """The URL the worker listens on, once it does; WorkerFailed with its reason when it exits first."""
    try:
        message = ready.recv()
    except EOFError:
        process.join()
        raise WorkerFailed(f"a worker exited with status {process.exitcode} before it listened") from None
    if message.startswith("error: "):
        process.join()
        raise WorkerFailed(message.removeprefix("error: "))
    return message


def _supervise(worker, settings: Settings, workers: dict, stop: "_StopSignals") -> None:
    """Until a stop signal: replace a worker that dies (it is the one it was: same number)."""
    while not stop.received:
        sentinels = {process.sentinel: number for number, (process, _) in workers.items()}
        for sentinel in wait([*sentinels, stop.reader], timeout=None):
            number = sentinels.get(sentinel)
            if number is None or stop.received:
                continue
            process, ready = workers[number]
            process.join()
            ready.close()
            metrics.process_gone(process.pid)
            log.warning("worker %d (pid %d) exited with status %s; starting another", number, process.pid,
                        process.exitcode)
            workers[number] = _started(worker, settings, number)
            _wait_until_listening(*workers[number])


def _stop_all(workers: dict) -> None:
    """SIGTERM to every worker (each drains itself), then wait for them all."""
    _signal_all(workers)
    for process, ready in workers.values():
        process.join()
        ready.close()


def _signal_all(workers: dict) -> None:
    for process, _ in workers.values():
        if process.is_alive():
            process.terminate()  # SIGTERM: the first drains a worker, the next cuts its drain short


class _StopSignals:
    """SIGINT/SIGTERM noted (and the supervisor woken through a pipe) instead of raised; each one
    after the first is passed on at once (again()), so a second Ctrl-C cuts the workers' drain."""

    def __init__(self, again) -> None:
        self.received = False
        self._again = again
        self.reader, self._writer = _spawn.Pipe(duplex=False)
        self._previous = {signum: signal.signal(signum, self._note) for signum in (signal.SIGINT, signal.SIGTERM)}

    def _note(self, signum, frame) -> None:
        if self.received:
            self._again()
            return
        self.received = True
        self._writer.send(signum)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _run(worker, settings: Settings, ready: Connection) -> None:
    """A worker process: a terminal's Ctrl-C reaches the parent too, which stops the workers with
    SIGTERM (until the worker heeds its own signals, a SIGINT would kill it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker(settings, ready.send)
