"""A cache disk that is full or read-only must not stop clients, and must never keep a partial archive.

The proxy passes such fetches through from memory (paced by the slowest client), verifies them as
ever, stores nothing, says so once per burst, and stores again as soon as the disk takes writes.
The cache lives on a small tmpfs that each test mounts (skipped where the machine forbids mounts).
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import (compressed_offset_of_member, hub_load, loaded_output, model_dirs, peak_rss, raw_request,
                            stand_in_archive)

DISK_SIZE = 16 << 20
FREE_WHEN_FULL = 1536 << 10  # room for the first MiB of a fetch, not for a whole 4 MiB archive
CANNOT_WRITE = "cannot write to"
WRITES_AGAIN = "takes writes again"


class SmallDisk:
    def __init__(self, mount_point: Path):
        self.mount_point = mount_point
        self.cache_dir = mount_point / "cache"
        self._filler = mount_point / "filler"

    def fill(self, leave: int = FREE_WHEN_FULL) -> None:
        free = os.statvfs(self.mount_point).f_bavail * os.statvfs(self.mount_point).f_frsize
        with self._filler.open("ab") as filler:
            filler.write(b"\0" * (free - leave))

    def make_room(self) -> None:
        self._filler.unlink()

    def limit_new_files(self, allowed: int) -> None:
        """Let only `allowed` more files or directories be created (tmpfs counts inodes apart from bytes)."""
        stats = os.statvfs(self.mount_point)
        in_use = stats.f_files - stats.f_ffree
        subprocess.run(["mount", "-o", f"remount,nr_inodes={in_use + allowed}", str(self.mount_point)], check=True)

    def make_cache_read_only(self) -> None:
        """What a kernel does to a file system after I/O errors: new writes fail with EROFS (a read-only
        bind mount over the cache, since a running proxy's open index keeps a remount busy)."""
        read_only_bind_mount(self.cache_dir)

    def make_cache_writable(self) -> None:
        # Lazily: files opened through the read-only mount (an index connection a thread opened
        # meanwhile) keep it alive until the proxy drops them.
        subprocess.run(["umount", "--lazy", str(self.cache_dir)], check=True)

    def stored_files(self) -> list[Path]:
        blobs = [p for p in (self.cache_dir / "blobs").rglob("*") if p.is_file()]
        return blobs + list((self.cache_dir / "tmp").iterdir())


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


_OPEN_TREE, _MOVE_MOUNT, _MOUNT_SETATTR = 428, 429, 442  # the same number on every architecture
_AT_FDCWD, _AT_EMPTY_PATH, _OPEN_TREE_CLONE, _MOVE_MOUNT_F_EMPTY_PATH, _MOUNT_ATTR_RDONLY = -100, 0x1000, 1, 4, 1


def read_only_bind_mount(directory: Path) -> None:
    """Cover `directory` with a read-only bind of itself in one step: with `mount --bind` then
    `remount,ro`, a file the proxy opens for writing in between makes the remount fail busy."""
    libc = ctypes.CDLL(None, use_errno=True)
    path = os.fsencode(directory)

    def call(*args) -> int:
        result = libc.syscall(*args)
        if result < 0:
            raise OSError(ctypes.get_errno(), f"read-only bind mount of {directory}: {os.strerror(ctypes.get_errno())}")
        return result

    tree = call(_OPEN_TREE, _AT_FDCWD, path, _OPEN_TREE_CLONE | os.O_CLOEXEC)
    try:
        attr = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY)
        call(_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
        call(_MOVE_MOUNT, tree, b"", _AT_FDCWD, path, _MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(tree)


@pytest.fixture
def small_disk(tmp_path, tmpfs):
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    return SmallDisk(tmpfs(mount_point, f"size={DISK_SIZE}"))


def _log_count(proxy, text: str) -> int:
    return proxy.log.read_text().count(text)


@pytest.fixture
def full_disk_proxy(proxy_factory, small_disk):
    proxy = proxy_factory(small_disk.cache_dir)
    small_disk.fill()
    return proxy


def _archive_path(model) -> str:
    return f"/{model.handle}?tf-hub-format=compressed"


def test_full_disk_still_serves_every_client(full_disk_proxy, clean_origin, archives, tmp_path):
    proxy = full_disk_proxy
    model = clean_origin.register(archives.padded)

    loaded = hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")
    status, headers, body = proxy.get(_archive_path(model))

    assert loaded_output(loaded) == archives.expected(archives.padded)
    assert (status, headers["X-Cache"], body) == (200, "MISS", archives.padded.read_bytes())


def test_full_disk_stores_nothing_and_says_so_once_per_burst(full_disk_proxy, clean_origin, small_disk, archives):
    proxy = full_disk_proxy
    model = clean_origin.register(archives.padded)

    for _ in range(2):
        assert proxy.get(_archive_path(model))[0] == 200

    assert small_disk.stored_files() == []
    assert proxy.metric("hubproxy_cache_write_errors_total", reason="no_space") == 2
    assert proxy.metric("hubproxy_passthrough_fetches_total") == 2
    assert proxy.metric("hubproxy_cache_writable") == 0
    assert _log_count(proxy, CANNOT_WRITE) == 1, "one line per burst, not one per failed write"


def test_cache_stores_again_once_the_full_disk_has_room(full_disk_proxy, clean_origin, small_disk, archives):
    proxy = full_disk_proxy
    model = clean_origin.register(archives.padded)
    assert proxy.get(_archive_path(model))[0] == 200  # passed through

    small_disk.make_room()

    assert proxy.get(_archive_path(model))[1]["X-Cache"] == "MISS"  # nothing was indexed while the disk was full
    status, headers, body = proxy.get(_archive_path(model))
    assert (status, headers["X-Cache"], body) == (200, "HIT", archives.padded.read_bytes())
    assert proxy.metric("hubproxy_cache_writable") == 1
    assert _log_count(proxy, WRITES_AGAIN) == 1


@pytest.fixture
def read_only_proxy(proxy_factory, clean_origin, small_disk, archives):
    """A proxy whose cache holds archives.small, then turns read-only: (proxy, the cached model)."""
    proxy = proxy_factory(small_disk.cache_dir)
    cached = clean_origin.register(archives.small)
    assert proxy.get(f"/{cached.handle}")[1]["X-Cache"] == "MISS"
    small_disk.make_cache_read_only()
    return proxy, cached


def test_read_only_cache_still_serves_hits(read_only_proxy, archives):
    proxy, cached = read_only_proxy

    hit = proxy.get(f"/{cached.handle}")

    assert (hit[0], hit[1]["X-Cache"], hit[2]) == (200, "HIT", archives.small.read_bytes())


def test_read_only_cache_passes_misses_through_and_counts_the_refused_write(read_only_proxy, clean_origin,
                                                                           small_disk, archives):
    proxy, _ = read_only_proxy
    fresh = clean_origin.register(archives.padded)

    miss = proxy.get(f"/{fresh.handle}")

    assert (miss[0], miss[1]["X-Cache"], miss[2]) == (200, "MISS", archives.padded.read_bytes())
    # No hit is counted in this test: a hit's count reaches the index later (at the next
    # housekeeping pass, or at once when a refused write pokes it), and that write fails or not
    # while read-only as the thread doing it has an index connection from before the disk turned
    # read-only or not.
    assert proxy.metric("hubproxy_cache_write_errors_total", reason="read_only") == 1, "the temp file, no more"
    small_disk.make_cache_writable()
    assert len(small_disk.stored_files()) == 1, "only the archive cached before"


def test_cache_stores_again_after_a_read_only_spell(read_only_proxy, clean_origin, small_disk, archives):
    proxy, _ = read_only_proxy
    fresh = clean_origin.register(archives.padded)
    assert proxy.get(f"/{fresh.handle}")[1]["X-Cache"] == "MISS"  # passed through

    small_disk.make_cache_writable()

    # A thread's index connection opened while read-only fails one write, then reopens: recovery
    # may cost a few pass-throughs (one per such thread), never more.
    outcomes = [proxy.get(f"/{fresh.handle}")[1]["X-Cache"] for _ in range(8)]
    assert "HIT" in outcomes and outcomes[outcomes.index("HIT"):] == ["HIT"] * (8 - outcomes.index("HIT"))


def test_commit_refused_by_the_disk_still_delivers_the_verified_archive(proxy_factory, clean_origin, small_disk,
                                                                       archives):
    """The archive reaches the temp file whole, but the disk refuses the commit (room for the temp
    file, none for the blob's directory): the client still gets it, and nothing is indexed."""
    proxy = proxy_factory(small_disk.cache_dir)
    model = clean_origin.register(archives.padded)
    path = f"/{model.handle}?tf-hub-format=compressed"
    small_disk.limit_new_files(1)

    status, headers, body = proxy.get(path)

    assert (status, headers["X-Cache"], body) == (200, "MISS", archives.padded.read_bytes())
    assert proxy.metric("hubproxy_cache_write_errors_total", reason="no_space") == 1
    assert proxy.metric("hubproxy_passthrough_fetches_total") == 1
    assert small_disk.stored_files() == []
    small_disk.limit_new_files(100)
    assert proxy.get(path)[1]["X-Cache"] == "MISS"
    assert proxy.get(path)[1]["X-Cache"] == "HIT"


def test_cut_upstream_on_a_full_disk_still_makes_the_client_fail(proxy_factory, clean_origin, small_disk, archives,
                                                                tmp_path):
    proxy = proxy_factory(small_disk.cache_dir)
    model = clean_origin.register(archives.padded)
    clean_origin.faults(model, truncate_at=compressed_offset_of_member(archives.padded, "assets/pad-b.bin"))
    small_disk.fill()

    failed = hub_load(f"{proxy.url}/{model.handle}", tmp_path / "tfhub")

    assert failed.returncode != 0
    assert model_dirs(tmp_path / "tfhub") == []
    assert small_disk.stored_files() == []


def test_http10_client_on_a_full_disk_gets_a_clear_refusal(proxy_factory, clean_origin, small_disk, archives):
    """Without chunked encoding a cut cannot be signalled, so HTTP/1.0 clients only ever get stored
    archives: with nothing storable they are told so, never sent a body that may be short."""
    proxy = proxy_factory(small_disk.cache_dir)
    model = clean_origin.register(archives.padded)
    small_disk.fill()

    status, body = raw_request(proxy.url, f"GET /{model.handle} HTTP/1.0\r\n\r\n".encode())

    assert status == 503 and b"cannot store" in body
    assert small_disk.stored_files() == []


def test_herd_on_a_full_disk_shares_one_upstream_fetch(proxy_factory, clean_origin, small_disk, archives):
    proxy = proxy_factory(small_disk.cache_dir)
    model = clean_origin.register(archives.padded)
    clean_origin.faults(model, hold_after=2 << 20)  # past what the disk takes
    small_disk.fill()
    results: list = []

    def fetch() -> None:
        results.append(proxy.get(f"/{model.handle}?tf-hub-format=compressed")[2])

    clients = [threading.Thread(target=fetch) for _ in range(4)]
    for client in clients:
        client.start()
    clean_origin.wait_held(1)
    proxy.wait_for_metric("hubproxy_flight_readers", 4)
    clean_origin.release()
    for client in clients:
        client.join(timeout=120)

    assert results == [archives.padded.read_bytes()] * 4
    assert clean_origin.object_gets(model) == 1
    assert small_disk.stored_files() == []


def test_a_process_passing_an_archive_through_lets_another_on_the_cache_fetch_it_alone(
        proxy_factory, clean_origin, small_disk, archives):
    """Another process cannot follow bytes held in a leader's memory; told so (the lock file's mode,
    which takes no space on the full disk), it fetches on its own instead of waiting for the end."""
    leader, other = proxy_factory(small_disk.cache_dir), proxy_factory(small_disk.cache_dir)
    model = clean_origin.register(archives.padded)
    clean_origin.faults(model, hold_after=2 << 20)
    small_disk.fill(leave=0)
    first: list = []
    held = threading.Thread(target=lambda: first.append(leader.get(_archive_path(model))[2]))
    held.start()
    clean_origin.wait_held(1)
    clean_origin.faults(model, hold_after=None)  # what the other process asks for is not held

    status, _, body = other.get(_archive_path(model))  # while the leader's fetch is still held
    assert (status, body) == (200, archives.padded.read_bytes())
    clean_origin.release()
    held.join(timeout=120)
    assert first == [archives.padded.read_bytes()]
    assert clean_origin.object_gets(model) == 2
    assert small_disk.stored_files() == []


def test_pass_through_memory_is_paced_by_a_slow_client(proxy_factory, clean_origin, small_disk, tmp_path):
    """Without the disk, a fast origin and a slow client would pile the archive up in memory."""
    size = 96 << 20
    archive = stand_in_archive(tmp_path / "big.tar.gz", size)
    proxy = proxy_factory(small_disk.cache_dir)
    model = clean_origin.register(archive)
    small_disk.fill()
    baseline = peak_rss(proxy.process.pid)

    received = _read_slowly(proxy.url, f"/{model.handle}?tf-hub-format=compressed")

    assert received == size
    assert peak_rss(proxy.process.pid) - baseline < size // 2
    assert small_disk.stored_files() == []


def _read_slowly(base_url: str, path: str) -> int:
    """GET with a client reading about 50 MB/s, a tenth of what the origin sends; returns body bytes
    (chunk framing included in the count, so it is parsed)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = bytearray()
        while chunk := sock.recv(256 << 10):
            raw += chunk
            time.sleep(0.005)  # the pace of a slow client, not a synchronisation
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0]
    return _dechunked_length(body)


def _dechunked_length(body: bytes) -> int:
    total, position = 0, 0
    while True:
        line_end = body.index(b"\r\n", position)
        length = int(body[position:line_end], 16)
        if length == 0:
            return total
        total += length
        position = line_end + 2 + length + 2
