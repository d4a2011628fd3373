"""Pure-Python mirror of the ringpool frame format.

This module mirrors proto/include/ringpool/proto/frame.hpp, the C++ definition of the wire
protocol (docs/design/protocol.md describes it). Every frame starts with a 48-byte little-endian
header:

    offset size field
     0     4    magic        b"RPF1" (0x31465052 as u32 LE)
     4     2    version      VERSION
     6     1    kind         Kind
     7     1    flags        FLAG_* bits; unknown bits are an error
     8     8    payload_len  bytes that follow the header
    16     8    seq          producer-assigned sequence number
    24     4    nhandles     file descriptors that travel with this frame
    28     4    aux          kind-specific; not validated (DATA writes 0)
    32    16    reserved     must be zero

decode() applies the same rules in the same order as check_header() and decode() in frame.hpp,
and a failure raises FrameError whose ``reason`` is the C++ DecodeError enumerator name
("bad_magic", "truncated_payload", ...). The golden vectors in proto/golden pin both
implementations to the same bytes.

Dependency-free (struct only) so it can be imported without the compiled extension.
"""
from __future__ import annotations

import enum
import struct
from typing import NamedTuple, Optional, Tuple

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_SIZE",
    "MAX_HANDLES",
    "MAX_KIND",
    "Kind",
    "FLAG_OUT_OF_BAND",
    "FLAG_BUFFERS",
    "FLAG_RAW",
    "FLAGS_KNOWN",
    "FrameHeader",
    "FrameError",
    "REASONS",
    "HEADER",
    "OOB_DESCRIPTOR",
    "check_header",
    "unpack_header",
    "encode",
    "decode",
]

MAGIC = 0x31465052  # bytes b"RPF1"
VERSION = 1
HEADER_SIZE = 48
# One frame never claims more handles than this (a corrupt header must not make a reader try to
# receive billions of descriptors).
MAX_HANDLES = 1 << 16
MAX_KIND = 10
_U64_MAX = (1 << 64) - 1
_U32_MAX = (1 << 32) - 1

# magic, version, kind, flags, payload_len, seq, nhandles, aux, reserved
HEADER = struct.Struct("<IHBBQQII16s")
assert HEADER.size == HEADER_SIZE

# The inline payload of a FLAG_OUT_OF_BAND frame: u64 length, u64 reserved.
OOB_DESCRIPTOR = struct.Struct("<QQ")


class Kind(enum.IntEnum):
    DATA = 1  # a user message (queue item, pipe message)
    HELLO = 2  # reserved: channel handshake
    MODULES = 3  # reserved: registered package sources
    CALL = 4  # reserved: task call
    RESULT = 5  # reserved: task result
    ERROR = 6  # reserved: task error
    PROCESS = 7  # reserved: pickled process object at start
    EXIT = 8  # reserved: worker exit report
    HEARTBEAT = 9  # reserved: liveness
    SHUTDOWN = 10  # reserved: orderly stop


# The payload lives in an out-of-band shared-memory block carried as handle 0; the inline payload
# is an OOB descriptor.
FLAG_OUT_OF_BAND = 1 << 0
# The payload starts with a buffer table (pickle protocol 5 out-of-band buffers follow the pickle).
FLAG_BUFFERS = 1 << 1
# The payload is raw bytes (Connection.send_bytes), not a pickle.
FLAG_RAW = 1 << 2
FLAGS_KNOWN = FLAG_OUT_OF_BAND | FLAG_BUFFERS | FLAG_RAW

# DecodeError enumerator name -> to_string() text in frame.hpp.
REASONS = {
    "ok": "ok",
    "truncated_header": "truncated frame header",
    "bad_magic": "bad frame magic",
    "bad_version": "unsupported protocol version",
    "bad_kind": "unknown frame kind",
    "bad_flags": "unknown frame flags",
    "bad_reserved": "reserved header bytes not zero",
    "too_many_handles": "frame claims too many handles",
    "missing_handle": "out-of-band frame without its block handle",
    "payload_too_large": "frame payload longer than allowed",
    "truncated_payload": "truncated frame payload",
}


class FrameHeader(NamedTuple):
    magic: int
    version: int
    kind: int  # a Kind once decode() accepted the header
    flags: int
    payload_len: int
    seq: int
    nhandles: int
    aux: int
    reserved: bytes


