"""kagglehub's RPC bodies (POST /v1/models.ModelApiService/<Rpc>), checked whole before anything
acts on them, into a Call: which model instance, version, file or page it asks for.

Invariants: a Call holds only checked values (slugs and paths from handles' strict alphabets, a
ModelFramework name, whole numbers in range), so its keys and the body rebuilt from it name
nothing else; a refusal is a jsonbody.BadBody (400 with a one-line reason naming the field; 413,
415); the body sent upstream is rebuilt from the Call, as kagglesdk writes it (camelCase, fields at
their defaults left out), never the client's bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

from ..handles import (KAGGLE_API, BadHandle, KaggleFile, KaggleInstance, kaggle_file_path, kaggle_instance,
                       kaggle_version)
from .jsonbody import BadBody, kind, read_object, refuse_unknown

GET_INSTANCE = "GetModelInstance"
LIST_FILES = "ListModelInstanceVersionFiles"
DOWNLOAD = "DownloadModelInstanceVersion"
SERVICE_PATH = "/v1/models.ModelApiService/"
MAX_PAGE_SIZE = 1000
_PAGE_TOKEN = re.compile(r"[A-Za-z0-9+/=_.-]{1,512}")
_INSTANCE_FIELDS = ("ownerSlug", "modelSlug", "framework", "instanceSlug")
FIELDS = {
    GET_INSTANCE: _INSTANCE_FIELDS,
    LIST_FILES: (*_INSTANCE_FIELDS, "versionNumber", "pageSize", "pageToken"),
    DOWNLOAD: (*_INSTANCE_FIELDS, "versionNumber", "path"),
}
_EXAMPLE = ('{"ownerSlug": "google", "modelSlug": "x", "framework": "MODEL_FRAMEWORK_TENSOR_FLOW_2", '
            '"instanceSlug": "default"}')


@dataclass(frozen=True)
class Call:
    rpc: str
    instance: KaggleInstance
    version: int | None = None
    path: str | None = None
    page_size: int | None = None
    page_token: str | None = None

    @property
    def fields(self) -> dict:
        """The body that asks upstream the same question."""
        optional = {"versionNumber": self.version, "path": self.path, "pageSize": self.page_size,
                    "pageToken": self.page_token}
        return {**self.instance.fields, **{k: v for k, v in optional.items() if v}}

    @property
    def described(self) -> str:
        """What it names, for people: "google/x/tensorFlow2/default/1"."""
        return self.instance.path.lstrip("/") + (f"/{self.version}" if self.version else "")

    @property
    def key(self) -> str:
        """Its metadata key (and the access log's handle): which question, never who asked it."""
        page = f"?pageSize={self.page_size or 0}&pageToken={self.page_token or ''}" if self.rpc == LIST_FILES else ""
        path = f"/{self.path}" if self.path else ""
        return f"{KAGGLE_API}:{self.rpc}:/{self.described}{path}{page}"

    @property
    def scope(self) -> str:
        """What upstream's anonymity is remembered for: the version, or the instance's latest."""
        return f"{self.instance.path}/{self.version or 'latest'}"

    @property
    def file(self) -> KaggleFile:
        """What a DownloadModelInstanceVersion asks for (its version is required)."""
        return KaggleFile(self.instance, self.version, self.path)


async def read_call(request: web.Request, rpc: str) -> Call:
    """The Call a request's body makes (rpc one of FIELDS); raises BadBody."""
    document = await read_object(request, _EXAMPLE)
    refuse_unknown(document, FIELDS[rpc], rpc)
    missing = [name for name in _INSTANCE_FIELDS if name not in document]
    if rpc == DOWNLOAD and "versionNumber" not in document:
        missing.append("versionNumber")
    if missing:
        raise BadBody(f"{rpc} needs {', '.join(missing)}")
    try:
        return Call(rpc, kaggle_instance(*(document[name] for name in _INSTANCE_FIELDS)),
                    version=_optional(document, "versionNumber", kaggle_version),
                    path=_optional(document, "path", kaggle_file_path),
                    page_size=_optional(document, "pageSize", _page_size),
                    page_token=_optional(document, "pageToken", _page_token))
    except BadHandle as e:
        raise BadBody(str(e)) from None


def _optional(document: dict, name: str, read):
    return read(document[name]) if name in document else None


def _page_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadHandle(f"pageSize must be a whole number, not {kind(value)}")
    if not 0 <= value <= MAX_PAGE_SIZE:
        raise BadHandle(f"pageSize must be from 0 to {MAX_PAGE_SIZE}, not {value}")
    return value


def _page_token(value: object) -> str:
    if not isinstance(value, str):
        raise BadHandle(f"pageToken must be a string, not {kind(value)}")
    if value and not _PAGE_TOKEN.fullmatch(value):
        raise BadHandle(f"pageToken is not a page token upstream gave: {value[:40]!r}")
    return value
