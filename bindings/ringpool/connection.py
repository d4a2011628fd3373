"""ringpool.Pipe and Connection: the stdlib's Connection API over shared-memory rings.

Each direction is one ring; a duplex pipe has two. A small socketpair, one end per Connection,
tells an end that its peer is gone (every process holding the other end closed it or died), so
``recv`` raises EOFError and ``send`` raises BrokenPipeError as with the stdlib's pipes.

Deviations from ``multiprocessing.connection.Connection``:
- ``send``/``send_bytes`` wait for ring space (1 MiB by default, against a pipe's 64 KiB);
  payloads over the ring's inline limit travel out of band and never fill it.
- ``fileno()`` of a readable end is an eventfd that is readable while a message is waiting
  (usable with ``multiprocessing.connection.wait``, ``select`` and asyncio); of a write-only end,
  the peer-liveness socket.
- Handles inside objects travel with the message (see ``ringpool.reduction``).
"""
from __future__ import annotations

import queue
import select
import socket
from typing import Any
from multiprocessing import BufferTooShort
from multiprocessing.reduction import DupFd

from . import _core
from .queues import DEFAULT_CAPACITY, rebuild_channel, reduce_channel
from .reduction import payload_bytes

__all__ = ["Connection", "Pipe"]

# A blocked recv/send re-checks the peer this often (ring wake-ups are immediate regardless).
_PEER_CHECK = 0.05
_RAW = _core.FLAG_RAW


