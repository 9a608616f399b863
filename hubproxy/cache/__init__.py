"""The cache core: content-addressed blobs on disk and their index; eviction, pins, scrub, upkeep.
It knows the disk and never HTTP: nothing here imports aiohttp."""
