"""How ringpool turns objects into frames and back.

Every ringpool channel pickles with the reducers registered on
``multiprocessing.reduction.ForkingPickler`` (so the stdlib's and torch's apply), using one cached
pickler per thread: ``ForkingPickler.dumps`` builds a new pickler and copies the whole dispatch
table per call, which costs more than the ring itself. The cached pickler is rebuilt when the
set of registered reducers changes.

Handles: while ringpool pickles, ``multiprocessing.context.get_spawning_popen()`` returns a
``_HandleCollector``. ``multiprocessing.reduction.DupFd(fd)`` (used by the reducers of
Connection, socket, torch storages, ...) then records the descriptor, which travels with the frame
over the channel's socket, and pickles a ``_ReceivedFd(index)``; on the receiving side
``_ReceivedFd.detach()`` returns the received descriptor, a fresh one the caller owns.
``multiprocessing.resource_sharer`` is never involved.

Buffers: pickle protocol 5 out-of-band buffers of at least ``OOB_BUFFER_MIN`` bytes (numpy arrays,
PickleBuffer-aware types) are not copied into the pickle: the frame carries them after it
(``FLAG_BUFFERS`` layout in docs/design/protocol.md), and the receiver rebuilds the objects over
the received memory (for out-of-band frames: shared memory, no copy).
"""
from __future__ import annotations

import copyreg
import os
import pickle
import struct
import threading
from multiprocessing import context as _mp_context
from multiprocessing.reduction import ForkingPickler

from . import _core

__all__ = ["dumps", "loads", "register", "OOB_BUFFER_MIN"]

# Protocol-5 buffers smaller than this stay in the pickle: below it the table entry and the
# 64-byte alignment cost more than the copy saves.
OOB_BUFFER_MIN = 8192

FLAG_BUFFERS = _core.FLAG_BUFFERS
FLAG_RAW = _core.FLAG_RAW

_BUF_HEAD = struct.Struct("<IIQ")  # nbuf, reserved, pickle_len
_ALIGN = 64
_PAD = bytes(_ALIGN)

_tls = threading.local()


def register(type_, reducer):
    """Register a handle reducer for ``type_`` on every ringpool channel (and the stdlib's)."""
    ForkingPickler.register(type_, reducer)


class _ReceivedFd:
    """Pickled in place of a descriptor; ``detach()`` on the receiving side returns it."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index

    def detach(self):
        table = getattr(_tls, "received", None)
        if table is None or not 0 <= self.index < len(table):
            raise RuntimeError("ringpool handle unpickled outside the frame that carried it")
        fd = table[self.index]
        if fd is None:
            raise RuntimeError("ringpool handle detached twice")
        table[self.index] = None
        return fd

    def __reduce__(self):
        return (_ReceivedFd, (self.index,))


class _HandleCollector:
    """The spawning popen seen by reducers while ringpool pickles one message."""

    __slots__ = ("fds",)
    DupFd = _ReceivedFd

    def __init__(self):
        self.fds = []

    def duplicate_for_child(self, fd):
        # The descriptor is sent before put() returns (or duplicated if the frame has to wait),
        # so the reducer's own descriptor is borrowed, not taken.
        self.fds.append(fd)
        return len(self.fds) - 1


_dispatch = copyreg.dispatch_table
_extra = ForkingPickler._extra_reducers
_mp_tls = _mp_context._tls


def _reducer_epoch():
    # Changes whenever a reducer is registered (copyreg or ForkingPickler.register, as torch does
    # on import): the cached pickler copied the tables at construction and must be rebuilt.
    return len(_dispatch) + (len(_extra) << 24)


class _Writer:
    __slots__ = ("write",)


class _Dumper:
    """One per thread: a reusable ForkingPickler whose file is a list append (the C pickler flushes
    each dump in one write), a reusable handle collector, and the buffers of the dump in progress.
    ``_core.dumps`` drives it from C; every attribute here is read once per thread."""

    __slots__ = ("epoch", "out", "pickler", "dump", "clear_memo", "buffers", "collector")

    def __init__(self):
        self.epoch = _reducer_epoch()
        self.out = []
        w = _Writer()
        w.write = self.out.append
        self.buffers = []
        self.collector = _HandleCollector()
        self.pickler = ForkingPickler(w, 5, True, self._on_buffer)
        self.dump = self.pickler.dump
        self.clear_memo = self.pickler.clear_memo

    def _on_buffer(self, pb):
        try:
            m = pb.raw()
        except BufferError:  # not contiguous: let pickle copy it in-band
            return True
        if m.nbytes < OOB_BUFFER_MIN:
            return True
        self.buffers.append(m)
        return False


def _thread_dumper():
    """This thread's dumper, rebuilt when reducers were registered since it was made."""
    d = getattr(_tls, "dumper", None)
    if d is None or d.epoch != _reducer_epoch():
        d = _tls.dumper = _Dumper()
    return d


