"""Tests for bindings/ringpool/_proto.py, the pure-Python mirror of proto/.../frame.hpp.

The module is loaded by file path so these tests depend neither on the ringpool package
__init__ nor on the compiled extension.
"""
import importlib.util
import json
import pathlib
import pickle
import random
import re
import struct
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "proto" / "golden"
FRAME_HPP = ROOT / "proto" / "include" / "ringpool" / "proto" / "frame.hpp"


def _load():
    name = "_ringpool_proto_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "bindings" / "ringpool" / "_proto.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # enum and pickle look classes up by module name
    spec.loader.exec_module(module)
    return module


P = _load()
RAW = struct.Struct("<IHBBQQII16s")  # the header, spelled independently of the module
MANIFEST = json.loads((GOLDEN / "vectors.json").read_text())
OK = [e for e in MANIFEST if e["expect"] == "ok"]


def raw_frame(kind=1, flags=0, payload=b"", seq=1, nhandles=0, aux=0, magic=0x31465052, version=1,
              reserved=bytes(16), length=None):
    n = len(payload) if length is None else length
    return RAW.pack(magic, version, kind, flags, n, seq, nhandles, aux, reserved) + payload


def golden_bytes(entry):
    return (GOLDEN / (entry["name"] + ".bin")).read_bytes()


def reason_of(data, max_payload=None):
    try:
        P.decode(data, max_payload)
    except P.FrameError as e:
        return e.reason
    return "ok"


# --- the mirror agrees with frame.hpp -------------------------------------------------------------

def test_constants_match_frame_hpp():
    src = FRAME_HPP.read_text()

    def const(name):
        m = re.search(r"\b" + name + r"\s*=\s*([^;]+);", src)
        assert m, name
        return m.group(1)

    assert P.MAGIC == int(const("kMagic").rstrip("uU"), 16)
    assert P.VERSION == int(const("kProtocolVersion"))
    assert P.HEADER_SIZE == int(const("kHeaderSize")) == P.HEADER.size == 48
    assert const("kMaxHandles").replace(" ", "") == "1u<<16" and P.MAX_HANDLES == 1 << 16
    assert P.MAX_KIND == int(const("kMaxKind")) == max(P.Kind)
    assert struct.pack("<I", P.MAGIC) == b"RPF1"

    kinds = dict(re.findall(r"^\s*([A-Z]+) = (\d+),", src.split("enum class Kind")[1].split("};")[0], re.M))
    assert {k.name: k.value for k in P.Kind} == {k: int(v) for k, v in kinds.items()}
    assert len(P.Kind) == 10

    flags = dict(re.findall(r"k(\w+) = 1u << (\d)", src))
    assert P.FLAG_OUT_OF_BAND == 1 << int(flags["OutOfBand"])
    assert P.FLAG_BUFFERS == 1 << int(flags["Buffers"])
    assert P.FLAG_RAW == 1 << int(flags["Raw"])
    assert P.FLAGS_KNOWN == 0b111

    errors = re.findall(r"^\s*(\w+)(?: = 0)?,", src.split("enum class DecodeError")[1].split("};")[0], re.M)
    assert errors == list(P.REASONS)
    messages = dict(re.findall(r'case DecodeError::(\w+): return "([^"]*)";', src))
    assert messages == P.REASONS


# --- golden vectors ---------------------------------------------------------------------------------

def test_manifest_covers_every_bin_file():
    names = [e["name"] for e in MANIFEST]
    assert len(names) == len(set(names))
    assert {p.stem for p in GOLDEN.glob("*.bin")} == set(names)
    assert {e["expect"] for e in MANIFEST} == set(P.REASONS) - {"payload_too_large"}


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["name"] for e in MANIFEST])
def test_golden_vector_decodes(entry):
    data = golden_bytes(entry)
    assert len(data) == entry["size"]
    if entry["expect"] != "ok":
        with pytest.raises(P.FrameError) as info:
            P.decode(data)
        assert info.value.reason == entry["expect"]
        assert str(info.value).startswith(P.REASONS[entry["expect"]])
        return
    h, payload = P.decode(data)
    assert isinstance(payload, memoryview)
    assert payload.obj is data  # zero copy
    assert (h.magic, h.version, h.aux, h.reserved) == (P.MAGIC, P.VERSION, 0, bytes(16))
    assert isinstance(h.kind, P.Kind) and h.kind == entry["kind"]
    assert h.flags == entry["flags"]
    assert h.payload_len == entry["payload_len"] == len(data) - P.HEADER_SIZE
    assert h.seq == entry["seq"]
    assert h.nhandles == entry["nhandles"]
    assert payload.tobytes() == bytes.fromhex(entry["payload_hex"])
    assert P.check_header(h) == "ok"


