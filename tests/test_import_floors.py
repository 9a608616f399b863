"""The house's floors hold: imports only go down (cli → serve/airgap → fetch → cache/tls → ground), the
cache core and the air-gap tools never import aiohttp's server, the web faces never build file
paths, handles do no I/O, only the SavedModel loader and the client shim import tensorflow, and the
shim (with the package it is imported from) pulls in no server dependency.

Read from the source with ast, so a wrong import fails here before it fails anywhere else.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "hubproxy"
GROUND = {"hubproxy", "hubproxy.config", "hubproxy.handles", "hubproxy.units", "hubproxy.metrics", "hubproxy.shim"}
FLOORS = {"cache": 1, "tls": 1, "fetch": 2, "serve": 3, "airgap": 3, "cli": 4, "__main__": 5}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module name the file imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return names


def _floor(name: str) -> int:
    if name in GROUND:
        return 0
    return FLOORS[name.split(".")[1]]


def _room(name: str) -> str:
    return "ground" if name in GROUND else name.split(".")[1]


def test_every_module_has_a_floor():
    for name in MODULES:
        assert name in GROUND or name.split(".")[1] in FLOORS, f"{name} is in no room of the house"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_only_go_down(name):
    for imported in _imports(name, MODULES[name]):
        if not imported.startswith("hubproxy") or imported not in MODULES:
            continue
        same_room = _room(imported) == _room(name)
        assert same_room or _floor(imported) < _floor(name), (
            f"{name} (floor {_floor(name)}) imports {imported} (floor {_floor(imported)}): imports only go down")


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _room(n) in ("cache", "airgap")))
def test_cache_core_and_airgap_never_import_the_web_server(name):
    forbidden = ("aiohttp.web", "aiohttp") if _room(name) == "cache" else ("aiohttp.web",)
    for imported in _imports(name, MODULES[name]):
        assert not imported.startswith(forbidden), f"{name} imports {imported}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _room(n) == "serve"))
def test_web_faces_never_build_file_paths(name):
    for imported in _imports(name, MODULES[name]):
        assert imported not in ("pathlib", "os.path", "os"), f"{name} imports {imported}: ask the store for paths"


def test_handles_do_no_io():
    io_modules = ("os", "io", "pathlib", "socket", "urllib.request", "aiohttp", "aiofiles", "shutil", "open")
    for imported in _imports("hubproxy.handles", MODULES["hubproxy.handles"]):
        assert not imported.startswith(io_modules), f"handles imports {imported}"


def test_only_the_saved_model_loader_and_the_client_shim_import_tensorflow():
    allowed = {"hubproxy.airgap.savedmodel", "hubproxy.shim"}
    for name, path in MODULES.items():
        if name not in allowed:
            assert not any(i.startswith(("tensorflow", "tf_keras")) for i in _imports(name, path)), name


def _reachable(name: str) -> set[str]:
    """name and every hubproxy module it imports, directly or not."""
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += [i for i in _imports(module, MODULES[module]) if i in MODULES]
    return seen


@pytest.mark.parametrize("name", ["hubproxy", "hubproxy.shim"])
def test_the_client_shim_pulls_in_no_server_dependency(name):
    server_deps = ("aiohttp", "aiofiles", "diskcache", "cryptography", "click", "rich", "prometheus_client",
                   "google_crc32c")
    for module in _reachable(name):
        for imported in _imports(module, MODULES[module]):
            assert not imported.startswith(server_deps), f"{name} reaches {module}, which imports {imported}"


def test_no_module_is_over_about_400_lines():
    for name, path in MODULES.items():
        assert len(path.read_text().splitlines()) <= 420, f"{name} has more than ~400 lines: split it by concern"
