"""A site cache (child) fetching through a regional hubproxy (parent, --parent): the origin is asked
once, the child verifies the parent's bytes against the sha256 it states, and a dead parent is
passed over for the next."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import socket
import threading

import pytest
from aiohttp import web

from tests import test_interception, test_kagglehub_through_mirror as through, test_origin_kaggle_api
from tests.conftest import hub_load, loaded_output, model_dirs
from tests.test_origin_kaggle_api import downloaded, md5s

ca, members, archive = test_interception.ca, test_origin_kaggle_api.members, test_origin_kaggle_api.archive


def _stored_blobs(proxy) -> list:
    return [p for p in (proxy.cache_dir / "blobs").rglob("*") if p.is_file()]


def test_a_child_loads_through_its_parent_and_the_origin_is_asked_once(proxy_factory, clean_origin, archives,
                                                                      tmp_path):
    origin = clean_origin
    model = origin.register(archives.small)
    parent = proxy_factory(tmp_path / "parent")
    child = proxy_factory(tmp_path / "child", "--parent", parent.url)

    assert loaded_output(hub_load(f"{child.url}/{model.handle}", tmp_path / "tfhub1")) == \
        archives.expected(archives.small)
    second_child = proxy_factory(tmp_path / "child2", "--parent", parent.url)
    assert loaded_output(hub_load(f"{second_child.url}/{model.handle}", tmp_path / "tfhub2")) == \
        archives.expected(archives.small)

    assert origin.object_gets(model) == 1  # the second child's miss was the parent's hit
    assert _stored_blobs(child) and _stored_blobs(second_child) and _stored_blobs(parent)


def test_a_dead_first_parent_is_passed_over_for_the_next(proxy_factory, clean_origin, archives, tmp_path):
    origin = clean_origin
    model = origin.register(archives.small)
    parent = proxy_factory(tmp_path / "parent")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{unused.getsockname()[1]}"  # bound, never listening: connection refused
        child = proxy_factory(tmp_path / "child", "--parent", dead, "--parent", parent.url, "--retries", "0")

        assert loaded_output(hub_load(f"{child.url}/{model.handle}", tmp_path / "tfhub")) == \
            archives.expected(archives.small)
    assert origin.object_gets(model) == 1


@pytest.fixture
def rogue_parent(archives):
    """A 'parent' that serves a valid archive with the Repr-Digest of other bytes."""
    body = archives.small.read_bytes()
    wrong = base64.b64encode(hashlib.sha256(body + b"x").digest()).decode()

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": "application/x-tar",
                                                "Repr-Digest": f"sha-256=:{wrong}:"})

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.run_until_complete(runner.cleanup())
    loop.close()


def test_a_parent_serving_rotten_bytes_cuts_the_client_and_stores_nothing(proxy_factory, clean_origin,
                                                                          rogue_parent, tmp_path):
    child = proxy_factory(tmp_path / "child", "--parent", rogue_parent)

    failed = hub_load(f"{child.url}/google/rotten/1", tmp_path / "tfhub")

    assert failed.returncode != 0
    assert model_dirs(tmp_path / "tfhub") == []
    assert _stored_blobs(child) == []
    assert "Repr-Digest" in child.log.read_text()



def test_kagglehub_through_a_child_gets_its_metadata_and_files_through_the_parent(proxy_factory, clean_origin,
                                                                                 archive, members, ca, tmp_path):
    model = clean_origin.register(archive)
    parent = proxy_factory(tmp_path / "parent", upstreams=through._upstreams(clean_origin))
    dead = {name: "http://127.0.0.1:9" for name in ("tfhub", "kaggle", "gcs", "kaggle-api")}
    child = proxy_factory(tmp_path / "child", "--intercept", "--ca-dir", ca, "--parent", parent.url, upstreams=dead)

    files = downloaded(through.run_kagglehub(child, ca, model.kaggle_handle, tmp_path / "kh"))

    assert files == md5s(members)
    assert _stored_blobs(child) and _stored_blobs(parent)


def test_when_every_parent_is_down_the_request_is_a_502_and_no_upstream_is_asked(proxy_factory, clean_origin,
                                                                                 archives, tmp_path):
    model = clean_origin.register(archives.small)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{unused.getsockname()[1]}"
        child = proxy_factory(tmp_path / "child", "--parent", dead, "--retries", "0")

        status, _, body = child.get(f"/{model.handle}?tf-hub-format=compressed")

    assert status == 502 and b"cannot reach upstream" in body
    assert clean_origin.object_gets(model) == 0  # the configured upstreams are not a fallback


def test_a_parents_miss_of_an_archive_the_origin_gave_no_checksum_for_still_loads(proxy_factory, clean_origin,
                                                                                  archives, tmp_path):
    """The parent streams such a miss chunked (no length, no checksum to pass on): the child takes
    the parent's terminating chunk as the end, and the archive must prove itself sound."""
    origin = clean_origin
    model = origin.register(archives.small)
    origin.faults(model, no_checksum=True)
    parent = proxy_factory(tmp_path / "parent")
    child = proxy_factory(tmp_path / "child", "--parent", parent.url)

    assert loaded_output(hub_load(f"{child.url}/{model.handle}", tmp_path / "tfhub")) == \
        archives.expected(archives.small)
    assert origin.object_gets(model) == 1 and _stored_blobs(child)
