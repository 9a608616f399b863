"""Local emulator of the TensorFlow Hub download chain: tfhub -> kaggle -> signed GCS URL, and of
the Kaggle models API kagglehub calls (kaggle-api -> signed GCS URL of the archive or of one file).

Invariants: one process, five 127.0.0.1 sites (tfhub, kaggle, kaggle-api, gcs, canary) sharing one
state (tests/origin_state.py); object bytes are streamed from disk in chunks, with headers (length,
hashes) always of the good file (of the encoded bytes under content_encoding); every non-control
request is logged at arrival, with its Range, its Accept-Encoding, its Via (which proxies it passed)
and whether it carried Authorization (never its value); nothing misbehaves unless a /_control/ switch says so. A model's
member files (tests/origin_files.py) are objects like its archive: signed, expiring, ranged, and
subject to the same fault switches, keyed by object name.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import calendar
import email.utils
import functools
import gzip
import hashlib
import hmac
import json
import os
import secrets
import signal
import tempfile
import time
import zlib

import yarl
from aiohttp import web

from origin_files import model_from_request
from origin_kaggle import found, make_kaggle_api_app
from origin_state import SIGNATURE_PARAM, Blob, State, authorized, new_crc32c, redirect_target, sign

SITES = ("tfhub", "kaggle", "kaggle-api", "gcs", "canary")
CHUNK_SIZE = 256 * 1024
CONTROL_PREFIX = "/_control/"
PUBLIC_PREFIX = "tfhub-modules/"
UNSATISFIABLE = "unsatisfiable"
SWITCHES = {
    "truncate_at", "corrupt_at", "status", "status_count", "throttle_bps",
    "hold_after", "html", "redirect_to", "down",
    # headers that misbehave: a body really encoded, an encoding only claimed, any Content-Type
    # (sent as its raw UTF-8 bytes), x-goog-hash and ETag dropped
    "content_encoding", "claimed_encoding", "content_type", "no_checksum",
    # Cut transfers and changed objects (resumes): cut the first request reaching this offset only;
    # cut every request after this many bytes of its own; serve the object as replaced (a new ETag);
    # ignore If-Match, as a careless origin would (a resume of a replaced object then gets a 206 under
    # the new ETag instead of a 412); send no headers until released (a trickle is throttle_bps, a cut
    # every time truncate_at).
    "cut_once_at", "cut_every", "replaced", "ignore_if_match", "hold_headers",
}


# ---------------------------------------------------------------- signing


def gcs_error(status: int, code: str, message: str) -> web.Response:
    body = (
        "<?xml version='1.0' encoding='UTF-8'?>"
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


def check_access(state: State, obj: str, url: yarl.URL) -> web.Response | None:
    """Return an error response if the request may not read obj, else None."""
    query = url.query
    signature = query.get("X-Goog-Signature")
    if signature is None:
        if obj.startswith(PUBLIC_PREFIX):
            return None
        return gcs_error(403, "AccessDenied", "Anonymous caller does not have storage.objects.get access.")
    date, expires = query.get("X-Goog-Date", ""), query.get("X-Goog-Expires", "")
    canonical = url.raw_query_string.partition(SIGNATURE_PARAM)[0]
    if not hmac.compare_digest(signature, sign(state, obj, canonical)):
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
    marks = [switches.get("truncate_at"), switches.get("hold_after"), switches.get("cut_once_at"),
             switches.get("cut_at_own")]
    return min([stop] + [m for m in marks if isinstance(m, int) and pos < m < stop])


def cuts_here(state: State, obj: str, pos: int, switches: dict) -> bool:
    """Whether the transfer is cut at object offset pos: always at truncate_at and at this
    request's cut_every mark (cut_at_own), once (the switch is used up) at cut_once_at."""
    if pos in (switches.get("truncate_at"), switches.get("cut_at_own")):
        return True
    return switches.get("cut_once_at") == pos and state.take_switch(obj, "cut_once_at")


