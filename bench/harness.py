"""The servers a benchmark compares, each a real process on 127.0.0.1: the origin emulator, hubproxy,
and nginx (Debian package) as a proxy_cache mirror of the same origin, over HTTP and, with a leaf
from hubproxy's interception CA, over TLS; a Python server doing no HTTP work (floor_server.py);
plus /proc readings.

Invariants: every server listens on loopback only; every process started here is stopped by the
context manager that started it; nothing here measures, it only starts, stops and reads.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hubproxy.tls import authority, leaves
from hubproxy.tls.files import PRIVATE, PUBLIC, write_new

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.origin_control import Model, Origin, start_origin, stop_process  # noqa: E402

# Debian package → the program it provides.
DEBIAN_PACKAGES = {"nginx": "/usr/sbin/nginx", "wrk": "/usr/bin/wrk", "curl": "/usr/bin/curl",
                   "apache2-utils": "/usr/bin/ab"}


class SetupError(RuntimeError):
    """The machine lacks something the benchmark needs; the message says what."""


def ensure_debian_packages() -> None:
    """Install nginx, wrk, ab and curl from Debian's packages when missing (needs root and apt-get)."""
    missing = [name for name, path in DEBIAN_PACKAGES.items() if not Path(path).exists()]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SetupError(f"install {' '.join(missing)} (Debian packages) first: the benchmark needs them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=subprocess.DEVNULL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """A running server: its base URL and the process (with its children) whose CPU and memory it uses."""

    name: str
    url: str
    pid: int
    ca_file: Path | None = None  # the CA a TLS client trusts: the interception CA of an HTTPS_PROXY, or its leaf's
    log: Path | None = None  # where its stderr goes
    tls_port: int | None = None  # where it also serves TLS_HOST over TLS itself

    def pids(self) -> list[int]:
        return [self.pid, *_children(self.pid)]

    def cpu_seconds(self) -> float:
        return sum(_cpu_seconds(pid) for pid in self.pids())

    def peak_rss_bytes(self) -> int:
        """Sum over its processes of each one's peak resident set (VmHWM)."""
        return sum(_status_kib(pid, "VmHWM") * 1024 for pid in self.pids())

    def rss_bytes(self) -> int:
        """Its main process's resident set now (VmRSS)."""
        return _status_kib(self.pid, "VmRSS") * 1024

    def open_fds(self) -> int:
        """How many file descriptors its main process holds open now."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def pooled_fds(self, upstream_ports: set[int]) -> int:
        """Of its open fds, those its pools hold: SQLite's files of the cache index (diskcache opens a
        connection per thread that reads it) and keep-alive connections to the upstreams (aiohttp's pool)."""
        upstream_sockets = {f"socket:[{inode}]" for inode, port in _tcp_peer_ports().items() if port in upstream_ports}
        pooled = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):  # closed since the listing
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                pooled += target in upstream_sockets or f"{os.sep}index{os.sep}cache.db" in target
        return pooled


def _tcp_peer_ports() -> dict[str, int]:
    """Socket inode → remote port, of every TCP socket in this network namespace."""
    peers = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                peers[fields[9]] = int(fields[2].rpartition(":")[2], 16)
    return peers


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def pinned(servers: list[Server], cpus: set[int]) -> Iterator[None]:
    """Every thread of each server (and of its child processes) runs only on `cpus` while the block
    runs, and anywhere again after."""
    anywhere = os.sched_getaffinity(0)
    _set_affinity(servers, cpus)
    try:
        yield
    finally:
        _set_affinity(servers, anywhere)


