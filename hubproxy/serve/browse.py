"""The browse page for people (GET /): what is cached, and the URL to paste into hub.load.

Invariants: server-rendered HTML with every value escaped; read-only; no scripts, no build step.
"""

from __future__ import annotations

import html
import time

from aiohttp import web

from ..cache.plans import usage
from ..cache.store import Entry
from ..handles import FILES_PATH, KAGGLE_FILE
from ..units import format_size

MAX_ROWS = 1000

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hubproxy</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
h1 {{ font-size: 1.4em; }} .muted {{ color: #666; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: .35em .6em; border-bottom: 1px solid #ddd; }}
code {{ background: #f4f4f4; padding: .1em .3em; }} .num {{ text-align: right; }}
</style></head><body>
<h1>hubproxy — cached models</h1>
<p>{count}, {used} on disk{cap}. Load one with <code>hub.load("URL")</code>.</p>
<table>
<tr><th>model</th><th>URL to paste into hub.load</th><th class="num">size</th><th class="num">age</th>
<th class="num">hits</th><th>pinned</th></tr>
{rows}
</table>
{more}
</body></html>
"""


def page(entries: list[Entry], base_url: str, max_size: int | None) -> str:
    shown = sorted(entries, key=lambda e: e.last_access, reverse=True)[:MAX_ROWS]
    used = usage(entries)
    cap = f" of a {format_size(max_size)} cap ({100 * used / max_size:.0f}%)" if max_size else ""
    more = f'<p class="muted">showing the {MAX_ROWS} most recently used</p>' if len(entries) > MAX_ROWS else ""
    count = f"{len(entries)} model" + ("" if len(entries) == 1 else "s")
    return _PAGE.format(count=count, used=format_size(used), cap=cap, rows="\n".join(_row(e, base_url) for e in shown),
                        more=more)


def _row(entry: Entry, base_url: str) -> str:
    upstream, _, path = entry.key.partition(":")
    served_at = FILES_PATH + path if upstream == KAGGLE_FILE else path  # kagglehub's files have their own URLs
    url = html.escape(base_url.rstrip("/") + served_at)
    return (f"<tr><td>{html.escape(path.strip('/'))} <span class=muted>({html.escape(upstream)})</span></td>"
            f"<td><code>{url}</code></td><td class=num>{format_size(entry.size)}</td>"
            f"<td class=num>{_age(entry.fetched)}</td><td class=num>{entry.hits}</td>"
            f"<td>{'yes' if entry.pinned else ''}</td></tr>")


def _age(timestamp: float) -> str:
    seconds = max(0, time.time() - timestamp)
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= scale:
            return f"{seconds / scale:.0f}{unit}"
    return f"{seconds:.0f}s"


def response(entries: list[Entry], base_url: str, max_size: int | None) -> web.Response:
    return web.Response(text=page(entries, base_url, max_size), content_type="text/html")
