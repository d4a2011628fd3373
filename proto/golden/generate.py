"""Writes the golden frame vectors. Run only when the protocol version changes: the committed
.bin files are the reference both test suites (C++ and Python) decode and re-encode byte for byte.

    /usr/bin/python3 proto/golden/generate.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = struct.Struct("<IHBBQQII16s")
MAGIC = 0x31465052


def frame(kind, flags, payload, seq, nhandles, aux=0, magic=MAGIC, version=1, reserved=b"\0" * 16, length=None):
    n = len(payload) if length is None else length
    return HEADER.pack(magic, version, kind, flags, n, seq, nhandles, aux, reserved) + payload


VECTORS = [
    # name, bytes, expected decode result, fields when ok
    ("data_empty", frame(1, 0, b"", 1, 0), "ok"),
    ("data_small", frame(1, 0, b"\x80\x05\x95\x0b\x00\x00\x00\x00\x00\x00\x00K\x01K\x02\x86\x94.", 7, 0), "ok"),
    ("data_handles", frame(1, 0, b"payload", 123456789, 3), "ok"),
    ("data_oob", frame(1, 1 | 2, struct.pack("<QQ", 16 << 20, 0), 2**40 + 5, 1), "ok"),
    ("raw_bytes", frame(1, 4, bytes(range(256)), 99, 0), "ok"),
    ("shutdown", frame(10, 0, b"", 18446744073709551615, 0), "ok"),
    ("bad_magic", frame(1, 0, b"x", 1, 0, magic=0xDEADBEEF), "bad_magic"),
    ("bad_version", frame(1, 0, b"x", 1, 0, version=2), "bad_version"),
    ("bad_kind", frame(11, 0, b"x", 1, 0), "bad_kind"),
    ("bad_flags", frame(1, 0x80, b"x", 1, 0), "bad_flags"),
    ("bad_reserved", frame(1, 0, b"x", 1, 0, reserved=b"\1" + b"\0" * 15), "bad_reserved"),
    ("too_many_handles", frame(1, 0, b"", 1, 70000), "too_many_handles"),
    ("oob_without_handle", frame(1, 1, struct.pack("<QQ", 5, 0), 1, 0), "missing_handle"),
    ("truncated_header", frame(1, 0, b"", 1, 0)[:47], "truncated_header"),
    ("truncated_payload", frame(1, 0, b"abc", 1, 0, length=10), "truncated_payload"),
]


def main():
    manifest = []
    for name, data, expect in VECTORS:
        with open(os.path.join(HERE, name + ".bin"), "wb") as f:
            f.write(data)
        entry = {"name": name, "size": len(data), "expect": expect}
        if expect == "ok":
            magic, version, kind, flags, n, seq, nh, aux, _ = HEADER.unpack_from(data)
            entry.update(kind=kind, flags=flags, payload_len=n, seq=seq, nhandles=nh, payload_hex=data[48:].hex())
        manifest.append(entry)
    with open(os.path.join(HERE, "vectors.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
