"""Writes the golden pickles for the C++ plain-data codec (runtime/src/pickle.cpp).

    /usr/bin/python3 proto/golden/pickle/generate.py

Good vectors are what CPython's own pickler writes: <name>.p<N>.pkl for protocols 2 to 5
(values holding bytes skip protocol 2, see docs/design/pickle-codec.md), and expected.tsv holds
"<name><TAB><repr(value)>" per value; tests/cpp/test_pickle.cpp decodes every file and compares
Value::repr() with it. Bad vectors, bad_<name>.pkl, must each be refused; bad.tsv holds
"<file><TAB><text the PickleError message must contain>". Rerun after changing the lists below;
the output is deterministic, so unchanged vectors keep their bytes.
"""
import os
import pickle
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

_shared_str = "shared text"
_shared_list = [1, 2, [3]]
_shared_tuple = (_shared_str, 4.5)


def _nested(depth):
    v = []
    for _ in range(depth - 1):
        v = [v]
    return v


GOOD = {
    "none": None,
    "true": True,
    "false": False,
    "int_zero": 0,
    "int_small": [0, 1, 255, 256, 65535, 65536, -1, -255, -256, -65536],
    "int_boundaries": [2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**32, 2**39, -2**39, 2**40, -2**40, 2**55, -2**56],
    "int_max": 2**63 - 1,
    "int_min": -2**63,
    "int_2_31": 2**31,
    "floats": [0.0, -0.0, 1.5, -2.25, 0.1, 1e16, 1e15, 123456789012345678.0, 1e-5, 0.0001, 1e300, -1e-300,
               5e-324, float("inf"), float("-inf")],
    "float_nan": float("nan"),
    "str_empty": "",
    "str_ascii": "hello",
    "str_unicode": "h\u00e9llo w\u00f6rld \u2713 \u65e5\u672c\u8a9e \U0001f600",
    "str_quotes": ["it's", 'say "hi"', "both ' and \"", "tab\tnl\nback\\slash\x00\x7f"],
    "str_255": "b" * 255,
    "str_256": "a" * 256,
    "str_big": "".join(chr(ord("a") + i % 26) for i in range(66000)),
    "bytes_empty": b"",
    "bytes_small": b"\x00\xff'\"\\ok",
    "bytes_all": bytes(range(256)),
    "bytes_300": bytes(i % 251 for i in range(300)),
    "list_empty": [],
    "tuple_empty": (),
    "dict_empty": {},
    "tuples": [(1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), (1, (2, (3, ())))],
    "nested": {"a": [1, (2, 3.5), {"b": None}], "c": ((), [[]], {}), (1, "k"): True, "": [b"raw"]},
    "dict_keys": {None: 1, True: 2, 3: 3, 4.5: 4, "x": 5, b"y": 6, (1, "z", (None,)): 7, -2**63: 8},
    "memo_shared": [_shared_str, _shared_str, _shared_list, _shared_list, (_shared_list, _shared_str),
                    {"k": _shared_list, "t": _shared_tuple}, _shared_tuple],
    "list_batches": list(range(2500)),
    "dict_batches": {f"k{i}": i for i in range(1500)},
    "deep_50": _nested(50),
}


