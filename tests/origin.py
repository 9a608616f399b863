"""Local emulator of the TensorFlow Hub download chain: tfhub -> kaggle -> signed GCS URL.

Invariants: one process, four 127.0.0.1 sites (tfhub, kaggle, gcs, canary) sharing one state;
object bytes are streamed from disk in chunks, with headers (length, hashes) always of the good file;
every non-control request is logged at arrival; nothing misbehaves unless a /_control/ switch says so.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import calendar
import email.utils
import hashlib
import hmac
import json
import os
import secrets
import signal
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

SITES = ("tfhub", "kaggle", "gcs", "canary")
CHUNK_SIZE = 256 * 1024
CONTROL_PREFIX = "/_control/"
PUBLIC_PREFIX = "tfhub-modules/"
MODEL_FIELDS = ("handle", "owner", "model", "framework", "variation", "version", "object", "file")
UNSATISFIABLE = "unsatisfiable"
SWITCHES = {
    "truncate_at", "corrupt_at", "status", "status_count", "throttle_bps",
    "hold_after", "html", "redirect_to", "down",
}


# ---------------------------------------------------------------- checksums

try:
    import google_crc32c

    def new_crc32c():
        return google_crc32c.Checksum()

except ImportError:  # pure-Python fallback, slow but correct
    _CRC_TABLE = []
    for _i in range(256):
        _c = _i
        for _ in range(8):
            _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
        _CRC_TABLE.append(_c)

    class _PyCrc32c:
        def __init__(self):
            self._crc = 0xFFFFFFFF

        def update(self, data):
            crc, table = self._crc, _CRC_TABLE
            for byte in data:
                crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
            self._crc = crc

        def digest(self):
            return (self._crc ^ 0xFFFFFFFF).to_bytes(4, "big")

    def new_crc32c():
        return _PyCrc32c()


def file_digests(path: str) -> tuple[str, str, int]:
    """Return (md5 hex, crc32c base64, size), reading the file in chunks."""
    md5, crc = hashlib.md5(), new_crc32c()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            md5.update(chunk)
            crc.update(chunk)
            size += len(chunk)
    return md5.hexdigest(), base64.b64encode(crc.digest()).decode(), size


# ---------------------------------------------------------------- state


@dataclass
class Model:
    handle: str
    owner: str
    model: str
    framework: str
    variation: str
    version: str
    object: str
    file: str
    md5: str
    crc32c: str
    size: int
    mtime: float

    @property
    def coords(self) -> tuple[str, ...]:
        return (self.owner, self.model, self.framework, self.variation, self.version)

    @property
    def kaggle_download_path(self) -> str:
        return "/api/v1/models/" + "/".join(urllib.parse.quote(p, safe="") for p in self.coords) + "/download"


class State:
    def __init__(self, signing_secret: str, url_ttl: int):
        self.signing_secret = signing_secret.encode()
        self.url_ttl = url_ttl
        self.urls: dict[str, str] = {}
        self.models: dict[str, Model] = {}
        self.by_object: dict[str, Model] = {}
        self.by_coords: dict[tuple[str, ...], Model] = {}
        self.faults: dict[str, dict] = {}
        self.log: list[dict] = []
        self.clock_offset = 0.0
        self.release_event = asyncio.Event()
        self.held = 0
        self.held_changed = asyncio.Condition()

    def now(self) -> float:
        return time.time() + self.clock_offset

    def register(self, model: Model) -> None:
        old = self.models.pop(model.handle, None)
        if old is not None:
            self.by_object.pop(old.object, None)
            self.by_coords.pop(old.coords, None)
        self.models[model.handle] = model
        self.by_object[model.object] = model
        self.by_coords[model.coords] = model

    def faults_for(self, obj: str) -> dict:
        """Merged switches: object-specific ones override the '*' ones."""
        return {**self.faults.get("*", {}), **self.faults.get(obj, {})}

    def take_status_fault(self, obj: str) -> int | None:
        """Consume one forced status for obj, if any remains."""
        for key in (obj, "*"):
            switches = self.faults.get(key, {})
            if "status" not in switches:
                continue
            remaining = switches.get("status_count")
            if remaining is None:
                return switches["status"]
            if remaining > 0:
                switches["status_count"] = remaining - 1
                return switches["status"]
        return None

    def release_all(self) -> None:
        # Held transfers wait on the old event; new holds wait on a fresh one.
        self.release_event.set()
        self.release_event = asyncio.Event()

    def reset(self) -> None:
        self.faults.clear()
        self.log.clear()
        self.clock_offset = 0.0
        self.release_all()


# ---------------------------------------------------------------- signing


def sign(state: State, obj: str, date: str, expires: str) -> str:
    message = f"{obj}\n{date}\n{expires}".encode()
    return hmac.new(state.signing_secret, message, hashlib.sha256).hexdigest()


def signed_gcs_url(state: State, model: Model) -> str:
    date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(state.now()))
    expires = str(state.url_ttl)
    query = urllib.parse.urlencode({
        "X-Goog-Algorithm": "GOOG4-HMAC-SHA256",
        "X-Goog-Date": date,
        "X-Goog-Expires": expires,
        "X-Goog-SignedHeaders": "host",
        "X-Goog-Signature": sign(state, model.object, date, expires),
    })
    return f"{state.urls['gcs']}/{urllib.parse.quote(model.object, safe='/')}?{query}"


def gcs_error(status: int, code: str, message: str) -> web.Response:
    body = (
        "<?xml version='1.0' encoding='UTF-8'?>"
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


def check_access(state: State, obj: str, query) -> web.Response | None:
    """Return an error response if the request may not read obj, else None."""
    signature = query.get("X-Goog-Signature")
    if signature is None:
        if obj.startswith(PUBLIC_PREFIX):
            return None
        return gcs_error(403, "AccessDenied", "Anonymous caller does not have storage.objects.get access.")
    date, expires = query.get("X-Goog-Date", ""), query.get("X-Goog-Expires", "")
    if not hmac.compare_digest(signature, sign(state, obj, date, expires)):
        return gcs_error(403, "SignatureDoesNotMatch", "The request signature we calculated does not match.")
    try:
        issued = calendar.timegm(time.strptime(date, "%Y%m%dT%H%M%SZ"))
        lifetime = int(expires)
    except ValueError:
        return gcs_error(400, "AuthorizationQueryParametersError", "Bad X-Goog-Date or X-Goog-Expires.")
    if state.now() > issued + lifetime:
        return gcs_error(400, "ExpiredToken", "The provided token has expired.")
    return None


# ---------------------------------------------------------------- ranges and streaming


def parse_range(header: str | None, size: int):
    """One 'bytes=' range -> (start, stop); None to serve it all; UNSATISFIABLE for a 416."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[len("bytes="):].strip().partition("-")
    if not sep or not (first + last) or not all(p == "" or p.isdigit() for p in (first, last)):
        return None  # malformed or multi-range: ignored, as RFC 9110 allows
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - suffix), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return UNSATISFIABLE
    return start, size if last == "" else min(int(last) + 1, size)


