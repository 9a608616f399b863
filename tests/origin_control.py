"""Client side of the origin emulator (tests/origin.py): start it, register models, flip faults,
read its request log. Used by the tests and by bench/."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import os
import secrets
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
    framework: str  # Kaggle's spelling in URLs and handles: "tensorFlow2"
    variation: str
    version: str
    object: str  # GCS object path of the archive
    file: str
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # member path -> its own GCS object
    private: bool = False  # the Kaggle API and download want `token` in Authorization
    token: str = ""

    @property
    def kaggle_path(self) -> str:
        return (f"/models/{self.owner}/{self.model}/frameworks/{self.framework}"
                f"/variations/{self.variation}/versions/{self.version}")

    @property
    def kaggle_download_path(self) -> str:
        return (f"/api/v1/models/{self.owner}/{self.model}/{self.framework}"
                f"/{self.variation}/{self.version}/download")

    @property
    def kaggle_instance_handle(self) -> str:
        """kagglehub's handle without a version: "google/t1/tensorFlow2/default"."""
        return f"{self.owner}/{self.model}/{self.framework}/{self.variation}"

    @property
    def kaggle_handle(self) -> str:
        """kagglehub's handle of this version: "google/t1/tensorFlow2/default/1"."""
        return f"{self.kaggle_instance_handle}/{self.version}"

    @property
    def objects(self) -> list[str]:
        """Every storage object of this model: its archive, then its member files."""
        return [self.object, *self.files.values()]

    def authorization(self, scheme: str = "Bearer", user: str = "tester") -> str:
        """An Authorization header value the emulator accepts for this (private) model."""
        if scheme == "Basic":
            return "Basic " + base64.b64encode(f"{user}:{self.token}".encode()).decode()
        return f"Bearer {self.token}"


class Origin:
    def __init__(self, urls: dict[str, str]):
        self.urls = urls

    def control(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.urls['tfhub']}/_control/{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def register(self, archive: Path, *, public_bucket: bool = False, private: bool = False,
                 extra_files: int = 0, like: Model | None = None, version: str = "1") -> Model:
        """Serve `archive` under a fresh model name (so nothing has it cached yet), or as another
        `version` of the model `like`. Its member files become objects of their own; `extra_files`
        adds that many small files to it (more than 25 and kagglehub fetches the archive instead)."""
        n = next(_unique)
        name = like.model if like else f"model{n}-{os.getpid()}"
        obj = (f"tfhub-modules/google/{name}/{version}.tar.gz" if public_bucket
               else f"kaggle-models-data/{1000 + n}/{name}.tar.gz")
        model = Model(handle=f"google/{name}/{version}", owner="google", model=name, framework="tensorFlow2",
                      variation="default", version=version, object=obj, file=str(archive),
                      private=private, token=secrets.token_hex(8) if private else "")
        body = {k: v for k, v in dataclasses.asdict(model).items() if k != "files"}
        answer = self.control("POST", "models", {**body, "extra_files": extra_files})
        model.files = {f["name"]: f["object"] for f in answer["files"]}
        return model

    def faults(self, model: Model, path: str | None = None, **switches) -> None:
        """Switch faults on the model's archive, or on its member file `path`."""
        self.control("POST", "faults", {"object": model.files[path] if path else model.object, **switches})

    def requests(self, site: str | None = None, path: str | None = None) -> list[dict]:
        log = self.control("GET", "requests")["requests"]
        return [r for r in log if (site is None or r["site"] == site) and (path is None or r["path"] == path)]

    def object_gets(self, model: Model) -> int:
        return len([r for r in self.requests("gcs", "/" + model.object) if r["method"] == "GET"])

    def storage_gets(self, model: Model, path: str | None = None) -> list[dict]:
        """The storage GETs of one member file, or of any of the model's objects (archive included)."""
        paths = {"/" + obj for obj in ([model.files[path]] if path else model.objects)}
        return [r for r in self.requests("gcs") if r["method"] == "GET" and r["path"] in paths]

    def rpcs(self, name: str | None = None) -> list[dict]:
        """The kaggle-api calls logged, each with its JSON request `body`; of RPC `name` if given."""
        return [r for r in self.requests("kaggle-api") if name is None or r["path"].endswith("/" + name)]

    def wait_held(self, count: int) -> None:
        self.control("GET", f"wait_held?count={count}&timeout=60")

    def release(self) -> None:
        self.control("POST", "release", {})


def start_origin(ports_file: Path) -> tuple[Origin, subprocess.Popen]:
    """Run tests/origin.py as its own process on 127.0.0.1; stop it with stop_process."""
    origin_script = str(Path(__file__).with_name("origin.py"))
    process = subprocess.Popen([sys.executable, origin_script, "--ports-file", str(ports_file)])
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
