"""The typed keys under which the aiohttp app keeps its components (shared by every face)."""

from __future__ import annotations

import collections

from aiohttp import web

from ..cache.metadata import Metadata
from ..cache.store import Store
from ..config import Settings
from ..fetch.flights import Flights
from ..fetch.upstream import Upstream
from ..metrics import Metrics
from .kagglecreds import Anonymity

STORE = web.AppKey("store", Store)
FLIGHTS = web.AppKey("flights", Flights)
UPSTREAM = web.AppKey("upstream", Upstream)
SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
SERVING = web.AppKey("serving", collections.Counter)  # sha256 → hits being sent right now
METADATA = web.AppKey("metadata", Metadata)  # kagglehub's RPC answers, stored
ANONYMITY = web.AppKey("anonymity", Anonymity)  # which Kaggle models upstream serves anonymously
