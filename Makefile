# Shortcuts for the README's commands.
.PHONY: serve test bench

serve:
	python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/hubproxy serve

test:
	python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest

bench:
	python3 -m venv .venv && .venv/bin/pip install -e '.[bench]' && .venv/bin/python -m bench --publish
