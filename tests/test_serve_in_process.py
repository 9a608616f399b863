"""The front in process: hubproxy's aiohttp app on a real socket in the test's event loop, real HTTP
clients, the origin emulator as its own process. Hits and misses at once, a client that leaves in
the middle of a miss, and pipelined requests on one connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import io
import socket
import urllib.parse

import aiohttp
import pytest

from hubproxy.serve.components import METRICS, SERVING
from tests.conftest import stand_in_archive
from tests.in_process import origin_paused, release_when_held, serving, settings_for, until

CLIENTS = 4


@pytest.fixture
def cold(held_stand_in):
    """A model nothing has cached, whose origin pauses mid-transfer (a miss under way) until released."""
    return held_stand_in


@pytest.fixture
def cached(clean_origin, tmp_path):
    return clean_origin.register(stand_in_archive(tmp_path / "cached.tar.gz", 100_000))


def _flight_readers(app) -> float:
    return app[METRICS].registry.get_sample_value("hubproxy_flight_readers")


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    async with session.get(url) as response:
        return response.status, response.headers["X-Cache"], await response.read()


async def _prime(base_url: str, model) -> None:
    async with aiohttp.ClientSession() as session:
        assert (await _get(session, f"{base_url}/{model.handle}"))[1] == "MISS"


def test_hits_are_answered_while_a_miss_waits_on_the_origin_and_the_miss_is_fetched_once(
        clean_origin, cold, cached, tmp_path):
    settings = settings_for(clean_origin, tmp_path / "cache")

    async def scenario():
        async with serving(settings) as (base_url, app):
            await _prime(base_url, cached)
            async with aiohttp.ClientSession() as session:
                misses = [asyncio.create_task(_get(session, f"{base_url}/{cold.handle}")) for _ in range(CLIENTS)]
                await until(lambda: _flight_readers(app) == CLIENTS, "every miss attached to the flight")
                await origin_paused(clean_origin)
                hits = await asyncio.gather(*(_get(session, f"{base_url}/{cached.handle}") for _ in range(CLIENTS)))
                await asyncio.to_thread(clean_origin.release)  # only once every hit is answered
                return hits, await asyncio.gather(*misses)

    hits, misses = asyncio.run(scenario())

    assert hits == [(200, "HIT", open(cached.file, "rb").read())] * CLIENTS
    assert sorted(outcome for _, outcome, _ in misses) == ["JOIN"] * (CLIENTS - 1) + ["MISS"]
    assert [(status, body) for status, _, body in misses] == [(200, open(cold.file, "rb").read())] * CLIENTS
    assert clean_origin.object_gets(cold) == 1
    assert clean_origin.object_gets(cached) == 1


def test_a_client_leaving_mid_miss_leaves_the_others_their_archive_and_the_cache_its_entry(
        clean_origin, cold, tmp_path):
    settings = settings_for(clean_origin, tmp_path / "cache")
    url_path = f"/{cold.handle}"

    async def scenario():
        async with serving(settings) as (base_url, app):
            sessions = [aiohttp.ClientSession() for _ in range(3)]
            try:
                responses = [await session.get(base_url + url_path) for session in sessions]
                first_bytes = [await response.content.readexactly(64 << 10) for response in responses]
                quitter, *stayers = responses
                quitter.close()  # hangs up mid-transfer
                await release_when_held(clean_origin)
                bodies = [start + await response.read() for start, response in zip(first_bytes[1:], stayers)]
                await until(lambda: _flight_readers(app) == 0, "the quitter's request ended too")
                after = await _get(sessions[1], base_url + url_path)
            finally:
                for session in sessions:
                    await session.close()
            return bodies, after

    bodies, after = asyncio.run(scenario())

    archive = open(cold.file, "rb").read()
    assert bodies == [archive] * 2
    assert after == (200, "HIT", archive)
    assert clean_origin.object_gets(cold) == 1


def test_pipelined_requests_are_answered_in_the_order_they_were_sent(clean_origin, cold, cached, tmp_path):
    """A hit behind a miss on one connection must wait for it: answering first would hand the
    client the hit's bytes as the miss's response."""
    settings = settings_for(clean_origin, tmp_path / "cache")
    cached_bytes = open(cached.file, "rb").read()
    etag = f'"{hashlib.sha256(cached_bytes).hexdigest()}"'
    requests = [("GET", f"/{cold.handle}", {}), ("GET", f"/{cached.handle}", {}), ("HEAD", f"/{cached.handle}", {}),
                ("GET", f"/{cached.handle}", {"If-None-Match": etag}), ("GET", "/healthz", {"Connection": "close"})]

    async def scenario():
        async with serving(settings) as (base_url, _):
            await _prime(base_url, cached)
            answering = asyncio.create_task(asyncio.to_thread(_pipeline, base_url, requests))
            await release_when_held(clean_origin)
            return await answering

    answers = asyncio.run(scenario())

    assert answers == [(200, "MISS", open(cold.file, "rb").read()), (200, "HIT", cached_bytes), (200, "HIT", b""),
                       (304, "HIT", b""), (200, None, b"ok\n")]


def test_blobs_no_longer_being_sent_leave_nothing_behind_in_the_busy_set(clean_origin, tmp_path):
    """A hit's blob is busy (never evicted) while it is sent; the count of sends kept a key for every
    blob ever served, so a long-running mirror's memory grew with each archive it sent."""
    models = [clean_origin.register(stand_in_archive(tmp_path / f"served-{n}.tar.gz", 50_000)) for n in range(3)]
    settings = settings_for(clean_origin, tmp_path / "cache")

    async def scenario():
        async with serving(settings) as (base_url, app):
            async with aiohttp.ClientSession() as session:
                for model in models:
                    await _prime(base_url, model)
                    assert (await _get(session, f"{base_url}/{model.handle}"))[1] == "HIT"
            await until(lambda: sum(app[SERVING].values()) == 0, "every hit's send ended")
            return dict(app[SERVING])

    assert asyncio.run(scenario()) == {}


def _pipeline(base_url: str, requests: list[tuple[str, str, dict]]) -> list[tuple[int, str | None, bytes]]:
    """Send every request on one connection before reading any answer; (status, X-Cache, body) of
    each answer, in the order they came."""
    host_port = urllib.parse.urlsplit(base_url).netloc
    host, port = host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(b"".join(_request_bytes(method, path, {"Host": host_port, **headers})
                              for method, path, headers in requests))
        stream = _KeptOpen(socket.SocketIO(sock, "rb"))
        answers = []
        for method, _, _ in requests:
            response = http.client.HTTPResponse(_OneStream(stream), method=method)
            response.begin()
            answers.append((response.status, response.headers["X-Cache"], response.read()))
        return answers


def _request_bytes(method: str, path: str, headers: dict) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _KeptOpen(io.BufferedReader):
    """The connection's one buffered stream: each response closes its stream when read, and a
    stream of its own would buffer (and lose) the next response's bytes."""

    def close(self) -> None:
        pass


class _OneStream:
    """What http.client.HTTPResponse takes for a socket: it only asks for a file to read."""

    def __init__(self, stream: io.BufferedReader):
        self._stream = stream

    def makefile(self, mode: str) -> io.BufferedReader:
        return self._stream
