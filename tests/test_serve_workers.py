"""`serve --workers N`: N processes on one port and one cache. Connections are spread over the
workers by the kernel, an archive is still fetched once, the metrics are the workers' together, a
worker that dies is replaced, and a stop signal ends them all. Real processes; which worker holds
a connection is read from /proc, not guessed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

CONNECTIONS = 32  # spread over 2 workers by the kernel's hash: all on one would be a 1 in 2**31 chance


def _workers(parent_pid: int) -> list[int]:
    children = Path(f"/proc/{parent_pid}/task/{parent_pid}/children").read_text().split()
    return [int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone (or going: ESRCH)
        return False


def _any_thread_alive(pid: int) -> bool:
    """Whether any thread of pid runs still (its sockets are open until the last one ends)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    return any(_alive_task(task) for task in tasks)


def _alive_task(task: Path) -> bool:
    try:
        return "\nState:\tZ" not in (task / "status").read_text()
    except OSError:
        return False


def _ignores(pid: int, signum: int) -> bool:
    ignored = int(Path(f"/proc/{pid}/status").read_text().split("\nSigIgn:\t")[1].split()[0], 16)
    return bool(ignored & (1 << (signum - 1)))


def _refused(url: str) -> bool:
    try:
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60).close()
    except ConnectionRefusedError:
        return True
    return False


