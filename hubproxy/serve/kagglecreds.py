"""What decides whether a kagglehub request that carries Authorization may be answered from the
cache: whether upstream serves that model version (or instance) anonymously, checked once with an
anonymous request and remembered.

Invariants: a scope is anonymous only once upstream answered an anonymous request for it, and that
is remembered on disk (metadata), so it survives restarts; a refusal (401, 403, 404) is remembered
in memory only, for this process (a private model made public is cached from the next restart);
nothing here ever holds a credential: scopes name models, never who asked.
"""

from __future__ import annotations

import asyncio
import logging

from ..cache.metadata import Metadata

log = logging.getLogger(__name__)

REFUSALS = (401, 403, 404)  # what upstream answers an anonymous request for a model it keeps private
_PREFIX = "kaggle-anonymous:"


class Anonymity:
    def __init__(self, metadata: Metadata):
        self._metadata = metadata
        self._known: dict[str, bool] = {}

    async def known(self, scope: str) -> bool | None:
        """True: served anonymously; False: refused; None: not checked yet."""
        if scope not in self._known:
            stored = await asyncio.to_thread(self._metadata.read, _PREFIX + scope)
            if stored is None:
                return None
            self._known[scope] = True
        return self._known[scope]

    async def served(self, scope: str) -> None:
        if self._known.get(scope) is True:
            return
        self._known[scope] = True
        try:
            await asyncio.to_thread(self._metadata.write, _PREFIX + scope, {"anonymous": True})
        except OSError as e:  # remembered for this process all the same
            log.warning("cannot store that %s is public: %s", scope, e.strerror or e)

    def refused(self, scope: str) -> None:
        self._known[scope] = False
