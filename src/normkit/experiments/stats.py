"""Aggregation over seeds and the one-sided paired t-test behind every claim's verdict.

The test is the evaluation protocol of Davis & Frank's official code:
``scipy.stats.ttest_rel(better, worse, alternative="greater")`` over seeds paired across methods,
significant at ``p <= alpha`` (0.05; any alpha in (0, 0.5), so that at most one direction can be
significant). A claim is tested in both directions: "held" when the claimed direction is
significant, "did not hold" when the opposite direction is, and "inconclusive at this size"
otherwise, or with fewer than two paired seeds. A non-finite value (a diverged run) counts as the
worst outcome of the method that produced it (see :func:`paired_test`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "HELD",
    "INCONCLUSIVE",
    "NOT_HELD",
    "NOT_TESTED",
    "PairedTest",
    "aggregate",
    "aggregate_curves",
    "check_alpha",
    "finite_or_none",
    "paired_test",
]

HELD = "held"
NOT_HELD = "did not hold"
INCONCLUSIVE = "inconclusive at this size"
NOT_TESTED = "not tested"

MIN_PAIRS = 2


def check_alpha(alpha: float) -> float:
    """``alpha`` if ``0 < alpha < 0.5``, else ``ValueError``.

    From 0.5 up both one-sided tests could be significant at once (their p-values add up to 1),
    and the verdict would depend on which direction is checked first.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 0.5:
        raise ValueError(f"expected alpha in (0, 0.5), got {alpha!r}")
    return float(alpha)