class FrameError(ValueError):
    """A frame the decoder rejects. ``reason`` is the C++ DecodeError enumerator name."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS or reason == "ok":
            raise AssertionError(f"not a decode error: {reason!r}")
        self.reason = reason
        self.detail = detail
        message = REASONS[reason]
        if detail:
            message = f"{message}: {detail}"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.reason, self.detail))


def _byte_view(data) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


def unpack_header(data) -> FrameHeader:
    """The first HEADER_SIZE bytes of ``data`` as a FrameHeader, unvalidated."""
    view = _byte_view(data)
    if view.nbytes < HEADER_SIZE:
        raise FrameError("truncated_header", f"{view.nbytes} of {HEADER_SIZE} bytes")
    return FrameHeader._make(HEADER.unpack_from(view, 0))


def _check(h: FrameHeader, max_payload: int) -> Tuple[str, str]:
    # The order of these tests is the order of check_header() in frame.hpp.
    if h.magic != MAGIC:
        return "bad_magic", f"0x{h.magic:08x}, expected 0x{MAGIC:08x}"
    if h.version != VERSION:
        return "bad_version", f"version {h.version}, this side speaks {VERSION}"
    if h.kind == 0 or h.kind > MAX_KIND:
        return "bad_kind", f"kind {h.kind}"
    if h.flags & ~FLAGS_KNOWN:
        return "bad_flags", f"flags 0x{h.flags:02x}, known 0x{FLAGS_KNOWN:02x}"
    if any(h.reserved):
        return "bad_reserved", f"reserved bytes {bytes(h.reserved).hex()}"
    if h.nhandles > MAX_HANDLES:
        return "too_many_handles", f"{h.nhandles} handles, at most {MAX_HANDLES}"
    if (h.flags & FLAG_OUT_OF_BAND) and h.nhandles == 0:
        return "missing_handle", "out-of-band frame without its block handle"
    if h.payload_len > max_payload:
        return "payload_too_large", f"{h.payload_len} bytes, limit {max_payload}"
    return "ok", ""


def _limit(max_payload: Optional[int]) -> int:
    if max_payload is None:
        return _U64_MAX
    if not isinstance(max_payload, int) or max_payload < 0:
        raise ValueError(f"max_payload must be a non-negative int or None, not {max_payload!r}")
    return max_payload


def check_header(header: FrameHeader, max_payload: Optional[int] = None) -> str:
    """Validates a header alone, like check_header() in frame.hpp.

    Returns the DecodeError enumerator name: "ok" or the first rule the header breaks.
    """
    return _check(header, _limit(max_payload))[0]


def decode(data, max_payload: Optional[int] = None) -> Tuple[FrameHeader, memoryview]:
    """Decodes one frame from the start of ``data`` (any bytes-like object).

    Returns (header, payload) where payload is a zero-copy memoryview of exactly payload_len
    bytes into ``data``; bytes after the frame are ignored. ``max_payload`` (None: no limit)
    bounds payload_len. Raises FrameError on a frame frame.hpp's decode() rejects.
    """
    limit = _limit(max_payload)
    view = _byte_view(data)
    avail = view.nbytes
    if avail < HEADER_SIZE:
        raise FrameError("truncated_header", f"{avail} of {HEADER_SIZE} bytes")
    h = FrameHeader._make(HEADER.unpack_from(view, 0))
    reason, detail = _check(h, limit)
    if reason != "ok":
        raise FrameError(reason, detail)
    if h.payload_len > avail - HEADER_SIZE:
        raise FrameError("truncated_payload", f"{avail - HEADER_SIZE} of {h.payload_len} payload bytes")
    return h._replace(kind=Kind(h.kind)), view[HEADER_SIZE : HEADER_SIZE + h.payload_len]


def encode(kind, flags: int, payload, seq: int, nhandles: int = 0, aux: int = 0) -> bytes:
    """One frame: the 48-byte header followed by ``payload`` (any bytes-like object).

    Refuses (FrameError, same reasons as decode) to build a frame that decode() would reject,
    and raises ValueError for fields outside their integer width.
    """
    payload = _byte_view(payload)
    for name, value, top in (("kind", kind, 0xFF), ("flags", flags, 0xFF), ("seq", seq, _U64_MAX),
                             ("nhandles", nhandles, _U32_MAX), ("aux", aux, _U32_MAX)):
        if not isinstance(value, int) or not 0 <= value <= top:
            raise ValueError(f"{name} must be an int in [0, {top}], not {value!r}")
    h = FrameHeader(MAGIC, VERSION, int(kind), flags, payload.nbytes, seq, nhandles, aux, bytes(16))
    reason, detail = _check(h, _U64_MAX)
    if reason != "ok":
        raise FrameError(reason, detail)
    return b"".join((HEADER.pack(*h), payload))
