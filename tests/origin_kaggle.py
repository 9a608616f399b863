"""The origin emulator's "kaggle-api" site (tests/origin.py): the three RPCs of Kaggle's
models.ModelApiService that kagglehub calls, with the JSON kagglesdk sends and parses.

    POST /v1/models.ModelApiService/GetModelInstance
    POST /v1/models.ModelApiService/ListModelInstanceVersionFiles
    POST /v1/models.ModelApiService/DownloadModelInstanceVersion   -> 302 to a signed storage URL

Also under /api/v1/..., where kagglesdk's non-production environments send them.
Invariants: answers carry only fields kagglesdk knows, in its camelCase names, leaving out
default values as its own to_dict does; errors are JSON {"code", "message"} with that status, which
kagglesdk turns into an HTTPError; a private model answers 401 to a request without its token,
before anything about it is told; every request body is recorded in its request-log entry.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import urllib.parse
from typing import Awaitable, Callable

from aiohttp import web

from origin_state import Blob, Model, State, authorized, redirect_target

SERVICE = "models.ModelApiService"
DEFAULT_PAGE_SIZE = 25
MAX_PAGE_SIZE = 1000
LICENSE = "Apache 2.0"
StorageHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RpcError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def rpc_error(code: int, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=code)


def iso_millis(timestamp: float) -> str:
    """A time as kagglesdk's DateTimeSerializer writes one: 2024-05-01T12:00:00.000Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp * 1000) % 1000:03d}Z"


def without_defaults(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if v not in ("", 0, [], None, False)}


# ---------------------------------------------------------------- finding what a request names


def instance_coords(state: State, body: dict) -> tuple[str, ...]:
    for key in ("ownerSlug", "modelSlug", "instanceSlug"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise RpcError(400, f"{key} is required")
    wanted = (body["ownerSlug"], body["modelSlug"], body.get("framework"), body["instanceSlug"])
    for model in state.models.values():
        owner, name, _, variation = model.instance_coords
        if (owner, name, model.framework_enum, variation) == wanted:
            return model.instance_coords
    raise RpcError(404, "Model instance {}/{}/{}/{} not found".format(*wanted))


def find_model(state: State, request, body: dict, *, version_required: bool) -> Model:
    """The model version a request names (the latest when it names none and may), checked for access."""
    coords = instance_coords(state, body)
    versions = state.versions_of(coords)
    number = body.get("versionNumber")
    if number is None and version_required:
        raise RpcError(400, "versionNumber is required")
    if number is not None and not isinstance(number, int):
        raise RpcError(400, "versionNumber must be an integer")
    model = versions[-1] if number is None else state.by_coords.get((*coords, str(number)))
    check_authorized(versions[-1] if model is None else model, request)
    if model is None:
        raise RpcError(404, f"Version {number} of {'/'.join(coords)} not found")
    return model


def check_authorized(model: Model, request) -> None:
    if not authorized(model, request.headers.get("Authorization")):
        raise RpcError(401, "Unauthenticated")


# ---------------------------------------------------------------- the RPCs


def get_model_instance(state: State, request, body: dict) -> web.Response:
    model = find_model(state, request, body, version_required=False)
    owner, name, framework, variation = model.instance_coords
    return web.json_response(without_defaults({
        "id": model.instance_id,
        "slug": variation,
        "framework": model.framework_enum,
        "versionId": model.version_id,
        "versionNumber": int(model.version),
        "url": f"{state.urls['kaggle']}/models/{owner}/{name}/{framework}/{variation}",
        "licenseName": LICENSE,
        "modelInstanceType": "MODEL_INSTANCE_TYPE_BASE_MODEL",
        "totalUncompressedBytes": sum(blob.size for blob in model.files.values()),
    }))


def page_bounds(body: dict, total: int) -> tuple[int, int]:
    size = body.get("pageSize") or DEFAULT_PAGE_SIZE
    if not isinstance(size, int) or size < 0:
        raise RpcError(400, "pageSize must be a whole number")
    start = decode_page_token(body.get("pageToken") or "")
    if start > total:
        raise RpcError(400, "Invalid pageToken")
    return start, min(total, start + min(size, MAX_PAGE_SIZE))


def encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        label, _, offset = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        label, offset = "", ""
    if label != "offset" or not offset.isdigit():
        raise RpcError(400, "Invalid pageToken")
    return int(offset)


def list_files(state: State, request, body: dict) -> web.Response:
    model = find_model(state, request, body, version_required=False)
    names = sorted(model.files)
    start, stop = page_bounds(body, len(names))
    files = [file_entry(name, model.files[name]) for name in names[start:stop]]
    next_token = encode_page_token(stop) if stop < len(names) else ""
    return web.json_response(without_defaults({"files": files, "nextPageToken": next_token}))


def file_entry(name: str, blob: Blob) -> dict:
    return without_defaults({"name": name, "size": blob.size, "creationDate": iso_millis(blob.mtime)})


def download(state: State, request, body: dict) -> web.Response:
    model = find_model(state, request, body, version_required=True)
    path = body.get("path")
    if path is None:
        return found(redirect_target(state, model.archive))
    blob = model.files.get(path) if isinstance(path, str) else None
    if blob is None:
        raise RpcError(404, f"File {path!r} not found in {'/'.join(model.coords)}")
    return found(redirect_target(state, blob))


def found(location: str) -> web.Response:
    """A 302 whose Location is sent verbatim (HTTPFound would normalise the signed URL's query)."""
    return web.Response(status=302, headers={"Location": location})


RPCS = {
    "GetModelInstance": get_model_instance,
    "ListModelInstanceVersionFiles": list_files,
    "DownloadModelInstanceVersion": download,
}


def make_kaggle_api_app(state: State, storage: StorageHandler) -> web.Application:
    """The RPCs; `storage` answers the gcs site's GETs that arrive here through HTTP_PROXY."""

    async def call(request):
        rpc = RPCS.get(request.match_info["rpc"])
        if request.match_info["service"] != SERVICE or rpc is None:
            return rpc_error(404, f"Unknown method {request.match_info['service']}/{request.match_info['rpc']}")
        try:
            body = json.loads(await request.read() or b"{}")
        except (ValueError, UnicodeDecodeError):
            return rpc_error(400, "Request body is not JSON")
        if not isinstance(body, dict):
            return rpc_error(400, "Request body is not a JSON object")
        entry = request.get("log_entry")
        if entry is not None:
            entry["body"] = body
        try:
            return rpc(state, request, body)
        except RpcError as error:
            return rpc_error(error.code, error.message)

    async def storage_through_proxy(request):
        # kagglesdk's LOCALHOST environment is reached through HTTP_PROXY=<this site>, and requests
        # keeps that proxy across the 302: the signed storage GET arrives here, in absolute form.
        if request.url.authority != urllib.parse.urlsplit(state.urls["gcs"]).netloc:
            return rpc_error(404, "Not found")
        if (entry := request.get("log_entry")) is not None:
            entry["site"] = "gcs"
        return await storage(request)

    app = web.Application()
    for prefix in ("/v1", "/api/v1"):
        app.router.add_post(prefix + "/{service}/{rpc}", call)
    app.router.add_get("/{object:.+}", storage_through_proxy)
    return app
