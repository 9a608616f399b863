"""Reliability, briefly: the kill -9 loop and the abort soak of `make soak` (bench/killloop.py,
bench/aborts.py), run for a few rounds. Seeded: the seed is printed, HUBPROXY_SOAK_SEED replays it."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from bench import aborts, harness, killloop
from tests.conftest import ROOT

SOAK_ROUNDS = 8
# From the warmed reading to the last, 6 rounds of 32 requests: RSS may grow by RSS_SLACK (the allocator
# keeping a higher peak of transient buffers; a leak of some 44 KiB a request outgrows it), the fds outside
# the proxy's pools by aborts.FD_SLACK. Read at rest, never timed.
RSS_SLACK = 8 << 20


@pytest.fixture
def soak_seed() -> int:
    seed = int(os.environ.get("HUBPROXY_SOAK_SEED") or random.randrange(1 << 32))
    print(f"HUBPROXY_SOAK_SEED={seed}")
    return seed


def test_kill_9_at_random_points_never_serves_a_bad_entry_nor_leaves_debris(clean_origin, tmp_path, soak_seed):
    figures = killloop.kill_loop(clean_origin, tmp_path, seed=soak_seed, rounds=8)

    assert figures.kills == 8
    assert (figures.wrong_bytes, figures.temp_left, figures.disagreements) == (0, 0, 0)
    assert figures.served_whole > 0, f"nothing was ever served whole: {figures}"


def test_kill_9_in_the_commit_window_leaves_a_cache_that_verifies(clean_origin, tmp_path, soak_seed):
    """The points aimed at the verify → fsync → rename → index window, until a kill lands in it."""
    for attempt in range(6):
        figures = killloop.kill_loop(clean_origin, tmp_path / str(attempt), seed=soak_seed + attempt, rounds=2,
                                     points=("whole-temp",))
        if figures.landed.get(killloop.IN_WINDOW):
            break
    assert figures.landed.get(killloop.IN_WINDOW), f"no kill landed in the commit window: {figures}"
    result = subprocess.run([sys.executable, "-m", "hubproxy", "cache", "verify", "--cache-dir",
                             str(tmp_path / str(attempt) / "kill-cache")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_clients_hanging_up_mid_body_cost_the_others_nothing_and_leak_nothing(clean_origin, tmp_path, soak_seed):
    with harness.hubproxy(clean_origin, tmp_path / "cache", intercept=False,
                          extra=("--max-size", aborts.STEADY_MAX_SIZE)) as server:
        figures = aborts.abort_soak(clean_origin, server, tmp_path, seed=soak_seed, rounds=SOAK_ROUNDS, clients=32)

    assert figures.aborts > 0
    assert (figures.errors, figures.wrong_bytes) == (0, 0), figures.first_errors
    assert figures.tracebacks == 0, f"a client hanging up cost a traceback: {figures.last_traceback_line}"
    assert len(figures.readings) == SOAK_ROUNDS
    assert aborts.growth(figures.readings, RSS_SLACK) is None, figures.readings


def test_make_soak_runs_and_publishes_its_figures(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "bench.soak", "--minutes", "0.25", "--seed", "11", "--clients", "8",
                             "--out", str(out), "--workdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)

    assert result.returncode == 0, result.stderr[-3000:]
    text = (out / "reliability.md").read_text()
    assert "seed 11" in text and "every check held" in text
    assert "## kill -9 loop" in text and "## Abort soak" in text
    assert "| warmed | 1 |" in text and "| end |" in text
