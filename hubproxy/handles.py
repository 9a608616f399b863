"""Hub handles: request path ↔ upstream URL ↔ cache key ↔ tensorflow_hub cache name; and the
files kagglehub downloads (KaggleFile): RPC fields ↔ mirror URL ↔ cache key.

Invariants: pure functions, no I/O; a Handle only ever holds path segments from a strict
alphabet (no '.', '..', '%', '\\' or empty segments), so no handle can name a file or a host;
a KaggleFile's path segments are as strict (no leading '.' or '-', so never '.' or '..'), and its
framework has one spelling; the cache key never contains a query string, so signed URLs never
become keys.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from dataclasses import dataclass

TFHUB, KAGGLE, GCS = "tfhub", "kaggle", "gcs"
UPSTREAM_NAMES = (TFHUB, KAGGLE, GCS)  # the upstreams archives (index keys) come from
KAGGLE_API = "kaggle-api"  # kagglehub's RPCs: metadata, and the way to its files

DEFAULT_UPSTREAMS = {
    TFHUB: "https://tfhub.dev",
    KAGGLE: "https://www.kaggle.com",
    GCS: "https://storage.googleapis.com",
    KAGGLE_API: "https://api.kaggle.com",
}

# The hosts a client reaches through HTTPS_PROXY that the proxy answers itself, and the upstream
# each one's requests belong to. Nothing else is ever intercepted.
HUB_HOSTS = {
    "tfhub.dev": TFHUB,
    "www.kaggle.com": KAGGLE,
    "kaggle.com": KAGGLE,
    "api.kaggle.com": KAGGLE_API,
    "storage.googleapis.com": GCS,
}

FORMAT_PARAM = "tf-hub-format"
COMPRESSED = "compressed"

MAX_PATH_LENGTH = 512
MAX_SEGMENTS = 16
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# Path prefixes that name which upstream a handle belongs to; everything else is tfhub.dev.
_ROUTES = (
    ("api/v1/models/", KAGGLE),
    ("models/", KAGGLE),
    ("tfhub-modules/", GCS),
    ("kaggle-models-data/", GCS),
)


class BadHandle(ValueError):
    """The request does not name a hub archive; the message is one line for the client."""


@dataclass(frozen=True)
class Handle:
    upstream: str  # one of UPSTREAM_NAMES
    path: str  # "/google/x/1", validated, never percent-encoded

    @property
    def key(self) -> str:
        """Index key: which upstream and which path; two spellings of a model are two keys."""
        return f"{self.upstream}:{self.path}"

    def upstream_url(self, base_url: str) -> str:
        """The URL that fetches this handle's archive from the upstream at base_url."""
        url = base_url.rstrip("/") + self.path
        if self.upstream == GCS or self.path.endswith("/download"):
            return url
        return f"{url}?{FORMAT_PARAM}={COMPRESSED}"


def parse_request_target(raw_target: str, host: str | None = None) -> Handle:
    """Parse an origin-form request target ("/google/x/1?tf-hub-format=compressed"). With the hub
    host it was sent to (an intercepted request), the path must belong to that host's upstream."""
    if not raw_target.startswith("/"):
        raise BadHandle("only origin-form request targets are accepted; this is not an open proxy")
    raw_path, _, raw_query = raw_target.partition("?")
    _check_query(raw_query)
    handle = Handle(upstream=route(raw_path), path=_normalise_path(raw_path))
    if host is not None and HUB_HOSTS.get(host) != handle.upstream:
        raise BadHandle(f"{host} serves no hub archive at {handle.path[:80]}")
    return handle


def parse_handle_url(handle_url: str) -> Handle:
    """Any spelling a user types (tfhub.dev, Kaggle, storage or mirror URL) → its Handle: the host
    does not matter, the path routes it."""
    parts = urllib.parse.urlsplit(handle_url)
    if parts.scheme not in ("http", "https") or not parts.path:
        raise BadHandle(f"{handle_url!r} is not a hub handle URL (https://tfhub.dev/<publisher>/<model>/<version>)")
    try:
        return parse_request_target(parts.path + (f"?{parts.query}" if parts.query else ""))
    except BadHandle as e:
        raise BadHandle(f"{handle_url}: {e}") from None


