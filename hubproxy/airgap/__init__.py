"""Offline clusters: verified archives from a cache, a mirror or upstream; TFHUB_CACHE_DIR trees
the real tensorflow_hub loads offline; signed bundles and their Ed25519 keys. No HTTP server here."""
