"""Purges and evictions racing fetches and hits of the same content-addressed blob: two spellings of
one model (tfhub and Kaggle paths) are two index keys naming one blob, so purging one while the
other is fetched or served must neither crash the other's commit nor turn its hit into an error.

Hazards guarded: a commit that fails after a whole download because a blob it shares was deleted
under it (its clients cut); a hit whose blob vanished between the index check and the open answered
as anything but a miss; a commit racing a purge leaving an entry that names no blob.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import os
import sqlite3
import threading
import urllib.request

import aiohttp
import pytest

from hubproxy.cache import plans
from hubproxy.cache.operations import carry_out
from hubproxy.cache.store import Store
from hubproxy.fetch.flight import State
from hubproxy.serve.components import FLIGHTS, STORE
from tests.conftest import http_request
from tests.in_process import WAIT_SECONDS, Reader, fetching, origin_paused, serving, settings_for

TOKEN = "race-admin-token-0123456789abcdef"
RACE_REQUESTS = 1350
PURGE_EVERY = 3  # one request in three is a purge of one spelling or an eviction
RACE_CLIENTS = 12


class PauseAtTheIndex:
    """Holds the first thread (of those started once installed) that calls into the index's
    database after arm(), just before that call, until resumed: a commit caught after whatever it checked on disk and before
    the index knows of it, which is where a purge racing it lands. Instruments SQLite's entry
    point only (threading.setprofile); nothing of hubproxy's is replaced."""

    def __init__(self):
        self.reached = threading.Event()
        self._resume = threading.Event()
        self._armed = threading.Lock()
        self._armed.acquire()

    def arm(self) -> None:
        self._armed.release()

    def resume(self) -> None:
        self._resume.set()

    def _profile(self, frame, event, arg) -> None:
        if event == "c_call" and isinstance(getattr(arg, "__self__", None), sqlite3.Connection):
            if self._armed.acquire(blocking=False):  # only the first call after arming waits
                self.reached.set()
                self._resume.wait(WAIT_SECONDS)

    @contextlib.contextmanager
    def installed(self):
        threading.setprofile(self._profile)
        try:
            yield self
        finally:
            threading.setprofile(None)
            self.resume()


def _index_under_another_spelling(store: Store, key: str, archive) -> None:
    """key → the archive's blob, committed as a bundle import does (another spelling already cached)."""
    fd, temp = store.new_temp_file()
    with os.fdopen(fd, "wb") as f:
        f.write(archive.read_bytes())
    store.commit(key, temp, hashlib.sha256(archive.read_bytes()).hexdigest(), archive.stat().st_size,
                 etag=None, content_type="application/x-tar", source="bundle")


def test_a_purge_of_another_spelling_landing_in_a_commit_leaves_the_commit_its_blob(
        clean_origin, held_stand_in, stand_in, store):
    kaggle_key = f"kaggle:{held_stand_in.kaggle_path}"
    _index_under_another_spelling(store, kaggle_key, stand_in)
    other_process = Store(store.root)  # a `hubproxy cache purge` while the proxy serves
    pause = PauseAtTheIndex()

    async def scenario():
        async with fetching(clean_origin, store, held_stand_in) as fetch:
            reader = Reader()
            reading = fetch.start(reader)
            await origin_paused(clean_origin)
            pause.arm()
            await asyncio.to_thread(clean_origin.release)
            await asyncio.to_thread(pause.reached.wait, WAIT_SECONDS)
            assert pause.reached.is_set(), "the commit never reached the index"
            await asyncio.to_thread(carry_out, other_process,
                                    plans.matching(other_process.entries(), [kaggle_key], include_pinned=True))
            pause.resume()
            return reader, await reading

    try:
        with pause.installed():
            reader, body = asyncio.run(scenario())
    finally:
        other_process.close()

    assert body == stand_in.read_bytes()
    assert reader.flight.state is State.COMMITTED
    entry = store.lookup(reader.flight.key)
    assert entry is not None and store.has_blob(entry), "the committed entry names a blob the purge deleted"
    assert store.blob_path(entry.sha256).read_bytes() == stand_in.read_bytes()
    assert [e.key for e in store.entries()] == [reader.flight.key]


def test_a_hit_whose_blob_vanished_after_the_index_check_is_a_miss_for_get_and_head(clean_origin, tmp_path):
    archive = tmp_path / "vanishing.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + os.urandom(100_000))
    model = clean_origin.register(archive)
    settings = settings_for(clean_origin, tmp_path / "cache")
    url_path = f"/{model.handle}?tf-hub-format=compressed"

    async def vanish(app, key: str) -> None:
        """Another process purges the blob; this one's index check (memoised) still says cached."""
        entry = app[STORE].lookup(key)
        app[STORE].blob_path(entry.sha256).unlink(missing_ok=True)
        assert app[STORE].lookup(key) == entry and not app[STORE].has_blob(entry)

    async def scenario():
        async with serving(settings) as (base_url, app), aiohttp.ClientSession() as session:
            key = f"tfhub:/{model.handle}"
            answers = []
            for method in ("HEAD", "GET"):
                async with session.get(base_url + url_path) as response:
                    assert response.status == 200  # cached (again)
                    await response.read()
                await vanish(app, key)
                async with session.request(method, base_url + url_path) as response:
                    answers.append((method, response.status, response.headers["X-Cache"], await response.read()))
            return answers

    answers = asyncio.run(scenario())

    assert answers == [("HEAD", 200, "MISS", b""), ("GET", 200, "MISS", archive.read_bytes())]


