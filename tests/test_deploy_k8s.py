"""Kubernetes manifests that apply but run wrong: every file in deploy/k8s passes
`kubernetes-validate --strict` (no misspelt or misplaced field), and the choices an operator relies
on hold: a volume per replica large enough for the configured cap, probes on /readyz and /healthz, a
grace period that outlasts the drain, the restricted security context, egress only to DNS and 443,
a ConfigMap hubproxy can load, and the names the consistent-hash front in deploy/lb dials."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from hubproxy.config import Settings, load_settings
from hubproxy.units import parse_duration, parse_size
from tests.conftest import ROOT
from tests.test_deploy_files_lint import _tool

K8S = ROOT / "deploy" / "k8s"
QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi|Ti)")


def _manifests() -> dict[str, dict]:
    """kind/name → resource, over every file in deploy/k8s."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def _statefulset() -> dict:
    return _manifests()["StatefulSet/hubproxy"]


def _container() -> dict:
    (container,) = _statefulset()["spec"]["template"]["spec"]["containers"]
    return container


def _bytes(quantity: str) -> int:
    number, unit = QUANTITY.fullmatch(quantity).groups()
    return int(number) * 1024 ** ("KiMiGiTi".index(unit) // 2 + 1)


def test_every_manifest_passes_kubernetes_validate_strict():
    files = sorted(K8S.glob("*.yaml"))
    assert len(files) >= 5
    result = subprocess.run([_tool("kubernetes-validate"), "--strict", "--quiet", *map(str, files)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_configmap_is_a_config_hubproxy_loads_and_fits_the_volume(tmp_path):
    config = tmp_path / "hubproxy.toml"
    config.write_text(_manifests()["ConfigMap/hubproxy-config"]["data"]["hubproxy.toml"])
    settings = load_settings(config, environ={})
    (claim,) = _statefulset()["spec"]["volumeClaimTemplates"]
    volume = _bytes(claim["spec"]["resources"]["requests"]["storage"])
    assert parse_size(settings.max_size) + parse_size(settings.min_free) <= volume, "the cap outgrows the volume"


def test_each_replica_has_its_own_cache_volume_and_the_config_mounted():
    spec = _statefulset()["spec"]
    (claim,) = spec["volumeClaimTemplates"]
    mounts = {mount["name"]: mount["mountPath"] for mount in _container()["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/var/cache/hubproxy"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert mounts["config"] == "/etc/hubproxy"  # the image runs `hubproxy serve --config /etc/hubproxy/hubproxy.toml`
    volumes = {volume["name"]: volume for volume in spec["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "hubproxy-config"


def test_probes_readiness_on_readyz_and_liveness_on_healthz():
    container = _container()
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in container["ports"]


def test_the_grace_period_outlasts_the_drain():
    pod = _statefulset()["spec"]["template"]["spec"]
    # drain_timeout, once Settings has it (60s, the default, until then)
    drain = parse_duration(getattr(Settings(), "drain_timeout", "60s"))
    pre_stop = _container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop


def test_the_pod_runs_restricted():
    pod = _statefulset()["spec"]["template"]["spec"]
    context = _container()["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False


def test_egress_is_dns_and_https_only():
    policy = _manifests()["NetworkPolicy/hubproxy-egress"]["spec"]
    assert policy["podSelector"]["matchLabels"] == _statefulset()["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Egress"]
    allowed = {(port["protocol"], port["port"]) for rule in policy["egress"] for port in rule["ports"]}
    assert allowed == {("UDP", 53), ("TCP", 53), ("TCP", 443)}


@pytest.mark.parametrize("name", ["Service/hubproxy", "Service/hubproxy-mirror", "PodDisruptionBudget/hubproxy"])
def test_services_and_the_budget_select_the_replicas(name):
    resource = _manifests()[name]["spec"]
    selector = resource["selector"].get("matchLabels", resource["selector"])
    assert selector == _statefulset()["spec"]["selector"]["matchLabels"]


def test_the_headless_service_names_the_replicas_the_front_dials():
    statefulset = _statefulset()
    spec = statefulset["spec"]
    assert _manifests()[f"Service/{spec['serviceName']}"]["spec"]["clusterIP"] == "None"
    # deploy/lb/haproxy.cfg's default servers are pod N of this StatefulSet, by its stable name
    front = (ROOT / "deploy" / "lb" / "haproxy.cfg").read_text()
    servers = re.findall(r'^\s*server \S+ "\$\{\w+-([^}]+)\}"', front, re.M)
    assert spec["replicas"] > 1
    assert servers == [f"{statefulset['metadata']['name']}-{n}.{spec['serviceName']}:8080"
                       for n in range(spec["replicas"])]
    assert _manifests()["PodDisruptionBudget/hubproxy"]["spec"]["maxUnavailable"] == 1
