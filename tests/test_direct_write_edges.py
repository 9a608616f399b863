"""A fetch's bytes reach its temp file around the page cache (cache/appender.py): whole blocks with
O_DIRECT, the partial blocks at either edge of each append through the cache. The hazards: a byte
lost, doubled or misplaced at a block edge, an unaligned start (a takeover appends to a dead
process's file), and a filesystem that refuses O_DIRECT, which must still get every byte.
"""

from __future__ import annotations

import os
import random

import pytest

from hubproxy.cache.appender import ALIGN, STAGING, Appender

EDGES = [1, ALIGN - 1, ALIGN, ALIGN + 1, STAGING - 1, STAGING, STAGING + ALIGN + 7, 3 * STAGING + 1]


def _append_in_pieces(path, start: int, data: bytes, seed: int) -> Appender:
    """data appended after `start` bytes of filler, in appends of pieces of awkward sizes."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"f" * start)
        appender = Appender(fd, start)
        position = 0
        while position < len(data):
            pieces = []
            for _ in range(rng.randint(1, 6)):
                size = rng.choice(EDGES + [rng.randint(1, 300_000)])
                pieces.append(data[position:position + size])
                position += len(pieces[-1])
            appender.append(pieces)
            assert appender.end == start + position  # each append is all in the file when it returns
    finally:
        os.close(fd)
    return appender


def _takes_o_direct(directory) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


@pytest.mark.parametrize("start", [0, 1, ALIGN - 1, ALIGN, 3 * ALIGN + 5])
@pytest.mark.parametrize("seed", range(4))
def test_every_byte_lands_once_in_order_across_block_edges(tmp_path, start, seed):
    if not _takes_o_direct(tmp_path):
        pytest.skip(f"{tmp_path} is on a filesystem that refuses O_DIRECT")
    data = random.Random(seed).randbytes(random.Random(seed).randint(0, 5 * STAGING))
    appender = _append_in_pieces(tmp_path / "temp", start, data, seed)
    assert appender.direct  # whole blocks went around the page cache
    assert (tmp_path / "temp").read_bytes() == b"f" * start + data


def test_a_filesystem_without_o_direct_gets_every_byte_through_the_page_cache(tmp_path, ramfs):
    disk = ramfs(tmp_path / "ramfs")
    data = random.Random(7).randbytes(3 * STAGING + 123)
    appender = _append_in_pieces(disk / "temp", ALIGN + 3, data, seed=7)
    assert not appender.direct
    assert (disk / "temp").read_bytes() == b"f" * (ALIGN + 3) + data


def test_a_cache_on_a_filesystem_without_o_direct_stores_and_serves_archives(proxy_factory, clean_origin,
                                                                            archives, tmp_path, ramfs):
    proxy = proxy_factory(ramfs(tmp_path / "ramfs") / "cache")
    model = clean_origin.register(archives.padded)
    expected = archives.padded.read_bytes()

    for outcome in ("MISS", "HIT"):
        status, headers, body = proxy.get(f"/{model.handle}?tf-hub-format=compressed")
        assert (status, headers["X-Cache"], body == expected) == (200, outcome, True)
    assert "Traceback" not in proxy.log.read_text()
