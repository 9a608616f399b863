"""Command line: `hubproxy serve` (more commands join as the project grows).

Invariants: every failure the operator can cause ends in a one-line message and exit status 2,
never a traceback; flags override HUBPROXY_* variables, which override the TOML file.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import click
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import __version__
from .config import ConfigError, Settings, load_settings
from .server import create_app

log = logging.getLogger("hubproxy")


@click.group()
@click.version_option(__version__, prog_name="hubproxy")
def main() -> None:
    """hubproxy: a caching mirror for TensorFlow Hub model archives."""


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML settings file.")
@click.option("--listen", help="HOST:PORT to serve on (port 0 picks a free one).  [default: 127.0.0.1:8080]")
@click.option("--cache-dir", help="Where archives and the index live.  [default: ~/.cache/hubproxy]")
@click.option("--upstream", "upstreams", multiple=True, metavar="NAME=URL",
              help="Upstream base URL: tfhub=, kaggle= or gcs=. Repeatable.")
@click.option("--allow-redirect-host", "allow_redirect_hosts", multiple=True, metavar="HOST[:PORT]",
              help="A host upstream redirects may lead to. Repeatable; replaces the default list.")
@click.option("--retries", type=int, help="Extra attempts on 429/5xx/connection errors.  [default: 3]")
@click.option("--backoff-seconds", type=float, help="First retry delay, doubled each time.  [default: 0.5]")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def serve(config_file, **flags) -> None:
    """Serve the mirror until interrupted."""
    settings = _settings_or_exit(config_file, flags)
    _configure_logging(settings.log_level)
    try:
        asyncio.run(_serve(settings))
    except OSError as e:
        raise click.ClickException(f"cannot serve on {settings.listen}: {e.strerror or e}") from None


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.server").addFilter(_one_line_bad_requests)


def _one_line_bad_requests(record: logging.LogRecord) -> bool:
    """aiohttp logs a traceback for every malformed request; a client's mistake deserves one line,
    without the offending bytes (they may hold a client's credentials)."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg, record.args = "refused a malformed request: %s (%s)", (type(error).__name__, error.code)
        record.exc_info = record.exc_text = None
    return True


def _settings_or_exit(config_file, flags) -> Settings:
    try:
        return load_settings(config_file=config_file, overrides=flags)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


async def _serve(settings: Settings) -> None:
    runner = web.AppRunner(create_app(settings), access_log_format='%a "%r" %s %b %Tfs X-Cache=%{X-Cache}o')
    await runner.setup()
    site = web.TCPSite(runner, settings.listen_host, settings.listen_port)
    await site.start()
    host, port = runner.addresses[0][:2]
    click.echo(f"hubproxy {__version__} listening on http://{host}:{port} (cache {settings.cache_path})", )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
