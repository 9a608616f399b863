"""The typed keys under which the aiohttp app keeps its components (shared by server and admin)."""

from __future__ import annotations

import collections

from aiohttp import web

from .config import Settings
from .flight import Flights
from .metrics import Metrics
from .store import Store
from .upstream import Upstream

STORE = web.AppKey("store", Store)
FLIGHTS = web.AppKey("flights", Flights)
UPSTREAM = web.AppKey("upstream", Upstream)
SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
SERVING = web.AppKey("serving", collections.Counter)  # sha256 → hits being sent right now
