"""Turn Metrics into the three outputs: a markdown table, the same as JSON, and the herd chart (PNG).

Invariants: every number printed is a min/median/max over the samples actually taken; ratios
are of medians measured in the same run; a target with nothing to compare against says so.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from importlib import metadata
from pathlib import Path

from .scenarios import DIRECT, HUBPROXY, NGINX, Metric

SERVERS = (HUBPROXY, NGINX, DIRECT)


def machine(programs: tuple[str, ...] = ("nginx", "curl")) -> dict[str, str]:
    versions = {"nginx": ["nginx", "-v"], "curl": ["curl", "--version"]}
    return {
        "cores": str(os.cpu_count()),
        "memory": f"{_meminfo_kib('MemTotal') / (1 << 20):.1f} GiB",
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "hubproxy": metadata.version("hubproxy"),
        "aiohttp": metadata.version("aiohttp"),
        **{program: _first_line(versions[program]) for program in programs},
    }


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _first_line(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    return (result.stdout or result.stderr).strip().splitlines()[0]


def _cell(values: list[float] | None) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return _fmt(values[0])
    return f"{_fmt(min(values))} / **{_fmt(statistics.median(values))}** / {_fmt(max(values))}"


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _ratio(metric: Metric, against: str) -> str:
    medians = metric.medians()
    if HUBPROXY not in medians or not medians.get(against):
        return "—"
    return f"{medians[HUBPROXY] / medians[against]:.2f}×"


def _verdict(metric: Metric) -> str:
    if metric.target is None:
        return ""
    met = metric.target.met(metric.medians())
    return f"{metric.target} {'✅' if met else '❌' if met is False else '—'}"


def markdown(metrics: list[Metric], reps: int, info: dict[str, str], chart: str | None) -> str:
    lines = [
        "# Benchmark results",
        "",
        "hubproxy, nginx (`proxy_cache` with `proxy_cache_lock on`) and direct download from the same local",
        f"origin, measured in one run on one machine. Cells are min / **median** / max over {reps} repetitions",
        "(a single number: one sample). Ratios and targets use medians. Over TLS, hubproxy intercepts (HTTPS_PROXY)",
        "and nginx serves the same cache with `ssl`, presenting a leaf issued by hubproxy's interception CA.",
        "",
        "| scenario | metric | unit | hubproxy | nginx | direct | hubproxy ÷ nginx | hubproxy ÷ direct | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in metrics:
        cells = [_cell(m.samples.get(server)) for server in SERVERS]
        name = m.name.replace("|", "\\|")  # "curl | sha256" is one cell
        lines.append(f"| {m.scenario} | {name} | {m.unit} | {' | '.join(cells)} | {_ratio(m, NGINX)} | "
                     f"{_ratio(m, DIRECT)} | {_verdict(m)} |")
    lines += ["", "## Machine", ""] + [f"- {key}: {value}" for key, value in info.items()]
    if chart:
        lines += ["", "## Thundering herd", "", f"![time to first byte per client]({chart})"]
    return "\n".join(lines) + "\n"


def as_json(metrics: list[Metric], reps: int, info: dict[str, str], herd_ttfb: dict) -> str:
    return json.dumps({
        "reps": reps,
        "machine": info,
        "metrics": [{
            "scenario": m.scenario, "name": m.name, "unit": m.unit, "samples": m.samples,
            "medians": m.medians(),
            "target": None if m.target is None else {"op": m.target.op, "value": m.target.value,
                                                      "against": m.target.against, "met": m.target.met(m.medians())},
        } for m in metrics],
        "herd_ttfb_seconds": herd_ttfb,
    }, indent=2)


def herd_chart(herd_ttfb: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    for server, ttfbs in herd_ttfb.items():
        axes.plot(range(1, len(ttfbs) + 1), [1000 * t for t in ttfbs], marker="o", label=server)
    axes.set_xlabel("client (in launch order)")
    axes.set_ylabel("time to first byte (ms)")
    axes.set_yscale("symlog", linthresh=10)
    axes.set_title("Thundering herd: one cold archive, every client at once")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
