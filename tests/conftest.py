"""Shared harness: the origin emulator, hubproxy and the real tensorflow_hub client, each a real
process on 127.0.0.1, plus tiny real SavedModel archives built with TensorFlow at session start."""

from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest

from hubproxy.cache.store import Store
from tests.origin_control import Origin, start_origin, stop_process

TESTS = Path(__file__).parent
ROOT = TESTS.parent
_unique = itertools.count(1)


# -- the origin emulator ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def origin(tmp_path_factory):
    origin, process = start_origin(tmp_path_factory.mktemp("origin") / "ports.json")
    yield origin
    stop_process(process)


@pytest.fixture(autouse=False)
def clean_origin(origin):
    origin.control("POST", "reset", {})
    yield origin
    origin.control("POST", "faults", {"clear": True})
    origin.release()


# -- models ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Archives:
    small: Path  # ~4 KB, output x*2+1
    padded: Path  # ~4 MiB, output x*3+1, two 2 MiB incompressible assets as its last members

    @staticmethod
    def expected(archive: Path) -> list[float]:
        k = 2.0 if archive.name.startswith("small") else 3.0
        return [1.0 * k + 1.0, 2.0 * k + 1.0]


@pytest.fixture(scope="session")
def archives(tmp_path_factory) -> Archives:
    out = tmp_path_factory.mktemp("archives")
    subprocess.run([sys.executable, str(TESTS / "savedmodels.py"), str(out), "small=2", "padded=3:2"],
                   check=True, stdout=subprocess.DEVNULL, env=_quiet_env())
    return Archives(small=out / "small.tar.gz", padded=out / "padded.tar.gz")


# -- hubproxy --------------------------------------------------------------------------------

class Proxy:
    def __init__(self, process: subprocess.Popen, url: str, cache_dir: Path, log: Path):
        self.process, self.url, self.cache_dir, self.log = process, url, cache_dir, log

    def get(self, path: str, headers: dict | None = None, method: str = "GET") -> tuple[int, Message, bytes]:
        return http_request(self.url + path, headers=headers, method=method)

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from GET /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        _, _, text = self.get("/metrics")
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0

    def wait_for_metric(self, name: str, value: float, timeout: float = 300) -> None:
        """Wait for an event the proxy reports, e.g. N clients attached to a fetch."""
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} never reached {value}"
            time.sleep(0.05)

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        """Wait for a line the proxy logs when it gets somewhere (e.g. its start-up pass is done)."""
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            assert time.monotonic() < deadline, f"the proxy never logged {text!r}"
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.process)


def start_proxy(origin: Origin, cache_dir: Path, *extra: str, upstreams: dict | None = None,
                log_dir: Path | None = None, preexec_fn=None) -> Proxy:
    """preexec_fn: run in the proxy's process before it starts (e.g. to lower its resource limits)."""
    upstreams = upstreams or {name: origin.urls[name] for name in ("tfhub", "kaggle", "gcs")}
    log = (log_dir or cache_dir.parent) / f"{cache_dir.name}-proxy-{next(_unique)}.log"
    args = [sys.executable, "-m", "hubproxy", "serve", "--listen", "127.0.0.1:0", "--cache-dir", str(cache_dir),
            "--backoff-seconds", "0.01", *extra]
    for name, url in upstreams.items():
        args += ["--upstream", f"{name}={url}"]
    with log.open("wb") as log_file:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=ROOT,
                                   preexec_fn=preexec_fn)
    line = process.stdout.readline()  # blocks until the proxy listens, or it exits
    if "listening on " not in line:
        stop_process(process)
        raise RuntimeError(f"hubproxy did not start: {line!r}\n{log.read_text()}")
    url = line.split("listening on ")[1].split()[0]
    return Proxy(process, url, cache_dir, log)


@pytest.fixture
def proxy_factory(origin, tmp_path):
    started = []

    def start(cache_dir: Path | None = None, *extra: str, **kwargs) -> Proxy:
        proxy = start_proxy(origin, cache_dir or tmp_path / "cache", *extra, log_dir=tmp_path, **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(proxy_factory, clean_origin) -> Proxy:
    return proxy_factory()


ADMIN_TOKEN = "s3cret-admin-token-0123456789"


@pytest.fixture
def admin_proxy(proxy_factory, clean_origin, tmp_path) -> Proxy:
    """A proxy with the admin API on (admin_token ADMIN_TOKEN, set in a TOML file)."""
    config = tmp_path / "hubproxy.toml"
    config.write_text(f'admin_token = "{ADMIN_TOKEN}"\n')
    return proxy_factory(tmp_path / "cache", "--config", config)


# -- clients ---------------------------------------------------------------------------------

def _quiet_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT), **extra)
    return env


def hub_load(handle: str, tfhub_cache_dir: Path) -> subprocess.CompletedProcess:
    """Load a model with the real tensorflow_hub client in its own process."""
    return subprocess.run(_hub_client_args(handle), capture_output=True, text=True, timeout=600,
                          env=_quiet_env(TFHUB_CACHE_DIR=str(tfhub_cache_dir)))


