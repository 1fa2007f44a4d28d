"""Seed statistics without scipy: Student's t tail via the regularized incomplete beta, and Welch's test.

The challenge's rule for a new record: it must beat the previous one by 0.005 nats (per token) at
p < 0.01. With a few seeds of each config, the test is one-sided Welch on the per-seed values:

    H0: mean(reference) - mean(candidate) <= margin      H1: the difference exceeds the margin

    golf compare --a KEY1,KEY2,KEY3 --b KEY4,KEY5,KEY6     (golf/submit.py prints this test)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

_EPS = 1e-15       # relative convergence of the continued fraction
_TINY = 1e-300     # keeps Lentz's method away from division by zero
_MAX_TERMS = 10_000


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated with the modified Lentz method."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_TERMS + 1):
        m2 = 2 * m
        # even step: d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m))
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        # odd step: d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # the fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom (df may be fractional, as Welch's is)."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0.0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    m = math.fsum(values) / n
    if n == 1:
        return m, 0.0
    return m, math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))


@dataclass(frozen=True)
class WelchResult:
    mean_candidate: float
    mean_reference: float
    improvement: float   # mean(reference) - mean(candidate): positive when the candidate is lower (better)
    margin: float        # the improvement H1 claims to exceed
    t: float
    df: float
    p_value: float       # one-sided: P(improvement this large | true improvement == margin)


def welch_one_sided(candidate: Sequence[float], reference: Sequence[float], margin: float = 0.0) -> WelchResult:
    """One-sided Welch t-test that ``candidate`` is lower than ``reference`` by more than ``margin``."""
    if len(candidate) < 2 or len(reference) < 2:
        raise ValueError(f"Welch's test needs at least 2 runs per side (got {len(candidate)} and {len(reference)})")
    ma, sa = mean_std(candidate)
    mb, sb = mean_std(reference)
    va, vb = sa * sa / len(candidate), sb * sb / len(reference)
    improvement = mb - ma
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical values within each side: the difference is known exactly
        t = math.inf if improvement > margin else -math.inf
        return WelchResult(ma, mb, improvement, margin, t, math.inf, 0.0 if improvement > margin else 1.0)
    t = (improvement - margin) / se
    # Welch-Satterthwaite degrees of freedom
    df = (va + vb) ** 2 / (va * va / (len(candidate) - 1) + vb * vb / (len(reference) - 1))
    return WelchResult(ma, mb, improvement, margin, t, df, student_t_sf(t, df))