async def stream_body(request, resp, state: State, blob: Blob, start: int, stop: int, switches: dict) -> bool:
    """Write file bytes [start, stop) applying faults; False when the connection was cut."""
    # Fault offsets are object offsets: a ranged request only meets those inside its range.
    chunk_size = chunk_size_for(switches)
    if isinstance(switches.get("cut_every"), int):
        switches = {**switches, "cut_at_own": start + switches["cut_every"]}
    bps = switches.get("throttle_bps")
    corrupt_at, held = switches.get("corrupt_at"), False
    # Paced against the clock, as a link of that speed would be: time spent reading and writing
    # counts toward each chunk's share, rather than being added to a fixed sleep.
    loop = asyncio.get_running_loop()
    paced_from, paced_bytes = loop.time(), 0
    with open(blob.file, "rb") as fh:
        fh.seek(start)
        pos = start
        while pos < stop:
            if switches.get("hold_after") == pos and not held:
                await resp.write(b"")  # flush headers (aiohttp buffers them) before blocking
                await hold(state)
                held = True
                paced_from, paced_bytes = loop.time(), 0
            if cuts_here(state, blob.name, pos, switches):
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
    def lookup(request):
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
        if not authorized(model, request.headers.get("Authorization")):
            raise web.HTTPUnauthorized(text="Unauthorized")
        # Sent verbatim: a signed URL's query is signed byte for byte, and a redirect_to may be crafted.
        return found(redirect_target(state, model.archive))

    app = web.Application()
    app.router.add_get(
        "/models/{owner}/{model}/frameworks/{framework}/variations/{variation}/versions/{version}",
        model_version,
    )
    app.router.add_get("/api/v1/models/{owner}/{model}/{framework}/{variation}/{version}/download", download)
    return app


def object_etag(blob: Blob, switches: dict) -> str:
    """The object's strong ETag: its md5, or another once a `replaced` switch says it changed."""
    return f'"{blob.md5}-replaced"' if switches.get("replaced") else f'"{blob.md5}"'


def object_headers(blob: Blob, switches: dict) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "ETag": object_etag(blob, switches),
        "x-goog-hash": f"crc32c={blob.crc32c},md5={base64.b64encode(bytes.fromhex(blob.md5)).decode()}",
        "x-goog-stored-content-length": str(blob.size),
        "Accept-Ranges": "bytes",
        "Last-Modified": email.utils.formatdate(blob.mtime, usegmt=True),
    }


async def get_object(state: State, request) -> web.StreamResponse:
    obj = request.match_info["object"]
    switches = state.faults_for(obj)
    if switches.get("down"):
        return abort_connection(request)
    denied = check_access(state, obj, request.rel_url)
    if denied is not None:
        return denied
    blob = state.by_object.get(obj)
    if blob is None:
        return gcs_error(404, "NoSuchKey", "The specified key does not exist.")
    if request.method == "GET":
        forced = state.take_status_fault(obj)
        if forced is not None:
            return web.Response(status=forced, text=f"emulated {forced}")
    if switches.get("html"):
        return html_page("Sign in")
    if switches.get("hold_headers"):
        await hold(state)
    return await serve_object(request, state, blob, switches)


def make_gcs_app(state: State) -> web.Application:
    app = web.Application()
    app.router.add_get("/{object:.+}", functools.partial(get_object, state))
    return app


async def serve_object(request, state: State, blob: Blob, switches: dict) -> web.StreamResponse:
    if_match = None if switches.get("ignore_if_match") else request.headers.get("If-Match")
    if if_match is not None and if_match.strip() != "*" and object_etag(blob, switches) not in (
            tag.strip() for tag in if_match.split(",")):
        return gcs_error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold.")
    wanted = parse_range(request.headers.get("Range"), blob.size)
    if wanted == UNSATISFIABLE:
        resp = gcs_error(416, "InvalidRange", "The requested range cannot be satisfied.")
        resp.headers["Content-Range"] = f"bytes */{blob.size}"
        return resp
    if switches.get("content_encoding"):
        return await encoded_object(blob, switches)
    start, stop = wanted or (0, blob.size)
    headers = misbehaving_headers(object_headers(blob, switches), switches)
    resp = web.StreamResponse(status=206 if wanted else 200, headers=headers)
    if wanted:
        resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{blob.size}"
    resp.content_length = stop - start
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    try:
        if await stream_body(request, resp, state, blob, start, stop, switches):
            await resp.write_eof()
    except ConnectionError:
        pass  # the client went away (or we are shutting down): nothing left to answer
    return resp


