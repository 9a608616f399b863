"""Host names the interception CA may speak for: which hosts, how they are spelled, what covers what.

Invariants: a host is a DNS name in lower case, IDNA (xn--) form, without a trailing dot, port,
wildcard or IP address; anything else is refused with a one-line HostError naming it. A
constraint covers itself and every name below it (as X.509 DNS name constraints do, RFC 5280
4.2.1.10), and never a name that merely ends with the same letters (nottfhub.dev).
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from typing import Iterable

# The hosts clients reach the hub through: tfhub.dev, Kaggle (www., api. and the bare name, one
# subtree) and the storage the archives are redirected to.
INTERCEPTED_HOSTS = ("tfhub.dev", "kaggle.com", "storage.googleapis.com")

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class HostError(ValueError):
    """A name that is no host the CA can be constrained to or sign for; the message is one line."""


def normalized(host: str) -> str:
    """The one spelling of `host` (lower case, no trailing dot), or HostError."""
    name = host.strip().lower()
    name = name[:-1] if name.endswith(".") else name
    if _is_ip_address(name):
        raise HostError(f"{host!r} is an IP address; only DNS names are intercepted")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise HostError(f"{host!r} is not a DNS host name (letters, digits, '-' and dots; no port, scheme "
                        f"or wildcard; IDNA names as xn--)")
    return name


def covers(constraint: str, host: str) -> bool:
    """Whether a DNS name constraint permits `host` (both normalized)."""
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint or host.endswith("." + constraint)


def subtrees(hosts: Iterable[str]) -> tuple[str, ...]:
    """The fewest constraints permitting every host: normalized, sorted, each name that another
    already covers (www.kaggle.com under kaggle.com) left out."""
    names = {normalized(host) for host in hosts}
    return tuple(sorted(name for name in names if not any(other != name and covers(other, name)
                                                          for other in names)))


def redirect_host_names(entries: Iterable[str]) -> tuple[str, ...]:
    """The host names of allow_redirect_hosts entries (HOST[:PORT]), each once: ports stripped
    (a name constraint has none) and IP literals left out (the CA excludes every IP address)."""
    hosts = (_without_port(entry) for entry in entries)
    return tuple(dict.fromkeys(host for host in hosts if not _is_ip_address(host)))


def _without_port(entry: str) -> str:
    try:
        return urllib.parse.urlsplit("//" + entry.strip()).hostname or entry
    except ValueError:  # an unclosed "[": left as it is, for normalized() to name
        return entry


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False
