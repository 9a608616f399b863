"""Archive bytes from a file to the client: with sendfile straight to the socket once aiohttp has
put the response head on the wire, or, inside a TLS tunnel where sendfile cannot reach, read with
aiofiles in large blocks and written through aiohttp. A whole response's head leaves in one segment
with its first body bytes, read on the loop (a read, like sendfile's, waits for a disk when the
file is not in the page cache).

Invariants: every byte written here follows the head, which `start` has handed to the transport
through aiohttp's public AbstractStreamWriter.send_headers(); a socket corked here is uncorked
before anything else is sent; a chunk framed here is whole (size line, bytes, CRLF) before the
next; through TLS, aiohttp frames every chunk; the terminating chunk is always aiohttp's, sent by
write_eof. tests/test_wire_contract.py holds aiohttp to this.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import BinaryIO

import aiofiles
from aiohttp import web

TLS_READ_BLOCK = 1 << 20  # a TLS record holds 16 KiB, but fewer, larger reads cost less per GB
FIRST_BYTES = 16 << 10  # sent with the head: as much as a new connection's first flight (10 x 1460 bytes)


async def start(request: web.Request, response: web.StreamResponse) -> None:
    """Send the response head now: what follows is body."""
    writer = await response.prepare(request)
    writer.send_headers()


async def send_whole(request: web.Request, response: web.StreamResponse, archive: BinaryIO, offset: int,
                     count: int) -> None:
    """The head, bytes [offset, offset + count) of the file, and the end of the response. The head
    and the first FIRST_BYTES leave the kernel together (the socket is corked while both are written,
    as nginx's tcp_nopush does), so a client is woken once for both rather than for the head and
    again for the body; the rest follows uncorked (by sendfile, which bypasses aiohttp)."""
    if count == 0:
        await start(request, response)
    else:
        first = min(count, FIRST_BYTES)
        archive.seek(offset)
        block = archive.read(first)  # unbuffered: one read (short only for a file cut short, as sendfile's)
        with _corked(request.transport):
            await start(request, response)
            await response.write(block)
        if count > first:
            await send_file(request, response, archive, offset + first, count - first)
    await response.write_eof()


async def send_file(request: web.Request, response: web.StreamResponse, archive: BinaryIO, offset: int,
                    count: int) -> None:
    """Bytes [offset, offset + count) of the file, as they are (a body with a Content-Length)."""
    transport = _open_transport(request)
    if _is_tls(transport):
        await _write_through_aiohttp(response, archive, offset, count)
    else:
        await _sendfile(transport, archive, offset, count)


async def send_file_chunk(request: web.Request, response: web.StreamResponse, archive: BinaryIO, offset: int,
                          count: int) -> None:
    """The same bytes as chunks of a chunked body: one chunk framed here around a sendfile, or
    aiohttp's chunks through TLS."""
    transport = _open_transport(request)
    if _is_tls(transport):
        await _write_through_aiohttp(response, archive, offset, count)
        return
    transport.write(b"%x\r\n" % count)
    await _sendfile(transport, archive, offset, count)
    transport.write(b"\r\n")


@contextlib.contextmanager
def _corked(transport: asyncio.Transport | None) -> Iterator[None]:
    """TCP_CORK while the block runs: what is written meanwhile leaves in full segments, the rest when
    it ends (through TLS too: the socket under it)."""
    sock = None if transport is None or transport.is_closing() else transport.get_extra_info("socket")
    if sock is None:
        yield
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # the connection is gone: nothing left to send
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


def cut(request: web.Request) -> None:
    """End the connection without the terminating chunk, so the client sees an incomplete body."""
    if request.transport is not None:
        request.transport.abort()


async def _write_through_aiohttp(response: web.StreamResponse, archive: BinaryIO, offset: int, count: int) -> None:
    async with aiofiles.open(archive.fileno(), "rb", buffering=0, closefd=False) as source:
        await source.seek(offset)
        while count > 0:
            block = await source.read(min(TLS_READ_BLOCK, count))
            if not block:
                raise EOFError(f"the file ended {count} bytes early")
            await response.write(block)
            count -= len(block)


async def _sendfile(transport: asyncio.Transport, archive: BinaryIO, offset: int, count: int) -> None:
    """loop.sendfile; a client that left (even during the write just before) is the ConnectionError
    it is, not asyncio's RuntimeError for a closing transport."""
    try:
        await asyncio.get_running_loop().sendfile(transport, archive, offset, count)
    except RuntimeError:
        if transport.is_closing():
            raise ConnectionResetError("client went away") from None
        raise


def _is_tls(transport: asyncio.Transport) -> bool:
    return transport.get_extra_info("sslcontext") is not None


def _open_transport(request: web.Request) -> asyncio.Transport:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    return transport
