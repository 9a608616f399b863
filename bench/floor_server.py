"""The interpreter's floor for a hit's time to first byte: a server on asyncio, as hubproxy, that
does no HTTP work at all. Run as `python -m bench.floor_server FILE`; it prints "listening on URL".

Invariants: every connection is answered with FILE whole, by the steps hubproxy's quick answer
cannot skip (accept, peek, open, read the first bytes, send them after a head made once, with the
fields of hubproxy's, then sendfile), and nothing else: the request is never parsed, nothing is
looked up, counted or logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import os
import socket
import sys
from typing import BinaryIO

FIRST_BYTES = 16 << 10  # as hubproxy's (serve/wire.py)
DEFER_SECONDS = 1  # as hubproxy's door: the kernel hands over a connection once its request is in


async def serve(path: str) -> None:
    size = os.stat(path).st_size
    head = _head_like_hubproxys(size)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_SECONDS)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    sending: set[asyncio.Task] = set()

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            task = loop.create_task(_send_rest(conn, *_send_first(conn, path, head), size))
            sending.add(task)
            task.add_done_callback(sending.discard)

    loop.add_reader(listener.fileno(), accept)
    print(f"listening on http://127.0.0.1:{listener.getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def _head_like_hubproxys(size: int) -> bytes:
    """A head with the fields of hubproxy's, and values as long: a client's time to its first byte
    includes parsing the head, which grows with it."""
    now = email.utils.formatdate(usegmt=True)
    fields = {"X-Cache": "HIT", "ETag": f'"{"0" * 64}"', "Last-Modified": now,
              "Repr-Digest": f"sha-256=:{'A' * 43}=:", "Cache-Control": "public, max-age=31536000, immutable",
              "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", "Content-Length": str(size),
              "Date": now, "Server": "floor", "Connection": "close"}
    return ("HTTP/1.1 200 OK\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n").encode()


def _send_first(conn: socket.socket, path: str, head: bytes) -> tuple[BinaryIO, bytes, int]:
    """As hubproxy's quick answer, before the loop runs again: the head and first bytes sent without
    waiting. (the file, what the socket did not take, where the rest starts)."""
    try:
        request = conn.recv(8192, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        request = b""
    fd = os.open(path, os.O_RDONLY)
    first = os.pread(fd, FIRST_BYTES, 0)
    try:
        sent = conn.send(head + first, socket.MSG_DONTWAIT)
    except OSError:
        sent = 0
    conn.setblocking(False)
    with contextlib.suppress(OSError):
        conn.recv(len(request))
    return open(fd, "rb", buffering=0), (head + first)[sent:], len(first)


async def _send_rest(conn: socket.socket, blob: BinaryIO, unsent: bytes, offset: int, size: int) -> None:
    loop = asyncio.get_running_loop()
    with conn, blob:
        try:
            await loop.sock_sendall(conn, unsent)
            await loop.sock_sendfile(conn, blob, offset, size - offset)
        except OSError:
            pass  # the client hung up after its first byte, as the bench's first-byte client does


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
