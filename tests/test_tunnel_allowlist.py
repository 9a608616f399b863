"""--tunnel entries, through both doors (CONNECT and an HTTP_PROXY absolute-form request): an IP address
or network admits only IP hosts inside it, in any form the resolver reads as an address (127.1 is
127.0.0.1); a glob admits only names, never an address (--tunnel '*' is no way to 127.0.0.1), and a
glob that can only be meant for addresses ('10.*', which would also admit 10.attacker.example) is a
one-line start-up error. The canary site of the origin emulator, on 127.0.0.1, is the host asked for."""

from __future__ import annotations

import socket

import pytest

from tests import test_interception
from tests.conftest import raw_exchange

ca = test_interception.ca

DOORS = ("CONNECT", "forward")


def _through(proxy, door: str, host: str, port: str) -> tuple[int, bytes]:
    """(status, the rest) of GET /_echo for host:port through the proxy's CONNECT, or as an absolute-form
    request it forwards."""
    target = f"{host}:{port}"
    get = f"HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    if door == "forward":
        return raw_exchange(proxy.url, f"GET http://{target}/_echo {get}".encode())
    proxy_host, proxy_port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((proxy_host, int(proxy_port)), timeout=60) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        reader = sock.makefile("rb")
        status = int(reader.readline().split()[1])
        if status == 200:
            assert reader.readline() == b"\r\n"
            sock.sendall(f"GET /_echo {get}".encode())
        return status, reader.read()


def _canary(origin) -> tuple[str, str]:
    host, port = origin.urls["canary"].removeprefix("http://").split(":")
    assert host == "127.0.0.1"
    return host, port


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("tunnel, host", [("127.0.0.0/8", "127.0.0.1"), ("127.0.0.1", "127.0.0.1"),
                                          ("127.0.0.0/8", "127.1")])
def test_a_tunnel_network_admits_the_addresses_inside_it(proxy_factory, clean_origin, ca, tmp_path, door, tunnel,
                                                          host):
    _, port = _canary(clean_origin)
    proxy = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--tunnel", tunnel)

    status, answer = _through(proxy, door, host, port)

    assert status == 200 and b'"target": "/_echo"' in answer, answer
    assert [r["path"] for r in clean_origin.requests("canary")] == ["/_echo"]


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("tunnel, host", [("*", "127.0.0.1"), ("*", "127.1"), ("*", "2130706433"),
                                          ("127.0.0.0/8", "localhost")])
def test_a_glob_admits_no_address_and_a_network_no_name(proxy_factory, clean_origin, ca, tmp_path, door, tunnel,
                                                        host):
    """'*' (any name) does not open the proxy to loopback, whatever spelling of it; a network is not widened
    to the names that resolve into it."""
    _, port = _canary(clean_origin)
    proxy = proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--tunnel", tunnel)

    status, answer = _through(proxy, door, host, port)

    assert status == 403 and host.encode() in answer, answer
    assert clean_origin.requests("canary") == []


@pytest.mark.parametrize("entry", ["10.*", "192.168.?.*", "fe80::*", "10.0.0.1/8", "127.1"])
def test_a_tunnel_glob_meant_for_addresses_is_a_one_line_start_up_error(proxy_factory, ca, tmp_path, entry):
    with pytest.raises(RuntimeError, match="did not start") as refused:
        proxy_factory(tmp_path / "cache", "--intercept", "--ca-dir", ca, "--tunnel", "*.example.org", "--tunnel", entry)

    error = str(refused.value).partition("\n")[2].strip()
    assert entry in error and "CIDR" in error and len(error.splitlines()) == 1, error