def misbehaving_headers(headers: dict[str, str], switches: dict) -> dict[str, str]:
    """An object's headers as the header switches change them."""
    headers = dict(headers)
    if switches.get("no_checksum"):
        headers.pop("x-goog-hash")
        headers.pop("ETag")
    if switches.get("claimed_encoding"):
        headers["Content-Encoding"] = switches["claimed_encoding"]
    if switches.get("content_type"):
        headers["Content-Type"] = switches["content_type"]  # aiohttp writes a str header as UTF-8
    return headers


def encoded_bytes(path: str, wbits: int) -> bytes:
    with open(path, "rb") as fh:
        compressor = zlib.compressobj(wbits=wbits)
        return compressor.compress(fh.read()) + compressor.flush()


async def encoded_object(blob: Blob, switches: dict) -> web.Response:
    """The whole object encoded as the content_encoding switch says ("gzip" or "deflate"), with the
    length and checksums of the encoded bytes, as an origin storing it encoded would send it."""
    encoding = switches["content_encoding"]
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}[encoding]
    body = await asyncio.to_thread(encoded_bytes, blob.file, wbits)
    crc = new_crc32c()
    crc.update(body)
    headers = {**object_headers(blob, switches), "Content-Encoding": encoding, "ETag": f'"{hashlib.md5(body).hexdigest()}"',
               "x-goog-hash": f"crc32c={base64.b64encode(crc.digest()).decode()},"
                              f"md5={base64.b64encode(hashlib.md5(body).digest()).decode()}"}
    return web.Response(body=body, headers=misbehaving_headers(headers, switches))


CANARY_GZIP = gzip.compress(b"canary " * 100, mtime=0)


def make_canary_app(state: State) -> web.Application:
    """A host nothing should reach unless a test means it to: "canary" on every path, except the
    paths a test of plain forwarding asks for (what arrived, a redirect, a gzip-encoded body, an
    answer held after the whole request arrived until /_control/release)."""

    async def canary(request):
        if request.path == "/_echo":
            return web.json_response({"method": request.method, "target": request.raw_path,
                                      "headers": list(request.headers.items()),
                                      "body": (await request.read()).decode(errors="replace")},
                                     headers={"Connection": "X-Canary-Hop", "X-Canary-Hop": "dropped",
                                              "Keep-Alive": "timeout=5", "X-Canary-End": "kept",
                                              "Set-Cookie": "canary=seen"})
        if request.path == "/_redirect":
            return found("/_elsewhere")
        if request.path == "/_hold":
            await request.read()
            await hold(state)
            return web.Response(text="released")
        if request.path == "/_gzip":
            return web.Response(body=CANARY_GZIP, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
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
        entry = {"site": site, "method": request.method, "path": request.path, "status": None,
                 "range": request.headers.get("Range"), "if_match": request.headers.get("If-Match"),
                 "authorization": "Authorization" in request.headers,
                 "accept_encoding": request.headers.get("Accept-Encoding"), "via": request.headers.get("Via")}
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
        try:
            model = await asyncio.to_thread(model_from_request, state, await request.json())
        except ValueError as error:
            return json_error(400, str(error))
        state.register(model)
        files = [{"name": name, **blob.describe()} for name, blob in sorted(model.files.items())]
        return web.json_response({**model.archive.describe(), "files": files})

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
    # Member files are unpacked beside the ports file, which lives in the caller's temporary space.
    beside_ports = os.path.dirname(os.path.abspath(args.ports_file))
    with tempfile.TemporaryDirectory(prefix="origin-files-", dir=beside_ports) as scratch:
        await serve_sites(args, State(args.signing_secret or secrets.token_hex(16), args.url_ttl, scratch))


async def serve_sites(args, state: State) -> None:
    factories = {
        "tfhub": make_tfhub_app,
        "kaggle": make_kaggle_app,
        "kaggle-api": functools.partial(make_kaggle_api_app, storage=functools.partial(get_object, state)),
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
