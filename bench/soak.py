"""`python -m bench.soak`: the long reliability run, the kill -9 loop then the abort soak (the same
code the test suite runs briefly: bench/killloop.py, bench/aborts.py), and its figures in markdown.

Invariants: the seed is printed before anything runs and is in the report, so a run can be replayed
(`--seed`, or HUBPROXY_SOAK_SEED); the report is written even when an invariant broke, saying which,
and the exit status is then 1; the soak's proxy runs at a steady state (a capped cache) and its fds
and RSS are judged from the warmed reading to the end; everything runs on 127.0.0.1 in a scratch dir
removed afterwards.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

import click

from hubproxy.units import format_size

from . import aborts, harness, killloop, report

BENCH = Path(__file__).resolve().parent
# Over minutes, RSS rises in steps as the allocator keeps the peak of transient buffers (32 clients,
# upstream chunks), higher peaks coming with a busier machine: a slack for that, a leak outgrows it.
RSS_SLACK = 16 << 20


def figures_markdown(kills: killloop.KillFigures, soak: aborts.SoakFigures, broken: str | None,
                     minutes: float, info: dict[str, str]) -> str:
    readings = soak.readings
    picked = dict(zip(("start", "warmed", "middle", "end"), (
        readings[0], readings[aborts.WARMED], readings[len(readings) // 2], readings[-1]))) if len(readings) > 1 else {}
    landed = ", ".join(f"{count} {where}" for where, count in sorted(kills.landed.items())) or "—"
    lines = [
        "# Reliability run",
        "",
        f"`make soak` (`python -m bench.soak --publish`): {minutes:g} minutes, seed {kills.seed}",
        f"(replay with `--seed {kills.seed}`). Verdict: {'**broken**: ' + broken if broken else 'every check held'}.",
        "",
        "## kill -9 loop",
        "",
        "hubproxy killed while downloads are under way, restarted on the same cache, checked: bodies served",
        "as complete have the origin's sha256, no temp file survives the restart, index and blobs agree.",
        "",
        "| kills | where they landed | requests | served whole | wrong bytes | temp files left "
        "| index/blob disagreements |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {kills.kills} | {landed} | {kills.requests} | {kills.served_whole} | {kills.wrong_bytes} | "
        f"{kills.temp_left} | {kills.disagreements} |",
        "",
        "## Abort soak",
        "",
        f"{soak.clients} concurrent clients per round over hits and misses, some hanging up mid-body, on a",
        f"hubproxy whose cache is capped (`--max-size {aborts.STEADY_MAX_SIZE}`) so that it stops growing.",
        "",
        "| rounds | requests | aborts | errors (others) | wrong bytes | tracebacks logged |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {soak.rounds} | {soak.requests} | {soak.aborts} | {soak.errors} | {soak.wrong_bytes} | {soak.tracebacks} |",
        "",
        *([f"First traceback logged: `{soak.last_traceback_line}`.", ""] if soak.tracebacks else []),
        "Readings at rest, after each round. Judged from the warmed one (after round 1) to the end: the open",
        f"fds outside the pools may grow by {aborts.FD_SLACK} (a connection closing as they are counted), RSS by",
        f"{format_size(RSS_SLACK)} (the allocator keeping the peak of transient buffers). The pools are bounded",
        "by design, not by rounds:",
        "the cache index's SQLite files, one connection per worker thread that reads it (at most",
        "min(32, cores + 4) threads), and aiohttp's keep-alive connections to the upstreams (idle ones closed",
        "after 15 s; a leak there would run the pool dry and show as errors).",
        "",
        "| reading | round | open fds | of which pooled | RSS |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {name} | {r.round} | {r.fds} | {r.pooled} | {format_size(r.rss)} |" for name, r in picked.items()],
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in info.items()],
    ]
    return "\n".join(lines) + "\n"


def run(workdir: Path, seed: int, seconds: float, clients: int) -> tuple[killloop.KillFigures, aborts.SoakFigures,
                                                                          str | None]:
    """Half the time killing, half soaking; (kill figures, soak figures, what broke or None)."""
    kills, soak, broken = killloop.KillFigures(seed), aborts.SoakFigures(seed, clients), None
    with harness.origin(workdir) as (origin, _):
        try:
            kills = killloop.kill_loop(origin, workdir, seed=seed, seconds=seconds / 2)
        except killloop.Broken as e:
            broken = str(e)
        origin.control("POST", "faults", {"clear": True})
        with harness.hubproxy(origin, workdir / "soak-cache", intercept=False,
                              extra=("--max-size", aborts.STEADY_MAX_SIZE)) as server:
            soak = aborts.abort_soak(origin, server, workdir, seed=seed, seconds=seconds / 2, clients=clients)
    if broken is None and (soak.errors or soak.wrong_bytes):
        broken = f"{soak.errors} errors, {soak.wrong_bytes} wrong bodies in the soak: {soak.first_errors}"
    if broken is None and soak.tracebacks:
        broken = f"{soak.tracebacks} tracebacks in the proxy's log, the first: {soak.last_traceback_line}"
    return kills, soak, broken or aborts.growth(soak.readings, RSS_SLACK)


@click.command()
@click.option("--minutes", type=float, default=10.0, show_default=True,
              help="How long the run lasts, half the kill loop, half the abort soak.")
@click.option("--seed", type=int, envvar="HUBPROXY_SOAK_SEED", help="Random seed to replay a run (default: new).")
@click.option("--clients", type=int, default=32, show_default=True, help="Concurrent clients per soak round.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Scratch space (default: /tmp).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=BENCH / "out", show_default=True,
              help="Where reliability.md goes.")
@click.option("--publish", is_flag=True, help="Also write it to bench/RELIABILITY.md.")
@click.option("--machine-note", help="A line for the report's Machine section (e.g. what else the machine ran).")
def main(minutes: float, seed: int | None, clients: int, workdir: Path | None, out: Path, publish: bool,
         machine_note: str | None) -> None:
    """Kill hubproxy at random points and soak it with aborting clients; report the figures."""
    seed = random.randrange(1 << 32) if seed is None else seed
    click.echo(f"seed {seed} (HUBPROXY_SOAK_SEED={seed} replays this run)", err=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hubproxy-soak-", dir=workdir) as scratch:
        kills, soak, broken = run(Path(scratch), seed, minutes * 60, clients)
    info = {**report.machine(programs=()), "load average (1, 5, 15 min) at the end": " ".join(
        f"{load:.2f}" for load in os.getloadavg())}
    if machine_note:
        info["note"] = machine_note
    text = figures_markdown(kills, soak, broken, round((time.monotonic() - started) / 60, 1), info)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.md").write_text(text)
    if publish:
        (BENCH / "RELIABILITY.md").write_text(text)
    click.echo(text)
    if broken:
        raise click.ClickException(broken)


if __name__ == "__main__":
    sys.exit(main())
