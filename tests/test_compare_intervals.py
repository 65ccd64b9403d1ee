"""benchmarks/compare.py's bootstrap intervals: what a reader takes from
them (whether a speed-up near a target is above or below it) must follow
from the rounds measured."""
import math
import random
import statistics

from conftest import load_benchmark


def test_rounds_drawn_together_cancel_a_shared_load():
    compare = load_benchmark("compare")
    rng = random.Random(1)
    # every round's load multiplies both cases alike: the ratio is exactly 10
    load = [1 + 3 * rng.random() for _ in range(40)]
    theirs = [10.0 * x for x in load]
    ours = list(load)
    low, high = compare.ratio_interval(theirs, ours)
    assert math.isclose(low, 10.0, rel_tol=1e-12) and math.isclose(high, 10.0, rel_tol=1e-12)
    # drawn apart, the same load would have spread the ratio
    shuffled = ours[:]
    rng.shuffle(shuffled)
    low, high = compare.ratio_interval(theirs, shuffled)
    assert low < 10.0 < high and high - low > 1.0


def test_interval_holds_the_point_and_narrows_with_rounds():
    compare = load_benchmark("compare")
    rng = random.Random(2)

    def rounds(n):
        return [20 + rng.gauss(0, 2) for _ in range(n)], [2 + rng.gauss(0, 0.4) for _ in range(n)]

    widths = []
    for n in (10, 160):
        theirs, ours = rounds(n)
        low, high = compare.ratio_interval(theirs, ours)
        point = statistics.median(theirs) / statistics.median(ours)
        assert low <= point <= high
        widths.append(high - low)
        # the same samples give the same interval
        assert compare.ratio_interval(theirs, ours) == (low, high)
    assert widths[1] < widths[0] / 2


def test_no_interval_for_failed_unpaired_or_lost_cases():
    compare = load_benchmark("compare")
    nan = float("nan")
    for num, den in (([nan], [1.0, 2.0]), ([1.0, nan, 3.0], [1.0, 2.0, 3.0]), ([1.0, 2.0], [1.0, 2.0, 3.0]),
                     ([1.0], [2.0]), ([5.0, 6.0, 7.0], [0.1, -0.2, 0.0])):
        assert all(math.isnan(v) for v in compare.ratio_interval(num, den))


def test_rows_carry_the_interval_of_their_speed_up():
    compare = load_benchmark("compare")
    samples = {"plain": [5.0, 6.0, 5.5, 7.0], "diffq": [25.0, 26.0, 25.5, 27.0], "diffq_c": [7.0, 8.0, 7.5, 9.0]}
    theirs, ours, (low, high) = compare._row(samples, "plain")
    assert (theirs, ours) == (20.0, 2.0)
    assert math.isclose(low, 10.0) and math.isclose(high, 10.0)  # every round's overheads are 20 and 2
    theirs, ours, (low, high) = compare._row({k: samples[k] for k in ("diffq", "diffq_c")})
    assert theirs == statistics.median(samples["diffq"]) and ours == statistics.median(samples["diffq_c"])
    assert low <= theirs / ours <= high
