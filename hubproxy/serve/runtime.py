"""Running the server: the listening socket, aiohttp's runner with the JSON access log, and a
clean stop on SIGTERM/SIGINT.

Invariants: the "listening on URL" line is printed only once the socket accepts connections;
every connection is accepted by door.Door, and is answered by quickhits.QuickHits (a new
connection's plain GET of a cached archive) or passes through front.Connection (head deadline),
both under one connection cap, in both modes;
on a stop signal the connections drain (drain.py), then the components stop (hit counts are
written), and buffered access lines are flushed last; a malformed request costs one log line,
never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing.connection
import socket
import ssl
from typing import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..config import Settings
from ..tls import authority
from ..tls.leaves import Leaves
from . import accesslog, fdtable
from .app import create_app
from .components import METRICS
from .door import Door
from .drain import StopSignals, drain_when_signalled
from .front import Connection, Table
from .intercept import Doors, ProxyFront
from .lifecycle import LIFECYCLE
from .quickhits import QuickHits

log = logging.getLogger(__name__)

BACKLOG = 128
# After a drain, how long aiohttp gives a handler whose connection was cut to notice before it is
# cancelled (a miss's reader looks every misses.CLIENT_CHECK_SECONDS).
CUT_HANDLERS_SECONDS = 5.0


def quiet_malformed_requests() -> None:
    """aiohttp logs a traceback for every malformed request; a client's mistake deserves one line,
    without the offending bytes (they may hold a client's credentials)."""
    logging.getLogger("aiohttp.server").addFilter(_one_line_bad_requests)


def _one_line_bad_requests(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "refused a malformed request: %s (%s)", (type(error).__name__, error.code)
        record.exc_info = record.exc_text = None
    return True


def interception_contexts(settings: Settings) -> Callable[[str], ssl.SSLContext]:
    """host → the TLS context that presents our leaf for it; raises authority.CAError (one line)."""
    return Leaves(authority.load(settings.ca_path)).context_for


def bound_socket(settings: Settings, reuse_port: bool = False, port: int | None = None) -> socket.socket:
    """A socket bound to settings.listen (port 0 picks a free one; port: this one instead); reuse_port:
    others may bind the same port (SO_REUSEPORT: serve --workers), the kernel spreading connections
    over them."""
    family = socket.AF_INET6 if ":" in settings.listen_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((settings.listen_host, settings.listen_port if port is None else port))
    except BaseException:
        sock.close()
        raise
    return sock


def reserved_socket(settings: Settings) -> socket.socket:
    """serve --workers' hold on settings.listen: bound with SO_REUSEPORT for its workers to share,
    once a plain socket has been bound there, which fails (EADDRINUSE) where anyone listens already,
    even another serve --workers of this user that SO_REUSEPORT alone would let share the port."""
    with bound_socket(settings) as plain:  # and port 0 picks a free one for the reservation
        return bound_socket(settings, reuse_port=True, port=plain.getsockname()[1])


def listening(sock: socket.socket) -> socket.socket:
    """sock (from bound_socket), listening and non-blocking."""
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def connection_table(settings: Settings) -> Table:
    """The table of client connections, capped below the open-file limit (raised to its maximum first)."""
    fd_limit = fdtable.raise_soft_limit()
    cap = settings.max_connections or fdtable.connection_cap(fd_limit)
    log.debug("open-file limit %d: at most %d client connections", fd_limit, cap)
    return Table(cap)


def _aiohttp_first(server: web.Server, connection: Connection) -> asyncio.Protocol:
    return server()


def app_runner(settings: Settings, access_log: accesslog.AccessLog) -> web.AppRunner:
    """aiohttp's runner of the app, with the access log and the idle keep-alive timeout of settings
    (aiohttp's own default keeps an idle connection for an hour); a drain's cut handlers get
    CUT_HANDLERS_SECONDS to end."""
    return web.AppRunner(create_app(settings), access_log_class=access_log.aiohttp_logger_class(),
                         access_log=logging.getLogger("hubproxy.access"),
                         keepalive_timeout=settings.keepalive_timeout_seconds,
                         shutdown_timeout=CUT_HANDLERS_SECONDS)


async def serve_until_stopped(settings: Settings, announce: Callable[[str], None],
                              orders: multiprocessing.connection.Connection | None = None,
                              sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then drain; `announce` gets the URL once connections are accepted.
    orders: one of serve --workers' processes (serve/workers.py), which shares its port (SO_REUSEPORT)
    and stops on its parent's orders read from this pipe, never on a signal (drain.StopSignals).
    sock: bound already (else bound here); closed at the end."""
    signals = StopSignals(orders)
    access_log = accesslog.AccessLog(enabled=logging.getLogger("hubproxy").isEnabledFor(logging.INFO))
    runner = app_runner(settings, access_log)
    app = runner.app
    await runner.setup()
    listener = None
    try:
        contexts = interception_contexts(settings) if settings.intercept else None
        sock = listening(sock or bound_socket(settings, reuse_port=orders is not None))
        first = functools.partial(_aiohttp_first, runner.server)
        if contexts is not None:  # the same port is also a forward proxy for the hub hosts
            first = functools.partial(ProxyFront, Doors(runner.server, contexts, settings.tunnel, app[METRICS]))
        table, header_timeout = connection_table(settings), settings.header_timeout_seconds
        listener = Door(sock, lambda: Connection(table, header_timeout, first), BACKLOG,
                        QuickHits(app, table, access_log))
        host, port = sock.getsockname()[:2]
        announce(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
        await drain_when_signalled(signals, listener, table, app[LIFECYCLE], settings.drain_timeout_seconds)
    finally:
        if listener is not None:
            listener.close()
        await runner.cleanup()
        access_log.flush()
    log.info("stopped")