@pytest.mark.parametrize("kind", ["range", "HTTP/1.0"])
def test_a_request_waiting_for_the_commit_whose_blob_is_purged_as_it_lands_fetches_it_again(
        clean_origin, tmp_path, kind):
    """A Range or HTTP/1.0 request waits for the committed blob and is answered from it; a purge landing
    between the commit and that answer was a 503 "ask again": a vanished blob is a miss, never an error."""
    archive, model = _registered(clean_origin, tmp_path)
    ranged = kind == "range"
    headers, version = ({"Range": "bytes=10-"}, aiohttp.HttpVersion11) if ranged else ({}, aiohttp.HttpVersion10)

    purges, status, outcome, body = _get_purging_commits(clean_origin, tmp_path, model, 1, headers, version)

    assert purges == 1
    expected = (206, archive.read_bytes()[10:]) if ranged else (200, archive.read_bytes())
    assert (status, outcome, body) == (expected[0], "MISS", expected[1])
    assert clean_origin.object_gets(model) == 2, "fetched again after the purge"


def test_a_request_whose_blob_is_purged_each_time_it_lands_is_fetched_again_once_then_told_to_ask_again(
        clean_origin, tmp_path):
    _, model = _registered(clean_origin, tmp_path)

    purges, status, outcome, _ = _get_purging_commits(clean_origin, tmp_path, model, 10, {"Range": "bytes=10-"})

    assert (purges, status, outcome) == (2, 503, "MISS")
    assert clean_origin.object_gets(model) == 2


def _registered(origin, tmp_path):
    archive = tmp_path / "purged.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + os.urandom(100_000))
    return archive, origin.register(archive)


def _get_purging_commits(origin, tmp_path, model, purges_wanted: int, headers: dict,
                         version: aiohttp.HttpVersion = aiohttp.HttpVersion11) -> tuple[int, int, str, bytes]:
    """GET the model from a proxy in process whose first `purges_wanted` commits are purged by another
    process as they land (told by the flights' on_commit, before any reader is woken): (purges done,
    status, X-Cache, body)."""
    settings = settings_for(origin, tmp_path / "cache")
    key, purges = f"tfhub:/{model.handle}", []

    async def scenario(other_process: Store):
        async with serving(settings) as (base_url, app), aiohttp.ClientSession(version=version) as session:
            flights = app[FLIGHTS]
            poke = flights.on_commit

            def purge_as_it_lands() -> None:
                if len(purges) < purges_wanted:
                    purges.append(_purge_from_another_process(other_process, key))
                poke()

            flights.on_commit = purge_as_it_lands
            async with session.get(f"{base_url}/{model.handle}", headers=headers) as response:
                return response.status, response.headers["X-Cache"], await response.read()

    other_process = Store(tmp_path / "cache")
    try:
        status, outcome, body = asyncio.run(scenario(other_process))
    finally:
        other_process.close()
    return len(purges), status, outcome, body


def _admin(proxy, endpoint: str, body: dict) -> str:
    request = urllib.request.Request(f"{proxy.url}/admin/{endpoint}", method="POST", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return f"{endpoint} {response.status}"


def _purge_from_another_process(store: Store, key: str) -> str:
    """What `hubproxy cache purge KEY` does, from this process while the proxy serves."""
    carry_out(store, plans.matching(store.entries(), [key], include_pinned=True))
    return "purge done"


def _get(url: str, expected: bytes) -> str:
    try:
        status, _, body = http_request(url)
    except (http.client.HTTPException, ConnectionError) as e:
        return f"cut: {type(e).__name__}"
    return f"{status} {'right' if body == expected else 'WRONG'} bytes"


def test_a_race_loop_of_gets_and_purges_of_two_spellings_crashes_no_flight_and_answers_no_404(
        proxy_factory, clean_origin, tmp_path):
    archive = tmp_path / "shared.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + os.urandom(300_000))
    model = clean_origin.register(archive)
    config = tmp_path / "hubproxy.toml"
    config.write_text(f'admin_token = "{TOKEN}"\n')
    proxy = proxy_factory(tmp_path / "cache", "--config", config)
    spellings = [f"/{model.handle}", model.kaggle_path]
    keys = [f"tfhub:/{model.handle}", f"kaggle:{model.kaggle_path}"]
    other_process = Store(proxy.cache_dir)

    def one(i: int) -> str:
        spelling = i % 2
        if i % PURGE_EVERY:
            return _get(f"{proxy.url}{spellings[spelling]}?tf-hub-format=compressed", archive.read_bytes())
        purge = (i // PURGE_EVERY) % 3
        if purge == 0:
            return _admin(proxy, "purge", {"handles": [keys[spelling]]})
        if purge == 1:
            return _admin(proxy, "evict", {"max_size": "0B"})  # every spelling not being fetched
        return _purge_from_another_process(other_process, keys[spelling])

    try:
        with concurrent.futures.ThreadPoolExecutor(RACE_CLIENTS) as pool:
            outcomes = collections.Counter(pool.map(one, range(RACE_REQUESTS)))
    finally:
        other_process.close()

    log = proxy.log.read_text()
    assert [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line] == [], "a flight crashed"
    gets = RACE_REQUESTS - RACE_REQUESTS // PURGE_EVERY
    removals = RACE_REQUESTS // PURGE_EVERY
    assert outcomes == {"200 right bytes": gets, "purge 200": removals // 3, "evict 200": removals // 3,
                        "purge done": removals // 3}, "every GET is a 200 with the archive's bytes"