@pytest.mark.parametrize("entry", OK, ids=[e["name"] for e in OK])
def test_encode_reproduces_golden_vector(entry):
    out = P.encode(P.Kind(entry["kind"]), entry["flags"], bytes.fromhex(entry["payload_hex"]), entry["seq"],
                   entry["nhandles"])
    assert type(out) is bytes
    assert out == golden_bytes(entry)
    # A plain int kind and other bytes-like payloads encode the same.
    assert P.encode(entry["kind"], entry["flags"], bytearray.fromhex(entry["payload_hex"]), entry["seq"],
                    entry["nhandles"]) == out


def test_oob_golden_vector_carries_a_descriptor():
    h, payload = P.decode(golden_bytes(next(e for e in OK if e["name"] == "data_oob")))
    assert h.flags & P.FLAG_OUT_OF_BAND and h.nhandles >= 1
    assert P.OOB_DESCRIPTOR.unpack(payload) == (16 << 20, 0)


# --- truncation and garbage -------------------------------------------------------------------------

@pytest.mark.parametrize("entry", OK, ids=[e["name"] for e in OK])
def test_no_strict_prefix_decodes(entry):
    data = golden_bytes(entry)
    for n in range(len(data)):
        expected = "truncated_header" if n < P.HEADER_SIZE else "truncated_payload"
        assert reason_of(data[:n]) == expected, n
        assert reason_of(memoryview(data)[:n]) == expected, n


@pytest.mark.parametrize("entry", OK, ids=[e["name"] for e in OK])
def test_trailing_bytes_are_ignored(entry):
    data = golden_bytes(entry)
    h, payload = P.decode(data + b"\xff" * 100)
    assert payload.tobytes() == data[P.HEADER_SIZE:]
    assert h.payload_len == len(data) - P.HEADER_SIZE


