"""Benchmark clients, each a separate process: curl for downloads, wrk for small-request rates, and
http.client (what urllib, so tensorflow_hub, uses) for first bytes on fresh connections.

Invariants: clients only talk to 127.0.0.1 (a TLS host name is resolved to it); a download's
timings come from curl itself (time to first byte, total), a first byte's from its own process;
bytes are hashed only when asked (smoke runs check them).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CURL_FORMAT = "%{http_code} %{size_download} %{time_starttransfer} %{time_total}"


@dataclass(frozen=True)
class Download:
    status: int
    size: int
    ttfb: float  # seconds from launch to the first body byte
    total: float
    started: float  # time.monotonic() at launch
    sha256: str | None = None

    @property
    def finished(self) -> float:
        return self.started + self.total


@dataclass(frozen=True)
class Fleet:
    downloads: list[Download]

    @property
    def wall(self) -> float:
        """From the first launch to the last byte of the last client."""
        return max(d.finished for d in self.downloads) - min(d.started for d in self.downloads)

    @property
    def total_bytes(self) -> int:
        return sum(d.size for d in self.downloads)


def download_many(url: str, clients: int, *, verify: bool = False, proxy: str | None = None,
                  cacert: Path | None = None, resolve: str | None = None) -> Fleet:
    """`clients` curl processes fetching url at once (launched back to back), through `proxy` (an
    HTTPS_PROXY) when given, trusting `cacert` for https, with curl's `--resolve` HOST:PORT:ADDRESS."""
    through = [*(["--proxy", proxy] if proxy else []), *(["--cacert", str(cacert)] if cacert else []),
               *(["--resolve", resolve] if resolve else [])]
    with tempfile.TemporaryDirectory(prefix="hubproxy-bench-") as scratch:
        outputs = [Path(scratch) / f"{n}.out" if verify else Path("/dev/null") for n in range(clients)]
        launched = []
        for output in outputs:
            started = time.monotonic()
            process = subprocess.Popen(["curl", "-s", *through, "-o", str(output), "-w", _CURL_FORMAT, url],
                                       stdout=subprocess.PIPE, text=True)
            launched.append((started, process))
        downloads = []
        for (started, process), output in zip(launched, outputs):
            out, _ = process.communicate(timeout=3600)
            status, size, ttfb, total = out.split()
            digest = _sha256_file(output) if verify else None
            downloads.append(Download(int(status), int(size), float(ttfb), float(total), started, digest))
    return Fleet(downloads)


@dataclass(frozen=True)
class FirstByte:
    status: int
    length: int | None  # the response's Content-Length
    seconds: float  # from the start of connect to the first body byte


FIRST_BYTE_BATCH = 20  # samples of one server before the next server's turn


def first_bytes(urls: list[str], samples: int, cpus: set[int] | None = None) -> dict[str, list[FirstByte]]:
    """`samples` GETs of each url one after another, each on a new connection, as urllib makes them;
    each hangs up after the first body byte. The urls take turns, FIRST_BYTE_BATCH samples at a time,
    so a drift in the machine's state (another process's burst) falls on all of them alike. Run in a
    process of their own, like every client here, on `cpus` when given."""
    script = ("import json,os,sys\nfrom dataclasses import asdict\nfrom bench.clients import _first_bytes\n"
              "os.sched_setaffinity(0, json.loads(sys.argv[1]) or os.sched_getaffinity(0))\n"
              "print(json.dumps({url: [asdict(s) for s in taken] for url, taken in "
              "_first_bytes(sys.argv[3:], int(sys.argv[2])).items()}))")
    out = subprocess.run([sys.executable, "-c", script, json.dumps(sorted(cpus or ())), str(samples), *urls],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return {url: [FirstByte(**sample) for sample in taken] for url, taken in json.loads(out).items()}


_URLLIB_HEADERS = {"Accept-Encoding": "identity", "User-Agent": "Python-urllib/3", "Connection": "close"}


def _first_bytes(urls: list[str], samples: int) -> dict[str, list[FirstByte]]:
    taken = {url: [] for url in urls}
    while any(len(t) < samples for t in taken.values()):
        for url in urls:
            for _ in range(min(FIRST_BYTE_BATCH, samples - len(taken[url]))):
                taken[url].append(_first_byte(url))
    return taken


def _first_byte(url: str) -> FirstByte:
    parts = urllib.parse.urlsplit(url)
    started = time.perf_counter()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("GET", parts.path, headers=_URLLIB_HEADERS)
        response = connection.getresponse()
        length = response.length
        response.read(1)
        return FirstByte(response.status, length, time.perf_counter() - started)
    finally:
        connection.close()  # with the body unread: the kernel resets the connection, as an abandoned read does


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_VERIFY_STDIN = ("import hashlib,sys\nh=hashlib.sha256()\n"
                 "for b in iter(lambda: sys.stdin.buffer.read(1<<20), b''): h.update(b)\nprint(h.hexdigest())")


def verified_download(url: str) -> tuple[float, str]:
    """A careful direct download: curl piped into sha256 (as fast as OpenSSL hashes). (seconds, digest)."""
    started = time.monotonic()
    curl = subprocess.Popen(["curl", "-sf", url], stdout=subprocess.PIPE)
    digest = subprocess.run([sys.executable, "-c", _VERIFY_STDIN], stdin=curl.stdout, capture_output=True,
                            text=True, check=True).stdout.strip()
    curl.stdout.close()
    if curl.wait() != 0:
        raise RuntimeError(f"direct download of {url} failed")
    return time.monotonic() - started, digest


def head(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    args = ["curl", "-s", "-I", "-o", "-", "-w", "%{http_code}"]
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    fields = dict(line.split(": ", 1) for line in lines[1:-1] if ": " in line)
    return int(lines[-1][-3:]), {k.lower(): v.strip() for k, v in fields.items()}


_WRK_SCRIPT = """\
wrk.method = "GET"
{headers}
"""


def requests_per_second(url: str, method: str, headers: dict[str, str], seconds: float,
                        connections: int = 32) -> float:
    """The request rate for one kind of small request, keep-alive, `connections` at once: wrk for
    GET, ab for HEAD (wrk waits for a HEAD response's body). Refuses a run with error responses."""
    if method == "HEAD":
        return _ab_head_rate(url, headers, seconds, connections)
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(_WRK_SCRIPT.format(headers="\n".join(f'wrk.headers["{k}"] = \'{v}\'' for k, v in headers.items())))
        script.flush()
        out = _run(["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s", script.name, url])
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise RuntimeError(f"wrk saw {bad.group(1)} error responses from {url}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def _ab_head_rate(url: str, headers: dict[str, str], seconds: float, connections: int) -> float:
    extra = [arg for k, v in headers.items() for arg in ("-H", f"{k}: {v}")]
    out = _run(["ab", "-q", "-i", "-k", f"-c{connections}", f"-t{max(1, round(seconds))}", "-n", "10000000",
                *extra, url])
    failed = int(re.search(r"Failed requests:\s+(\d+)", out).group(1))
    non_2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    if failed or non_2xx:
        raise RuntimeError(f"ab saw failed or error responses from {url}")
    return float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))


def _run(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout
