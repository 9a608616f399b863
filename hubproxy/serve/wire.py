"""Archive bytes from a file to the client: with sendfile straight to the socket once aiohttp has
put the response head on the wire, or, inside a TLS tunnel where sendfile cannot reach, read with
aiofiles in large blocks and written through aiohttp.

Invariants: every byte written here follows the head, which `start` has handed to the transport
through aiohttp's public AbstractStreamWriter.send_headers(); a chunk framed here is whole (size
line, bytes, CRLF) before the next; through TLS, aiohttp frames every chunk; the terminating
chunk is always aiohttp's, sent by write_eof. tests/test_wire_contract.py holds aiohttp to this.
"""

from __future__ import annotations

import asyncio
from typing import BinaryIO

import aiofiles
from aiohttp import web

TLS_READ_BLOCK = 1 << 20  # a TLS record holds 16 KiB, but fewer, larger reads cost less per GB


async def start(request: web.Request, response: web.StreamResponse) -> None:
    """Send the response head now: what follows is body."""
    writer = await response.prepare(request)
    writer.send_headers()


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