class Connection:
    """One end of a ringpool Pipe. Not thread-safe for concurrent use of the same direction from
    two threads (neither is the stdlib's); any process may hold it."""

    def __init__(self, recv_chan, send_chan, peer):
        self._recv = recv_chan
        self._send = send_chan
        self._peer = peer  # socket whose other end the peer holds
        self._closed = False

    # -- pickling (a Process argument, or inside a ringpool message) ---------------------------
    def __reduce__(self):
        self._check_open()
        return (_rebuild_connection, (
            reduce_channel(self._recv) if self._recv is not None else None,
            reduce_channel(self._send) if self._send is not None else None,
            DupFd(self._peer.fileno()),
        ))

    # -- state ------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once ``close()`` was called on this end."""
        return self._closed

    @property
    def readable(self) -> bool:
        """True if this end can receive (``Pipe(duplex=False)``'s first end, or a duplex end)."""
        return self._recv is not None

    @property
    def writable(self) -> bool:
        """True if this end can send (``Pipe(duplex=False)``'s second end, or a duplex end)."""
        return self._send is not None

    def _check_open(self):
        if self._closed:
            raise OSError("handle is closed")

    def _check_readable(self):
        self._check_open()
        if self._recv is None:
            raise OSError("connection is write-only")

    def _check_writable(self):
        self._check_open()
        if self._send is None:
            raise OSError("connection is read-only")

    def fileno(self) -> int:
        """A descriptor that is readable when a message may be waiting (for ``select`` and
        ``multiprocessing.connection.wait``)."""
        self._check_open()
        return self._recv.fileno() if self._recv is not None else self._peer.fileno()

    def close(self) -> None:
        """Close this end; the peer's ``recv`` then raises EOFError once the sent messages are read. Idempotent."""
        if not self._closed:
            self._closed = True
            self._peer.close()
            self._recv = self._send = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self._peer.close()

    def _peer_gone(self):
        p = select.poll()
        p.register(self._peer.fileno(), select.POLLIN | select.POLLRDHUP)
        return any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLIN) for _, ev in p.poll(0))

    # -- sending ------------------------------------------------------------------------------
    def send(self, obj: object) -> None:
        """Send a picklable object (handles inside travel with it)."""
        if self._closed or self._send is None:
            self._check_writable()
        p = self._send.put_obj(obj, 0)
        if p is not None:
            self._wait_published(p)

    def send_bytes(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        """Send bytes from a bytes-like object; recv_bytes on the other end returns them."""
        if type(buf) is bytes and offset == 0 and size is None and not self._closed and self._send is not None:
            p = self._send.put(buf, _RAW, None, 0)  # the common case, without memoryview work
            if p is not None:
                self._wait_published(p)
            return
        self._check_writable()
        m = memoryview(buf)
        if m.itemsize > 1:
            m = m.cast("B")
        n = m.nbytes
        if offset < 0:
            raise ValueError("offset is negative")
        if n < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > n:
            raise ValueError("buffer length < offset + size")
        self._send_payload(m[offset:offset + size], _RAW, None)

    def _send_payload(self, payload, flags, fds):
        self._wait_published(self._send.put(payload, flags, fds, 0))

    def _wait_published(self, p):
        chan = self._send
        while p is not None and not chan.publish(p):
            if self._peer_gone():
                raise BrokenPipeError("the other end of the pipe is closed")
            chan.wait_writable(p.record_bytes, _PEER_CHECK)

    # -- receiving ----------------------------------------------------------------------------
    def _recv_item(self):
        if self._closed or self._recv is None:
            self._check_readable()
        chan = self._recv
        while True:
            item = chan.get(_PEER_CHECK)
            if item is not None:
                return item
            if self._peer_gone() and not chan.readable():
                raise EOFError
            self._check_readable()

    def recv(self) -> Any:
        """Receive an object sent with send()."""
        if self._closed or self._recv is None:
            self._check_readable()
        chan = self._recv
        while True:
            try:
                return chan.get_obj(_PEER_CHECK)
            except queue.Empty:
                pass
            if self._peer_gone() and not chan.readable():
                raise EOFError
            self._check_readable()

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receive one message's bytes. Raises OSError (and closes) if longer than maxlength."""
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        item = self._recv_item()
        data = item if type(item) is bytes else payload_bytes(item)
        if maxlength is not None and len(data) > maxlength:
            self.close()
            raise OSError("bad message length")
        return data

    def recv_bytes_into(self, buf: Any, offset: int = 0) -> int:
        """Receive one message into buf at offset; returns its length. BufferTooShort carries the
        whole message if it does not fit."""
        data = payload_bytes(self._recv_item())
        with memoryview(buf) as m:
            itemsize = m.itemsize
            bytesize = itemsize * len(m)
            if offset < 0:
                raise ValueError("negative offset")
            if offset > bytesize:
                raise ValueError("offset too large")
            if bytesize - offset < len(data):
                raise BufferTooShort(data)
            m.cast("B")[offset:offset + len(data)] = data
        return len(data)

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether recv would not block (a message waits, or the peer is gone)."""
        self._check_readable()
        if timeout is None:
            timeout = -1.0
        if self._recv.poll(0.0):
            return True
        if timeout == 0:
            return self._peer_gone()
        import time

        deadline = None if timeout < 0 else time.monotonic() + timeout
        while True:
            step = _PEER_CHECK if deadline is None else min(_PEER_CHECK, max(deadline - time.monotonic(), 0.0))
            if self._recv.poll(step):
                return True
            if self._peer_gone():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False


def _rebuild_connection(recv_tokens, send_tokens, peer_token):
    recv = rebuild_channel(recv_tokens) if recv_tokens is not None else None
    send = rebuild_channel(send_tokens) if send_tokens is not None else None
    peer = socket.socket(fileno=peer_token.detach())
    return Connection(recv, send, peer)


def Pipe(duplex: bool = True, *, capacity: int | None = None) -> tuple[Connection, Connection]:
    """Return (conn1, conn2). With duplex=False, conn1 only receives and conn2 only sends."""
    cap = DEFAULT_CAPACITY if capacity is None else capacity
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a = _core.Channel.create(cap)
    if duplex:
        b = _core.Channel.create(cap)
        return Connection(a, b, s1), Connection(b, a, s2)
    return Connection(a, None, s1), Connection(None, a, s2)
