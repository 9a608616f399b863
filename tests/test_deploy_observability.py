"""Monitoring that silently watches nothing: deploy/'s Prometheus config, alert rules and Grafana
dashboard are checked by promtool (config, rules, the alerts' own unit tests, every dashboard query
parsed as PromQL), compose.yaml against the Compose Specification's schema, and every metric they
query against what a real hubproxy exports, so a renamed metric or a broken expression fails here."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_deploy_files_lint import _tool

DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "hubproxy.json"
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time, not by hubproxy
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$instance": ".*"}  # stand-ins to parse

METRIC_NAME = re.compile(r"\bhubproxy_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    return found


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)


def _alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _dashboard_queries() -> list[tuple[str, str]]:
    """(expr, legend) of every panel target, and of every query variable: Grafana's
    label_values(SELECTOR, LABEL) as (SELECTOR, "{{LABEL}}"), so both are checked."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(t["expr"], t.get("legendFormat", "")) for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            selector, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"]).groups()
            queries.append((selector, f"{{{{{label}}}}}"))
    return queries


def _as_promql(expr: str) -> str:
    for variable, stand_in in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, stand_in)
    return expr


# -- promtool ------------------------------------------------------------------------------------

def test_prometheus_config_passes_promtool_check_config():
    result = _run(_promtool(), "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout, "prometheus.yml does not load the alert rules"


def test_alert_rules_pass_promtool_check_rules():
    result = _run(_promtool(), "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_as_their_unit_tests_expect():
    result = _run(_promtool(), "test", "rules", "alerts.test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_pages_or_tickets_and_has_a_unit_test_that_fires_it():
    rules = _alert_rules()
    names = {rule["alert"] for rule in rules}
    assert {"HubproxyDown", "HubproxyCacheUnwritable", "HubproxyUpstreamFailing", "HubproxyVerifyFailures",
            "HubproxyCacheDiskNearlyFull"} <= names
    for rule in rules:
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    cases = [case for test in yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
             for case in test["alert_rule_test"]]
    untested = names - {case["alertname"] for case in cases if case.get("exp_alerts")}
    assert not untested, f"alerts no unit test sees firing: {sorted(untested)}"


def test_dashboard_queries_are_valid_promql(tmp_path):
    # promtool parses each expression as a recording rule; Grafana's own variables get stand-ins
    rules = [{"record": f"dashboard:query_{i}", "expr": _as_promql(expr)}
             for i, (expr, _) in enumerate(_dashboard_queries())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run(_promtool(), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- the names they query, against a real hubproxy ----------------------------------------------

def _exported(exposition: str) -> tuple[set[str], dict[str, set[str]], dict[str, set[str]]]:
    """(series names Prometheus would store, label names per name, label values per name:label)
    from GET /metrics; a family with no samples yet still names its series in its TYPE line."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"} if kind == "histogram" else {name}
    labels: dict[str, set[str]] = {}
    values: dict[str, set[str]] = {}
    for name, body in re.findall(r"^([a-zA-Z_:]\w*)\{([^}]*)\}", exposition, re.M):
        for label, _, value in MATCHER.findall(body):
            labels.setdefault(name, set()).add(label)
            values.setdefault(f"{name}:{label}", set()).add(value)
    return names, labels, values


def _unknown_labels(expr: str, legend: str, labels: dict[str, set[str]], values: dict[str, set[str]]) -> list[str]:
    """Label names and matched values in expr that no exported sample of its metrics has (checked only
    when each of its metrics has samples: a family nothing has counted yet shows no labels)."""
    metrics = set(METRIC_NAME.findall(expr))
    if not metrics or not all(m in labels for m in metrics):
        return []
    known = TARGET_LABELS | {"le"} | set().union(*(labels[m] for m in metrics))
    used = {label.strip() for group in GROUPING.findall(expr) for label in group.split(",") if label.strip()}
    used |= set(LEGEND_LABEL.findall(legend))
    wrong = [f"label {label!r}" for label in sorted(used - known)]
    for metric, body in SELECTOR.findall(expr):
        for label, op, value in MATCHER.findall(body):
            if label in TARGET_LABELS:
                continue
            exported = values.get(f"{metric}:{label}", set())
            if label not in labels.get(metric, set()):
                wrong.append(f"label {label!r} of {metric}")
            elif (op == "=" and value not in exported) or (
                    op == "=~" and not any(re.fullmatch(value, v) for v in exported)):
                wrong.append(f"{metric}{{{label}{op}{value!r}}}: exported values are {sorted(exported)}")
    return wrong


def test_every_metric_the_dashboard_and_alerts_query_is_exported_by_hubproxy(proxy, clean_origin, stand_in):
    model = clean_origin.register(stand_in)
    assert [proxy.get(f"/{model.handle}")[1]["X-Cache"] for _ in range(2)] == ["MISS", "HIT"]
    _, _, body = proxy.get("/metrics")
    names, labels, values = _exported(body.decode())

    texts = {"alerts.yml": (PROMETHEUS / "alerts.yml").read_text(), "hubproxy.json": DASHBOARD.read_text()}
    missing = {f"{where}: {name}" for where, text in texts.items() for name in METRIC_NAME.findall(text)
               if name not in names}
    assert not missing, f"queried but not exported by hubproxy: {sorted(missing)}"

    queries = [(rule["expr"], "") for rule in _alert_rules()] + _dashboard_queries()
    wrong = {w for expr, legend in queries for w in _unknown_labels(expr, legend, labels, values)}
    assert not wrong, f"queries name labels hubproxy does not export: {sorted(wrong)}"


def test_hubproxy_exposition_passes_promtool_check_metrics(proxy):
    _, _, body = proxy.get("/metrics")
    result = subprocess.run([_promtool(), "check", "metrics"], input=body.decode(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cache_cap_floor_and_disk_space_are_exported_for_the_disk_alerts(proxy_factory, tmp_path):
    proxy = proxy_factory(tmp_path / "cache", "--max-size", "1G", "--min-free", "1M")
    proxy.wait_for_log("index and blobs reconciled")  # the start-up pass has measured the cache
    disk = shutil.disk_usage(proxy.cache_dir)
    assert proxy.metric("hubproxy_cache_max_bytes") == 1 << 30
    assert proxy.metric("hubproxy_cache_min_free_bytes") == 1 << 20
    assert proxy.metric("hubproxy_cache_disk_size_bytes") == disk.total
    assert 0 < proxy.metric("hubproxy_cache_disk_free_bytes") <= disk.total


# -- compose and Grafana ---------------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_file_matches_the_compose_specification():
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_references_resolve():
    """What the schema cannot see (docker compose would refuse these at `up`): named volumes and
    configs declared, bind-mounted files present, the build context holding its Dockerfile."""
    compose = _compose()
    problems = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                problems += [] if (DEPLOY / source).exists() else [f"{name}: no {source}"]
            elif source not in compose.get("volumes", {}):
                problems.append(f"{name}: volume {source} is not declared")
        for config in service.get("configs", []):
            if config["source"] not in compose.get("configs", {}):
                problems.append(f"{name}: config {config['source']} is not declared")
        if "build" in service:
            build = service["build"]
            if not (DEPLOY / build["context"] / build["dockerfile"]).is_file():
                problems.append(f"{name}: no {build['dockerfile']} in {build['context']}")
    for name, config in compose.get("configs", {}).items():
        if not (DEPLOY / config["file"]).is_file():
            problems.append(f"config {name}: no {config['file']}")
    assert not problems, problems


def test_compose_wires_hubproxy_to_prometheus_to_grafana():
    compose = _compose()
    services = compose["services"]
    assert compose["configs"]["hubproxy-toml"]["file"] == "./hubproxy.toml"
    assert {"source": "hubproxy-toml", "target": "/etc/hubproxy/hubproxy.toml"} in services["hubproxy"]["configs"]
    assert "cache:/var/cache/hubproxy" in services["hubproxy"]["volumes"]

    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    job = next(job for job in scrape if job["static_configs"][0]["targets"] == ["hubproxy:8080"])
    queries = [rule["expr"] for rule in _alert_rules()] + [expr for expr, _ in _dashboard_queries()]
    assert all(f'job="{job["job_name"]}"' in q for q in queries if re.search(r"\bup\{", q)), "up{job=...} mismatch"
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"] if v.startswith(".")}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= mounted
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]

    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "hubproxy.yaml").read_text())
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("."))
    assert grafana_mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert grafana_mounts["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]


def test_dashboard_panels_query_the_chosen_prometheus():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert 'instance=~"$instance"' in target["expr"], f"{panel['title']} ignores the replica picker"