def chunk_size_for(switches: dict) -> int:
    bps = switches.get("throttle_bps")
    if not bps:
        return CHUNK_SIZE
    return max(1, min(CHUNK_SIZE, int(bps) // 10))


async def hold(state: State) -> None:
    event = state.release_event
    async with state.held_changed:
        state.held += 1
        state.held_changed.notify_all()
    try:
        await event.wait()
    finally:
        async with state.held_changed:
            state.held -= 1
            state.held_changed.notify_all()


def next_boundary(pos: int, stop: int, switches: dict) -> int:
    """The nearest offset after pos where a fault must act, or stop."""
    marks = [switches.get("truncate_at"), switches.get("hold_after")]
    return min([stop] + [m for m in marks if isinstance(m, int) and pos < m < stop])


async def stream_body(request, resp, state: State, model: Model, start: int, stop: int, switches: dict) -> bool:
    """Write file bytes [start, stop) applying faults; False when the connection was cut."""
    # Fault offsets are object offsets: a ranged request only meets those inside its range.
    chunk_size = chunk_size_for(switches)
    bps = switches.get("throttle_bps")
    corrupt_at, held = switches.get("corrupt_at"), False
    # Paced against the clock, as a link of that speed would be: time spent reading and writing
    # counts toward each chunk's share, rather than being added to a fixed sleep.
    loop = asyncio.get_running_loop()
    paced_from, paced_bytes = loop.time(), 0
    with open(model.file, "rb") as fh:
        fh.seek(start)
        pos = start
        while pos < stop:
            if switches.get("hold_after") == pos and not held:
                await resp.write(b"")  # flush headers (aiohttp buffers them) before blocking
                await hold(state)
                held = True
                paced_from, paced_bytes = loop.time(), 0
            if switches.get("truncate_at") == pos:
                await resp.write(b"")
                request.transport.close()  # close() flushes what was written, then drops
                return False
            want = min(chunk_size, next_boundary(pos, stop, switches) - pos)
            data = await asyncio.to_thread(fh.read, want)
            if not data:
                break
            if isinstance(corrupt_at, int) and pos <= corrupt_at < pos + len(data):
                data = bytearray(data)
                data[corrupt_at - pos] ^= 0xFF
            await resp.write(bytes(data))
            pos += len(data)
            paced_bytes += len(data)
            if bps:
                await asyncio.sleep(max(0.0, paced_from + paced_bytes / bps - loop.time()))
    return True


def abort_connection(request) -> web.Response:
    request["log_entry"] = None  # no status line is ever sent
    request.transport.abort()
    # aiohttp fails to write this on the dead transport and drops it quietly.
    return web.Response(status=500)


# ---------------------------------------------------------------- sites


def html_page(title: str) -> web.Response:
    return web.Response(
        text=f"<!doctype html><html><head><title>{title}</title></head><body>{title}</body></html>",
        content_type="text/html",
    )


def make_tfhub_app(state: State) -> web.Application:
    async def model_page(request):
        handle = request.match_info["handle"].strip("/")
        model = state.models.get(handle)
        if model is None:
            return web.Response(status=404, text="Not found")
        if request.query.get("tf-hub-format") != "compressed":
            return html_page(f"TensorFlow Hub: {handle}")
        raise web.HTTPFound(state.urls["kaggle"] + model.kaggle_download_path)

    app = web.Application()
    add_control_routes(app, state)
    app.router.add_get("/{handle:.+}", model_page)
    return app


def make_kaggle_app(state: State) -> web.Application:
    def lookup(request) -> Model:
        info = request.match_info
        coords = (info["owner"], info["model"], info["framework"], info["variation"], info["version"])
        model = state.by_coords.get(coords)
        if model is None:
            raise web.HTTPNotFound(text="Not found")
        return model

    async def model_version(request):
        model = lookup(request)
        if request.query.get("tf-hub-format") != "compressed":
            return html_page(f"Kaggle: {'/'.join(model.coords)}")
        raise web.HTTPFound(state.urls["kaggle"] + model.kaggle_download_path)

    async def download(request):
        model = lookup(request)
        redirect_to = state.faults_for(model.object).get("redirect_to")
        raise web.HTTPFound(redirect_to or signed_gcs_url(state, model))

    app = web.Application()
    app.router.add_get(
        "/models/{owner}/{model}/frameworks/{framework}/variations/{variation}/versions/{version}",
        model_version,
    )
    app.router.add_get("/api/v1/models/{owner}/{model}/{framework}/{variation}/{version}/download", download)
    return app


def object_headers(model: Model) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "ETag": f'"{model.md5}"',
        "x-goog-hash": f"crc32c={model.crc32c},md5={base64.b64encode(bytes.fromhex(model.md5)).decode()}",
        "x-goog-stored-content-length": str(model.size),
        "Accept-Ranges": "bytes",
        "Last-Modified": email.utils.formatdate(model.mtime, usegmt=True),
    }


def make_gcs_app(state: State) -> web.Application:
    async def get_object(request):
        obj = request.match_info["object"]
        switches = state.faults_for(obj)
        if switches.get("down"):
            return abort_connection(request)
        denied = check_access(state, obj, request.query)
        if denied is not None:
            return denied
        model = state.by_object.get(obj)
        if model is None:
            return gcs_error(404, "NoSuchKey", "The specified key does not exist.")
        if request.method == "GET":
            forced = state.take_status_fault(obj)
            if forced is not None:
                return web.Response(status=forced, text=f"emulated {forced}")
        if switches.get("html"):
            return html_page("Sign in")
        return await serve_object(request, state, model, switches)

    app = web.Application()
    app.router.add_get("/{object:.+}", get_object)
    return app


async def serve_object(request, state: State, model: Model, switches: dict) -> web.StreamResponse:
    wanted = parse_range(request.headers.get("Range"), model.size)
    if wanted == UNSATISFIABLE:
        resp = gcs_error(416, "InvalidRange", "The requested range cannot be satisfied.")
        resp.headers["Content-Range"] = f"bytes */{model.size}"
        return resp
    start, stop = wanted or (0, model.size)
    resp = web.StreamResponse(status=206 if wanted else 200, headers=object_headers(model))
    if wanted:
        resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{model.size}"
    resp.content_length = stop - start
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    try:
        if await stream_body(request, resp, state, model, start, stop, switches):
            await resp.write_eof()
    except ConnectionError:
        pass  # the client went away (or we are shutting down): nothing left to answer
    return resp


def make_canary_app(state: State) -> web.Application:
    async def canary(request):
        return web.Response(text="canary")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", canary)
    return app


# ---------------------------------------------------------------- request log


def add_request_log(app: web.Application, state: State, site: str) -> None:
    @web.middleware
    async def log_request(request, handler):
        if site == "tfhub" and request.path.startswith(CONTROL_PREFIX):
            return await handler(request)
        entry = {"site": site, "method": request.method, "path": request.path, "status": None}
        state.log.append(entry)
        request["log_entry"] = entry
        try:
            return await handler(request)
        except web.HTTPException as exc:
            entry["status"] = exc.status
            raise

    async def on_prepare(request, response):
        # Fires when the status line is sent, also for streamed and held responses.
        entry = request.get("log_entry")
        if entry is not None:
            entry["status"] = response.status

    app.middlewares.append(log_request)
    app.on_response_prepare.append(on_prepare)


# ---------------------------------------------------------------- control API


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def add_control_routes(app: web.Application, state: State) -> None:
    async def register_model(request):
        body = await request.json()
        missing = [f for f in MODEL_FIELDS if not body.get(f)]
        if missing:
            return json_error(400, f"missing fields: {', '.join(missing)}")
        path = Path(body["file"])
        if not path.is_file():
            return json_error(400, f"no such file: {path}")
        md5, crc, size = await asyncio.to_thread(file_digests, str(path))
        fields = {f: str(body[f]) for f in MODEL_FIELDS}
        fields["handle"] = fields["handle"].strip("/")
        fields["object"] = fields["object"].lstrip("/")
        state.register(Model(**fields, md5=md5, crc32c=crc, size=size, mtime=path.stat().st_mtime))
        return web.json_response({"md5": md5, "crc32c": crc, "size": size})

    async def set_faults(request):
        body = await request.json()
        if body.get("clear"):
            state.faults.clear()
            return web.json_response({"faults": state.faults})
        obj = str(body.get("object", "")).lstrip("/")
        unknown = set(body) - SWITCHES - {"object"}
        if not obj or unknown:
            return json_error(400, f"need 'object'; unknown switches: {sorted(unknown)}")
        switches = state.faults.setdefault(obj, {})
        for key, value in body.items():
            if key == "object":
                continue
            if value is None:
                switches.pop(key, None)  # null removes a switch
            else:
                switches[key] = value
        return web.json_response({"faults": state.faults})

    async def release(request):
        state.release_all()
        return web.json_response({"released": True})

    async def advance_clock(request):
        body = await request.json()
        state.clock_offset += float(body.get("seconds", 0))
        return web.json_response({"now": state.now()})

    async def requests_log(request):
        return web.json_response({"requests": state.log})

    async def reset(request):
        state.reset()
        return web.json_response({"reset": True})

    async def wait_held(request):
        count = int(request.query.get("count", "1"))
        timeout = float(request.query.get("timeout", "30"))
        async with state.held_changed:
            try:
                await asyncio.wait_for(state.held_changed.wait_for(lambda: state.held >= count), timeout)
            except asyncio.TimeoutError:
                return web.json_response({"held": state.held, "error": "timeout"}, status=504)
        return web.json_response({"held": state.held})

    app.router.add_post("/_control/models", register_model)
    app.router.add_post("/_control/faults", set_faults)
    app.router.add_post("/_control/release", release)
    app.router.add_post("/_control/advance_clock", advance_clock)
    app.router.add_get("/_control/requests", requests_log)
    app.router.add_post("/_control/reset", reset)
    app.router.add_get("/_control/wait_held", wait_held)


# ---------------------------------------------------------------- process


def write_atomically(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


async def serve(args) -> None:
    state = State(args.signing_secret or secrets.token_hex(16), args.url_ttl)
    factories = {
        "tfhub": make_tfhub_app,
        "kaggle": make_kaggle_app,
        "gcs": make_gcs_app,
        "canary": make_canary_app,
    }
    runners = []
    for site in SITES:
        app = factories[site](state)
        add_request_log(app, state, site)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        state.urls[site] = f"http://{host}:{port}"
        runners.append(runner)
    write_atomically(args.ports_file, state.urls)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    state.release_all()
    for runner in runners:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports-file", required=True, help="where to write the sites' base URLs as JSON")
    parser.add_argument("--signing-secret", default=None, help="HMAC key for GCS URLs (default: random)")
    parser.add_argument("--url-ttl", type=int, default=600, help="X-Goog-Expires of signed URLs, seconds")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