def _set_affinity(servers: list[Server], cpus: set[int]) -> None:
    for server in servers:
        for pid in server.pids():
            for thread in _threads(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(thread, cpus)


def _threads(pid: int) -> list[int]:
    try:
        return [int(thread) for thread in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def origin(workdir: Path) -> Iterator[tuple[Origin, Server]]:
    ports = workdir / "origin-ports.json"
    ports.unlink(missing_ok=True)
    control, process = start_origin(ports)
    try:
        yield control, Server("direct", control.urls["gcs"], process.pid)
    finally:
        stop_process(process)


@contextlib.contextmanager
def hubproxy(origin_control: Origin, cache_dir: Path, *, intercept: bool = True, log_level: str = "WARNING",
             extra: tuple[str, ...] = (), label: str = "") -> Iterator[Server]:
    """hubproxy on the origin, also intercepting HTTPS_PROXY clients with a CA of its own unless
    `intercept` is false; its log (stderr) goes to Server.log, replaced at each start. label tells
    apart the logs of several hubproxies on one cache dir."""
    args = [sys.executable, "-m", "hubproxy", "serve", "--listen", "127.0.0.1:0", "--cache-dir", str(cache_dir),
            "--log-level", log_level, *extra]
    ca_file = None
    if intercept:
        ca_dir = cache_dir.parent / f"{cache_dir.name}-ca"
        subprocess.run([sys.executable, "-m", "hubproxy", "ca", "init", "--ca-dir", str(ca_dir), "--force"],
                       check=True, capture_output=True, cwd=ROOT)
        args += ["--intercept", "--ca-dir", str(ca_dir)]
        ca_file = ca_dir / "ca.pem"
    for name in ("tfhub", "kaggle", "gcs"):
        args += ["--upstream", f"{name}={origin_control.urls[name]}"]
    log = cache_dir.parent / f"{cache_dir.name}{label}.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=ROOT)
    try:
        line = process.stdout.readline()
        if "listening on " not in line:
            raise SetupError(f"hubproxy did not start: {log.read_text()[-2000:]}")
        yield Server("hubproxy", line.split("listening on ")[1].split()[0], process.pid, ca_file, log)
    finally:
        stop_process(process)


NGINX_CONF = """\
{user}worker_processes auto;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/client_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=hub:64m max_size=200g inactive=365d use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
{location}
    }}
{tls_server}}}
"""

# One location for both servers: the same zone and key, so an archive cached over HTTP is a hit over TLS.
NGINX_LOCATION = """\
        location / {{
            proxy_pass {origin};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache hub;
            proxy_cache_key $uri;
            proxy_cache_valid 200 365d;
            proxy_cache_lock on;
            proxy_buffering on;
            add_header X-Cache $upstream_cache_status;
        }}"""

NGINX_TLS_SERVER = """\
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {host};
        ssl_certificate {certificate};
        ssl_certificate_key {key};
{location}
    }}
"""

# The host nginx's TLS server presents a certificate for: where hub archives are served from.
TLS_HOST = "storage.googleapis.com"


@contextlib.contextmanager
def floor(archive: Path) -> Iterator[Server]:
    """bench/floor_server.py answering every GET with archive: the interpreter's floor for the time to
    a hit's first byte (a server on asyncio doing no HTTP work)."""
    process = subprocess.Popen([sys.executable, "-m", "bench.floor_server", str(archive)], stdout=subprocess.PIPE,
                               text=True, cwd=ROOT)
    try:
        line = process.stdout.readline()
        if "listening on " not in line:
            raise SetupError("the floor server did not start")
        yield Server("floor", line.split("listening on ")[1].split()[0], process.pid)
    finally:
        stop_process(process)


@contextlib.contextmanager
def nginx(origin_url: str, prefix: Path, ca_dir: Path | None = None) -> Iterator[Server]:
    """nginx as a careful operator would run it in front of the origin: proxy_cache with its lock; with
    `ca_dir`, also over TLS (Server.tls_port) presenting a leaf for TLS_HOST issued by that CA."""
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    location = NGINX_LOCATION.format(origin=origin_url)
    tls_port, tls_server = None, ""
    if ca_dir is not None:
        tls_port = free_port()
        certificate, key = issue_leaf(ca_dir, TLS_HOST, prefix)
        tls_server = NGINX_TLS_SERVER.format(port=tls_port, host=TLS_HOST, certificate=certificate, key=key,
                                             location=location)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, location=location, tls_server=tls_server,
                                      user="user root;\n" if os.geteuid() == 0 else ""))
    process = subprocess.Popen(["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
                               stderr=subprocess.PIPE, text=True)
    try:
        for listening in (port, tls_port):
            if listening is not None:
                _wait_for_port(listening, process)
        ca_file = None if ca_dir is None else authority.paths(ca_dir)[0]
        yield Server("nginx", f"http://127.0.0.1:{port}", process.pid, ca_file=ca_file, tls_port=tls_port)
    finally:
        stop_process(process)


def issue_leaf(ca_dir: Path, host: str, directory: Path) -> tuple[Path, Path]:
    """A leaf for `host` signed by hubproxy's interception CA in `ca_dir`, as hubproxy signs its own
    (same code), written to `directory` as (certificate, key); the key 0600 from its first byte."""
    ca = authority.load(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = leaves.sign_leaf(ca, host, key, datetime.datetime.now(datetime.UTC) - authority.CLOCK_SKEW,
                                   leaves.DEFAULT_LIFETIME)
    cert_path, key_path = directory / f"{host}.pem", directory / f"{host}.key"
    write_new(cert_path, certificate.public_bytes(serialization.Encoding.PEM), mode=PUBLIC, replace=True)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    write_new(key_path, key_pem, mode=PRIVATE, replace=True)
    return cert_path, key_path


def _wait_for_port(port: int, process: subprocess.Popen) -> None:
    for _ in range(200):
        if process.poll() is not None:
            raise SetupError("nginx did not start: " + textwrap.shorten(process.stderr.read(), 400))
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.05)
    raise SetupError(f"nginx did not listen on port {port}")


def make_archive(path: Path, size: int) -> Path:
    """A stand-in archive of `size` bytes: gzip magic, then incompressible filler (made once)."""
    if path.exists() and path.stat().st_size == size:
        return path
    block = os.urandom(8 << 20)
    with path.open("wb") as f:
        f.write(b"\x1f\x8b")
        remaining = size - 2
        while remaining > 0:
            piece = block[: min(len(block), remaining)]
            f.write(piece)
            remaining -= len(piece)
    return path


@dataclass(frozen=True)
class Registered:
    """An archive the origin serves under a fresh model name."""

    handle: str
    sha256: str
    size: int
    model: Model  # for the origin's fault switches


def register_random_archive(origin_control: Origin, path: Path, rng: random.Random) -> Registered:
    """A stand-in archive of 256 KiB to 2 MiB of rng's bytes (a seed replays it), at path, served."""
    size = rng.randrange(256 << 10, 2 << 20)
    data = b"\x1f\x8b" + rng.randbytes(size - 2)
    path.write_bytes(data)
    model = origin_control.register(path)
    return Registered(model.handle, hashlib.sha256(data).hexdigest(), size, model)
