"""The container's entrypoint, run as a real process: the exact ENTRYPOINT + CMD of deploy/Dockerfile
(with only the listen address and the cache dir swapped for test ones) starts and answers /healthz."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, _quiet_env, http_request
from tests.origin_control import stop_process

DEPLOY = ROOT / "deploy"


def _exec_form(instruction: str, text: str) -> list[str]:
    match = re.search(rf"^{instruction} (\[.*\])$", text, re.M)
    assert match, f"no exec-form {instruction} in deploy/Dockerfile"
    return json.loads(match.group(1))


def _override(args: list[str], flag: str, value: str) -> list[str]:
    assert flag in args, f"{flag} not in the image's command {shlex.join(args)}"
    i = args.index(flag)
    return [*args[:i + 1], value, *args[i + 2:]]


def test_the_image_command_serves_healthz(tmp_path: Path):
    text = (DEPLOY / "Dockerfile").read_text()
    command = _exec_form("ENTRYPOINT", text) + _exec_form("CMD", text)
    assert command[0] == "hubproxy"
    command = _override(command, "--config", str(DEPLOY / "hubproxy.toml"))
    command = _override(command, "--listen", "127.0.0.1:0")
    command = _override(command, "--cache-dir", str(tmp_path / "cache"))
    process = subprocess.Popen([str(Path(sys.executable).parent / command[0]), *command[1:]], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_quiet_env())
    try:
        line = process.stdout.readline()
        assert "listening on " in line, process.stderr.read()
        url = line.split("listening on ")[1].split()[0]
        status, _, body = http_request(url + "/healthz")
        assert status == 200, body
    finally:
        stop_process(process)