def _bad_pickles():
    import os as _os

    class Evil:
        def __reduce__(self):
            return (_os.system, ("echo pwned",))

    rec_list = []
    rec_list.append(rec_list)
    rec_dict = {}
    rec_dict["self"] = rec_dict
    inner = []
    rec_tuple = (inner,)
    inner.append(rec_tuple)

    # An exponential DAG: each tuple holds the previous one twice, 64 levels deep, in 400 bytes.
    blowup = b"\x80\x02)q\x000"
    for i in range(64):
        blowup += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
    blowup += b"h\x40."

    return [
        ("os_system_p2", pickle.dumps(_os.system, 2), "GLOBAL"),
        ("os_system_p4", pickle.dumps(_os.system, 4), "STACK_GLOBAL"),
        ("reduce_evil_p2", pickle.dumps(Evil(), 2), "GLOBAL"),
        ("reduce_evil_p5", pickle.dumps(Evil(), 5), "STACK_GLOBAL"),
        ("reduce", b"\x80\x02N)R.", "REDUCE"),
        ("build", b"\x80\x02}}b.", "BUILD"),
        ("newobj", b"\x80\x02N)\x81.", "NEWOBJ"),
        ("newobj_ex", b"\x80\x04N)}\x92.", "NEWOBJ_EX"),
        ("inst", b"(ios\nsystem\n.", "INST"),
        ("obj", b"\x80\x02(No.", "OBJ"),
        ("persid", b"\x80\x02X\x01\x00\x00\x00xQ.", "BINPERSID"),
        ("ext1", b"\x80\x02\x82\x01.", "EXT1"),
        ("set", pickle.dumps({1, 2}, 4), "EMPTY_SET"),
        ("frozenset", pickle.dumps(frozenset([1]), 4), "FROZENSET"),
        ("bytearray", pickle.dumps(bytearray(b"ab"), 5), "BYTEARRAY8"),
        ("next_buffer", b"\x80\x05\x97.", "NEXT_BUFFER"),
        ("bytes_p2", pickle.dumps(b"abc", 2), "GLOBAL"),
        ("text_int_p0", pickle.dumps(1, 0), "INT"),
        ("int_2_64", pickle.dumps(2**64, 4), "does not fit"),
        ("int_2_63", pickle.dumps(2**63, 2), "does not fit"),
        ("int_neg_2_63_minus_1", pickle.dumps(-2**63 - 1, 3), "does not fit"),
        ("long4_negative_length", b"\x80\x02\x8b\xff\xff\xff\xff.", "negative length"),
        ("truncated_str", pickle.dumps("hello world", 3)[:-4], "truncated"),
        ("truncated_binint", b"\x80\x02J\x01\x00", "truncated"),
        ("missing_stop", pickle.dumps([1, 2], 2)[:-1], "missing STOP"),
        ("empty", b"", "missing STOP"),
        ("trailing", pickle.dumps(1, 2) + b"N", "trailing"),
        ("huge_length", b"\x80\x04\x8d" + struct.pack("<Q", 2**63) + b".", "truncated"),
        ("frame_too_long", b"\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00N.", "truncated"),
        ("protocol_6", b"\x80\x06N.", "unsupported pickle protocol"),
        ("recursive_list", pickle.dumps(rec_list, 2), "recursive"),
        ("recursive_dict", pickle.dumps(rec_dict, 4), "recursive"),
        ("recursive_tuple", pickle.dumps(rec_tuple, 5), "recursive"),
        ("memo_blowup", blowup, "decoded size exceeds"),
        ("deep_200", pickle.dumps(_nested(200), 4), "nesting deeper"),
        ("memo_missing", b"\x80\x02h\x05.", "never stored"),
        ("stack_underflow", b"\x80\x02a.", "stack underflow"),
        ("append_to_dict", b"\x80\x02}Na.", "expects a list"),
        ("two_values", b"\x80\x02NN.", "not one"),
        ("open_mark", b"\x80\x02(N.", "MARK is still open"),
        ("bad_utf8", b"\x80\x04\x8c\x01\xff.", "UTF-8"),
        ("surrogate", pickle.dumps("\ud800", 4), "UTF-8"),
        ("unhashable_key", b"\x80\x02}]Ns.", "unhashable"),
        ("unhashable_tuple_key", b"\x80\x02}]\x85Ns.", "unhashable"),
        ("duplicate_key", b"\x80\x02}(K\x01NG?\xf0\x00\x00\x00\x00\x00\x00Nu.", "repeats"),
        ("unknown_opcode", b"\x80\x02\xff.", "not a pickle opcode"),
    ]


def _holds_bytes(v):
    if isinstance(v, bytes):
        return True
    if isinstance(v, dict):
        return any(_holds_bytes(k) or _holds_bytes(x) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return any(_holds_bytes(x) for x in v)
    return False


def main():
    for name in os.listdir(HERE):
        if name.endswith((".pkl", ".tsv")):
            os.remove(os.path.join(HERE, name))
    with open(os.path.join(HERE, "expected.tsv"), "w", encoding="utf-8", newline="\n") as manifest:
        for name, value in GOOD.items():
            text = repr(value)
            assert "\t" not in text and "\n" not in text, name
            manifest.write(f"{name}\t{text}\n")
            has_bytes = _holds_bytes(value)
            for protocol in range(2, 6):
                if protocol == 2 and has_bytes:
                    continue
                data = pickle.dumps(value, protocol)
                assert repr(pickle.loads(data)) == text, name
                with open(os.path.join(HERE, f"{name}.p{protocol}.pkl"), "wb") as f:
                    f.write(data)
    with open(os.path.join(HERE, "bad.tsv"), "w", encoding="utf-8", newline="\n") as manifest:
        for name, data, message in _bad_pickles():
            with open(os.path.join(HERE, f"bad_{name}.pkl"), "wb") as f:
                f.write(data)
            manifest.write(f"bad_{name}.pkl\t{message}\n")


if __name__ == "__main__":
    main()
