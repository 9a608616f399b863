"""The kill -9 loop: hubproxy as a real process on one cache dir, downloads under way, SIGKILL at a
random point, restart on the same cache, check. The points: mid-body (the origin holding the
transfer), a few bytes after the origin resumes, the moment the temp file is whole (the verify →
fsync → rename → index window), a random instant after the resume, after the commit.

Invariants checked at every round (a Broken names the round, what was wrong and the seed): every
body a client received as complete hashes to the origin's sha256; after a restart, tmp/ is empty,
the index and the blobs agree once reconciled (each entry's blob is there and hashes to its name,
no blob outside the index), and the models fetched in recent rounds are served whole.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import random
import signal
import time
from pathlib import Path

from hubproxy.cache import scrub
from hubproxy.cache.store import Store

from . import harness
from .downloads import Fetched, Progress, download

POINTS = ("held", "resumed", "whole-temp", "instant", "committed")
RECHECKED = 6  # earlier models re-fetched after each restart: a bounded sample, so rounds cost the same
RECONCILED = "index and blobs reconciled"
MID_BODY, IN_WINDOW, COMMITTED = "mid-body", "in the commit window", "after the commit"


class Broken(AssertionError):
    """An invariant did not hold."""


@dataclasses.dataclass
class KillFigures:
    seed: int
    rounds: int = 0
    kills: int = 0
    landed: dict[str, int] = dataclasses.field(default_factory=dict)  # where the kills fell, judged from the disk
    requests: int = 0
    served_whole: int = 0
    wrong_bytes: int = 0
    temp_left: int = 0  # temp files found after a restart's cleanup
    disagreements: int = 0  # index and blobs not agreeing after a restart


Model = harness.Registered


def kill_loop(origin, workdir: Path, *, seed: int, rounds: int | None = None, seconds: float | None = None,
              clients: int = 3, points: tuple[str, ...] = POINTS) -> KillFigures:
    """Kill hubproxy `rounds` times (or for `seconds`) at one of `points` each; raises Broken at the
    first broken invariant."""
    rng, figures = random.Random(seed), KillFigures(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    cache_dir, models = workdir / "kill-cache", []
    deadline = None if seconds is None else time.monotonic() + seconds
    while (rounds is None or figures.rounds < rounds) and (deadline is None or time.monotonic() < deadline):
        model = _new_model(origin, workdir, rng, figures.rounds)
        origin.faults(model.model, hold_after=rng.randrange(model.size // 2, model.size))
        with harness.hubproxy(origin, cache_dir, intercept=False, log_level="INFO") as server:
            _check_restart(server, cache_dir, models[-RECHECKED:], figures)
            point = rng.choice(points)
            fetched = _downloads_killed_at(point, origin, server, cache_dir, model, models, rng, clients)
        figures.kills += 1
        _judge_landing(cache_dir, model, figures)
        for got, wanted in fetched:
            _count(figures, got, wanted)
        origin.faults(model.model, hold_after=None)
        origin.release()
        models.append(model)
        _forget_old_archives(workdir, models)
        figures.rounds += 1
    with harness.hubproxy(origin, cache_dir, intercept=False, log_level="INFO") as server:
        _check_restart(server, cache_dir, models[-RECHECKED:], figures)
    return figures


def _new_model(origin, workdir: Path, rng: random.Random, n: int) -> Model:
    return harness.register_random_archive(origin, workdir / f"kill-{n}.tar.gz", rng)


def _forget_old_archives(workdir: Path, models: list[Model]) -> None:
    """Only the last RECHECKED models are fetched again: older archives need no disk."""
    if len(models) > RECHECKED:
        Path(models[-RECHECKED - 1].model.file).unlink(missing_ok=True)


def _downloads_killed_at(point: str, origin, server: harness.Server, cache_dir: Path, model: Model,
                         models: list[Model], rng: random.Random, clients: int) -> list[tuple[Fetched, Model]]:
    """`clients` downloads of the new model and one of an earlier one, the proxy killed at `point`."""
    progress = Progress()
    wanted = [model] * clients + ([rng.choice(models[-RECHECKED:])] if models else [])
    with concurrent.futures.ThreadPoolExecutor(len(wanted)) as pool:
        futures = [pool.submit(download, f"{server.url}/{m.handle}", progress=progress if i == 0 else None)
                   for i, m in enumerate(wanted)]
        origin.wait_held(1)
        if point != "held":
            origin.release()
        if point == "resumed":
            progress.wait_for(progress.received + rng.randrange(1, 256 << 10))
        elif point == "whole-temp":
            _wait_until_whole(cache_dir, model)
        elif point == "instant":
            time.sleep(rng.uniform(0, 0.05))  # a random instant is the point: no event to wait on
        elif point == "committed":
            concurrent.futures.wait(futures)
        os.kill(server.pid, signal.SIGKILL)
        return [(future.result(), m) for future, m in zip(futures, wanted)]


def _wait_until_whole(cache_dir: Path, model: Model, timeout: float = 60) -> None:
    """Until a temp file has every byte of the archive, or its blob is in place (too late)."""
    blob, deadline = _blob_path(cache_dir, model.sha256), time.monotonic() + timeout
    while time.monotonic() < deadline and not blob.exists():
        with os.scandir(cache_dir / "tmp") as temps:
            if any(temp.stat().st_size >= model.size for temp in temps):
                return
        time.sleep(0.0002)


def _blob_path(cache_dir: Path, sha256: str) -> Path:
    store = Store(cache_dir)
    try:
        return store.blob_path(sha256)
    finally:
        store.close()


def _judge_landing(cache_dir: Path, model: Model, figures: KillFigures) -> None:
    """Where the kill fell, from what the dead proxy left on disk."""
    temps = [p.stat().st_size for p in (cache_dir / "tmp").iterdir()]
    store = Store(cache_dir)
    try:
        blob = store.blob_path(model.sha256).exists()
        indexed = any(e.sha256 == model.sha256 for e in store.entries())
    finally:
        store.close()
    where = COMMITTED if indexed else IN_WINDOW if blob or model.size in temps else MID_BODY
    figures.landed[where] = figures.landed.get(where, 0) + 1


def _check_restart(server: harness.Server, cache_dir: Path, recent: list[Model], figures: KillFigures) -> None:
    _wait_for_log(server, RECONCILED)
    leftovers = list((cache_dir / "tmp").iterdir())
    figures.temp_left += len(leftovers)
    if leftovers:
        raise Broken(f"round {figures.rounds} (seed {figures.seed}): temp files after restart: {leftovers}")
    problem = _disagreement(cache_dir)
    if problem:
        figures.disagreements += 1
        raise Broken(f"round {figures.rounds} (seed {figures.seed}): {problem}")
    for model in recent:
        got = download(f"{server.url}/{model.handle}")
        _count(figures, got, model)
        if not got.served_whole(model.sha256):
            raise Broken(f"round {figures.rounds} (seed {figures.seed}): {model.handle} after restart: {got}")


def _disagreement(cache_dir: Path) -> str | None:
    """What is wrong between the index and the blobs (None: they agree, every blob verifies)."""
    store = Store(cache_dir)
    try:
        named, stored = {e.sha256 for e in store.entries()}, store.stored_blobs()
        findings = scrub.scrub(store)
    finally:
        store.close()
    if named != stored:
        return f"entries without a blob {sorted(named - stored)}, blobs outside the index {sorted(stored - named)}"
    if findings:
        return f"blobs that do not verify: {findings}"
    return None


def _count(figures: KillFigures, got: Fetched, model: Model) -> None:
    figures.requests += 1
    figures.served_whole += got.served_whole(model.sha256)
    if got.served_wrong(model.sha256):
        figures.wrong_bytes += 1
        raise Broken(f"round {figures.rounds} (seed {figures.seed}): {model.handle} served as complete "
                     f"with the wrong bytes: {got}")


def _wait_for_log(server: harness.Server, text: str, timeout: float = 60) -> None:
    """Until the proxy logged `text` (its startup reconcile): the event the checks wait on."""
    deadline = time.monotonic() + timeout
    while text not in server.log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise Broken(f"hubproxy never logged {text!r}: {server.log.read_text()[-2000:]}")
        time.sleep(0.02)
