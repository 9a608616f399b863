"""The one-line client shim: `hubproxy.use_mirror(URL)` makes tensorflow_hub fetch hub handles from a mirror.

A resolver registered with tensorflow_hub claims the handles users type for the hubs (tfhub.dev, Kaggle
models, hub.tensorflow.google.cn) and downloads each from the mirror at the same path (the China mirror's
handles name the same models as tfhub.dev's). Everything else is tensorflow_hub's own: the cache
directory is sha1 of the handle *as typed* (so TFHUB_CACHE_DIRs filled with and without the shim agree),
and the lock file, temporary directory, descriptor and atomic rename are its atomic_download's.

Invariants: importing this module imports neither tensorflow nor tensorflow_hub nor any server
dependency (use_mirror imports tensorflow_hub when called); a bad mirror URL is a one-line ValueError
before anything is imported or registered; at most one resolver of ours is ever registered, and a later
use_mirror only changes the URL it uses; a handle it claims never goes to the hub's own host.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.parse
import urllib.request

from .handles import parse_handle_url

MIRROR_ENV = "HUBPROXY_MIRROR"

# host → the path prefix a handle on it must have to be claimed ("" = any)
MIRRORED_HOSTS = {
    "tfhub.dev": "",
    "hub.tensorflow.google.cn": "",
    "www.kaggle.com": "/models/",
    "kaggle.com": "/models/",
}

log = logging.getLogger(__name__)
_installed: MirrorResolver | None = None


def use_mirror(url: str | None = None) -> None:
    """Send tensorflow_hub's tfhub.dev, Kaggle and hub.tensorflow.google.cn handles to the mirror at url
    (default: $HUBPROXY_MIRROR). Calling it again only switches the mirror."""
    global _installed
    mirror = mirror_base(url)
    if _installed is None:
        from tensorflow_hub import registry

        _installed = MirrorResolver(mirror)
        registry.resolver.add_implementation(_installed)  # tried before the ones registered earlier
    _installed.mirror = mirror


def mirror_base(url: str | None) -> str:
    """The mirror's base URL, checked: an http(s) URL with a host, maybe a path, no query or fragment."""
    source = "mirror URL"
    if url is None:
        url, source = os.environ.get(MIRROR_ENV, ""), MIRROR_ENV
        if not url:
            raise ValueError(f"no mirror: call hubproxy.use_mirror('http://mirror:8080') or set {MIRROR_ENV}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"{source} {url!r} is not an http(s) base URL like http://mirror:8080")
    return url.rstrip("/")


def is_mirrored(handle: str) -> bool:
    """Whether handle is a hub handle the shim sends to the mirror."""
    parts = urllib.parse.urlsplit(handle)
    prefix = MIRRORED_HOSTS.get(parts.netloc.lower())
    return parts.scheme in ("http", "https") and prefix is not None and parts.path.startswith(prefix)


def mirror_url(mirror: str, handle: str) -> str:
    """Where the mirror serves handle's compressed archive (BadHandle, a ValueError, if it names none)."""
    return parse_handle_url(handle).upstream_url(mirror)


class MirrorResolver:
    """A tensorflow_hub resolver (is_supported + __call__) that downloads claimed handles from the mirror
    with tensorflow_hub's own machinery, and leaves everything else to the resolvers registered before it."""

    def __init__(self, mirror: str):
        from tensorflow_hub import compressed_module_resolver

        self.mirror = mirror
        self._hub = compressed_module_resolver.HttpCompressedFileResolver()

    def is_supported(self, handle: str) -> bool:
        # the hub's own check too: TFHUB_MODEL_LOAD_FORMAT=UNCOMPRESSED reads gs:// paths, not archives
        return is_mirrored(handle) and self._hub.is_supported(handle)

    def __call__(self, handle: str) -> str:
        from tensorflow_hub import compressed_module_resolver, resolver

        url = mirror_url(self.mirror, handle)

        def download(_handle: str, tmp_dir: str) -> None:
            log.info("hubproxy: fetching %s from %s", handle, url)
            # the hub's SSL context: SSL_CERT_FILE and TFHUB_DISABLE_CERT_VALIDATION hold for the mirror too
            try:
                response = self._hub._call_urlopen(urllib.request.Request(url))
            except urllib.error.HTTPError as e:
                raise _with_mirror_reason(e) from None
            with response:
                resolver.DownloadManager(handle).download_and_uncompress(response, tmp_dir)

        module_dir = compressed_module_resolver._module_dir(handle)  # sha1 of the handle as typed
        return resolver.atomic_download(handle, download, module_dir, self._hub._lock_file_timeout_sec())


def _with_mirror_reason(error: urllib.error.HTTPError) -> urllib.error.HTTPError:
    """The same error, its message carrying the first line of the mirror's one-line reply."""
    with error:
        lines = error.read(512).decode("utf8", "replace").strip().splitlines()
    message = f"{error.reason}: {lines[0]}" if lines else error.reason
    return urllib.error.HTTPError(error.url, error.code, message, error.headers, None)
