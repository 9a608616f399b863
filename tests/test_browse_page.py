"""The browse page renders in a real browser (headless Chromium) and lists what is cached, with
the URL to paste into hub.load."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def _chromium() -> str:
    """Debian's chromium, installed on first use when we may (CI runs as root)."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, check=True, stdout=subprocess.DEVNULL)
        found = shutil.which("chromium")
    if found is None:
        pytest.fail("this test needs Debian's chromium package (apt-get install chromium)")
    return found


def _headless(chromium: str, profile, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


def test_browse_page_lists_cached_models_in_a_real_browser(proxy, origin, archives, tmp_path):
    model = origin.register(archives.small)
    assert proxy.get(f"/{model.handle}")[0] == 200
    chromium = _chromium()
    page = proxy.url + "/"

    dom = _headless(chromium, tmp_path / "profile-dom", "--dump-dom", page)
    shot = tmp_path / "browse.png"
    _headless(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1200,700", page)

    assert "hubproxy — cached models" in dom.stdout
    assert f"{proxy.url}/{model.handle}" in dom.stdout, "the URL to paste into hub.load"
    assert "1 model," in dom.stdout
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 5000
