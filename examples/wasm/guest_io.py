"""Inputs for the example guests, and reference results to check them against.

    python examples/wasm/guest_io.py make-inputs examples/wasm   # writes vecadd.in.bin, mlp.in.bin
    python examples/wasm/guest_io.py check vecadd vecadd.in.bin out.bin
    python examples/wasm/guest_io.py check mlp mlp.in.bin out.bin
    python examples/wasm/guest_io.py show out.bin                  # print float32 values

Pure Python (no numpy), so it runs wherever p2psched does. The references round
every operation to float32 in the order the guests do, so a correct guest's
output matches them bit for bit.
"""

from __future__ import annotations

import random
import struct
import sys
from pathlib import Path

_F32 = struct.Struct("<f")


def f32(x: float) -> float:
    """Round a Python float to the nearest float32. Doing each + and * in double
    and rounding once gives exactly the float32 result (53 >= 2*24 + 2 bits)."""
    return _F32.unpack(_F32.pack(x))[0]


def floats(data: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(data) // 4}f", data[: len(data) // 4 * 4]))


def pack(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _rand_f32(rng: random.Random, n: int, scale: float = 1.0) -> list[float]:
    return [f32(rng.uniform(-scale, scale)) for _ in range(n)]


# vecadd ------------------------------------------------------------------


def make_vecadd_input(n: int = 1024, seed: int = 1) -> bytes:
    """Two float32 vectors of length n, concatenated."""
    rng = random.Random(seed)
    return pack(_rand_f32(rng, n, 100.0)) + pack(_rand_f32(rng, n, 100.0))


def vecadd_reference(data: bytes) -> bytes:
    if len(data) % 8:
        raise ValueError(f"vecadd input is {len(data)} bytes; it must be a multiple of 8")
    v = floats(data)
    n = len(v) // 2
    return pack([f32(v[i] + v[n + i]) for i in range(n)])


# mlp ---------------------------------------------------------------------


def make_mlp_input(n_in: int = 16, n_hidden: int = 32, n_out: int = 4, batch: int = 8, seed: int = 2) -> bytes:
    """Header, weights and `batch` input rows in the layout mlp.wasm reads."""
    rng = random.Random(seed)
    parts = [
        struct.pack("<3I", n_in, n_hidden, n_out),
        pack(_rand_f32(rng, n_hidden * n_in, 0.5)),  # W1
        pack(_rand_f32(rng, n_hidden, 0.1)),  # b1
        pack(_rand_f32(rng, n_out * n_hidden, 0.5)),  # W2
        pack(_rand_f32(rng, n_out, 0.1)),  # b2
        pack(_rand_f32(rng, batch * n_in, 1.0)),  # X
    ]
    return b"".join(parts)


def mlp_reference(data: bytes) -> bytes:
    n_in, n_h, n_o = struct.unpack_from("<3I", data)
    v = floats(data[12:])
    w1, v = v[: n_h * n_in], v[n_h * n_in :]
    b1, v = v[:n_h], v[n_h:]
    w2, v = v[: n_o * n_h], v[n_o * n_h :]
    b2, xs = v[:n_o], v[n_o:]
    if not xs or len(xs) % n_in:
        raise ValueError(f"mlp input holds {len(xs)} input values; it must be a positive multiple of n_in={n_in}")
    out: list[float] = []
    for r in range(len(xs) // n_in):
        x = xs[r * n_in : (r + 1) * n_in]
        hidden = []
        for j in range(n_h):
            acc = b1[j]
            for k in range(n_in):
                acc = f32(acc + f32(w1[j * n_in + k] * x[k]))
            hidden.append(acc if acc > 0 else 0.0)
        for i in range(n_o):
            acc = b2[i]
            for j in range(n_h):
                acc = f32(acc + f32(w2[i * n_h + j] * hidden[j]))
            out.append(acc)
    return pack(out)


# command line ------------------------------------------------------------

REFERENCES = {"vecadd": vecadd_reference, "mlp": mlp_reference}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "make-inputs":
        d = Path(argv[1])
        (d / "vecadd.in.bin").write_bytes(make_vecadd_input())
        (d / "mlp.in.bin").write_bytes(make_mlp_input())
        print(f"wrote {d / 'vecadd.in.bin'} and {d / 'mlp.in.bin'}")
        return 0
    if len(argv) == 4 and argv[0] == "check" and argv[1] in REFERENCES:
        want = REFERENCES[argv[1]](Path(argv[2]).read_bytes())
        got = Path(argv[3]).read_bytes()
        if got == want:
            print(f"{argv[1]}: output matches the reference ({len(got) // 4} float32 values)")
            return 0
        print(f"{argv[1]}: output differs from the reference: got {floats(got)[:8]}..., want {floats(want)[:8]}...")
        return 1
    if len(argv) == 2 and argv[0] == "show":
        print(" ".join(f"{x:.6g}" for x in floats(Path(argv[1]).read_bytes())))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
