"""Replicas behind haproxy (deploy/lb/haproxy.cfg, run as is): consistent hashing on the handle path
sends every client of a model to one replica, so 32 clients cost one origin GET per model; a replica
stopped mid-run (SIGTERM) finishes the downloads it was serving, leaves the pool (its /readyz), and
hands only its models to the next owner: later clients see no error."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, http_request
from tests.origin_control import stop_process

HAPROXY_CFG = ROOT / "deploy" / "lb" / "haproxy.cfg"
NGINX_CONF = ROOT / "deploy" / "lb" / "nginx.conf"
REPLICAS = 3
MODELS = 4
CLIENTS = 32

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed (apt-get install haproxy)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lb_env(tmp_path: Path, replicas: list[str]) -> dict:
    env = dict(os.environ, HUBPROXY_LB_BIND=f"127.0.0.1:{_free_port()}",
               HUBPROXY_LB_ADMIN_SOCKET=str(tmp_path / "haproxy.sock"),
               HUBPROXY_CHECK_INTER="100ms", HUBPROXY_CHECK_FALL="1")
    env.update({f"HUBPROXY_REPLICA{n}": address for n, address in enumerate(replicas, 1)})
    return env


def _servers_state(sock_path: Path) -> dict[str, int]:
    """haproxy's admin answer to `show servers state`: server name -> srv_op_state (2 up, 0 down)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock_path))
        s.sendall(b"show servers state hubproxy\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    rows = [line.split() for line in answer.decode().splitlines()[1:] if line and not line.startswith("#")]
    return {row[3]: int(row[5]) for row in rows}


def _wait_for_states(sock_path: Path, wanted: dict[str, int], process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while True:  # haproxy's own health checks change these states; we read them as they change
        assert process.poll() is None, "haproxy exited"
        try:
            state = _servers_state(sock_path)
            if all(state.get(name) == value for name, value in wanted.items()):
                return
        except OSError:
            pass  # the admin socket is not listening yet
        assert time.monotonic() < deadline, f"haproxy never reported {wanted}"
        time.sleep(0.05)


def _fetch_all(base: str, models, expected: dict[str, str]) -> dict[str, set[str]]:
    """CLIENTS threads at once, client n GETting model n % MODELS (half with the query, half the bare
    handle: both spellings of one archive); returns handle -> replicas that answered, after checking
    every client got the archive's exact bytes with status 200."""
    results: dict[int, tuple[int, str, str]] = {}

    def client(n: int) -> None:
        model = models[n % len(models)]
        query = "?tf-hub-format=compressed" if n // len(models) % 2 else ""
        status, headers, body = http_request(f"{base}/{model.handle}{query}")
        results[n] = (status, headers.get("X-Hubproxy-Replica", ""), hashlib.sha256(body).hexdigest())

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == CLIENTS
    owners: dict[str, set[str]] = {}
    for n, (status, replica, digest) in results.items():
        model = models[n % len(models)]
        assert (status, digest) == (200, expected[model.handle]), f"client {n} of {model.handle} via {replica}"
        owners.setdefault(model.handle, set()).add(replica)
    return owners


class _Download(threading.Thread):
    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.result = url, None
        self.start()

    def run(self) -> None:
        status, _, body = http_request(self.url)
        self.result = (status, body)

    def outcome(self):
        self.join(timeout=120)
        return self.result


def _model_owned_by(origin, archive: Path, replica: str, base: str):
    """A new model whose handle haproxy's hash sends to replica (a HEAD tells, fetching no archive)."""
    while True:
        model = origin.register(archive)
        _, headers, _ = http_request(f"{base}/{model.handle}", method="HEAD")
        if headers.get("X-Hubproxy-Replica") == replica:
            return model


def test_lb_configs_pass_their_linters(tmp_path):
    env = _lb_env(tmp_path, [f"127.0.0.1:{port}" for port in (1, 2, 3)])
    checked = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    if shutil.which("nginx") is None:
        pytest.skip("nginx not installed")
    # nginx resolves upstream names at start-up: check the file with its replica names on loopback
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.read_text().replace("hubproxy-", "127.0.0.").replace(".hubproxy:", ":")
                    .replace("/tmp/hubproxy-lb-nginx.pid", str(tmp_path / "nginx.pid")))
    checked = subprocess.run(["nginx", "-t", "-c", str(conf), "-e", str(tmp_path / "error.log")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_cluster_fetches_each_model_once_and_survives_a_lost_replica(proxy_factory, clean_origin, archives,
                                                                     tmp_path):
    origin = clean_origin
    replicas = [proxy_factory(tmp_path / f"cache{n}") for n in range(1, REPLICAS + 1)]
    env = _lb_env(tmp_path, [p.url.removeprefix("http://") for p in replicas])
    sock = Path(env["HUBPROXY_LB_ADMIN_SOCKET"])
    names = [f"replica{n}" for n in range(1, REPLICAS + 1)]
    with (tmp_path / "haproxy.log").open("wb") as log:
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=log, stderr=log)
    try:
        _wait_for_states(sock, {name: 2 for name in names}, haproxy)
        base = "http://" + env["HUBPROXY_LB_BIND"]
        models = [origin.register(archives.small) for _ in range(MODELS)]
        expected = {m.handle: hashlib.sha256(archives.small.read_bytes()).hexdigest() for m in models}

        owners = _fetch_all(base, models, expected)
        assert all(len(answered) == 1 for answered in owners.values()), owners  # one owner per model
        assert [origin.object_gets(m) for m in models] == [1] * MODELS
        owner = {handle: answered.pop() for handle, answered in owners.items()}
        while len(set(owner.values())) < 2:  # all on one replica: add a model until another owns one
            extra = origin.register(archives.small)
            models.append(extra)
            expected[extra.handle] = expected[models[0].handle]
            owner.update({h: a.pop() for h, a in _fetch_all(base, [extra], expected).items()})

        lost = owner[models[0].handle]
        inflight = _model_owned_by(origin, archives.padded, lost, base)
        origin.faults(inflight, hold_after=archives.padded.stat().st_size // 2)
        downloads = [_Download(f"{base}/{inflight.handle}") for _ in range(4)]
        origin.wait_held(1)
        replicas[names.index(lost)].wait_for_metric("hubproxy_flight_readers", len(downloads))
        replicas[names.index(lost)].process.send_signal(signal.SIGTERM)  # mid-run: it drains what it serves
        _wait_for_states(sock, {lost: 0}, haproxy)
        origin.release()
        for download in downloads:
            assert download.outcome() == (200, archives.padded.read_bytes()), "a download in flight was cut"
        assert replicas[names.index(lost)].process.wait(timeout=60) == 0

        after = _fetch_all(base, models, expected)
        for model in models:
            answered = after[model.handle]
            if owner[model.handle] == lost:
                assert len(answered) == 1 and lost not in answered, answered  # moved to one next owner
                assert origin.object_gets(model) == 2
            else:
                assert answered == {owner[model.handle]}  # survivors keep their models
                assert origin.object_gets(model) == 1
    finally:
        stop_process(haproxy)
