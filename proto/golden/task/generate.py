"""Writes the golden task records (proto/include/ringpool/proto/task.hpp; docs/design/protocol.md,
"Task records"):

    /usr/bin/python3 proto/golden/task/generate.py

One <name>.pkl per record: the frame payload, a pickle of the record tuple, byte for byte as its
writer puts it on the wire. The bytes are spelled here from the opcodes (struct), not by the code
under test; the op and status numbers are read from task.hpp, their one home. manifest.tsv has a
line per record:

    <name> TAB <call|result> TAB <writer> TAB <field 0> TAB ... TAB <field 4>

writer: "pool" (the C++ ringpool::Pool writes it: tests/cpp/test_task.cpp re-encodes it and
compares the bytes), "worker" (the Python worker loop, executor._serve, writes it: the C++ pool
reads it; tests/python/test_task_records.py re-encodes it), "executor" (only ringpool.Executor
writes it; both sides decode it). The two encoders differ only in how a list or dict of one item
(or of more than 1000) is batched (see _batches); every reader takes both. A field is the
repr() of its value, except a call's op and a result's status, which are given by name (CALL, OK).
The output is deterministic: rerun after changing the lists below and commit the .pkl files and
manifest.tsv together.
"""
import math
import os
import pickle
import re
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
TASK_HPP = os.path.join(HERE, "..", "..", "include", "ringpool", "proto", "task.hpp")


def _enum(src, name):
    body = src.split(f"enum class {name}")[1].split("};")[0]
    return {k: int(v) for k, v in re.findall(r"^\s*([A-Z_]+) = (\d+),", body, re.M)}


_SRC = open(TASK_HPP, encoding="utf-8").read()
OPS = _enum(_SRC, "Op")
STATUSES = _enum(_SRC, "Status")
SINGLE = int(re.search(r"kSingle = (\d+);", _SRC).group(1))


# -- the plain-data opcodes (pickle protocol 5, no memo), as ringpool's encoders write them ------
def _int(v):
    if 0 <= v < 0x100:
        return b"K" + struct.pack("<B", v)
    if 0 <= v < 0x10000:
        return b"M" + struct.pack("<H", v)
    if -2**31 <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    n = 5
    while not -(1 << (8 * n - 1)) <= v < (1 << (8 * n - 1)):
        n += 1
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


def _sized(short, long, data):
    if len(data) < 0x100:
        return short + bytes([len(data)]) + data
    return long + struct.pack("<I", len(data)) + data


def _batches(items, cpython):
    """A list's or dict's items after its EMPTY_ opcode, as (MARK or nothing, items, closing op):
    the C++ codec writes them as CPython does (batches of 1000, MARK ... APPENDS/SETITEMS, a batch
    of one as APPEND/SETITEM); ringpool's plain-data encoder (the Python side) writes one
    MARK ... APPENDS/SETITEMS for any number of items."""
    if not items:
        return []
    if not cpython:
        return [(b"(", items, True)]
    out = []
    for i in range(0, len(items), 1000):
        batch = items[i:i + 1000]
        out.append((b"(" if len(batch) > 1 else b"", batch, len(batch) > 1))
    return out


def ops(v, cpython):
    """The opcodes that push v (plain data only), as the C++ codec (cpython=True) or ringpool's
    plain-data encoder writes them."""
    if v is None:
        return b"N"
    if v is True or v is False:
        return b"\x88" if v else b"\x89"
    if type(v) is int:
        return _int(v)
    if type(v) is float:
        return b"G" + struct.pack(">d", v)
    if type(v) is str:
        return _sized(b"\x8c", b"X", v.encode("utf-8"))
    if type(v) is bytes:
        return _sized(b"C", b"B", v)
    if type(v) is tuple:
        if not v:
            return b")"
        inner = b"".join(ops(x, cpython) for x in v)
        return inner + bytes([0x85 + len(v) - 1]) if len(v) <= 3 else b"(" + inner + b"t"
    if type(v) is list:
        return b"]" + b"".join(mark + b"".join(ops(x, cpython) for x in batch) + (b"e" if many else b"a")
                               for mark, batch, many in _batches(v, cpython))
    if type(v) is dict:
        return b"}" + b"".join(mark + b"".join(ops(k, cpython) + ops(x, cpython) for k, x in batch)
                               + (b"u" if many else b"s")
                               for mark, batch, many in _batches(list(v.items()), cpython))
    raise TypeError(type(v))


def record(fields, writer):
    """A record as its writer puts it on the wire: PROTO 5, MARK, the five fields, TUPLE, STOP."""
    return b"\x80\x05(" + b"".join(ops(f, writer == "pool") for f in fields) + b"t."


