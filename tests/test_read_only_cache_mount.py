"""A cache seeded, then mounted read-only (an air-gapped volume of pre-seeded models): `serve
--read-only` serves its hits, passes misses through unstored (504 offline) and writes nothing;
read-only `cache` commands give their normal output; writing ones, and a plain serve, are one line."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, _quiet_env, run_cli
from tests.test_cache_disk_full import small_disk  # noqa: F401  (the tmpfs fixture, mounted per test)


def _tree(directory) -> dict[str, tuple[int, float, str]]:
    """Every path below directory → (size, mtime, sha256 of a file's bytes): any write through the
    mount shows as a change."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
                     else "") for p in sorted(directory.rglob("*"))}


@pytest.fixture
def seeded(proxy_factory, clean_origin, small_disk, archives):  # noqa: F811
    """A cache holding archives.small, fetched by a real proxy that then stopped; the mount read-only."""
    seeder = proxy_factory(small_disk.cache_dir)
    cached = clean_origin.register(archives.small)
    assert seeder.get(f"/{cached.handle}")[1]["X-Cache"] == "MISS"
    seeder.stop()
    before = _tree(small_disk.cache_dir)
    small_disk.make_cache_read_only()
    yield cached, before
    small_disk.make_cache_writable()


def _no_traceback(proxy) -> None:
    log = proxy.log.read_text()
    assert "Traceback" not in log and "Error" not in log, log


def test_serve_read_only_serves_hits_and_passes_misses_through_unstored(seeded, proxy_factory, clean_origin,
                                                                        small_disk, archives):  # noqa: F811
    cached, before = seeded
    proxy = proxy_factory(small_disk.cache_dir, "--read-only")
    fresh = clean_origin.register(archives.padded)

    hit = proxy.get(f"/{cached.handle}")
    miss = proxy.get(f"/{fresh.handle}")
    proxy.stop()

    assert (hit[0], hit[1]["X-Cache"], hit[2]) == (200, "HIT", archives.small.read_bytes())
    assert (miss[0], miss[1]["X-Cache"], miss[2]) == (200, "MISS", archives.padded.read_bytes())
    _no_traceback(proxy)
    assert _tree(small_disk.cache_dir) == before, "nothing written: no temp file, no hit count, no housekeeping"


def _cache_state(proxy) -> dict[str, float]:
    """The exported samples that tell an operator whether the cache takes writes, and why not."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = ("hubproxy_cache_read_only", "hubproxy_cache_writable", "hubproxy_cache_write_errors_total")
    text = proxy.get("/metrics")[2].decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name in wanted}


def test_a_read_only_serve_exports_read_only_and_never_unwritable(seeded, proxy_factory, clean_origin,
                                                                  small_disk, archives):  # noqa: F811
    """Read-only by design is no fault: the cache-unwritable alert (hubproxy_cache_writable == 0)
    must not fire, while hubproxy_cache_read_only shows the state."""
    proxy = proxy_factory(small_disk.cache_dir, "--read-only")
    fresh = clean_origin.register(archives.padded)
    assert proxy.get(f"/{fresh.handle}")[1]["X-Cache"] == "MISS"  # passed through, refused by design
    assert proxy.metric("hubproxy_passthrough_fetches_total") == 1

    assert _cache_state(proxy) == {"hubproxy_cache_read_only": 1, "hubproxy_cache_writable": 1}


def test_a_writable_serve_exports_read_only_0(proxy, clean_origin):
    assert _cache_state(proxy) == {"hubproxy_cache_read_only": 0, "hubproxy_cache_writable": 1}


def test_serve_read_only_offline_answers_a_miss_504(seeded, proxy_factory, clean_origin, small_disk,  # noqa: F811
                                                    archives):
    cached, before = seeded
    proxy = proxy_factory(small_disk.cache_dir, "--read-only", "--mode", "offline")
    fresh = clean_origin.register(archives.padded)

    assert proxy.get(f"/{cached.handle}")[0] == 200
    assert proxy.get(f"/{fresh.handle}")[0] == 504
    proxy.stop()
    _no_traceback(proxy)
    assert _tree(small_disk.cache_dir) == before


def test_read_only_cache_commands_work_and_write_commands_are_one_line(seeded, small_disk):  # noqa: F811
    cached, before = seeded
    listed = run_cli("cache", "ls", "--json", "--cache-dir", small_disk.cache_dir)
    assert listed.returncode == 0, listed.stderr
    assert [e["key"] for e in json.loads(listed.stdout)] == [f"tfhub:/{cached.handle}"]
    stats = run_cli("cache", "stats", "--json", "--cache-dir", small_disk.cache_dir)
    assert stats.returncode == 0 and json.loads(stats.stdout)["entries"] == 1, stats.stderr
    verified = run_cli("cache", "verify", "--cache-dir", small_disk.cache_dir)
    assert (verified.returncode, verified.stdout.strip()) == (0, "checked; 0 bad blobs"), verified.stderr
    for command in (["purge", f"tfhub:/{cached.handle}"], ["pin", f"tfhub:/{cached.handle}"],
                    ["evict", "--max-size", "0B"]):
        result = run_cli("cache", *command, "--cache-dir", small_disk.cache_dir)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert str(small_disk.cache_dir) in lines[0] and "read-only" in lines[0]
    assert _tree(small_disk.cache_dir) == before


@pytest.mark.parametrize("plan", [["evict", "--max-size", "0B"], ["evict", "--older-than", "0s"],
                                  ["evict", "tfhub:/*"], ["purge", "tfhub:/*"]])
def test_dry_runs_plan_on_a_read_only_cache_writing_nothing(seeded, small_disk, plan):  # noqa: F811
    cached, before = seeded
    result = run_cli("cache", *plan, "--dry-run", "--cache-dir", small_disk.cache_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"would remove tfhub:/{cached.handle}"]
    assert _tree(small_disk.cache_dir) == before


def test_bundle_export_reads_a_read_only_cache(seeded, small_disk, archives, tmp_path):  # noqa: F811
    cached, before = seeded
    bundle, elsewhere = tmp_path / "models.tar", tmp_path / "imported-cache"
    exported = run_cli("bundle", "export", "--out", bundle, "--cache-dir", small_disk.cache_dir,
                       f"https://tfhub.dev/{cached.handle}")
    assert exported.returncode == 0, exported.stderr
    assert _tree(small_disk.cache_dir) == before

    imported = run_cli("bundle", "import", bundle, "--allow-unsigned", "--cache-dir", elsewhere)
    assert imported.returncode == 0, imported.stderr
    listed = json.loads(run_cli("cache", "ls", "--json", "--cache-dir", elsewhere).stdout)
    digest = hashlib.sha256(archives.small.read_bytes()).hexdigest()
    assert [(e["key"], e["sha256"]) for e in listed] == [(f"tfhub:/{cached.handle}", digest)]


def test_plain_serve_on_a_read_only_mount_says_so_in_one_line_suggesting_read_only(seeded, small_disk):  # noqa: F811
    result = subprocess.run([sys.executable, "-m", "hubproxy", "serve", "--listen", "127.0.0.1:0",
                             "--cache-dir", str(small_disk.cache_dir)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env=_quiet_env())
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert str(small_disk.cache_dir) in lines[0] and "--read-only" in lines[0]
