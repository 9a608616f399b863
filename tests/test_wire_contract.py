"""Hits and misses send archive bytes with sendfile straight to the socket, after aiohttp has put the
response head on the wire. That leans on aiohttp's public AbstractStreamWriter.send_headers() and on
write_eof() adding the terminating chunk; if a new aiohttp buffers or reorders differently, these
tests fail here, loudly, rather than clients receiving bodies before heads. A whole response
(send_whole) sends its head with its first bytes in one segment, then the rest by sendfile.

The server is hubproxy's own serve.wire under a real aiohttp runner on a real socket, in-process.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from aiohttp import web

from hubproxy.serve import wire

PAYLOAD = bytes(range(256)) * 256  # 64 KiB
FILE = web.AppKey("file", object)


async def _plain(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"X-Test": "plain"})
    response.content_length = 100
    with open(request.app[FILE], "rb") as archive:
        await wire.start(request, response)
        await wire.send_file(request, response, archive, 10, 100)
    await response.write_eof()
    return response


async def _whole(request: web.Request) -> web.StreamResponse:
    count = int(request.query["count"])
    response = web.StreamResponse(headers={"X-Test": "whole"})
    response.content_length = count
    with open(request.app[FILE], "rb", buffering=0) as archive:
        await wire.send_whole(request, response, archive, 10, count)
    return response


async def _chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"X-Test": "chunked"})
    response.enable_chunked_encoding()
    with open(request.app[FILE], "rb") as archive:
        await wire.start(request, response)
        await wire.send_file_chunk(request, response, archive, 0, 5)
        await response.write(b"from memory")
        await wire.send_file_chunk(request, response, archive, 5, 3)
    await response.write_eof()
    return response


def _exchange(requests: bytes, tmp_path, tcp_info: list | None = None) -> bytes:
    """Run the app on 127.0.0.1, send raw request bytes, return every byte received until close
    (and append the client socket's TCP_INFO then to tcp_info, when given)."""
    archive = tmp_path / "archive.bin"
    archive.write_bytes(PAYLOAD)

    async def run() -> bytes:
        app = web.Application()
        app[FILE] = archive
        app.router.add_get("/plain", _plain)
        app.router.add_get("/chunked", _chunked)
        app.router.add_get("/whole", _whole)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            return await asyncio.to_thread(_send_and_read, port, requests, tcp_info)
        finally:
            await runner.cleanup()

    return asyncio.run(run())


def _send_and_read(port: int, requests: bytes, tcp_info: list | None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(requests)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        if tcp_info is not None:
            tcp_info.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256))
        return received


def _split(response: bytes) -> tuple[bytes, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


def test_head_precedes_a_sendfile_body_and_the_connection_stays_usable(tmp_path):
    received = _exchange(b"GET /plain HTTP/1.1\r\nHost: t\r\n\r\n"
                         b"GET /plain HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", tmp_path)
    first_head, rest = _split(received)
    assert first_head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nX-Test: plain" in first_head
    assert b"Content-Length: 100" in first_head
    assert rest[:100] == PAYLOAD[10:110]
    second_head, second_body = _split(rest[100:])
    assert second_head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert second_body == PAYLOAD[10:110]


def test_chunks_framed_here_and_by_aiohttp_interleave_and_end_once(tmp_path):
    received = _exchange(b"GET /chunked HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", tmp_path)
    head, body = _split(received)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked" in head
    expected = (b"5\r\n" + PAYLOAD[:5] + b"\r\n" + b"b\r\nfrom memory\r\n" + b"3\r\n" + PAYLOAD[5:8] + b"\r\n"
                + b"0\r\n\r\n")
    assert body == expected



def test_a_whole_response_sends_the_rest_after_the_bytes_sent_with_its_head(tmp_path):
    count = wire.FIRST_BYTES + 20000  # the rest goes by sendfile
    received = _exchange(b"GET /whole?count=%d HTTP/1.1\r\nHost: t\r\n\r\n" % count
                         + b"GET /whole?count=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", tmp_path)
    head, rest = _split(received)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nX-Test: whole" in head
    assert b"Content-Length: %d" % count in head
    assert rest[:count] == PAYLOAD[10:10 + count]
    second_head, second_body = _split(rest[count:])
    assert second_head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert second_body == PAYLOAD[10:11]


TCPI_DATA_SEGS_IN = 152  # offset of tcpi_data_segs_in in Linux's struct tcp_info (since 4.6)


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="TCP_INFO (segment counts) is Linux's")
def test_a_head_leaves_in_one_segment_with_the_first_body_bytes(tmp_path):
    """A client on a fresh connection is woken once for the head and the body's start, not once for
    each: a small archive's whole response arrives as one segment with data."""
    tcp_info: list[bytes] = []
    received = _exchange(b"GET /whole?count=100 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", tmp_path,
                         tcp_info)
    head, body = _split(received)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == PAYLOAD[10:110]
    (data_segments_in,) = struct.unpack_from("I", tcp_info[0], TCPI_DATA_SEGS_IN)
    assert data_segments_in == 1
