"""The HTTP faces (aiohttp): hub routes answered from the cache (hits) or a flight (misses), the
admin API, the browse page, metrics and the access log, and the listener that runs them."""