def handle_from_key(key: str) -> Handle:
    """The Handle an index key was made from (keys are `upstream:/path`)."""
    upstream, _, path = key.partition(":")
    handle = parse_request_target(path)
    if handle.upstream != upstream:
        raise BadHandle(f"index key {key[:80]!r} does not route to {upstream}")
    return handle


def route(path: str) -> str:
    """Which upstream serves a mirror path."""
    relative = path.lstrip("/")
    for prefix, upstream in _ROUTES:
        if relative.startswith(prefix):
            return upstream
    return TFHUB


def _check_query(raw_query: str) -> None:
    for name, value in urllib.parse.parse_qsl(raw_query, keep_blank_values=True):
        if name == FORMAT_PARAM and value != COMPRESSED:
            raise BadHandle(f"only {FORMAT_PARAM}={COMPRESSED} archives are mirrored, not {value!r}")


def _normalise_path(raw_path: str) -> str:
    if len(raw_path) > MAX_PATH_LENGTH:
        raise BadHandle(f"handle longer than {MAX_PATH_LENGTH} characters")
    if "%" in raw_path or "\\" in raw_path:
        raise BadHandle("handles contain no percent-encoded characters or backslashes")
    segments = raw_path.strip("/").split("/")
    if segments == [""]:
        raise BadHandle("empty handle: ask for /<publisher>/<model>/<version>")
    if len(segments) > MAX_SEGMENTS:
        raise BadHandle(f"handle has more than {MAX_SEGMENTS} path segments")
    for segment in segments:
        if not _SEGMENT.fullmatch(segment):
            raise BadHandle(f"invalid handle segment {segment[:40]!r}")
    if len(segments) < 2:
        raise BadHandle("a handle has at least a publisher and a model: /<publisher>/<model>/<version>")
    return "/" + "/".join(segments)


# -- kagglehub's files -------------------------------------------------------------------------

KAGGLE_FILE = "kaggle-file"  # index keys of what kagglehub downloads: a version's files, or its archive
FILES_PATH = "/hubproxy/v1/files"  # where the mirror serves them (on api.kaggle.com when intercepting)
FRAMEWORK_PREFIX = "MODEL_FRAMEWORK_"
MAX_VERSION = 2**31 - 1
MAX_FILE_PATH = 1024
_FRAMEWORK_ENUM = re.compile(r"MODEL_FRAMEWORK_[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*")
_FRAMEWORK_WORD = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[a-z])(?=[0-9])")
_FILE_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")


@dataclass(frozen=True)
class KaggleInstance:
    """A model instance as kagglehub names it: owner/model/framework/variation; `framework` is the
    ModelFramework name the RPCs carry ("MODEL_FRAMEWORK_TENSOR_FLOW_2")."""
    owner: str
    model: str
    framework: str
    variation: str

    @property
    def path(self) -> str:
        """"/google/x/tensorFlow2/default": the framework as kagglehub's handles spell it."""
        return f"/{self.owner}/{self.model}/{framework_spelling(self.framework)}/{self.variation}"

    @property
    def fields(self) -> dict:
        """The RPC fields naming it, as kagglesdk sends them."""
        return {"ownerSlug": self.owner, "modelSlug": self.model, "framework": self.framework,
                "instanceSlug": self.variation}


@dataclass(frozen=True)
class KaggleFile:
    """One file of a model instance version (`path`), or the version's whole archive (None)."""
    instance: KaggleInstance
    version: int
    path: str | None

    @property
    def version_path(self) -> str:
        return f"{self.instance.path}/{self.version}"

    @property
    def key(self) -> str:
        """Index key: never a signed URL, a query or a credential."""
        return f"{KAGGLE_FILE}:{self.version_path}" + (f"/{self.path}" if self.path else "")

    @property
    def mirror_path(self) -> str:
        return FILES_PATH + self.key.partition(":")[2]

    @property
    def download_fields(self) -> dict:
        """The DownloadModelInstanceVersion body that names it upstream."""
        return {**self.instance.fields, "versionNumber": self.version, **({"path": self.path} if self.path else {})}