def _held_download(proxy, origin, archive: Path) -> tuple[threading.Thread, list]:
    """A GET of archive through proxy, under way: the origin holds its second half until released."""
    held = origin.register(archive)
    origin.faults(held, hold_after=archive.stat().st_size // 2)
    download = []
    client = threading.Thread(target=lambda: download.append(proxy.get(f"/{held.handle}")))
    client.start()
    origin.wait_held(1)
    return client, download


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def _established_inodes(port: int) -> set[str]:
    """Inodes of the server side of established TCP connections to port."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            inodes.add(fields[9])
    return inodes


def _get_on(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
    response = sock.makefile("rb")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += response.readline()
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                 .split(b":")[1])
    return response.read(length)


def test_workers_share_the_port_the_cache_and_their_metrics(proxy_factory, clean_origin, archives, tmp_path):
    proxy = proxy_factory(tmp_path / "cache", "--workers", "2")
    workers = _workers(proxy.process.pid)
    assert len(workers) == 2
    model = clean_origin.register(archives.small)
    clean_origin.faults(model, hold_after=100)
    results = []
    clients = [threading.Thread(target=lambda: results.append(proxy.get(f"/{model.handle}"))) for _ in range(6)]
    for client in clients:
        client.start()
    clean_origin.wait_held(1)
    proxy.wait_for_metric("hubproxy_flight_readers", 6)  # the workers' readers, added up
    clean_origin.release()
    for client in clients:
        client.join(timeout=120)
    assert [(status, body) for status, _, body in results] == [(200, archives.small.read_bytes())] * 6
    assert clean_origin.object_gets(model) == 1

    port = int(proxy.url.rsplit(":", 1)[1])
    connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTIONS)]
    try:
        bodies = [_get_on(sock, f"/{model.handle}") for sock in connections]
        established = _established_inodes(port)
        served_by = {pid: len(_socket_inodes(pid) & established) for pid in workers}
    finally:
        for sock in connections:
            sock.close()
    assert bodies == [archives.small.read_bytes()] * CONNECTIONS
    assert sum(served_by.values()) == CONNECTIONS and min(served_by.values()) > 0, served_by
    assert proxy.metric("hubproxy_requests_total", outcome="HIT") == CONNECTIONS
    assert proxy.metric("hubproxy_upstream_bytes_total") == archives.small.stat().st_size


def test_a_worker_that_dies_is_replaced_and_a_stop_drains_them_all(proxy_factory, clean_origin, archives, tmp_path):
    proxy = proxy_factory(tmp_path / "cache", "--workers", "2")
    model = clean_origin.register(archives.small)
    first, second = _workers(proxy.process.pid)
    os.kill(first, signal.SIGKILL)
    # Once the parent has seen it go, its last thread is gone and its socket closed with it (the
    # connections it had queued are reset); from then on every connection reaches a live worker.
    proxy.wait_for_log(f"(pid {first}) exited with status -9; starting another")
    deadline = time.monotonic() + 120
    while True:  # until the parent has started another
        status, _, body = proxy.get(f"/{model.handle}")
        assert (status, body) == (200, archives.small.read_bytes())
        now = _workers(proxy.process.pid)
        if len(now) == 2 and first not in now:
            break
        assert time.monotonic() < deadline, "no worker replaced the one killed"
    assert second in now
    metrics_dirs = {arg for arg in Path(f"/proc/{now[0]}/environ").read_bytes().split(b"\0")
                    if arg.startswith(b"PROMETHEUS_MULTIPROC_DIR=")}
    metrics_dir = Path(metrics_dirs.pop().split(b"=", 1)[1].decode())

    client, download = _held_download(proxy, clean_origin, archives.padded)
    proxy.process.send_signal(signal.SIGTERM)  # the workers drain: the download under way finishes whole
    proxy.wait_for_log("new connections refused")
    clean_origin.release()
    client.join(timeout=120)
    assert [(status, body) for status, _, body in download] == [(200, archives.padded.read_bytes())]
    assert proxy.process.wait(timeout=60) == 0
    assert not any(_alive(pid) for pid in now)
    assert not metrics_dir.exists()
    assert "Traceback" not in proxy.log.read_text()


def test_a_stop_signal_to_the_whole_process_group_drains_the_workers_rather_than_cutting_them(
        proxy_factory, clean_origin, archives, tmp_path):
    # systemd's default KillMode=control-group, `kill -TERM -PGID` and a shell-wrapped `docker stop`
    # signal every worker as well as the parent, which passes its own signal on
    proxy = proxy_factory(tmp_path / "cache", "--workers", "2", preexec_fn=os.setsid)
    workers = _workers(proxy.process.pid)
    assert all(_ignores(pid, signal.SIGTERM) and _ignores(pid, signal.SIGINT) for pid in workers)
    client, download = _held_download(proxy, clean_origin, archives.padded)
    os.killpg(proxy.process.pid, signal.SIGTERM)
    proxy.wait_for_log("stopping on SIGTERM: new connections refused, 1 busy")
    clean_origin.release()
    client.join(timeout=120)
    assert [(status, body) for status, _, body in download] == [(200, archives.padded.read_bytes())]
    assert proxy.process.wait(timeout=60) == 0
    assert not any(_alive(pid) for pid in workers)
    log = proxy.log.read_text()
    assert "second stop signal" not in log and "Traceback" not in log, log[-3000:]


def test_workers_whose_parent_is_killed_drain_and_exit(proxy_factory, clean_origin, archives, tmp_path):
    proxy = proxy_factory(tmp_path / "cache", "--workers", "2")
    workers = _workers(proxy.process.pid)
    try:
        client, download = _held_download(proxy, clean_origin, archives.padded)
        proxy.process.kill()
        proxy.process.wait()
        proxy.wait_for_log("stopping on the parent's exit: new connections refused, 1 busy")
        proxy.wait_for_log("stopping on the parent's exit: new connections refused, 0 busy")
        assert _refused(proxy.url)
        clean_origin.release()
        client.join(timeout=120)
        assert [(status, body) for status, _, body in download] == [(200, archives.padded.read_bytes())]
        while any(_any_thread_alive(pid) for pid in workers):  # orphans: nobody left to report their exit
            time.sleep(0.05)
        assert _refused(proxy.url)  # no worker left behind holds the port
        assert "Traceback" not in proxy.log.read_text()
    finally:
        for pid in workers:  # had they outlived their parent for good
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_workers_that_cannot_start_end_serve_with_their_one_line_reason(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hubproxy", "serve", "--workers", "2", "--listen", "127.0.0.1:0",
                             "--cache-dir", str(tmp_path / "cache"), "--intercept", "--ca-dir",
                             str(tmp_path / "no-ca")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-ca" in lines[0], result.stderr


def _intercepting_workers(proxy_factory, tmp_path):
    """serve --workers 2 --intercept: each worker loads the CA as it starts."""
    ca = tmp_path / "ca"
    assert run_cli("ca", "init", "--ca-dir", ca).returncode == 0
    return proxy_factory(tmp_path / "cache", "--workers", "2", "--intercept", "--ca-dir", ca), ca


def test_a_replacement_that_cannot_start_is_tried_again_while_the_other_worker_serves(
        proxy_factory, clean_origin, archives, tmp_path):
    proxy, ca = _intercepting_workers(proxy_factory, tmp_path)
    model = clean_origin.register(archives.small)
    first, second = _workers(proxy.process.pid)
    ca.rename(tmp_path / "ca-moved")  # a worker started now cannot load it
    os.kill(first, signal.SIGKILL)
    proxy.wait_for_log(f"could not start: {ca / 'ca.pem'} does not exist")
    proxy.wait_for_log("; trying again in 2s")  # and again, later
    assert proxy.get(f"/{model.handle}")[::2] == (200, archives.small.read_bytes())
    (tmp_path / "ca-moved").rename(ca)
    proxy.wait_for_log("listening again")
    now = _workers(proxy.process.pid)
    assert len(now) == 2 and second in now and first not in now
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=60) == 0
    assert "Traceback" not in proxy.log.read_text()


def _write_once_read(fifo: Path, data: bytes) -> None:
    """data into the FIFO, once a process has opened it to read (given up after a minute)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:  # ENXIO: no reader yet
            assert e.errno == errno.ENXIO, e
            time.sleep(0.05)
            continue
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(data)
        return


def test_a_stop_reaches_the_workers_while_a_replacement_is_still_starting(proxy_factory, tmp_path):
    proxy, ca = _intercepting_workers(proxy_factory, tmp_path)
    first, second = _workers(proxy.process.pid)
    certificate = ca / "ca.pem"
    pem = certificate.read_bytes()
    certificate.unlink()
    os.mkfifo(certificate)  # a worker started now waits for it as it loads the CA
    try:
        os.kill(first, signal.SIGKILL)
        proxy.wait_for_log(f"(pid {first}) exited with status -9; starting another")
        proxy.process.send_signal(signal.SIGTERM)
        proxy.wait_for_log("stopping on SIGTERM: new connections refused")  # the other worker, at once
    finally:
        _write_once_read(certificate, pem)  # the replacement starts, and stops at once
    assert proxy.process.wait(timeout=60) == 0
    assert not _alive(second)
    assert "Traceback" not in proxy.log.read_text()


def _plain_listener(proxy_factory, tmp_path) -> tuple[int, contextlib.closing]:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken.getsockname()[1], contextlib.closing(taken)


def _serve_with_workers(proxy_factory, tmp_path) -> tuple[int, contextlib.nullcontext]:
    # SO_REUSEPORT would let a second one of the same user share the port: the kernel would split
    # the traffic between two services
    proxy = proxy_factory(tmp_path / "running", "--workers", "2")
    return int(proxy.url.rsplit(":", 1)[1]), contextlib.nullcontext()


@pytest.mark.parametrize("taker", [_plain_listener, _serve_with_workers], ids=["a plain listener", "serve --workers"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_that_is_taken_fails_serve_before_it_makes_the_cache_dir(proxy_factory, tmp_path, taker, workers):
    port, taken = taker(proxy_factory, tmp_path)
    with taken:
        result = subprocess.run([sys.executable, "-m", "hubproxy", "serve", "--workers", workers, "--listen",
                                 f"127.0.0.1:{port}", "--cache-dir", str(tmp_path / "cache")],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"Error: cannot serve on 127.0.0.1:{port}: Address already in use"
    assert not (tmp_path / "cache").exists()