def finite_or_none(value: Any) -> float | None:
    """``float(value)`` if it is a finite number, else ``None`` (NaN, inf, None)."""
    if value is None or isinstance(value, str):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def aggregate(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and std (ddof=1; 0.0 for a single value) over the finite values.

    Returns ``{"mean", "std", "n", "n_missing", "values"}``; ``mean``/``std`` are ``None``
    when no value is finite. ``values`` keeps the input order, with ``None`` for non-finite ones.
    """
    clean = [finite_or_none(v) for v in values]
    finite = [v for v in clean if v is not None]
    n = len(finite)
    mean: float | None = None
    std: float | None = None
    if n:
        # Diverged runs can report losses near the float limit: work in units of the largest
        # magnitude so that neither the sum nor the squares overflow.
        largest = max(abs(v) for v in finite)
        unit = largest if largest > 1e150 else 1.0
        scaled = [v / unit for v in finite]
        mean_u = math.fsum(scaled) / n
        mean = mean_u * unit
        std = 0.0
        if n >= 2:
            std = finite_or_none(
                math.sqrt(math.fsum((v - mean_u) ** 2 for v in scaled) / (n - 1)) * unit
            )
    return {"mean": mean, "std": std, "n": n, "n_missing": len(clean) - n, "values": clean}


def finite_values(values: Sequence[Any]) -> list[float]:
    """The finite values, in order (None, NaN, infinities and non-numbers dropped)."""
    return [v for v in map(finite_or_none, values) if v is not None]


def mean_std(values: Sequence[Any]) -> tuple[float, float]:
    """:func:`aggregate`'s mean and std as plain floats for plotting: NaN and 0.0 when no value
    is finite."""
    agg = aggregate(list(values))
    mean = agg["mean"] if agg["mean"] is not None else math.nan
    return mean, agg["std"] if agg["std"] is not None else 0.0


def aggregate_curves(curves: Sequence[Sequence[float | None]]) -> dict[str, Any]:
    """Pointwise mean and std of curves, over the curves long enough to reach each point."""
    length = max((len(c) for c in curves), default=0)
    mean: list[float | None] = []
    std: list[float | None] = []
    for i in range(length):
        point = aggregate([c[i] for c in curves if len(c) > i])
        mean.append(point["mean"])
        std.append(point["std"])
    return {"mean": mean, "std": std, "n": len(curves)}


@dataclass(frozen=True)
class PairedTest:
    """The outcome of one paired comparison (JSON-ready through :meth:`as_dict`)."""

    n: int
    """Number of paired seeds tested (pairs with a non-finite value included)."""
    mean_diff: float | None
    """Mean of (better - worse), sign-flipped for a lower-is-better metric (margin not added),
    over the pairs whose two values are finite."""
    std_diff: float | None
    t: float | None
    """The t statistic (``None`` when undefined: fewer than 2 pairs, or zero variance); with
    non-finite values, its limit (see :func:`paired_test`)."""
    p: float | None
    """p-value of the claimed direction (``None`` when there is no test)."""
    p_opposite: float | None
    """p-value of the opposite direction (``None`` when there is no test)."""
    verdict: str
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_test(
    better: Sequence[float | None],
    worse: Sequence[float | None],
    *,
    higher_is_better: bool = True,
    margin: float = 0.0,
    alpha: float = 0.05,
) -> PairedTest:
    """One-sided paired t-test of "``better`` beats ``worse`` (by more than ``-margin``)".

    ``better[i]`` and ``worse[i]`` come from the same seed. With the differences
    ``d = better - worse`` (negated for a lower-is-better metric), the claimed direction is
    H1: mean(d) > -margin, tested by ``ttest_rel(d + margin, 0, alternative="greater")``, and the
    opposite direction by ``alternative="less"``. ``mean_diff`` and ``std_diff`` are over the
    pairs whose two values are finite (margin not added).

    **Non-finite values** (NaN, infinities, ``None``: a diverged run) are never dropped. A
    non-finite value is the worst possible outcome for the method that produced it: a pair with
    one non-finite side is a win for the other side by an unbounded difference, and a pair with
    two is a tie (d = 0). With any unbounded difference the test is the t-test's limit as those
    differences grow without bound, which depends on their signs only: the t-test of the signs
    (+1 for a win of ``better``, -1 for a loss, 0 for the other pairs). So a non-finite value can
    only count against the side that produced it. On top of that a claim is never "held" while
    any value of its ``better`` side is non-finite (the note says so).

    Zero-variance differences make the t statistic undefined; then, if every shifted
    difference is the same non-zero number the direction is plain, and that direction gets
    p = 0 (the other p = 1); if they are all zero there is no evidence either way
    (inconclusive, p = ``None``). "The same" allows rounding: a spread within 16 units in the
    last place of the largest input value.
    """
    if len(better) != len(worse):
        raise ValueError(f"paired_test: expected equal lengths, got {len(better)} and {len(worse)}")
    check_alpha(alpha)
    b_clean = [finite_or_none(b) for b in better]
    w_clean = [finite_or_none(w) for w in worse]
    n = len(b_clean)
    finite = [(b, w) for b, w in zip(b_clean, w_clean) if b is not None and w is not None]
    b_bad = sum(b is None for b in b_clean)
    w_bad = sum(w is None for w in w_clean)
    losses = sum(b is None and w is not None for b, w in zip(b_clean, w_clean))
    wins = sum(b is not None and w is None for b, w in zip(b_clean, w_clean))
    ties = sum(b is None and w is None for b, w in zip(b_clean, w_clean))
    sign = 1.0 if higher_is_better else -1.0
    # Work in units of the largest magnitude when values are huge, so no difference overflows
    # (the t statistic does not depend on the unit).
    largest = max([abs(margin), *(max(abs(b), abs(w)) for b, w in finite)], default=0.0)
    unit = largest if largest > 1e150 else 1.0
    diffs = [sign * (b / unit - w / unit) for b, w in finite]
    summary = aggregate(diffs)
    mean_diff = summary["mean"] * unit if summary["mean"] is not None else None
    std_diff = summary["std"] * unit if summary["std"] is not None else None
    notes = []
    if b_bad or w_bad:
        parts = [
            f"{k} non-finite value(s) of the {side} side"
            for k, side in ((b_bad, "better"), (w_bad, "worse"))
            if k
        ]
        notes.append(
            f"{' and '.join(parts)}, each counted as that side's worst outcome "
            f"({wins} win(s), {losses} loss(es), {ties} tie(s) for the better side)"
        )

    def result(t: float | None, p: float | None, p_opp: float | None, verdict: str) -> PairedTest:
        if verdict == HELD and b_bad:
            notes.append(f"not held: the better side has {b_bad} non-finite value(s)")
            verdict = INCONCLUSIVE
        return PairedTest(
            n,
            finite_or_none(mean_diff),
            finite_or_none(std_diff),
            t,
            p,
            p_opp,
            verdict,
            "; ".join(notes),
        )

    if n < MIN_PAIRS:
        notes.append(f"{n} paired seed(s); a paired t-test needs at least {MIN_PAIRS}")
        return result(None, None, None, INCONCLUSIVE)
    if wins or losses:
        # The limit of the t-test as the unbounded differences grow: the finite differences
        # (and the margin) vanish beside them.
        shifted = [1.0] * wins + [-1.0] * losses + [0.0] * (n - wins - losses)
        tol = 0.0
    else:
        shifted = [d + margin / unit for d in diffs] + [margin / unit] * ties
        tol = 16 * sys.float_info.epsilon * largest / unit
    if max(shifted) - min(shifted) <= tol:
        # ttest_rel would return NaN: the standard error is zero.
        level = math.fsum(shifted) / n
        if abs(level) <= tol:
            notes.append("all differences are zero")
            return result(None, None, None, INCONCLUSIVE)
        notes.append("all differences are equal; the direction is certain")
        if level > 0:
            return result(None, 0.0, 1.0, HELD)
        return result(None, 1.0, 0.0, NOT_HELD)

    from scipy import stats  # type: ignore[import-untyped]  # an experiments extra; slow

    zeros = [0.0] * n
    greater = stats.ttest_rel(shifted, zeros, alternative="greater")
    less = stats.ttest_rel(shifted, zeros, alternative="less")
    p, p_opp, t = float(greater.pvalue), float(less.pvalue), float(greater.statistic)
    if p <= alpha:
        verdict = HELD
    elif p_opp <= alpha:
        verdict = NOT_HELD
    else:
        verdict = INCONCLUSIVE
    return result(t, p, p_opp, verdict)
