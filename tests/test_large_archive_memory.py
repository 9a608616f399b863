"""A large archive must never sit whole in the proxy's memory, on a miss, a join or a hit."""

from __future__ import annotations

import os
import threading

from tests.conftest import peak_rss

ARCHIVE_SIZE = 160 * 1024 * 1024


def _drain(proxy, path: str, results: list) -> None:
    status, headers, body = proxy.get(path)
    results.append((status, headers["X-Cache"], len(body)))


def test_peak_memory_stays_far_below_the_archive_size(proxy, origin, tmp_path):
    archive = tmp_path / "big.tar.gz"
    with archive.open("wb") as f:  # gzip magic, then incompressible filler: the proxy streams it as is
        f.write(b"\x1f\x8b")
        for _ in range(ARCHIVE_SIZE // (8 << 20)):
            f.write(os.urandom(8 << 20))
    model = origin.register(archive)
    path = f"/{model.handle}?tf-hub-format=compressed"
    baseline = peak_rss(proxy.process.pid)

    results: list = []
    clients = [threading.Thread(target=_drain, args=(proxy, path, results)) for _ in range(3)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=300)
    _drain(proxy, path, results)

    size = archive.stat().st_size
    assert [r[2] for r in results] == [size] * 4
    assert results[-1][1] == "HIT"
    assert peak_rss(proxy.process.pid) - baseline < size // 4
