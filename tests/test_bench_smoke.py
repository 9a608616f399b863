"""The benchmark harness must not rot: every scenario runs at tiny sizes against real nginx, real
hubproxy and the origin, checking bytes and origin GET counts (never speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.harness import Server, pinned
from tests.conftest import ROOT

# Rows issue 13 measures hubproxy by, and the servers each must have numbers for (smoke sizes: 3 clients).
ROWS_ISSUE_13_ASKS_FOR = {
    "time to first byte, 1 client (new connection each)": {"hubproxy", "nginx", "direct"},
    "time to first byte ÷ the interpreter's floor (bench/floor_server.py: no HTTP work)": {"hubproxy"},
    "the interpreter's floor ÷ nginx, time to first byte": {"hubproxy"},
    "throughput, 3 clients": {"hubproxy", "nginx", "direct"},
    "throughput over TLS, 1 client": {"hubproxy", "nginx"},
    "intercepted TLS hit ÷ plain HTTP hit, 1 client": {"hubproxy"},
    "server CPU per GB, cold fetch": {"hubproxy", "nginx"},
    "throughput with --workers 2, 1 client": {"hubproxy", "nginx"},
    "throughput with --workers 2, 3 clients": {"hubproxy", "nginx"},
    "--workers 2 ÷ --workers 1, 1 client": {"hubproxy"},
    "--workers 2 ÷ --workers 1, 3 clients": {"hubproxy"},
}
# Issue 13's targets: (op, value, against).
TARGETS = {
    "throughput, 1 client, 3 MiB": (">=", 1.1, "nginx"),
    "throughput, 3 clients": (">=", 1.2, "nginx"),
    "time to first byte, 1 client (new connection each)": ("<=", 1.0, "nginx"),
    "throughput over TLS, 1 client": (">=", 1.0, "nginx"),
    "cold fetch, 3 MiB (direct = curl | sha256)": (">=", 1.0, "nginx"),
    "--workers 2 ÷ --workers 1, 1 client": (">=", 1.0, None),
}
# No client users run sends these, or issue 13 asks only for them to be reported: shown, not held to a target.
INFORMATION_ONLY = ("HEAD on a cached archive", "GET If-None-Match → 304",
                    "--workers 2 ÷ --workers 1, 3 clients")  # issue 13: "report the curve"


def test_every_scenario_runs_and_checks_its_bytes(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--workdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((out / "results.json").read_text())
    scenarios = {m["scenario"] for m in report["metrics"]}
    assert scenarios == {"HIT", "MISS", "herd", "memory", "small requests", "index"}
    for metric in report["metrics"]:
        assert metric["samples"], metric["name"]
    rows = {m["name"]: m for m in report["metrics"]}
    table = (out / "results.md").read_text()
    for name, servers in ROWS_ISSUE_13_ASKS_FOR.items():
        assert name in rows and f"| {name} |" in table, f"the bench lost its row {name!r}"
        assert set(rows[name]["samples"]) == servers, name
    for name, (op, value, against) in TARGETS.items():
        target = rows[name]["target"]
        assert (target["op"], target["value"], target["against"]) == (op, value, against), name
    for name in INFORMATION_ONLY:
        assert rows[name]["target"] is None, f"{name!r} is information, not a target"
    herd_gets = next(m for m in report["metrics"] if m["name"].startswith("origin GETs"))
    assert herd_gets["samples"]["hubproxy"] == [1], "the herd must cost hubproxy exactly one origin GET"
    assert set(report["herd_ttfb_seconds"]) == {"hubproxy", "nginx"}
    assert (out / "herd.png").read_bytes().startswith(b"\x89PNG")
    assert "| HIT |" in table and "## Machine" in table


# A server with a second thread and a child process, which says "ready" once all three run.
THREADS_AND_A_CHILD = """
import subprocess, sys, threading
threading.Thread(target=sys.stdin.read, daemon=True).start()
child = subprocess.Popen([sys.executable, "-c", "import sys; print(1, flush=True); sys.stdin.read()"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
child.stdout.readline()
print("ready", flush=True)
sys.stdin.read()
"""


def test_pinning_places_every_thread_of_a_server_and_its_children_and_lets_them_go():
    """The time-to-first-byte row's fixed placement: a server's threads, its children's too, on the
    CPUs asked for while pinned; anywhere again after."""
    anywhere = os.sched_getaffinity(0)
    one = {min(anywhere)}
    process = subprocess.Popen([sys.executable, "-c", THREADS_AND_A_CHILD], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "ready\n"
        server = Server("s", "http://127.0.0.1:1", process.pid)
        tasks = [int(task) for pid in server.pids() for task in os.listdir(f"/proc/{pid}/task")]
        assert len(tasks) >= 3
        with pinned([server], one):
            assert {task: os.sched_getaffinity(task) for task in tasks} == dict.fromkeys(tasks, one)
        assert {task: os.sched_getaffinity(task) for task in tasks} == dict.fromkeys(tasks, anywhere)
    finally:
        process.kill()
        process.wait()


def test_a_missing_workdir_is_named_in_one_line(tmp_path):
    missing = tmp_path / "no-such-dir"
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--workdir", str(missing)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert not missing.exists()
