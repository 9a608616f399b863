"""Side-by-side benchmarks: hubproxy vs nginx proxy_cache vs direct download, on one machine."""