def kaggle_instance(owner: object, model: object, framework: object, variation: object) -> KaggleInstance:
    """A checked KaggleInstance from RPC fields; raises BadHandle naming the field at fault."""
    for name, value in (("ownerSlug", owner), ("modelSlug", model), ("instanceSlug", variation)):
        if not isinstance(value, str) or not _SEGMENT.fullmatch(value):
            raise BadHandle(f"{name} must be a slug (letters, digits, '.', '_', '-'), not {str(value)[:40]!r}")
    if not isinstance(framework, str) or not _FRAMEWORK_ENUM.fullmatch(framework) \
            or framework_enum(framework_spelling(framework)) != framework:
        raise BadHandle(f"framework must be a ModelFramework name such as MODEL_FRAMEWORK_TENSOR_FLOW_2, "
                        f"not {str(framework)[:60]!r}")
    return KaggleInstance(owner, model, framework, variation)


def kaggle_version(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise BadHandle(f"versionNumber must be a whole number from 1 to {MAX_VERSION}, not {str(value)[:40]!r}")
    return value


def kaggle_file_path(value: object) -> str:
    """A member path of a version ("variables/variables.index"), checked segment by segment."""
    if not isinstance(value, str) or not value:
        raise BadHandle("path must be a file path inside the version, such as saved_model.pb")
    if len(value) > MAX_FILE_PATH:
        raise BadHandle(f"path longer than {MAX_FILE_PATH} characters")
    for segment in value.split("/"):
        if not _FILE_SEGMENT.fullmatch(segment):
            raise BadHandle(f"invalid path segment {segment[:40]!r}: names of letters, digits, '.', '_' and '-', "
                            "not starting with '.' or '-'")
    return value


def parse_kaggle_file(raw_target: str) -> KaggleFile:
    """The KaggleFile a mirror URL names: FILES_PATH/<owner>/<model>/<framework>/<variation>/<version>
    and, for one file rather than the archive, /<path>. Raises BadHandle."""
    raw_path, _, _ = raw_target.partition("?")
    if not raw_path.startswith(FILES_PATH + "/"):
        raise BadHandle(f"kagglehub's files are under {FILES_PATH}/")
    if "%" in raw_path or "\\" in raw_path:
        raise BadHandle("file URLs contain no percent-encoded characters or backslashes")
    segments = raw_path[len(FILES_PATH) + 1:].split("/")
    if len(segments) < 5:
        raise BadHandle(f"a file URL is {FILES_PATH}/<owner>/<model>/<framework>/<variation>/<version>[/<path>]")
    owner, model, spelling, variation, version = segments[:5]
    if not version.isdigit() or version != str(int(version)):
        raise BadHandle(f"version must be a whole number, not {version[:20]!r}")
    if not _SEGMENT.fullmatch(spelling) or framework_spelling(framework_enum(spelling)) != spelling:
        raise BadHandle(f"invalid framework {spelling[:40]!r}: spell it as kagglehub's handles do (tensorFlow2)")
    instance = kaggle_instance(owner, model, framework_enum(spelling), variation)
    path = "/".join(segments[5:])
    return KaggleFile(instance, kaggle_version(int(version)), kaggle_file_path(path) if path else None)


def framework_spelling(framework: str) -> str:
    """MODEL_FRAMEWORK_TENSOR_FLOW_2 → tensorFlow2, as kagglehub's handles spell frameworks."""
    first, *rest = framework.removeprefix(FRAMEWORK_PREFIX).split("_")
    return first.lower() + "".join(word.capitalize() for word in rest)


def framework_enum(spelling: str) -> str:
    """tensorFlow2 → MODEL_FRAMEWORK_TENSOR_FLOW_2 (the inverse of framework_spelling)."""
    return FRAMEWORK_PREFIX + _FRAMEWORK_WORD.sub("_", spelling).upper()


def tfhub_cache_name(handle_as_typed: str) -> str:
    """The directory name tensorflow_hub uses under TFHUB_CACHE_DIR: sha1 of the handle as typed."""
    return hashlib.sha1(handle_as_typed.encode("utf8")).hexdigest()


def strip_query(url: str) -> str:
    """A URL fit for logs and the index: signed URLs carry their secret in the query."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
