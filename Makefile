# Shortcuts for the README's commands.
.PHONY: serve test bench soak

serve:
	python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/hubproxy serve

test:
	python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest

bench:
	python3 -m venv .venv && .venv/bin/pip install -e '.[bench]' && .venv/bin/python -m bench --publish

# SOAK_MINUTES=60 make soak for the hour-long run.
soak:
	python3 -m venv .venv && .venv/bin/pip install -e '.[bench]' && .venv/bin/python -m bench.soak --publish --minutes $(or $(SOAK_MINUTES),10)
