"""`hubproxy serve`: run the mirror."""

from __future__ import annotations

import asyncio

import click

from .. import __version__
from ..config import MODES
from ..serve.runtime import quiet_malformed_requests, serve_until_stopped
from .common import config_option, configure_logging, opened_cache, settings_or_exit
from .failures import fail, reason


@click.command()
@config_option()
@click.option("--listen", help="HOST:PORT to serve on (port 0 picks a free one).  [default: 127.0.0.1:8080]")
@click.option("--cache-dir", help="Where archives and the index live.  [default: ~/.cache/hubproxy]")
@click.option("--upstream", "upstreams", multiple=True, metavar="NAME=URL",
              help="Upstream base URL: tfhub=, kaggle= or gcs=. Repeatable.")
@click.option("--allow-redirect-host", "allow_redirect_hosts", multiple=True, metavar="HOST[:PORT]",
              help="A host upstream redirects may lead to. Repeatable; replaces the default list.")
@click.option("--retries", type=int, help="Extra attempts on 429/5xx/connection errors.  [default: 3]")
@click.option("--backoff-seconds", type=float, help="First retry delay, doubled each time.  [default: 0.5]")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--max-size", help="Evict least recently used entries above SIZE (200G).")
@click.option("--min-free", help="Evict when the cache's disk has less than SIZE free.")
@click.option("--mode", type=click.Choice(MODES),
              help="offline never contacts upstream (a miss is a 504).  [default: online]")
def serve(config_file, **flags) -> None:
    """Serve the mirror until interrupted."""
    settings = settings_or_exit(config_file, flags)
    with opened_cache(settings.cache_path, must_exist=False):
        pass  # a cache dir that cannot be opened is named here, before anything listens
    configure_logging(settings.log_level)
    quiet_malformed_requests()

    def announce(url: str) -> None:
        click.echo(f"hubproxy {__version__} listening on {url} (cache {settings.cache_path})")

    try:
        asyncio.run(serve_until_stopped(settings, announce))
    except OSError as e:
        fail(reason(e) if e.filename else f"cannot serve on {settings.listen}: {e.strerror or e}")
