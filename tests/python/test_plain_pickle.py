"""The plain-data fast path of the channel codec (bindings/src/plain_pickle.cpp).

Queues pickle None/bool/int/float/str/bytes/tuple/list/dict without a Pickler and unpickle the
pickle subset CPython writes for such data without an Unpickler; anything else is declined and
the pickle module does the work. These tests hold the fast path to the pickle module:

- what it writes, pickle.loads reads back as an equal object of the same types;
- what it reads, it reads exactly as pickle.loads does (same value, same types, same sharing of
  lists and dicts), or it declines;
- on damaged bytes it declines whenever pickle.loads fails, and never crashes or reads outside
  the data (random mutations of valid pickles).
"""
from __future__ import annotations

import math
import pickle
import pickletools
import random

import pytest

import ringpool
from ringpool import _core

plain_dumps, plain_loads = _core._plain_dumps, _core._plain_loads

INT_EDGES = [0, 1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, -1, -2**31, -2**31 - 1, 2**32,
             2**39, -2**39 - 1, 2**47, -2**55, 2**63 - 1, -2**63, 127, 128, -128, -129, 32767,
             -32768, 8388607, -8388608]
FLOATS = [0.0, -0.0, 1.5, -3.25e-300, 1e308, math.inf, -math.inf, math.nan, 3.14]
STRS = ["", "a", "abcdefgh" * 4, "é", "日本語", "\U0001f600", "x" * 255, "y" * 256, "z" * 70000]
BYTES = [b"", b"\x00", bytes(range(256)), b"q" * 255, b"r" * 256, b"s" * 100000]


