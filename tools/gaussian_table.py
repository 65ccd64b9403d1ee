"""Fits the gaussian noise's table (csrc/noise_gen.h, GAUSS_POLY) and prints it.

The noise's magnitude is -Phi^-1(p) / 2 for a tail probability p in
[2^-25, 1/2), Phi the standard normal CDF. On each octave [2^e, 2^(e+1)) of
p, e = -25..-2, it is a degree-3 polynomial in the mantissa m in [1, 2) of
p (in m itself, not m - 1.5: the kernels then take m from the float's bits
with no subtraction, and the worst error is the same). This script fits
each octave by least squares on 400 Chebyshev nodes (within a few percent
of the minimax polynomial), rounds the coefficients to float32, evaluates
them in float32 as the kernels do (Horner by fused multiply-adds) over every
97th mantissa of every octave, and prints the worst error against the exact
quantile with the table.

Degree 3 (error 1.0e-4) rather than 5 (2.0e-6): two table rows, two
permutes and two multiply-adds fewer a vector of noise: the gaussian 17%
faster, the fused noise kernels 0-7% (they are bound by more than the
transform), for an error 20 times below what a test on 2^22 draws can see (the
Kolmogorov-Smirnov critical value there is 8e-4 in probability; 1e-4 in the
quantile moves the CDF by at most 4e-5). Degree 4 (1.6e-5) measured between
the two, within the noise of either.

    python tools/gaussian_table.py          # needs numpy and scipy

The table in csrc/noise_gen.h is this script's output; tests/test_noise.py checks
the table's accuracy against torch.special.ndtri over all 2^23 magnitudes.
"""
import numpy as np
from scipy.special import ndtri

DEGREE = 3
OCTAVES = range(-25, -1)  # p in [2^e, 2^(e+1))
NODES = 400


def fit_octave(e):
    k = np.arange(NODES)
    m = 1.5 + 0.5 * np.cos(np.pi * (k + 0.5) / NODES)
    magnitude = -0.5 * ndtri(np.ldexp(m, e))
    fit = np.polynomial.chebyshev.Chebyshev.fit(m, magnitude, DEGREE, domain=[1.0, 2.0])
    power = fit.convert(kind=np.polynomial.Polynomial, domain=[1.0, 2.0], window=[1.0, 2.0]).coef
    return power[::-1].astype(np.float32)  # highest degree first, as Horner takes them


def evaluate(coef, m):
    """Horner by multiply-adds: float32 products are exact in float64, so
    only the float64 sum rounds before float32 does; that double rounding
    can move a last bit, which does not show in the error printed here
    (tests/test_noise.py specifies the bits with an exact fma)."""
    y = np.full_like(m, coef[0])
    for c in coef[1:]:
        y = (y.astype(np.float64) * m.astype(np.float64) + np.float64(c)).astype(np.float32)
    return y


def worst_error(e, coef):
    mantissa = np.arange(0, 1 << 23, 97, dtype=np.uint32)
    p = ((np.uint32(127 + e) << np.uint32(23)) | mantissa).view(np.float32)
    m = (mantissa | np.uint32(0x3F800000)).view(np.float32)
    exact = -0.5 * ndtri(p.astype(np.float64))
    return float(np.abs(evaluate(coef, m).astype(np.float64) - exact).max())


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
