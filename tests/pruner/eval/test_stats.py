import math

import numpy as np
import pytest

from e3pruner.eval.stats import mean_std, paired_difference, sign_test


def test_paired_difference_finds_a_truly_better_method():
    rng = np.random.default_rng(11)
    base = rng.normal(3.0, 1.0, 300)  # per-item difficulty, shared by both methods
    a = base + rng.normal(0, 0.5, 300)
    b = base + 0.25 + rng.normal(0, 0.5, 300)  # b is worse by 0.25 on every item
    res = paired_difference(a, b, seed=1)
    assert res["verdict"] == "a<b" and res["ci"][1] < 0
    assert abs(res["mean_diff"] + 0.25) < 4 * res["stderr"]
    assert res["ci"][0] < -0.25 < res["ci"][1] or abs(res["mean_diff"] + 0.25) < 0.1
    assert res["p_sign"] < 1e-3
    assert paired_difference(b, a, seed=1)["verdict"] == "a>b"
    # unpaired, the same gap drowns in the items' spread: pairing is what finds it
    d = a - b
    assert res["stderr"] == pytest.approx(d.std(ddof=1) / math.sqrt(d.size), rel=1e-9)
    assert res["stderr"] < 0.5 * math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / a.size)


def test_paired_difference_says_tie_under_the_null_at_about_the_stated_rate():
    rng = np.random.default_rng(5)
    covered = 0
    for i in range(40):
        base = rng.normal(0, 1, 80)
        a, b = base + rng.normal(0, 1, 80), base + rng.normal(0, 1, 80)
        covered += paired_difference(a, b, seed=i, resamples=2000)["verdict"] == "tie"
    assert covered >= 33  # 95% intervals: ~38 of 40 expected


def test_weighted_pairs_match_the_pooled_mean():
    a, b = [1.0, 2.0, 4.0], [0.5, 2.5, 3.0]
    w = [10, 10, 2]
    res = paired_difference(a, b, weights=w, resamples=500)
    assert res["mean_diff"] == pytest.approx((10 * 0.5 - 10 * 0.5 + 2 * 1.0) / 22)


def test_sign_test_and_mean_std():
    assert sign_test([1] * 10) == pytest.approx(2 / 1024)
    assert sign_test([1, -1] * 5) == 1.0 and sign_test([0, 0]) == 1.0
    assert sign_test([1, 1, 1]) == pytest.approx(0.25)  # 3 seeds can never reach p < 0.05
    s = mean_std([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3) and s["std"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert mean_std([5.0])["std"] is None


@pytest.mark.parametrize("a,b,kw,match", [
    ([1.0], [2.0], {}, "at least 2"),
    ([1.0, 2.0], [1.0], {}, "one length"),
    ([1.0, float("nan")], [1.0, 2.0], {}, "finite"),
    ([1.0, 2.0], [1.0, 2.0], {"confidence": 1.0}, "confidence"),
    ([1.0, 2.0], [1.0, 2.0], {"weights": [0, 0]}, "weights"),
])
def test_paired_difference_rejects_bad_input(a, b, kw, match):
    with pytest.raises(ValueError, match=match):
        paired_difference(a, b, **kw)
    with pytest.raises(ValueError):
        mean_std([])
