"""README's maps cannot drift from the code: the Layout table lists every module of hubproxy/ in
its room and nothing that does not exist; the Configuration table has a row for every setting."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from hubproxy.config import Settings

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "hubproxy"
NOT_MODULES = ("__init__", "__main__")  # a package's own files, not rooms' modules


def _section(title: str) -> str:
    """The text of README's `## title` section, up to the next section of that level."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _table_rows(section: str) -> list[list[str]]:
    """A markdown table's body rows as cells (the header and its rule left out)."""
    rows = [line.strip().strip("|").split(" | ") for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]


def _named(cell: str) -> set[str]:
    """The `names` a cell lists, leaving out what its (parenthesised notes) mention."""
    return set(re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", cell)))


def _room(cell: str) -> str:
    """'`cache/`' → 'cache'; '`hubproxy/` (ground)' → '' (the package's top level)."""
    [room] = _named(cell)
    return "" if room == "hubproxy/" else room.removesuffix("/")


def _modules_in_rooms() -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.stem not in NOT_MODULES:
            rooms.setdefault(path.parent.relative_to(PACKAGE).as_posix().removeprefix("."), set()).add(path.stem)
    return rooms


def test_the_layout_table_lists_every_module_in_its_room_and_no_other():
    listed = {_room(room): _named(modules) for room, modules, _ in _table_rows(_section("Layout"))}
    present = _modules_in_rooms()
    for room in sorted(set(listed) | set(present)):
        shown = f"`{room or 'hubproxy'}/`"
        assert room in listed, f"README's Layout table has no row for {shown} ({sorted(present[room])})"
        assert room in present, f"README's Layout table lists {shown}, which is no package"
        unlisted, gone = present[room] - listed[room], listed[room] - present[room]
        assert not unlisted, f"README's Layout row {shown} does not list {sorted(unlisted)}"
        assert not gone, f"README's Layout row {shown} lists {sorted(gone)}, which do not exist"


def _toml_key(cell: str) -> str:
    """'`listen` / `HUBPROXY_LISTEN`' → 'listen'; '`[upstreams]` table / …' → 'upstreams'."""
    return re.findall(r"`([^`]+)`", cell)[0].strip("[]")


def test_the_configuration_table_has_a_row_for_every_setting():
    rows = _table_rows(_section("Configuration").partition("\n### ")[0])
    documented = {_toml_key(key_and_variable) for _, key_and_variable, _ in rows}
    missing = [f.name for f in dataclasses.fields(Settings) if f.name not in documented]
    assert not missing, f"README's Configuration table has no row for: {missing}"
    unknown = documented - {f.name for f in dataclasses.fields(Settings)}
    assert not unknown, f"README's Configuration table documents settings that do not exist: {sorted(unknown)}"
