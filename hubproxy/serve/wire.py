"""Archive bytes straight from a file to the client's socket with sendfile, once aiohttp has put the
response head on the wire: how hits and misses send bodies without copying them through Python.

Invariants: every byte written here follows the head, which `start` has handed to the transport
through aiohttp's public AbstractStreamWriter.send_headers(); a chunk framed here is whole (size
line, bytes, CRLF) before the next; the terminating chunk is aiohttp's, sent by write_eof.
tests/test_wire_contract.py holds aiohttp to this.
"""

from __future__ import annotations

import asyncio
from typing import BinaryIO

from aiohttp import web


async def start(request: web.Request, response: web.StreamResponse) -> None:
    """Send the response head now: what follows is body."""
    writer = await response.prepare(request)
    writer.send_headers()


async def send_file(request: web.Request, archive: BinaryIO, offset: int, count: int) -> None:
    """Bytes [offset, offset + count) of the file, as they are (a body with a Content-Length)."""
    await asyncio.get_running_loop().sendfile(_open_transport(request), archive, offset, count)


async def send_file_chunk(request: web.Request, archive: BinaryIO, offset: int, count: int) -> None:
    """The same bytes framed as one chunk of a chunked body."""
    transport = _open_transport(request)
    transport.write(b"%x\r\n" % count)
    await asyncio.get_running_loop().sendfile(transport, archive, offset, count)
    transport.write(b"\r\n")


def cut(request: web.Request) -> None:
    """End the connection without the terminating chunk, so the client sees an incomplete body."""
    if request.transport is not None:
        request.transport.abort()


def _open_transport(request: web.Request) -> asyncio.Transport:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    return transport
