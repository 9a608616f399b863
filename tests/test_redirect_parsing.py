"""A redirect's Location is parsed once, and the URL checked against the allowlist is the very one
fetched: a Location two parsers read differently (a backslash before an `@`), one with userinfo,
a bad port or a bad host is a one-line 502, nothing is asked of any host it names, and no
traceback reaches the log. A good relative Location is still followed."""

from __future__ import annotations

import pytest


def _port(origin, site: str) -> int:
    return int(origin.urls[site].rsplit(":", 1)[1])


CRAFTED = {
    # urllib reads host 127.0.0.1 (the gcs site, allowed); WHATWG parsers read 127.0.0.2 (canary's port)
    "backslash-before-userinfo": lambda o, m: f"http://127.0.0.2:{_port(o, 'canary')}\\@127.0.0.1:{_port(o, 'gcs')}/"
                                              f"{m.object}",
    "userinfo": lambda o, m: f"http://user:secret@127.0.0.1:{_port(o, 'gcs')}/{m.object}",
    "empty-userinfo": lambda o, m: f"http://@127.0.0.1:{_port(o, 'gcs')}/{m.object}",
    "port-out-of-range": lambda o, m: f"http://127.0.0.1:99999/{m.object}?X-Goog-Signature=s3cr3t",
    "port-not-a-number": lambda o, m: f"http://127.0.0.1:http/{m.object}",
    "unclosed-ipv6-host": lambda o, m: f"http://[::1/{m.object}",
}


@pytest.mark.parametrize("crafted", sorted(CRAFTED))
def test_a_crafted_location_is_a_one_line_502_and_nothing_is_asked_of_it(proxy, origin, archives, crafted):
    model = origin.register(archives.small, public_bucket=True)
    origin.faults(model, redirect_to=CRAFTED[crafted](origin, model))

    status, headers, reason = proxy.get(f"/{model.handle}")

    assert (status, headers["X-Cache"]) == (502, "MISS")
    assert reason.count(b"\n") == 1 and b"redirect" in reason, reason
    assert b"s3cr3t" not in reason and b"secret" not in reason
    assert [r["site"] for r in origin.requests()] == ["tfhub", "kaggle"]
    assert "Traceback" not in proxy.log.read_text()


def test_userinfo_in_a_redirect_is_refused_by_name(proxy, origin, archives):
    model = origin.register(archives.small, public_bucket=True)
    origin.faults(model, redirect_to=CRAFTED["userinfo"](origin, model))

    assert b"userinfo" in proxy.get(f"/{model.handle}")[2]


def test_a_scheme_relative_location_is_resolved_against_the_hop_and_followed(proxy, origin, archives):
    model = origin.register(archives.small, public_bucket=True)
    origin.faults(model, redirect_to=f"//127.0.0.1:{_port(origin, 'gcs')}/{model.object}")

    status, headers, body = proxy.get(f"/{model.handle}")

    assert (status, headers["X-Cache"], body) == (200, "MISS", archives.small.read_bytes())
    assert [r["site"] for r in origin.requests()] == ["tfhub", "kaggle", "gcs"]
