"""Writes the seed corpora of the ring, control and task_record fuzz targets (tests/fuzz/corpus/).

    /usr/bin/python3 tests/fuzz/make_seeds.py

The layouts are the ones the targets' header comments describe; the seeds are valid inputs (a
ring with frames and their handles, control messages, records as CPython's pickler writes them)
from which libFuzzer mutates. Regression inputs for fixed findings sit next to them, named
regress-*, and are not written here.
"""
import os
import pickle
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
MAGIC, VERSION, HEADER = 0x31465052, 1, 48
PACKET_MAGIC = 0x44465052


def header(kind, flags, payload_len, seq, nhandles, aux=0):
    return struct.pack("<IHBBQQII16x", MAGIC, VERSION, kind, flags, payload_len, seq, nhandles, aux)


def record(kind, flags, payload, seq, nhandles=0):
    rec = header(kind, flags, len(payload), seq, nhandles) + payload
    return rec + b"\0" * (-len(rec) % 8)


def ring_seed(shape, records, packets=(), head=0, max_take=3, control_extra=None):
    """shape bits as fuzz_ring.cpp; records back to back from `head`; packets: (seq, nfds, kinds, pages)."""
    data = b"".join(records)
    tail = head + len(data)
    out = bytes([shape, max_take, len(packets)])
    for seq, nfds, kinds, pages in packets:
        out += struct.pack("<QBBBBBBBB", seq, 0, 1, nfds, nfds, kinds, pages, 0, 0)
    out += b"\0" * 64
    ctl = bytearray(512)
    struct.pack_into("<QQQ", ctl, 0, tail, len(records) + 1, len(records))  # tail, next_seq, committed
    struct.pack_into("<QQQ", ctl, 64, head, 0, head)  # head, consumed, tail_cache
    if control_extra:
        for off, fmt, value in control_extra:
            struct.pack_into(fmt, ctl, off, value)
    out += bytes(ctl)
    cap = 4096 << (shape & 3)
    area = bytearray(cap)
    for i, b in enumerate(data):
        area[(head + i) % cap] = b
    return out + bytes(area).rstrip(b"\0")


def write(sub, name, blob):
    with open(os.path.join(HERE, "corpus", sub, name), "wb") as f:
        f.write(blob)


def ring_seeds():
    sealed = 4
    write("ring", "empty", ring_seed(sealed, []))
    write("ring", "one_frame", ring_seed(sealed, [record(1, 0, b"hello", 1)]))
    write("ring", "three_frames", ring_seed(sealed | 1, [record(1, 0, bytes(range(40)), 1),
                                                          record(1, 4, b"raw", 2), record(1, 0, b"", 3)]))
    write("ring", "with_handles", ring_seed(sealed, [record(1, 0, b"x", 1, nhandles=2), record(1, 0, b"y", 2)],
                                            packets=[(1, 2, 0, 1)]))
    oob = struct.pack("<QQ", 5000, 0)
    write("ring", "out_of_band", ring_seed(sealed, [record(1, 1, oob, 1, nhandles=1)], packets=[(1, 1, 1, 2)]))
    write("ring", "orphan_packet", ring_seed(sealed, [record(1, 0, b"z", 2, nhandles=1)],
                                             packets=[(1, 1, 0, 1), (2, 1, 0, 1)]))
    # A frame that wraps around the end of a one-page data area (read through the mirror).
    write("ring", "wraps", ring_seed(sealed, [record(1, 0, b"w" * 100, 7)], head=4096 - 64))
    write("ring", "count_items", ring_seed(sealed | 32, [record(1, 0, b"c", 1)],
                                           control_extra=[(448 - 192, "<q", 1)]))
    write("ring", "unsealed", ring_seed(0, [record(1, 0, b"u", 1)]))


def control_seeds():
    def structured(kind, seq, aux, payload, nfds=0, blocking=False):
        body = struct.pack("<BQI", kind, seq, aux) + payload
        return bytes([nfds | (8 if blocking else 0)]) + struct.pack("<H", len(body)) + body

    def raw(msg, nfds=0):
        return bytes([4 | nfds]) + struct.pack("<H", len(msg)) + msg

    write("control", "hello", bytes([0]) + structured(2, 1, 0, b"config"))
    write("control", "process_fds", bytes([1]) + structured(7, 2, 3, b"\x80\x05N.", nfds=2)
          + structured(8, 3, 0, b"", blocking=True))
    write("control", "raw_frames", bytes([2]) + raw(header(1, 0, 4, 9, 1) + b"abcd", nfds=1)
          + raw(header(10, 0, 0, 10, 0)) + raw(b""))
    write("control", "raw_short", bytes([0]) + raw(header(1, 0, 8, 1, 0) + b"abc"))


def task_record_seeds():
    # As a worker's CPython pickler writes (wid, tid, status, value, elapsed): FRAME and MEMOIZE.
    records = {
        "ok_list": (0, 5, 0, [1, "two", 3.0, None, True], 0.25),
        "ok_dict": (1, 2**40, 0, {"a": (1, 2), "b": b"\x00\xff"}, 1e-6),
        "ok_int": (3, 7, 0, 12345, 0.0),
        "err": (2, 9, 1, ("ValueError", "bad", "Traceback (most recent call last):\n"), 0.5),
        "pong": (0, None, 3, None, 0.0),
        "shared": (0, 1, 0, [[1, 2]] * 3, 0.1),
    }
    for name, rec in records.items():
        write("task_record", name, pickle.dumps(rec, protocol=5))


if __name__ == "__main__":
    ring_seeds()
    control_seeds()
    task_record_seeds()
