"""`python -m bench`: run the benchmark scenarios and write the results (see bench/README in README.md)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from hubproxy.units import parse_size

from . import harness, report, scenarios

BENCH = Path(__file__).resolve().parent

SMOKE = dict(reps=1, verify=True, hit_size=3 << 20, hit_clients=3, miss_size=3 << 20, herd_size=6 << 20,
             herd_clients=4, herd_rate=20_000_000, memory_size=4 << 20, memory_clients=3, small_seconds=1,
             index_entries=500, ttfb_samples=20, single_client_pairs=2)


def _size(ctx, param, value):
    try:
        return None if value is None else parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=BENCH / "out", show_default=True,
              help="Where results.md, results.json and herd.png go.")
@click.option("--workdir", type=click.Path(exists=True, file_okay=False, writable=True, path_type=Path),
              help="Scratch space for archives and caches (needs ~3× the largest size free).")
@click.option("--only", default=",".join(scenarios.SCENARIOS), show_default=True, help="Scenarios to run.")
@click.option("--reps", type=int, help="Repetitions per measurement.  [default: 3]")
@click.option("--smoke", is_flag=True, help="Tiny sizes, one repetition, every byte verified: checks the harness.")
@click.option("--publish", is_flag=True, help="Also write the table to bench/RESULTS.md.")
@click.option("--hit-size", callback=_size, help="[default: 1G]")
@click.option("--miss-size", callback=_size, help="[default: 1G]")
@click.option("--herd-size", callback=_size, help="[default: 512M]")
@click.option("--herd-clients", type=int, help="[default: 32]")
@click.option("--herd-rate", callback=_size, help="Origin bytes/s during the herd.  [default: 200M ≈ 200 MB/s]")
@click.option("--memory-size", callback=_size, help="[default: 4G]")
@click.option("--memory-clients", type=int, help="[default: 32]")
@click.option("--small-seconds", type=float, help="wrk duration per measurement.  [default: 5]")
@click.option("--index-entries", type=int, help="[default: 100000]")
@click.option("--ttfb-samples", type=int,
              help="New connections per repetition for a hit's time to first byte (the median is kept).  "
                   "[default: 200]")
def main(out: Path, workdir: Path | None, only: str, smoke: bool, publish: bool, **overrides) -> None:
    """Benchmark hubproxy against nginx proxy_cache and direct download, side by side."""
    chosen = [name.strip() for name in only.split(",") if name.strip()]
    unknown = set(chosen) - set(scenarios.SCENARIOS)
    if unknown:
        raise click.UsageError(f"unknown scenarios: {', '.join(sorted(unknown))}")
    settings = {**(SMOKE if smoke else {}), **{k: v for k, v in overrides.items() if v is not None}}
    if settings.get("herd_rate") and not smoke and overrides.get("herd_rate") is not None:
        settings["herd_rate"] = overrides["herd_rate"]
    plan = scenarios.Plan(**settings)
    try:
        harness.ensure_debian_packages()
    except harness.SetupError as e:
        raise click.ClickException(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hubproxy-bench-", dir=workdir) as scratch:
        metrics, herd_ttfb = _run(plan, Path(scratch), chosen)
    _write(out, metrics, plan, herd_ttfb, publish)


def _run(plan: scenarios.Plan, workdir: Path, chosen: list[str]):
    with harness.origin(workdir) as (origin, direct), \
            harness.hubproxy(origin, workdir / "hubproxy-cache") as hubproxy, \
            harness.nginx(direct.url, workdir / "nginx", hubproxy.ca_file.parent) as nginx:
        ctx = scenarios.Context(plan, workdir, origin, direct, hubproxy, nginx)
        metrics = []
        for name in chosen:
            click.echo(f"running {name} …", err=True)
            metrics += scenarios.SCENARIOS[name](ctx)
        return metrics, ctx.herd_ttfb


def _write(out: Path, metrics, plan, herd_ttfb, publish: bool) -> None:
    info = report.machine()
    chart = None
    if herd_ttfb:
        report.herd_chart(herd_ttfb, out / "herd.png")
        chart = "herd.png"
    table = report.markdown(metrics, plan.reps, info, chart)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(report.as_json(metrics, plan.reps, info, herd_ttfb))
    if publish:
        (BENCH / "RESULTS.md").write_text(table.replace("](herd.png)", "](herd.png)"))
        if chart:
            (BENCH / "herd.png").write_bytes((out / "herd.png").read_bytes())
    click.echo(table)


if __name__ == "__main__":
    sys.exit(main())
