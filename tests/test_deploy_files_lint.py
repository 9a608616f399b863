"""deploy/ files that rot silently: each is checked by its real linter or loader (hadolint,
systemd-analyze, hubproxy's own settings loader), so a broken or undocumented file fails here."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hubproxy.config import Settings, load_settings

DEPLOY = Path(__file__).parent.parent / "deploy"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if found is None:
        pytest.fail(f"{name} is not installed (pip install -e '.[test]', or .ci/run's apt-get line)")
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run([_tool("hadolint"), "--failure-threshold", "info", str(DEPLOY / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_hubproxy_as_pid_1_non_root_with_a_cache_volume():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["hubproxy", "serve"', text, re.M), "entrypoint must be exec form"
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert re.search(r'^VOLUME \["/var/cache/hubproxy"\]', text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks ExecStart's program exists: point it at this environment's hubproxy
    unit = tmp_path / "hubproxy.service"
    unit.write_text((DEPLOY / "systemd" / "hubproxy.service").read_text()
                    .replace("/usr/local/bin/hubproxy", str(BIN / "hubproxy")))
    result = subprocess.run([_tool("systemd-analyze"), "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert str(unit) not in result.stderr, result.stderr  # unknown keys are only warnings


def test_systemd_unit_is_hardened():
    text = (DEPLOY / "systemd" / "hubproxy.service").read_text()
    for line in ("ProtectSystem=strict", "ReadWritePaths=/var/cache/hubproxy", "NoNewPrivileges=yes",
                 "PrivateTmp=yes", "CacheDirectory=hubproxy", "Restart=on-failure", "KillSignal=SIGTERM"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line
    assert re.search(r"^(DynamicUser=yes|User=hubproxy)$", text, re.M)
    stop = re.search(r"^TimeoutStopSec=(\d+)s$", text, re.M)
    assert stop and int(stop.group(1)) > 60, "must outlast the 60 s drain"


def test_example_config_loads_and_documents_every_setting():
    settings = load_settings(DEPLOY / "hubproxy.toml", environ={})
    assert settings.listen == "0.0.0.0:8080"
    text = (DEPLOY / "hubproxy.toml").read_text()
    missing = [f.name for f in dataclasses.fields(Settings) if not re.search(rf"^#? ?\[?{f.name}\b", text, re.M)]
    assert not missing, f"deploy/hubproxy.toml does not document: {missing}"