def _nested(depth):
    v = [1]
    for _ in range(depth - 1):
        v = [v]
    return v


_TB = "Traceback (most recent call last):\n  File \"<task>\", line 1, in <module>\nValueError: bad\n"

# (name, writer, op, tid, fn, args, kwargs): the functions are real, so that
# tests/python/test_task_records.py can run the records through the worker loop.
CALLS = [
    ("call_args", "pool", "CALL", 1, "operator:add", (2, 3), None),
    ("call_kwargs", "pool", "CALL", 2, "builtins:int", ("ff",), {"base": 16}),
    ("call_no_args", "pool", "CALL", 3, "builtins:tuple", (), None),
    ("call_big_tid", "pool", "CALL", 2**40 + 5, "builtins:abs", (-7,), None),
    ("call_many_args", "pool", "CALL", 4, "builtins:max", (3, 1.5, 9, -2, 7), None),
    ("run_tuples", "pool", "RUN", 10, "operator:mul", [(1, 2), (3, 4), (5, 6)], None),
    ("run_single", "pool", "RUN", 20, "builtins:len", ["a", "bb", b"ccc"], SINGLE),
    ("ping", "pool", "PING", None, None, None, None),
    ("stop", "pool", "STOP", None, None, None, None),
    ("chunk_single", "executor", "CHUNK", 30, "builtins:abs", [-1, -2, 3], SINGLE),
    ("chunk_tuples", "executor", "CHUNK", 40, "builtins:pow", [(2, 3), (3, 2)], None),
]

# (name, writer, wid, tid, status, value, elapsed)
RESULTS = [
    ("ok_int", "worker", 1, 1, "OK", 5, 0.25),
    ("ok_none", "worker", 1, 3, "OK", None, 0.5),
    ("ok_value", "worker", 2, 10, "OK", {"k": [1, 2.5, "x", b"y", (True, None)], "": ()}, 1.5e-06),
    ("ok_big", "worker", 3, 2**40 + 5, "OK", -2**40, 0.125),
    ("ok_text", "worker", 3, 300, "OK", "caf\u00e9 " * 80, 2.0),
    ("ok_one_item", "worker", 3, 301, "OK", {"only": [1]}, 0.375),  # MARK ... SETITEMS, APPENDS
    ("err", "worker", 1, 2, "ERR", ("ValueError", "bad", _TB), 0.0625),
    ("err_no_tid", "worker", 1, None, "ERR", ("ModuleNotFoundError", "No module named 'nowhere'", _TB), 0.0),
    ("started", "worker", 4, 7, "STARTED", None, 0.0),
    ("pong", "worker", 4, None, "PONG", None, 0.0),
    ("init_failed", "worker", 5, None, "INIT_FAILED", ("RuntimeError", "boom", _TB), 0.0),
    # Nested deeper than ringpool's plain-data encoder goes (8): the worker's pickle module writes
    # it, with FRAME and MEMOIZE; the C++ reader takes those too.
    ("ok_deep", "worker", 6, 50, "OK", _nested(10), 0.75),
    ("died", "executor", 3, None, "DIED", None, 0.0),
]


def main():
    for name in os.listdir(HERE):
        if name.endswith((".pkl", ".tsv")):
            os.remove(os.path.join(HERE, name))
    lines = []
    for name, writer, op, tid, fn, args, kwargs in CALLS:
        fields = (OPS[op], tid, fn, args, kwargs)
        data = record(fields, writer)
        assert pickle.loads(data) == fields, name
        lines.append((name, "call", writer, op, repr(tid), repr(fn), repr(args), repr(kwargs), data))
    for name, writer, wid, tid, status, value, elapsed in RESULTS:
        fields = (wid, tid, STATUSES[status], value, elapsed)
        if name == "ok_deep":
            data = pickle.dumps(fields, 5)  # what the worker's pickle module writes
            assert b"\x95" in data[:3] and b"\x94" in data, "expected FRAME and MEMOIZE"
        else:
            data = record(fields, writer)
        assert pickle.loads(data) == fields, name
        assert not math.isnan(elapsed)
        lines.append((name, "result", writer, repr(wid), repr(tid), status, repr(value), repr(elapsed), data))
    with open(os.path.join(HERE, "manifest.tsv"), "w", encoding="utf-8", newline="\n") as manifest:
        for *cols, data in lines:
            assert not any("\t" in c or "\n" in c for c in cols), cols[0]
            manifest.write("\t".join(cols) + "\n")
            with open(os.path.join(HERE, cols[0] + ".pkl"), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