@pytest.mark.parametrize("entry", OK, ids=[e["name"] for e in OK])
def test_header_bit_flips(entry):
    data = golden_bytes(entry)
    avail = len(data) - P.HEADER_SIZE
    for bit in range(P.HEADER_SIZE * 8):
        b = bytearray(data)
        b[bit // 8] ^= 1 << (bit % 8)
        reason = reason_of(bytes(b))
        byte = bit // 8
        if reason == "ok":
            h, payload = P.decode(bytes(b))
            assert P.check_header(h) == "ok"
            assert len(payload) == h.payload_len <= avail
        else:
            assert reason != "truncated_header"
        if byte < 4:
            assert reason == "bad_magic"
        elif byte < 6:
            assert reason == "bad_version"
        elif byte == 7 and bit % 8 >= 3:
            assert reason == "bad_flags"
        elif 8 <= byte < 16:
            (length,) = struct.unpack_from("<Q", b, 8)
            assert reason == ("truncated_payload" if length > avail else "ok")
        elif 16 <= byte < 24:
            assert reason == "ok"
        elif byte >= 32:
            assert reason == "bad_reserved"


def test_garbage_never_decodes_or_crashes():
    rng = random.Random(20240601)
    for _ in range(2000):
        n = rng.randrange(0, 200)
        data = bytes(rng.getrandbits(8) for _ in range(n))
        reason = reason_of(data)
        assert reason in P.REASONS
        if n < P.HEADER_SIZE:
            assert reason == "truncated_header"
    # Garbage behind a valid magic still fails on the first broken field.
    assert reason_of(b"RPF1" + b"\xff" * 60) == "bad_version"
    assert reason_of(b"") == "truncated_header"
    assert reason_of(bytes(48)) == "bad_magic"


def test_non_bytes_input_is_a_type_error():
    with pytest.raises(TypeError):
        P.decode("RPF1" * 12)
    with pytest.raises(TypeError):
        P.decode(None)


def test_wide_memoryview_formats_are_read_as_bytes():
    frame = P.encode(P.Kind.DATA, 0, b"12345678", 5)
    import array
    h, payload = P.decode(array.array("Q", frame))  # 56 bytes = 7 u64 items
    assert h.seq == 5 and payload.tobytes() == b"12345678"


# --- validation rules and order ---------------------------------------------------------------------

def test_validation_order_matches_check_header():
    fields = dict(magic=0, version=7, kind=0, flags=0x81, reserved=b"\0" * 15 + b"\1", nhandles=P.MAX_HANDLES + 1,
                  length=100)
    steps = [("bad_magic", "magic", P.MAGIC), ("bad_version", "version", 1), ("bad_kind", "kind", 10),
             ("bad_flags", "flags", P.FLAG_OUT_OF_BAND), ("bad_reserved", "reserved", bytes(16)),
             ("too_many_handles", "nhandles", 0), ("missing_handle", "nhandles", P.MAX_HANDLES),
             ("payload_too_large", None, None)]
    for reason, field, fix in steps:
        assert reason_of(raw_frame(**fields), max_payload=10) == reason
        if field:
            fields[field] = fix
    # Limit satisfied: the missing payload bytes are the last thing checked.
    assert reason_of(raw_frame(**fields), max_payload=100) == "truncated_payload"
    fields["payload"] = bytes(100)
    h, _ = P.decode(raw_frame(**fields), max_payload=100)
    assert h.kind is P.Kind.SHUTDOWN and h.nhandles == P.MAX_HANDLES


def test_kind_bounds():
    for k in range(256):
        assert reason_of(raw_frame(kind=k)) == ("ok" if 1 <= k <= 10 else "bad_kind")


def test_aux_is_not_validated():
    # frame.hpp's check_header() does not look at aux; the mirror must not either.
    h, _ = P.decode(raw_frame(aux=0xDEADBEEF))
    assert h.aux == 0xDEADBEEF


def test_max_payload_is_enforced():
    for entry in OK:
        data = golden_bytes(entry)
        n = len(data) - P.HEADER_SIZE
        assert reason_of(data, max_payload=n) == "ok"
        assert reason_of(data, max_payload=None) == "ok"
        if n:
            assert reason_of(data, max_payload=n - 1) == "payload_too_large"
            assert reason_of(data, max_payload=0) == "payload_too_large"
    huge = raw_frame(length=(1 << 64) - 1)
    assert reason_of(huge) == "truncated_payload"
    assert reason_of(huge, max_payload=(1 << 64) - 2) == "payload_too_large"
    with pytest.raises(ValueError):
        P.decode(huge, max_payload=-1)


def test_frame_error():
    with pytest.raises(P.FrameError) as info:
        P.decode(raw_frame(magic=0xDEADBEEF))
    e = info.value
    assert isinstance(e, ValueError)
    assert e.reason == "bad_magic"
    assert "bad frame magic" in str(e) and "0xdeadbeef" in str(e)
    copy = pickle.loads(pickle.dumps(e))
    assert type(copy) is P.FrameError and copy.reason == e.reason and str(copy) == str(e)


def test_encode_refuses_invalid_frames():
    with pytest.raises(P.FrameError) as info:
        P.encode(0, 0, b"", 1)
    assert info.value.reason == "bad_kind"
    with pytest.raises(P.FrameError) as info:
        P.encode(P.Kind.DATA, 0x08, b"", 1)
    assert info.value.reason == "bad_flags"
    with pytest.raises(P.FrameError) as info:
        P.encode(P.Kind.DATA, P.FLAG_OUT_OF_BAND, bytes(16), 1)
    assert info.value.reason == "missing_handle"
    with pytest.raises(P.FrameError) as info:
        P.encode(P.Kind.DATA, 0, b"", 1, nhandles=P.MAX_HANDLES + 1)
    assert info.value.reason == "too_many_handles"
    for bad in (dict(seq=-1), dict(seq=1 << 64), dict(aux=1 << 32), dict(nhandles=-1), dict(seq=1.0)):
        args = dict(kind=P.Kind.DATA, flags=0, payload=b"", seq=1)
        args.update(bad)
        with pytest.raises(ValueError):
            P.encode(**args)


# --- randomized round trip --------------------------------------------------------------------------

def _random_frame(rng):
    kind = rng.choice(list(P.Kind))
    flags = rng.randrange(8)
    nhandles = rng.choice([0, 1, 2, 253, 254, P.MAX_HANDLES, rng.randrange(P.MAX_HANDLES + 1)])
    if flags & P.FLAG_OUT_OF_BAND and nhandles == 0:
        nhandles = 1
    n = rng.choice([0, 1, 7, 8, 16, 63, 64, 65, rng.randrange(4096)])
    payload = rng.randbytes(n)
    seq = rng.choice([0, 1, (1 << 64) - 1, rng.getrandbits(64)])
    aux = rng.choice([0, rng.getrandbits(32)])
    return kind, flags, payload, seq, nhandles, aux


def test_randomized_round_trip():
    rng = random.Random(0x52504631)
    stream = bytearray()
    frames = []
    for _ in range(1000):
        kind, flags, payload, seq, nhandles, aux = f = _random_frame(rng)
        data = P.encode(kind, flags, payload, seq, nhandles, aux)
        assert len(data) == P.HEADER_SIZE + len(payload)
        # The independent struct spelling agrees with the module.
        assert data == raw_frame(kind, flags, payload, seq, nhandles, aux)
        h, got = P.decode(data, max_payload=len(payload))
        assert (h.kind, h.flags, h.seq, h.nhandles, h.aux, h.payload_len) == (kind, flags, seq, nhandles, aux,
                                                                               len(payload))
        assert got.tobytes() == payload
        frames.append(f)
        stream += data

    # Walk the concatenation the way a stream reader does.
    view = memoryview(bytes(stream))
    off = 0
    for kind, flags, payload, seq, nhandles, aux in frames:
        h, got = P.decode(view[off:])
        assert (h.kind, h.seq, got.tobytes()) == (kind, seq, payload)
        off += P.HEADER_SIZE + h.payload_len
    assert off == len(view)
    assert reason_of(view[off:]) == "truncated_header"
