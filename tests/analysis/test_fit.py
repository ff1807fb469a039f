"""Power-law fitting and the compute-advantage formula (pure numpy, milliseconds)."""

import math

import numpy as np
import pytest

from attnres_train.analysis.fit import PowerLaw, compute_advantage, fit_power_law, pflops_days


@pytest.mark.parametrize("A,alpha", [(1.891, 0.057), (3.5, 0.3), (0.8, 0.01)])
def test_fit_recovers_known_law_from_exact_points(A, alpha):
    c = np.geomspace(0.05, 50.0, 7)
    law = fit_power_law(c, A * c**-alpha)
    assert law.A == pytest.approx(A, rel=1e-10)
    assert law.alpha == pytest.approx(alpha, rel=1e-10)
    assert law.r2 == pytest.approx(1.0, abs=1e-12)
    assert law.n == 7


def test_fit_recovers_known_law_from_noisy_points():
    rng = np.random.default_rng(0)
    c = np.geomspace(0.5, 5.6, 40)
    y = 1.870 * c**-0.058 * np.exp(rng.normal(0, 2e-4, c.shape))  # 0.02 % multiplicative noise
    law = fit_power_law(c, y)
    assert law.A == pytest.approx(1.870, rel=2e-3)
    assert law.alpha == pytest.approx(0.058, abs=2e-3)
    assert 0.99 < law.r2 <= 1.0


def test_compute_advantage_hand_computed_case():
    # Reference L = 2·C^-0.5, variant L = 1·C^-0.5, budget 4: the variant reaches 1·4^-0.5 = 0.5; the reference
    # reaches 0.5 at C = (2/0.5)^(1/0.5) = 16, i.e. 4x the budget.
    ref, var = PowerLaw(A=2.0, alpha=0.5), PowerLaw(A=1.0, alpha=0.5)
    assert float(var.loss(4.0)) == pytest.approx(0.5)
    assert ref.compute_for(0.5) == pytest.approx(16.0)
    assert compute_advantage(ref, var, 4.0) == pytest.approx(4.0, rel=1e-12)
    assert compute_advantage(ref, ref, 4.0) == pytest.approx(1.0, rel=1e-12)
    assert compute_advantage(var, ref, 4.0) == pytest.approx(0.25, rel=1e-12)  # the reference behind: < 1


def test_compute_advantage_reproduces_the_papers_1_25x():
    # Paper §5.1: baseline 1.891·C^-0.057, Block AttnRes 1.870·C^-0.058, at 5.6 PFLOP/s-days: 1.25x
    # (baseline fit 1.7141, Block fit 1.6922, baseline needs C ≈ 7.02).
    base, block = PowerLaw(1.891, 0.057), PowerLaw(1.870, 0.058)
    assert float(base.loss(5.6)) == pytest.approx(1.7141, abs=1e-4)
    assert float(block.loss(5.6)) == pytest.approx(1.6922, abs=1e-4)
    adv = compute_advantage(base, block, 5.6)
    assert adv * 5.6 == pytest.approx(7.02, abs=0.01)
    assert adv == pytest.approx(1.254, abs=0.002)
    # closed form
    expected = (base.A / (block.A * 5.6**-block.alpha)) ** (1 / base.alpha) / 5.6
    assert adv == pytest.approx(expected, rel=1e-12)


def test_fit_rejects_unfittable_input():
    with pytest.raises(ValueError, match="2 distinct"):
        fit_power_law([1.0, 1.0], [2.0, 2.1], min_points=2)
    with pytest.raises(ValueError, match="at least 3 distinct.*R² = 1"):
        fit_power_law([1.0, 2.0], [2.0, 1.9])  # two sizes: an exact line, not evidence of a power law
    with pytest.raises(ValueError, match="at least 3 distinct"):
        fit_power_law([1.0, 2.0, 2.0], [2.0, 1.9, 1.91])
    assert fit_power_law([1.0, 2.0], [2.0, 1.9], min_points=2).r2 == 1.0
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1.0, -2.0], [2.0, 1.9])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1.0, 2.0], [2.0, math.nan])
    with pytest.raises(ValueError, match="alpha"):
        PowerLaw(2.0, 0.0).compute_for(1.5)


def test_pflops_days_unit():
    assert pflops_days(1e15 * 86400) == pytest.approx(1.0)
    assert pflops_days(5.6 * 8.64e19) == pytest.approx(5.6)
