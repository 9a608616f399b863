"""Fetching from upstream: the redirect chain, the origin's evidence and the checks against it, one
flight per key that readers tail, and the one-shot verified fetch of the offline tools. It knows
upstreams and the cache, never the client."""
