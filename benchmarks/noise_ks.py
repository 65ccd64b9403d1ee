"""The noise's Kolmogorov-Smirnov statistic over many seeds: is sqrt(n) D
distributed as the Kolmogorov law says (mean 0.869; above the 10%, 5% and
1% critical values 1.224, 1.358 and 1.628 that often)? One sample that
passes is weak evidence; forty whose statistics look like the law's are
stronger. Draws come from the kernel's fill (`_C.noise_fill`, element 0
onward, the seeds 0..N-1 through derive_seed as the quantizer's
parameters get them).

    PYTHONPATH=. python benchmarks/noise_ks.py              # 40 seeds of 2^22
    PYTHONPATH=. python benchmarks/noise_ks.py --seeds 10 --log2n 20
"""
import argparse
import math

import torch

from diffq_c import _C

CRITICAL = {"10%": 1.224, "5%": 1.358, "1%": 1.628}


def ks_sqrt_n(z, cdf):
    z = torch.sort(z.double()).values
    n = z.numel()
    f = cdf(z)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    d = max((k / n - f).max().item(), (f - (k - 1) / n).max().item())
    return math.sqrt(n) * d


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--log2n", type=int, default=22)
    args = parser.parse_args()
    n = 1 << args.log2n
    laws = {
        "gaussian": (1, lambda x: 0.5 * torch.erfc(-(2 * x) / math.sqrt(2))),  # N(0, 1) / 2
        "uniform": (0, lambda x: (x + 0.5).clamp(0, 1)),
    }
    print(f"{args.seeds} seeds of 2^{args.log2n} values, sqrt(n) D against the Kolmogorov law")
    print("| noise | mean sqrt(n) D (law: 0.869) | above 10% | above 5% | above 1% |")
    print("|---|---|---|---|---|")
    for name, (kind, cdf) in laws.items():
        stats = []
        for seed in range(args.seeds):
            out = torch.empty(n)
            _C.noise_fill(out, kind, _C.derive_seed(seed, 0), 0, 2)
            stats.append(ks_sqrt_n(out, cdf))
        above = [sum(s > c for s in stats) for c in CRITICAL.values()]
        print(f"| {name} | {sum(stats) / len(stats):.3f} | {above[0]} | {above[1]} | {above[2]} |")


if __name__ == "__main__":
    main()
