"""Fits the gaussian noise's table (csrc/rng.c, GAUSS_POLY) and prints it.

The noise's magnitude is -Phi^-1(p) / 2 for a tail probability p in
[2^-25, 1/2), Phi the standard normal CDF. On each octave [2^e, 2^(e+1)) of
p, e = -25..-2, it is a degree-5 polynomial in t = m - 1.5, m in [1, 2) the
mantissa of p. This script fits each octave by least squares on 400
Chebyshev nodes (within a few percent of the minimax polynomial), rounds the
coefficients to float32, evaluates them in float32 as the kernels do
(Horner by fused multiply-adds) over every 97th mantissa of every octave, and
prints the worst error against the exact quantile with the table.

    python tools/gaussian_table.py          # needs numpy and scipy

The table in csrc/rng.c is this script's output; tests/test_noise.py checks
the table's accuracy against torch.special.ndtri over all 2^23 magnitudes.
"""
import numpy as np
from scipy.special import ndtri

DEGREE = 5
OCTAVES = range(-25, -1)  # p in [2^e, 2^(e+1))
NODES = 400


def fit_octave(e):
    k = np.arange(NODES)
    t = 0.5 * np.cos(np.pi * (k + 0.5) / NODES)
    magnitude = -0.5 * ndtri(np.ldexp(t + 1.5, e))
    fit = np.polynomial.chebyshev.Chebyshev.fit(t, magnitude, DEGREE, domain=[-0.5, 0.5])
    power = fit.convert(kind=np.polynomial.Polynomial, domain=[-0.5, 0.5],
                        window=[-0.5, 0.5]).coef
    return power[::-1].astype(np.float32)  # highest degree first, as Horner takes them


def evaluate(coef, t):
    """Horner by multiply-adds: float32 products are exact in float64, so
    only the float64 sum rounds before float32 does; that double rounding
    can move a last bit, which does not show in the error printed here
    (tests/test_noise.py specifies the bits with an exact fma)."""
    y = np.full_like(t, coef[0])
    for c in coef[1:]:
        y = (y.astype(np.float64) * t.astype(np.float64) + np.float64(c)).astype(np.float32)
    return y


def worst_error(e, coef):
    mantissa = np.arange(0, 1 << 23, 97, dtype=np.uint32)
    p = ((np.uint32(127 + e) << np.uint32(23)) | mantissa).view(np.float32)
    t = (mantissa | np.uint32(0x3F800000)).view(np.float32) - np.float32(1.5)
    exact = -0.5 * ndtri(p.astype(np.float64))
    return float(np.abs(evaluate(coef, t).astype(np.float64) - exact).max())


def hex_float(c):
    """A float32 as a C hex literal, exact and short: -0x1.525c8ep-9f."""
    if c == 0:
        return "0.0f"
    mantissa, exponent = float(c).hex().split("p")
    return mantissa.rstrip("0").rstrip(".") + "p" + exponent + "f"


def main():
    table = np.zeros((DEGREE + 1, 32), np.float32)
    worst = 0.0
    for e in OCTAVES:
        coef = fit_octave(e)
        # the octave's row: the low five bits of the biased exponent of
        # 4v + 2 = p * 2^26 as a float, 0..23
        table[:, (127 + 26 + e) & 31] = coef
        worst = max(worst, worst_error(e, coef))
    print(f"/* worst error against -Phi^-1(p) / 2: {worst:.2e} */")
    print(f"static const float GAUSS_POLY[GAUSS_DEGREE + 1][32] = {{")
    for row in table:
        cells = [hex_float(c) for c in row]
        lines = []
        for i in range(0, 32, 4):
            lines.append("     " + ", ".join(cells[i:i + 4]))
        print("    {\n" + ",\n".join(lines) + "},")
    print("};")


if __name__ == "__main__":
    main()
