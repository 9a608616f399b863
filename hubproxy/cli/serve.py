"""`hubproxy serve`: run the mirror."""

from __future__ import annotations

import asyncio

import click

from .. import __version__
from ..config import MAX_WORKERS, MODES, Settings
from ..serve.runtime import bound_socket, quiet_malformed_requests, reserved_socket, serve_until_stopped
from ..serve.workers import WorkerFailed, serve_with_workers
from ..tls.authority import CAError
from .common import configure_logging, opened_cache, setting_option, settings_or_exit, upstream_options
from .failures import fail, reason


@click.command()
@setting_option("--listen", "listen", "HOST:PORT to serve on (port 0 picks a free one).", "127.0.0.1:8080")
@setting_option("--cache-dir", "cache_dir", "Where archives and the index live.", "~/.cache/hubproxy")
@upstream_options
@setting_option("--parent", "parents", "A hubproxy to fetch through instead of the upstreams (a regional cache). "
                "Repeatable: tried in order, the next when one is down; then the request fails.", multiple=True,
                metavar="URL")
@setting_option("--retries", "retries", "Extra attempts on 429/5xx/connection errors.", "3", type=int)
@setting_option("--backoff-seconds", "backoff_seconds", "First retry delay, doubled each time.", "0.5",
                type=float)
@setting_option("--upstream-resumes", "upstream_resumes", "Times one fetch cut mid-body (or stalled) is resumed "
                "from the byte it broke at (Range + If-Match), before its clients are cut.", "3", type=int)
@setting_option("--upstream-min-rate", "upstream_min_rate", "A body arriving slower than SIZE per second over "
                "--upstream-rate-window has stalled: resumed, then failed (0B: no floor).", "64K", metavar="SIZE")
@setting_option("--upstream-rate-window", "upstream_rate_window", "The time over which --upstream-min-rate is "
                "judged; a unit is required (30s, 1m).", "30s", metavar="DURATION")
@setting_option("--upstream-headers-deadline", "upstream_headers_deadline", "How long an upstream answer's "
                "headers may take, redirects and retries included, before the request is a 504 (0s: none).", "60s",
                metavar="DURATION")
@setting_option("--log-level", "log_level", "How much to log (access lines are INFO).", "INFO",
                type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@setting_option("--max-size", "max_size", "Evict least recently used entries above SIZE (200G).", metavar="SIZE")
@setting_option("--min-free", "min_free", "Evict when the cache's disk has less than SIZE free (20G).",
                metavar="SIZE")
@setting_option("--mode", "mode", "offline never contacts upstream (a miss is a 504); fallback answers kagglehub's "
                "metadata from its stored copy when upstream fails.", "online",
                type=click.Choice(MODES))
@setting_option("--kaggle-metadata-ttl", "kaggle_metadata_ttl", "How long kagglehub's latest-version answers "
                "(GetModelInstance) are reused before upstream is asked again; a unit is required (10m, 1h).", "10m",
                metavar="DURATION")
@setting_option("--header-timeout", "header_timeout", "How long a client may take to send a request head, however "
                "it trickles; then 408 and the connection closes. A unit is required (30s, 1m).", "30s",
                metavar="DURATION")
@setting_option("--keepalive-timeout", "keepalive_timeout", "How long an idle keep-alive connection stays open; a "
                "unit is required (75s, 2m).", "75s", metavar="DURATION")
@setting_option("--drain-timeout", "drain_timeout", "On SIGTERM or SIGINT, how long busy connections may finish "
                "their transfers (new ones are refused at once); then they are cut. A unit is required (60s, 5m; "
                "0s: cut at once).", "60s", metavar="DURATION")
@setting_option("--max-connections", "max_connections", "Client connections open at once, per process (with "
                "--workers N, N times that in all); at the cap the longest-idle one is closed for a new one. 0: "
                "(open-file limit - 192) / 2, the limit raised to its hard maximum at start.", "0", type=int)
@setting_option("--trusted-proxy", "trusted_proxies", "A load balancer's address or network (CIDR) whose "
                "X-Forwarded-For/-Proto/-Host are believed: they give the access log's client and the URLs the "
                "mirror shows. Repeatable; from any other peer they are ignored.", multiple=True, metavar="CIDR")
@setting_option("--workers", "workers", "Processes serving the port (SO_REUSEPORT) and the cache: each archive is "
                "still fetched once. One per core is plenty.", "1", type=click.IntRange(1, MAX_WORKERS), metavar="N")
@setting_option("--read-only", "read_only", "Serve a cache on a read-only mount: hits are served, misses pass "
                "through unstored (a 504 in offline mode), nothing on the cache is written.", is_flag=True,
                default=None)
@setting_option("--intercept", "intercept", "Also serve as an HTTPS_PROXY that answers the hub hosts itself, with "
                "leaves from the CA in --ca-dir; every other host is refused.", is_flag=True, default=None)
@setting_option("--ca-dir", "ca_dir", "The interception CA's directory (made by hubproxy ca init).", metavar="DIR")
@setting_option("--tunnel", "tunnel", "With --intercept: a host name glob, or an IP address or network (CIDR), "
                "that a CONNECT may reach (any port) as a plain tunnel, never inspected, and an HTTP_PROXY http:// "
                "request is forwarded to, never cached. Repeatable.", multiple=True, metavar="HOST_GLOB|CIDR")
def serve(config_file, **flags) -> None:
    """Serve the mirror until SIGTERM or SIGINT, then drain: new connections are refused, busy ones
    finish within --drain-timeout (a second signal cuts them at once), and the exit status is 0.

    \b
    Example:
      hubproxy serve --listen 0.0.0.0:8080 --cache-dir /var/cache/hubproxy --max-size 200G
      hubproxy serve --intercept --ca-dir /etc/hubproxy/ca    # clients: eval "$(hubproxy ca env ...)"
    """
    settings = settings_or_exit(config_file, flags)
    try:  # a port that cannot be had fails before the cache dir is made
        sock = reserved_socket(settings) if settings.workers > 1 else bound_socket(settings)
    except OSError as e:
        fail(_failure(settings, e))
    with opened_cache(settings.cache_path, must_exist=settings.read_only, read_only=settings.read_only):
        pass  # a cache dir that cannot be opened is named here, before anything listens
    configure_logging(settings.log_level)
    quiet_malformed_requests()

    def announce(url: str) -> None:
        workers = f", {settings.workers} workers" if settings.workers > 1 else ""
        click.echo(f"hubproxy {__version__} listening on {url} (cache {settings.cache_path}{workers})")

    try:
        if settings.workers > 1:
            serve_with_workers(settings, announce, _worker, reservation=sock)
        else:
            asyncio.run(serve_until_stopped(settings, announce, sock=sock))
    except (CAError, OSError, WorkerFailed) as e:
        fail(_failure(settings, e))


def _failure(settings: Settings, error: Exception) -> str:
    """The one line a serve that cannot start ends with."""
    if isinstance(error, OSError):
        return reason(error) if error.filename else f"cannot serve on {settings.listen}: {error.strerror or error}"
    return str(error)


def _worker(settings: Settings, announce, orders) -> None:
    """One of serve --workers' processes (a fresh interpreter): serve as `serve` does, on a shared
    port, until its parent's orders say stop; a failure to start is announced as its one line for
    the parent to print."""
    configure_logging(settings.log_level)
    quiet_malformed_requests()
    try:
        asyncio.run(serve_until_stopped(settings, announce, orders=orders))
    except (CAError, OSError) as e:
        announce(f"error: {_failure(settings, e)}")
        raise SystemExit(2) from None
