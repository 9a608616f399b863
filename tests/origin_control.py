"""Client side of the origin emulator (tests/origin.py): start it, register models, flip faults,
read its request log. Used by the tests and by bench/."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_unique = itertools.count(1)


@dataclasses.dataclass
class Model:
    handle: str  # tfhub path, "google/t1/1"
    owner: str
    model: str
    framework: str
    variation: str
    version: str
    object: str  # GCS object path
    file: str

    @property
    def kaggle_path(self) -> str:
        return (f"/models/{self.owner}/{self.model}/frameworks/{self.framework}"
                f"/variations/{self.variation}/versions/{self.version}")

    @property
    def kaggle_download_path(self) -> str:
        return (f"/api/v1/models/{self.owner}/{self.model}/{self.framework}"
                f"/{self.variation}/{self.version}/download")


class Origin:
    def __init__(self, urls: dict[str, str]):
        self.urls = urls

    def control(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.urls['tfhub']}/_control/{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def register(self, archive: Path, *, public_bucket: bool = False) -> Model:
        """Serve `archive` under a fresh model name (so nothing has it cached yet)."""
        n = next(_unique)
        name = f"model{n}-{os.getpid()}"
        obj = f"tfhub-modules/google/{name}/1.tar.gz" if public_bucket else f"kaggle-models-data/{1000 + n}/{name}.tar.gz"
        model = Model(handle=f"google/{name}/1", owner="google", model=name, framework="tensorFlow2",
                      variation="default", version="1", object=obj, file=str(archive))
        self.control("POST", "models", dataclasses.asdict(model))
        return model

    def faults(self, model: Model, **switches) -> None:
        self.control("POST", "faults", {"object": model.object, **switches})

    def requests(self, site: str | None = None, path: str | None = None) -> list[dict]:
        log = self.control("GET", "requests")["requests"]
        return [r for r in log if (site is None or r["site"] == site) and (path is None or r["path"] == path)]

    def object_gets(self, model: Model) -> int:
        return len([r for r in self.requests("gcs", "/" + model.object) if r["method"] == "GET"])

    def wait_held(self, count: int) -> None:
        self.control("GET", f"wait_held?count={count}&timeout=60")

    def release(self) -> None:
        self.control("POST", "release", {})


def start_origin(ports_file: Path) -> tuple[Origin, subprocess.Popen]:
    """Run tests/origin.py as its own process on 127.0.0.1; stop it with stop_process."""
    process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("origin.py")), "--ports-file", str(ports_file)])
    deadline = time.monotonic() + 30
    while not ports_file.exists():  # process start-up, not a test event: nothing to wait on but the file
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the origin emulator did not start")
        time.sleep(0.05)
    return Origin(json.loads(ports_file.read_text())), process


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
