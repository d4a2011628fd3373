"""The C++ plain-data pickle codec (runtime/src/pickle.cpp) against CPython's pickle.

_core._pickle_roundtrip decodes with the C++ decoder and re-encodes with the C++ encoder, so
`pickle.loads(_pickle_roundtrip(pickle.dumps(v, p), q)) == v` checks both directions against
CPython at once. Equality is checked with exact types (bool is not int, tuple is not list).
"""
import math
import os
import pickle
import random

import pytest

from ringpool import _core

roundtrip = _core._pickle_roundtrip

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
PROTOCOLS = [2, 3, 4, 5]


def same(a, b):
    """== with exact types all the way down, and floats by identity of value (NaN, -0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b) or (a != a and b != b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(same(ka, kb) and same(va, vb)
                                        for (ka, va), (kb, vb) in zip(a.items(), b.items()))
    return a == b


def random_int(rng):
    kind = rng.randrange(5)
    if kind == 0:
        return rng.choice([0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, -2**31, -2**31 - 1,
                           INT64_MAX, INT64_MIN, 2**32, -2**32])
    if kind == 1:
        return rng.randrange(-300, 70000)
    bits = rng.randrange(1, 64)
    return rng.randrange(-2**bits, 2**bits)


def random_float(rng):
    return rng.choice([0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 5e-324, 1e308,
                       rng.random(), rng.uniform(-1e20, 1e20), rng.gauss(0, 1e-10)])


ALPHABET = "abcXYZ019 '\"\\\t\n\x00\x7f\u00e9\u00a0\u2713\u65e5\U0001f600"


def random_str(rng):
    n = rng.choice([0, 1, 5, 40, 255, 256, 300])
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def random_bytes(rng):
    return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 255, 256, 300])))


def random_key(rng, with_bytes, depth):
    kind = rng.randrange(7 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return random_int(rng)
    if kind == 3:
        return rng.uniform(-1e6, 1e6)
    if kind == 4 or (kind == 5 and not with_bytes):
        return random_str(rng)
    if kind == 5:
        return random_bytes(rng)
    return tuple(random_key(rng, with_bytes, depth + 1) for _ in range(rng.randrange(4)))


def random_value(rng, with_bytes, depth=0):
    kinds = ["none", "bool", "int", "float", "str"] + (["bytes"] if with_bytes else [])
    if depth < 4:
        kinds += ["list", "tuple", "dict"] * 2
    kind = rng.choice(kinds)
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return random_int(rng)
    if kind == "float":
        return random_float(rng)
    if kind == "str":
        return random_str(rng)
    if kind == "bytes":
        return random_bytes(rng)
    n = rng.choice([0, 1, 2, 3, 4, 6])
    if kind == "list":
        return [random_value(rng, with_bytes, depth + 1) for _ in range(n)]
    if kind == "tuple":
        return tuple(random_value(rng, with_bytes, depth + 1) for _ in range(n))
    d = {}
    for _ in range(n):
        # Python merges equal keys (1, 1.0, True) on insertion: the dict stays valid.
        d[random_key(rng, with_bytes, depth + 1)] = random_value(rng, with_bytes, depth + 1)
    return d


def with_sharing(rng, v):
    """Puts the same subobject in several places, so that CPython writes memo references."""
    if isinstance(v, (list, tuple, str, bytes)) and rng.random() < 0.3:
        return [v, (v, v), {"again": v}]
    return v


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_random_values_round_trip_through_cpp(protocol):
    rng = random.Random(5000 + protocol)
    with_bytes = protocol >= 3  # bytes at protocol 2 are a REDUCE, which the decoder refuses
    for i in range(1000):
        v = with_sharing(rng, random_value(rng, with_bytes))
        data = pickle.dumps(v, protocol)
        for out_protocol in (protocol, rng.choice(PROTOCOLS[1:])):
            got = pickle.loads(roundtrip(data, out_protocol))
            assert same(got, v), (i, v, got)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ints_are_written_byte_for_byte_like_cpython(protocol):
    # An int involves neither the memo nor (below 4 bytes of frame) framing, so the encoding
    # must be CPython's exactly; protocols 4 and 5 frame the longer ones, so compare 2 and 3.
    rng = random.Random(7)
    values = [0, 255, 256, 65535, 65536, -1, 2**31 - 1, 2**31, -2**31, -2**31 - 1, INT64_MAX, INT64_MIN]
    values += [random_int(rng) for _ in range(500)]
    for v in values:
        out = roundtrip(pickle.dumps(v, protocol), min(protocol, 3))
        assert out == pickle.dumps(v, min(protocol, 3)), v


def test_bytes_at_protocol_2_are_refused_both_ways():
    with pytest.raises(ValueError, match="GLOBAL"):
        roundtrip(pickle.dumps(b"abc", 2))
    with pytest.raises(ValueError, match="protocol 3"):
        roundtrip(pickle.dumps(b"abc", 3), 2)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should never run",))


@pytest.mark.parametrize("protocol", [0, 1] + PROTOCOLS)
@pytest.mark.parametrize("obj, opcode", [
    (os.system, "GLOBAL"),
    (_Evil(), "GLOBAL"),
    ({1, 2}, "SET|GLOBAL"),
    (frozenset({1}), "FROZENSET|GLOBAL"),
    (bytearray(b"x"), "BYTEARRAY8|GLOBAL"),
    (2**64, "does not fit|LONG|INT"),
    (-2**63 - 1, "does not fit|LONG|INT"),
    (range(3), "GLOBAL"),
    (complex(1, 2), "GLOBAL"),
])
def test_unsafe_or_unsupported_pickles_raise_value_error(obj, opcode, protocol):
    with pytest.raises(ValueError, match=opcode):
        roundtrip(pickle.dumps(obj, protocol))


def test_recursive_and_malformed_pickles_raise_value_error():
    lst = []
    lst.append(lst)
    d = {}
    d["d"] = d
    data = pickle.dumps([1, "two", (3.0,)], 3)  # unframed: a cut shows as a missing STOP
    cases = [
        (pickle.dumps(lst, 2), "recursive"),
        (pickle.dumps(d, 5), "recursive"),
        (data[:-1], "missing STOP"),
        (data + b".", "trailing"),
        (data[:len(data) // 2], "truncated|missing STOP"),
        (pickle.dumps("\ud800", 4), "UTF-8"),
        (b"", "missing STOP"),
    ]
    for blob, message in cases:
        with pytest.raises(ValueError, match=message):
            roundtrip(blob)


def test_every_truncation_is_refused():
    data = pickle.dumps({"k": [1, 2.5, b"xy", ("s" * 300, None)], 7: INT64_MIN}, 5)
    for n in range(len(data)):
        with pytest.raises(ValueError):
            roundtrip(data[:n])
