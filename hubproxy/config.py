"""Settings: one frozen dataclass, layered defaults < TOML file < HUBPROXY_* environment < CLI flags.

Invariants: every setting has an embedded default that serves the real hub; each layer only
overrides the keys it names; unknown keys and malformed values are refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

from .handles import DEFAULT_UPSTREAMS
from .units import parse_duration, parse_size

ENV_PREFIX = "HUBPROXY_"

# The hosts today's chain redirects through: tfhub.dev → Kaggle → signed Google Cloud Storage URL.
DEFAULT_REDIRECT_HOSTS = ("www.kaggle.com", "kaggle.com", "storage.googleapis.com")
# online: upstream when needed; offline: never upstream; fallback: online, but kagglehub's metadata is
# answered from its stored copy when upstream fails (archives and files need no fallback: a hit never asks)
MODES = ("online", "offline", "fallback")
MAX_WORKERS = 256
# A tunnel entry of digits, dots and glob syntax only, or with a ":" or "/" no host name has: no glob of
# host names, which never match an address, but an address pattern, which must be written as a network.
_ADDRESS_PATTERN = re.compile(r"[0-9.*?\[\]!-]*[0-9][0-9.*?\[\]!-]*|.*[:/].*")


class ConfigError(ValueError):
    """A setting could not be read; the message is one line for the operator."""


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hubproxy")


def _parsed(setting: str, parse: Callable[[str], float]) -> property:
    """A read-only property: the text setting `setting` in seconds or bytes, through a units parser."""
    return property(lambda settings: parse(getattr(settings, setting)),
                    doc=f"{setting} through {parse.__name__} (a malformed value raises ValueError)")


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:8080"
    cache_dir: str = field(default_factory=default_cache_dir)
    upstreams: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_UPSTREAMS))
    allow_redirect_hosts: tuple[str, ...] = DEFAULT_REDIRECT_HOSTS
    retries: int = 3  # extra attempts after the first, on 429/5xx/connection errors
    backoff_seconds: float = 0.5  # first retry delay; doubles each attempt
    connect_timeout_seconds: float = 30.0
    read_timeout_seconds: float = 120.0  # longest silence tolerated mid-body
    upstream_resumes: int = 3  # times one fetch cut mid-body (or stalled) is resumed from where it broke
    upstream_min_rate: str = "64K"  # per second: a body slower than this over upstream_rate_window has stalled
    upstream_rate_window: str = "30s"
    upstream_headers_deadline: str = "60s"  # to an answer's headers, redirects and retries included
    log_level: str = "INFO"
    max_size: str | None = None  # evict least recently used above this (e.g. "200G")
    min_free: str | None = None  # evict when the disk has less free than this
    mode: str = "online"  # online | offline (never upstream) | fallback (stored metadata when upstream fails)
    admin_token: str | None = field(default=None, repr=False)  # enables /admin/; never logged
    ca_dir: str | None = None  # the interception CA's directory (hubproxy ca init)
    read_only: bool = False  # the cache is on a read-only mount: serve hits, pass misses through, write nothing
    intercept: bool = False  # also a forward proxy (HTTPS_PROXY) that answers the hub hosts itself
    # what a CONNECT may reach as a plain tunnel, never intercepted: IP networks (addresses) and host-name globs
    tunnel: tuple[str, ...] = ()
    kaggle_metadata_ttl: str = "10m"  # how long kagglehub's latest-version answers are reused
    header_timeout: str = "30s"  # a request head must arrive within this (408 otherwise); bytes do not extend it
    keepalive_timeout: str = "75s"  # an idle keep-alive connection is closed after this
    drain_timeout: str = "60s"  # on SIGTERM/SIGINT, busy connections may finish within this; then they are cut
    parents: tuple[str, ...] = ()  # hubproxy mirrors fetched through instead of the upstreams, tried in order
    max_connections: int = 0  # client connections open at once; 0: as many as the open-file limit leaves room for
    # the forward proxy every upstream hop goes through (not the parents, nor what tunnel lets clients reach):
    # http://[user:password@]host:port
    egress_proxy: str | None = field(default=None, repr=False)  # repr=False: it may hold credentials
    trusted_proxies: tuple[str, ...] = ()  # CIDRs of load balancers whose X-Forwarded-* headers are believed
    workers: int = 1  # processes serving the port (SO_REUSEPORT) and the cache (single flight across them)

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def ca_path(self) -> Path | None:
        return None if self.ca_dir is None else Path(self.ca_dir).expanduser()

    kaggle_metadata_ttl_seconds = _parsed("kaggle_metadata_ttl", parse_duration)
    header_timeout_seconds = _parsed("header_timeout", parse_duration)
    keepalive_timeout_seconds = _parsed("keepalive_timeout", parse_duration)
    drain_timeout_seconds = _parsed("drain_timeout", parse_duration)
    upstream_min_rate_bytes = _parsed("upstream_min_rate", parse_size)
    upstream_rate_window_seconds = _parsed("upstream_rate_window", parse_duration)
    upstream_headers_deadline_seconds = _parsed("upstream_headers_deadline", parse_duration)

    def upstream_base(self, name: str) -> str:
        """The base URL name's requests go to: the first parent (whose mirror URL space is the
        handle path of every upstream), else that upstream's own; Upstream fails over to the next."""
        return self.parents[0] if self.parents else self.upstreams[name]

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()

    @property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(cidr) for cidr in self.trusted_proxies)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def load_settings(
    config_file: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from the layers; `overrides` are CLI flags, None meaning 'not given'."""
    values: dict[str, Any] = {}
    if config_file is not None:
        _merge(values, _read_toml(Path(config_file)), source=str(config_file))
    _merge(values, _from_environ(os.environ if environ is None else environ), source="environment")
    _merge(values, {k: v for k, v in (overrides or {}).items() if v not in (None, (), [])}, source="flags")
    settings = Settings(**values)
    _validate(settings)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (a byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); TOML files are UTF-8") from None


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    found = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX):].lower()
            if key in _FIELDS:
                found[key] = value
    return found


def _merge(values: dict[str, Any], layer: Mapping[str, Any], source: str) -> None:
    for key, raw in layer.items():
        if key not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r} in {source}")
        value = _coerce(key, raw, source)
        if key == "upstreams":
            value = {**values.get("upstreams", DEFAULT_UPSTREAMS), **value}
        values[key] = value


def _coerce(key: str, raw: Any, source: str) -> Any:
    kind = _FIELDS[key].type
    try:
        if key == "upstreams":
            return _parse_upstreams(raw)
        if key in ("allow_redirect_hosts", "tunnel", "parents", "trusted_proxies"):
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(item.strip() for item in items if item.strip())
        if kind == "bool":
            return _parse_bool(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad value for {key} in {source}: {e}") from None


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {str(raw)[:40]!r}")
    return text in ("true", "1", "yes")


def _parse_upstreams(raw: Any) -> dict[str, str]:
    """Accepts {"tfhub": URL}, ["tfhub=URL", ...] or "tfhub=URL,gcs=URL"."""
    if isinstance(raw, Mapping):
        return {str(k): str(v) for k, v in raw.items()}
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    pairs = {}
    for item in items:
        name, sep, url = item.strip().partition("=")
        if not sep:
            raise ValueError(f"expected NAME=URL, got {item!r}")
        pairs[name.strip()] = url.strip()
    return pairs


def _validate(settings: Settings) -> None:
    for name, url in settings.upstreams.items():
        if name not in DEFAULT_UPSTREAMS:
            raise ConfigError(f"unknown upstream {name!r}; known: {', '.join(DEFAULT_UPSTREAMS)}")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"upstream {name} must be an http(s) URL, got {url!r}")
    for url in settings.parents:
        if not url.startswith(("http://", "https://")) or "?" in url or "#" in url:
            raise ConfigError(f"parent must be an http(s) base URL, got {url[:80]!r}")
    if settings.egress_proxy is not None:
        _validate_egress_proxy(settings.egress_proxy)
    for entry in settings.tunnel:
        _validate_tunnel(entry)
    for cidr in settings.trusted_proxies:
        try:
            ipaddress.ip_network(cidr)
        except ValueError as e:
            raise ConfigError(f"trusted_proxies: {cidr[:60]!r} is not an IP network in CIDR notation ({e})") from None
    try:
        port = settings.listen_port
    except ValueError:
        raise ConfigError(f"listen must be HOST:PORT, got {settings.listen!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"listen port out of range: {port}")
    for name in ("max_size", "min_free", "upstream_min_rate"):
        value = getattr(settings, name)
        try:
            value is None or parse_size(value)
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None
    for name in ("kaggle_metadata_ttl", "header_timeout", "keepalive_timeout", "upstream_rate_window",
                 "upstream_headers_deadline", "drain_timeout"):
        try:
            seconds = getattr(settings, f"{name}_seconds")
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None
        if seconds <= 0 and name in ("header_timeout", "keepalive_timeout", "upstream_rate_window"):
            raise ConfigError(f"{name} must be longer than 0s")
    if not 1 <= settings.workers <= MAX_WORKERS:
        raise ConfigError(f"workers must be from 1 to {MAX_WORKERS}, got {settings.workers}")
    if settings.max_connections < 0:
        raise ConfigError("max_connections must not be negative (0: derived from the open-file limit)")
    if settings.mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {settings.mode!r}")
    if settings.admin_token is not None and len(settings.admin_token) < 16:
        raise ConfigError("admin_token must be at least 16 characters")
    if settings.intercept and not settings.ca_dir:
        raise ConfigError("intercept needs ca_dir: the CA its leaf certificates come from (hubproxy ca init)")
    if settings.tunnel and not settings.intercept:
        raise ConfigError("tunnel takes effect only with intercept, the forward proxy it is a door of")
    if settings.retries < 0 or settings.backoff_seconds < 0 or settings.upstream_resumes < 0:
        raise ConfigError("retries, backoff_seconds and upstream_resumes must not be negative")


def _validate_tunnel(entry: str) -> None:
    """An IP address or network, or a glob of host names (which never matches an address)."""
    try:
        ipaddress.ip_network(entry)
    except ValueError as e:
        if _ADDRESS_PATTERN.fullmatch(entry):
            why = f" ({e})" if "/" in entry else ""
            raise ConfigError(f"tunnel: {entry[:60]!r} is no IP address or network in CIDR notation{why}, and a glob "
                              "matches host names only, never an address: give the network, as 10.0.0.0/8") from None


def _validate_egress_proxy(text: str) -> None:
    """http://[user:password@]host:port, or a one-line ConfigError that never repeats the credentials."""
    shape = "egress_proxy must be http://[user:password@]host:port"
    try:
        url = URL(text)
        host, port = url.host, url.port
    except (ValueError, TypeError):
        raise ConfigError(f"{shape}; it does not parse as a URL") from None
    if url.scheme != "http":
        raise ConfigError(f"{shape}: only plain-http proxies are supported (https targets go through them "
                          "with CONNECT), not https or socks ones")
    if not host or url.raw_path not in ("", "/") or url.raw_query_string or url.raw_fragment:
        raise ConfigError(f"{shape}, nothing after the port (got http://{host or ''}:{port}{url.raw_path[:40]})")
