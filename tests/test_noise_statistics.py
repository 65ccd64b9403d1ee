"""The noise's law, drawn the way training draws it: through a DiffQuantizer's
training forward, recovered as (noisy weight - weight) / (range * step).

Each draw has 2^22 values. The checks: mean, standard deviation, fourth
moment (each within 5 standard errors of the law's), Kolmogorov-Smirnov
distance to N(0, 1) or U(-1/2, 1/2) under the 1% critical value, the mass
beyond 3.5 sigma within 10% of the normal law's, and correlations within
5 / sqrt(n): between neighbours at lags 1 to 16, between two consecutive
draws, between two parameters of one draw. The same checks pass on
torch.randn / torch.rand (the thresholds are calibrated) and reject
generators with a known defect (they can fail).
"""
import math

import pytest
import torch

import diffq_c

N = 1 << 22
KS_CRITICAL_1PC = 1.628  # sqrt(-log(0.01 / 2) / 2): P(sqrt(n) D > 1.628) = 1%
NORMAL_BEYOND_3_5 = math.erfc(3.5 / math.sqrt(2))  # P(|Z| > 3.5)


class Weights(torch.nn.Module):
    """Two parameters whose forward returns them: in training, the noisy ones."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(self.flat_with_range())
        self.b = torch.nn.Parameter(self.flat_with_range())

    @staticmethod
    def flat_with_range():
        # zeros, so noisy - weight is the noise with no rounding, and one -1
        # and one 1 for a range of 2
        w = torch.zeros(N)
        w[0], w[1] = -1.0, 1.0
        return w

    def forward(self):
        return self.a.detach().clone(), self.b.detach().clone()


def draws(kind, steps=2, group_size=8):
    """[steps][2] noise samples in standard units (N(0, 1) or U(-1/2, 1/2))."""
    torch.manual_seed(1234)
    model = Weights()
    quantizer = diffq_c.DiffQuantizer(model, group_size=group_size, min_size=0, noise=kind)
    quantizer.no_optimizer()
    model.train()
    out = []
    for _ in range(steps):
        noisy = model()
        per_param = []
        for weight, name in zip(noisy, ("a", "b")):
            w = getattr(model, name).detach()
            step = quantizer._get_noise_scale(getattr(model, name + "_diffq").detach())
            z = (weight - w) / ((w.max() - w.min()) * step.repeat_interleave(group_size))
            z = z[2:]  # the two range-setting elements are not zero-based
            per_param.append(2 * z if kind == "gaussian" else z)
        out.append(per_param)
    return out


def normal_cdf(x):
    return 0.5 * torch.erfc(-x / math.sqrt(2))


def uniform_cdf(x):
    return (x + 0.5).clamp(0, 1)


LAWS = {  # sigma, fourth moment, eighth moment, cdf
    "gaussian": (1.0, 3.0, 105.0, normal_cdf),
    "uniform": (math.sqrt(1 / 12), 1 / 80, 1 / 2304, uniform_cdf),
}


def ks_distance(z, cdf):
    z = torch.sort(z).values.double()
    n = z.numel()
    f = cdf(z)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    return max((k / n - f).max().item(), (f - (k - 1) / n).max().item())


def corr(x, y):
    x = x.double() - x.double().mean()
    y = y.double() - y.double().mean()
    return (x @ y / torch.sqrt((x @ x) * (y @ y))).item()


def failing_mean(z, kind):
    sigma = LAWS[kind][0]
    return abs(z.double().mean().item()) > 5 * sigma / math.sqrt(z.numel())


def failing_std(z, kind):
    sigma, m4 = LAWS[kind][:2]
    kurtosis = m4 / sigma ** 4
    bound = 5 * sigma * math.sqrt((kurtosis - 1) / (4 * z.numel()))
    return abs(z.double().std().item() - sigma) > bound


def failing_fourth_moment(z, kind):
    _, m4, m8, _ = LAWS[kind]
    return abs(z.double().pow(4).mean().item() - m4) > 5 * math.sqrt((m8 - m4 ** 2) / z.numel())


def failing_ks(z, kind):
    return ks_distance(z, LAWS[kind][3]) > KS_CRITICAL_1PC / math.sqrt(z.numel())


def failing_tail(z, kind):
    if kind == "gaussian":
        beyond = (z.abs() > 3.5).double().mean().item()
        return abs(beyond / NORMAL_BEYOND_3_5 - 1) > 0.1
    # the uniform's counterpart: its support, and the mass of its outer
    # sixty-fourths
    outer = ((z < -0.5 + 1 / 64) | (z >= 0.5 - 1 / 64)).double().mean().item()
    return z.min().item() < -0.5 or z.max().item() >= 0.5 or abs(outer * 32 - 1) > 0.1


def failing_lags(z, kind):
    c = z.double() - z.double().mean()
    norm = (c @ c).item()
    bound = 5 / math.sqrt(z.numel())
    return any(abs((c[:-lag] @ c[lag:]).item() / norm) > bound for lag in range(1, 17))


CHECKS = {"mean": failing_mean, "std": failing_std, "fourth moment": failing_fourth_moment,
          "ks": failing_ks, "tail": failing_tail, "lags": failing_lags}


def law_failures(z, kind):
    """The names of the checks that one sample fails."""
    return [name for name, failing in CHECKS.items() if failing(z, kind)]


def pair_failures(x, y):
    return ["pair"] if abs(corr(x, y)) > 5 / math.sqrt(x.numel()) else []


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_noise_drawn_in_training_has_the_law(kind):
    (a0, b0), (a1, _) = draws(kind)
    assert a0.numel() >= (1 << 22) - 2
    assert law_failures(a0, kind) == []
    assert pair_failures(a0, a1) == [], "two consecutive draws correlate"
    assert pair_failures(a0, b0) == [], "two parameters of one draw correlate"


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_group_size_one_draws_the_same_law(kind):
    (a, _), = draws(kind, steps=1, group_size=1)
    assert law_failures(a, kind) == []


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_checks_pass_on_torch_generators(kind):
    """Calibration: torch's own generators pass the same checks."""
    gen = torch.Generator().manual_seed(99)

    def sample():
        if kind == "gaussian":
            return torch.randn(N, generator=gen)
        return torch.rand(N, generator=gen) - 0.5
    a, b = sample(), sample()
    assert law_failures(a, kind) == []
    assert pair_failures(a, b) == []


def test_checks_reject_known_defects():
    """Each check fails on a sample with the defect it is there to see (a
    quarter of a draw: the defects are far above the thresholds)."""
    gen = torch.Generator().manual_seed(7)
    n = N // 4
    z = torch.randn(n, generator=gen)
    u = torch.rand(4, n, generator=gen)
    irwin_hall = (u.sum(0) - 2) * math.sqrt(3)  # unit variance, light tails
    assert failing_ks(irwin_hall, "gaussian") and failing_fourth_moment(irwin_hall, "gaussian")
    assert failing_tail(z.clamp(-3.4, 3.4), "gaussian")
    assert failing_lags((z + 0.02 * z.roll(5)) / math.sqrt(1.0004), "gaussian")
    assert failing_mean(z + 0.01, "gaussian")
    assert failing_std(z * 1.01, "gaussian")
    assert pair_failures(z, 0.99 * torch.randn(n, generator=gen) + 0.02 * z) == ["pair"]
    coarse = torch.floor((u[0] - 0.5) * 16) / 16 + 1 / 32  # 16 levels: far from U in KS
    assert failing_ks(coarse, "uniform")
    assert failing_tail(u[1] * 0.98 - 0.49, "uniform")  # its outer sixty-fourths too thin