# dumps(obj) -> (payload, flags, fds): pickles with this thread's dumper under the handle
# collector, in C (see bindings/src/codec.cpp).
dumps = _core.dumps


def _with_buffers(data, bufs):
    n = len(bufs)
    head = _BUF_HEAD.pack(n, 0, len(data)) + struct.pack(f"<{n}Q", *(m.nbytes for m in bufs))
    pieces = [head, data]
    off = len(head) + len(data)
    for m in bufs:
        pad = -off % _ALIGN
        if pad:
            pieces.append(_PAD[:pad])
            off += pad
        pieces.append(m)
        off += m.nbytes
    return pieces


def _split_buffers(payload):
    mv = memoryview(payload)
    nbuf, _, plen = _BUF_HEAD.unpack_from(mv, 0)
    lens = struct.unpack_from(f"<{nbuf}Q", mv, _BUF_HEAD.size)
    off = _BUF_HEAD.size + 8 * nbuf
    data = mv[off:off + plen]
    off += plen
    bufs = []
    for n in lens:
        off += -off % _ALIGN
        bufs.append(mv[off:off + n])
        off += n
    if off > len(mv):
        raise _core.ProtocolError("buffer table runs past the frame")
    return data, bufs


def loads_payload(payload, flags=0, fds=None):
    """Unpickle a frame's payload; fds are the descriptors that came with it (consumed)."""
    if fds:
        prev = getattr(_tls, "received", None)
        _tls.received = table = list(fds)
        try:
            return _loads_flags(payload, flags)
        finally:
            _tls.received = prev
            for fd in table:  # whatever the objects did not take
                if fd is not None:
                    os.close(fd)
    return _loads_flags(payload, flags)


def _loads_flags(payload, flags):
    if flags & FLAG_BUFFERS:
        data, bufs = _split_buffers(payload)
        return pickle.loads(data, buffers=bufs)
    if type(payload) is bytes:
        return pickle.loads(payload)
    with memoryview(payload) as mv:  # an out-of-band block: free it as soon as we are done
        return pickle.loads(mv)


def loads(item):
    """Unpickle an item as returned by ``_core.Channel.get``."""
    if type(item) is bytes:
        return pickle.loads(item)
    flags, payload, fds = item
    return loads_payload(payload, flags, fds)


def payload_bytes(item):
    """The bytes of an item, for recv_bytes: raw frames as sent, pickles as a plain pickle."""
    if type(item) is bytes:
        return item
    flags, payload, fds = item
    if flags & FLAG_RAW or not (fds or flags & FLAG_BUFFERS):
        for fd in fds or ():
            os.close(fd)
        return bytes(payload)
    # Handles and out-of-band buffers only make sense to our unpickler: rebuild the object and
    # return an equivalent self-contained pickle, which is what the stdlib's recv_bytes returns.
    return bytes(ForkingPickler.dumps(loads_payload(payload, flags, fds)))