def same(a, b, seen=None):
    """Equal, with the same exact types all the way down (nan equal to nan, -0.0 apart from
    0.0), and the same sharing: a container reached twice in a is reached twice in b."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if not isinstance(a, (tuple, list, dict)):
        return a == b
    seen = {} if seen is None else seen
    if id(a) in seen:
        return seen[id(a)] is b
    seen[id(a)] = b
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k], seen) for k in a)
    return len(a) == len(b) and all(same(x, y, seen) for x, y in zip(a, b))


def random_plain(rng, depth=3):
    kind = rng.randrange(11 if depth else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice(INT_EDGES) + rng.choice([0, 0, 1, -1])
    if kind == 2:
        return rng.choice(FLOATS)
    if kind == 3:
        return rng.choice(STRS[:-1])
    if kind == 4:
        return rng.choice(BYTES[:-1])
    if kind == 5:
        return rng.randrange(-10**6, 10**6)
    n = rng.choice([0, 1, 2, 3, 4, 5, 17])
    items = [random_plain(rng, depth - 1) for _ in range(n)]
    if kind in (6, 7):
        return tuple(items)
    if kind in (8, 9):
        return items
    keys = [rng.choice([rng.randrange(100), rng.choice(STRS[:5]), (1, "k"), 2.5, None, b"kb"]) for _ in range(n)]
    return dict(zip(keys, items))


# -- writing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("obj", [None, True, False] + INT_EDGES + FLOATS + STRS + BYTES
                         + [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), [], [1], {}, {"a": 1}])
def test_scalars_and_small_containers_round_trip_through_pickle(obj):
    data = plain_dumps(obj)
    assert data is not None, obj
    assert same(pickle.loads(data), obj)
    ok, back = plain_loads(data)
    assert ok and same(back, obj)


def test_random_plain_objects_round_trip():
    rng = random.Random(1234)
    for _ in range(3000):
        obj = random_plain(rng)
        data = plain_dumps(obj)
        if data is None:  # only when a list or dict is reached twice, or the nesting is deep
            continue
        assert same(pickle.loads(data), obj), obj
        ok, back = plain_loads(data)
        assert ok and same(back, obj), obj


def test_the_queue_message_of_the_benchmark_is_written_by_the_fast_path():
    msg = (123456, 3.14, "abcdefgh" * 4)
    data = plain_dumps(msg)
    assert data is not None and pickle.loads(data) == msg
    assert _core.dumps(msg)[0] == data  # the channel codec uses it


@pytest.mark.parametrize("obj", [
    2**63, -2**63 - 1, 10**40,                 # beyond int64
    "\ud800",                                  # a lone surrogate (pickle writes it surrogatepass)
    {1, 2}, frozenset(), 1j, bytearray(b"x"),  # types outside the subset
    ((((((((((1,),),),),),),),),),),          # nested deeper than the fast path goes
])
def test_what_the_fast_path_declines_the_codec_still_pickles(obj):
    assert plain_dumps(obj) is None
    payload, flags, fds = _core.dumps(obj)
    assert flags == 0 and not fds
    assert pickle.loads(payload) == obj


def test_subclasses_of_plain_types_are_declined():
    class MyInt(int):
        pass

    class MyStr(str):
        pass

    class MyDict(dict):
        pass

    for obj in (MyInt(3), MyStr("s"), MyDict(a=1), (1, MyInt(2)), [MyStr("x")]):
        assert plain_dumps(obj) is None, obj


def test_a_list_reached_twice_is_declined_and_stays_one_list():
    shared = [1, 2]
    obj = (shared, shared, {"k": shared})
    assert plain_dumps(obj) is None
    back = pickle.loads(_core.dumps(obj)[0])
    assert back[0] is back[1] is back[2]["k"]
    ok, fast = plain_loads(pickle.dumps(obj, 5))  # the memo is read, sharing kept
    assert ok and fast[0] is fast[1] is fast[2]["k"] and fast == obj


def test_shared_immutables_are_fine():
    s = "shared" * 10
    data = plain_dumps((s, s, (1, 2), (1, 2)))
    assert pickle.loads(data) == (s, s, (1, 2), (1, 2))


# -- reading ------------------------------------------------------------------------------------

def test_reads_what_cpython_writes_at_every_protocol():
    rng = random.Random(99)
    for _ in range(2000):
        obj = random_plain(rng)
        for protocol in (2, 3, 4, 5):
            data = pickle.dumps(obj, protocol)
            ok, back = plain_loads(data)
            # (protocol 2 writes bytes as a codecs.encode call: declined, rightly)
            if protocol > 2 and all(abs(i) < 2**63 for i in _ints(obj)):
                assert ok, (protocol, obj, data)
            if ok:
                assert same(back, pickle.loads(data)), (protocol, obj)


def _ints(obj):
    if type(obj) is int:
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _ints(x)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _ints(k)
            yield from _ints(v)


def test_reads_memo_references():
    shared = {"a": [1]}
    data = pickle.dumps([shared, shared], 2)  # BINPUT/BINGET
    ok, back = plain_loads(data)
    assert ok and back[0] is back[1] and back == [shared, shared]


def test_a_self_referencing_list_reads_as_pickle_reads_it():
    lst = []
    lst.append(lst)
    data = pickle.dumps(lst, 5)
    ok, back = plain_loads(data)
    assert ok and back[0] is back


@pytest.mark.parametrize("data", [
    pickle.dumps(ringpool.Queue, 5),        # GLOBAL
    pickle.dumps({1, 2}, 5),                # sets
    pickle.dumps(2**100, 5),                # LONG1 wider than int64
    pickle.dumps(1, 0), pickle.dumps("s", 0),  # text forms
    b"", b".", b"\x80\x06N.", b"N", b"NN.", b"(N.", b"K",
    b"\x80\x05\x95\xff\x00\x00\x00\x00\x00\x00\x00N.",   # a frame longer than the data
    b"]N\x85e.", b"}N.u.", b"(Ku.", b"}(]Ku.",             # malformed APPENDS/SETITEMS, unhashable key
    b"h\x00.", b"\x94.", b"X\xff\xff\xff\x7fabc.",
])
def test_declines_what_it_does_not_read(data):
    ok, back = plain_loads(data)
    assert not ok and back is None


# Opcodes that import or call: pickle.loads must not run them on random bytes.
_CALLS = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD",
          "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}


def _safe_for_pickle(data):
    """Whether pickle.loads may be run on the bytes: no opcode before the first error or STOP
    (pickle.loads stops there too) imports or calls anything, and none puts to a memo index so
    large that pickle.loads would spend seconds and gigabytes growing its table (the fast path
    declines those at once)."""
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            if opcode.name in _CALLS:
                return False
            if opcode.name in ("BINPUT", "LONG_BINPUT", "PUT") and int(arg) > 1 << 16:
                return False
    except Exception:  # noqa: BLE001 - damaged bytes: pickle.loads fails at the same place
        pass
    return True


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # protocol-0 STRING escapes
def test_damaged_pickles_are_declined_whenever_pickle_fails():
    rng = random.Random(7)
    seeds = [pickle.dumps(random_plain(rng), rng.choice([3, 4, 5])) for _ in range(300)]
    seeds += [plain_dumps(random_plain(rng)) or b"N." for _ in range(300)]
    checked = 0
    for _ in range(20000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            how = rng.randrange(4)
            pos = rng.randrange(len(data) + 1)
            if how == 0 and data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif how == 1:
                del data[pos:pos + rng.randint(1, 8)]
            elif how == 2:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            else:
                data = data[:pos]
        data = bytes(data)
        ok, back = plain_loads(data)
        if not _safe_for_pickle(data):
            assert not ok, data
            continue
        try:
            expected = pickle.loads(data)
        except Exception:  # noqa: BLE001 - any failure of pickle must be a decline here
            assert not ok, data
            continue
        if ok:
            checked += 1
            assert same(back, expected), data
    assert checked > 1000  # the mutations left many readable pickles to compare


# -- through a queue ----------------------------------------------------------------------------

def test_queue_put_many_get_many_mixes_fast_and_general_objects():
    q = ringpool.Queue()
    shared = [0]
    objs = [(1, 2.5, "s"), 2**70, {1, 2}, [shared, shared], "\ud800", b"b" * 300, None, {"k": (1,)}]
    q.put_many(objs * 40)
    got = []
    while len(got) < len(objs) * 40:
        got += q.get_many(64, timeout=5)
    assert got == objs * 40
    assert all(g[0] is g[1] for g in got[3::len(objs)])


# -- Channel.put_plain: a C++ Pool worker's answers ---------------------------------------------

def test_put_plain_publishes_what_the_fast_path_writes_and_declines_the_rest_untouched():
    ch = _core.Channel.create(1 << 16)
    shared = [0]
    for obj in [None, (1, "s", 2.5, b"b"), {"k": [1, (2,)]}, -2**63]:
        assert ch.put_plain(obj) is None
        assert ch.get_obj(5) == obj
    # Declined: not plain (a set, an int beyond int64, a lone surrogate, a bytearray) or plain but
    # beyond the fast path (a list reached twice): nothing published, NotImplemented returned.
    for obj in [{1, 2}, 2**70, "\ud800", bytearray(b"x"), [shared, shared]]:
        assert ch.put_plain(obj) is NotImplemented
        assert not ch.readable()
    assert ch.put_plain(7) is None and ch.get_obj(5) == 7
