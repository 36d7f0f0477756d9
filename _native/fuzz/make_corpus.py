"""Write a small seed corpus for fuzz_replay: valid and damaged logs built with walstore.format.

Each seed is 8 control bytes (see fuzz_replay.c) then a file. Usage: make_corpus.py OUTDIR
"""

from __future__ import annotations

import os
import random
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from walstore import format as fmt  # noqa: E402

SEGMENT, SNAPSHOT, IDENTITY, ALL = 0, 1, 2, 3


def control(mask: int, first_seq: int, start: int, fix_crc: bool) -> bytes:
    return bytes([mask, first_seq, start // 8, 7, int(fix_crc), 0, 0, 0])


def segment(rng: random.Random, n: int, close: bool) -> bytes:
    out = [fmt.FileHeader(fmt.KIND_SEGMENT, bytes(16), 1).encode()]
    for seq in range(1, n + 1):
        ops = []
        for _ in range(rng.randint(1, 3)):
            op = rng.choice([fmt.OP_PUT, fmt.OP_PUT, fmt.OP_DELETE, fmt.OP_CALL])
            flags = fmt.op_flags(rng.random() < 0.5, rng.randint(0, 2))
            value = rng.randbytes(rng.randint(0, 20))
            ops.append(fmt.encode_op(op, flags, b"k%d" % rng.randint(0, 5), value))
        out.append(fmt.encode_frame(fmt.REC_COMMIT, seq, seq - 1, b"".join(ops)))
    if close:
        out.append(fmt.encode_frame(fmt.REC_CLOSE, n, n, b""))
    return b"".join(out)


def snapshot(rng: random.Random, n: int) -> bytes:
    out = [fmt.FileHeader(fmt.KIND_SNAPSHOT, bytes(16), 5).encode()]
    for _ in range(n):
        out.append(fmt.encode_frame(fmt.REC_SNAPSHOT_DATA, 5, 5, fmt.encode_op(fmt.OP_PUT, 0, b"k", b"v")))
    out.append(fmt.encode_frame(fmt.REC_SNAPSHOT_END, 5, 5, struct.pack("<QQ", n, n)))
    return b"".join(out)


def main(outdir: str) -> None:
    os.makedirs(outdir, exist_ok=True)
    rng = random.Random(1)
    seeds = {
        "empty": control(SEGMENT, 1, 64, False) + fmt.FileHeader(fmt.KIND_SEGMENT, bytes(16), 1).encode(),
        "segment": control(SEGMENT, 1, 64, False) + segment(rng, 6, True),
        "segment-fix": control(SEGMENT, 1, 64, True) + segment(rng, 6, False),
        "prealloc": control(SEGMENT, 1, 64, False) + segment(rng, 3, False) + bytes(256),
        "snapshot": control(SNAPSHOT, 5, 64, False) + snapshot(rng, 3),
        "identity": control(IDENTITY, 0, 64, True)
        + fmt.FileHeader(fmt.KIND_IDENTITY, bytes(16)).encode()
        + fmt.encode_frame(fmt.REC_META, 0, 0, b'{"codec": "json"}'),
    }
    torn = bytearray(segment(rng, 8, False))
    torn[-20:] = rng.randbytes(20)
    seeds["torn"] = control(SEGMENT, 1, 64, False) + bytes(torn)
    flipped = bytearray(segment(rng, 8, True))
    flipped[200] ^= 4
    seeds["flipped"] = control(SEGMENT, 1, 64, False) + bytes(flipped)
    seeds["random"] = control(ALL, 0, 0, True) + rng.randbytes(300)
    for name, data in seeds.items():
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main(sys.argv[1])
