"""Writes the seed corpus of fuzz_unpack (fuzz/corpus/). Plain Python, no
diffq_c needed: the packed words are random, which is what the fuzzer sees
anyway; the headers are chosen to start in each validation branch."""
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def entry(nbits, lines, n, group_size, ngroups, bits, uint8_levels=False, scale=0,
          lines_shift=0, words=None, seed=0):
    rng = random.Random(seed)
    if words is None:
        words = lines * nbits * 32
    header = struct.pack("<BBBHBHB", nbits, lines, lines_shift, n, group_size, ngroups,
                         (1 if uint8_levels else 0) | (scale << 1))
    body = bytes(bits) + b"".join(struct.pack("<Q", rng.getrandbits(64)) for _ in range(words))
    return header + body


SEEDS = {
    # valid: 3 planes, one line, groups of 4 at 3 bits (every 3-bit level fits)
    "valid_3bit_groups": entry(3, 1, 2048, 4, 512, [3] * 512),
    # valid: 8 planes, two lines, last one padded, one group, uint8 levels
    "valid_8bit_one_group_uint8": entry(8, 2, 3000, 0, 1, [8], uint8_levels=True, scale=3),
    # levels of 4 planes against 2-bit groups: DQ_ERR_LEVEL
    "levels_too_wide": entry(4, 1, 64, 8, 8, [2] * 8, seed=1),
    # 15 planes, group size 1
    "valid_15bit": entry(15, 1, 32, 1, 32, [15] * 32, seed=2),
    # zero planes: no words at all
    "zero_planes": entry(0, 1, 5, 0, 1, [1]),
    # 17 planes: DQ_ERR_NBITS
    "too_many_planes": entry(17, 1, 10, 0, 1, [4], seed=3),
    # a claim of 255 << 50 lines: overflow checks
    "huge_line_claim": entry(16, 255, 100, 0, 1, [9], lines_shift=50, words=4),
    # words do not match the shape: DQ_ERR_PACK_SHAPE
    "short_words": entry(5, 2, 100, 0, 1, [5], words=100, seed=4),
}

if __name__ == "__main__":
    out = os.path.join(HERE, "corpus")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(SEEDS)} seeds to {out}")