def hub_load_offline(handle: str, tfhub_cache_dir: Path) -> subprocess.CompletedProcess:
    """hub_load with every HTTP(S) request sent to a dead loopback proxy: a model missing from
    TFHUB_CACHE_DIR fails at once, and nothing can leave the machine."""
    dead = "http://127.0.0.1:9"
    env = _quiet_env(TFHUB_CACHE_DIR=str(tfhub_cache_dir), http_proxy=dead, https_proxy=dead,
                     HTTP_PROXY=dead, HTTPS_PROXY=dead, no_proxy="", NO_PROXY="")
    return subprocess.run(_hub_client_args(handle), capture_output=True, text=True, timeout=600, env=env)


def run_cli(*args: object) -> subprocess.CompletedProcess:
    """The hubproxy command line, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "hubproxy", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=_quiet_env())


def hub_load_started(handle: str, tfhub_cache_dir: Path) -> subprocess.Popen:
    """hub_load, started in the background; .communicate() it."""
    return subprocess.Popen(_hub_client_args(handle), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_quiet_env(TFHUB_CACHE_DIR=str(tfhub_cache_dir)))


def _hub_client_args(handle: str) -> list[str]:
    return [sys.executable, str(TESTS / "hub_client.py"), handle]


def loaded_output(result: subprocess.CompletedProcess) -> list[float]:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def model_dirs(tfhub_cache_dir: Path) -> list[Path]:
    """Directories tensorflow_hub would treat as a cached model (any non-empty directory)."""
    if not tfhub_cache_dir.exists():
        return []
    return [p for p in tfhub_cache_dir.iterdir() if p.is_dir() and any(p.iterdir()) and not p.name.endswith(".tmp")]


def http_request(url: str, headers: dict | None = None, method: str = "GET") -> tuple[int, Message, bytes]:
    """(status, case-insensitive headers, body); 4xx/5xx are returned, not raised."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def download_fails(proxy: Proxy, model) -> None:
    """A GET of model through proxy that does not deliver it: an error status, or a body cut short."""
    try:
        status, _, _ = proxy.get(f"/{model.handle}")
    except http.client.IncompleteRead:
        return
    assert status >= 500, f"the download succeeded with {status}"


def raw_request(base_url: str, request_bytes: bytes) -> tuple[int, bytes]:
    """Send exact bytes (targets no client library would send) and parse the response."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request_bytes)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def raw_exchange(base_url: str, request_bytes: bytes) -> tuple[int, bytes]:
    """Send exact bytes and return (status, every byte of the response, headers included), for a
    request the server answers by closing the connection (errors, Connection: close)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request_bytes)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return int(received.split(b" ", 2)[1]), received


def peak_rss(pid: int) -> int:
    """A process's peak resident memory so far, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


def compressed_offset_of_member(archive: Path, member: str) -> int:
    """The shortest prefix of a .tar.gz whose decompressed bytes reach `member`'s header: a
    download cut there ends exactly at a tar member boundary."""
    import tarfile
    import zlib

    with tarfile.open(archive, "r:gz") as tar:
        header_offset = tar.getmember(member).offset
    data = archive.read_bytes()
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    produced = 0
    for cut in range(16, len(data), 16):
        produced += len(inflater.decompress(data[cut - 16:cut]))
        if produced >= header_offset:
            assert produced < header_offset + 512, "prefix must not contain the next header"
            return cut
    raise AssertionError(f"{member} not reached")


def stand_in_archive(path: Path, size: int) -> Path:
    """A file the proxy takes for a model archive (gzip magic, then incompressible filler): for tests
    of how bytes move, where no client extracts it."""
    with path.open("wb") as f:
        f.write(b"\x1f\x8b")
        for start in range(2, size, 8 << 20):
            f.write(os.urandom(min(8 << 20, size - start)))
    return path


# -- in process (tests/in_process.py) -------------------------------------------------------

STAND_IN_SIZE = 4 << 20
STAND_IN_HOLD_AT = 3 << 20  # where the origin pauses a held stand-in, so readers can join or leave mid-stream


@pytest.fixture
def stand_in(tmp_path) -> Path:
    return stand_in_archive(tmp_path / "stand-in.tar.gz", STAND_IN_SIZE)


@pytest.fixture
def held_stand_in(clean_origin, stand_in):
    """The stand-in served by the origin, which pauses at STAND_IN_HOLD_AT until released."""
    model = clean_origin.register(stand_in)
    clean_origin.faults(model, hold_after=STAND_IN_HOLD_AT)
    return model


@pytest.fixture
def store(tmp_path):
    """A cache store, for hubproxy's classes run in the test's process."""
    store = Store(tmp_path / "cache")
    yield store
    store.close()


# -- disks that refuse writes (tmpfs), or O_DIRECT (ramfs) ---------------------------------------

def _mounts(fstype: str):
    """mount(mount_point, *options): a filesystem of fstype mounted there for the test, unmounted
    after; the test is skipped where the machine forbids mounts (they need root)."""
    mounted: list[Path] = []

    def mount(mount_point: Path, *options: str) -> Path:
        mount_point.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", fstype, *(["-o", ",".join(options)] if options else []), fstype,
                                 str(mount_point)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"this machine does not let the tests mount a {fstype}: {result.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in reversed(mounted):
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def tmpfs():
    """mount(mount_point, *options): a tmpfs ("size=16m", "ro"...), as _mounts."""
    yield from _mounts("tmpfs")


@pytest.fixture
def ramfs():
    """mount(mount_point): a ramfs, which refuses O_DIRECT, as _mounts."""
    yield from _mounts("ramfs")
