"""The benchmark harness must not rot: every scenario runs at tiny sizes against real nginx, real
hubproxy and the origin, checking bytes and origin GET counts (never speed)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


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
    assert {m["name"] for m in report["metrics"]} >= {"--workers 2, 3 clients", "--workers 2 ÷ --workers 1, 1 client"}
    herd_gets = next(m for m in report["metrics"] if m["name"].startswith("origin GETs"))
    assert herd_gets["samples"]["hubproxy"] == [1], "the herd must cost hubproxy exactly one origin GET"
    assert set(report["herd_ttfb_seconds"]) == {"hubproxy", "nginx"}
    assert (out / "herd.png").read_bytes().startswith(b"\x89PNG")
    table = (out / "results.md").read_text()
    assert "| HIT |" in table and "## Machine" in table
