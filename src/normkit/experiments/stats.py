"""Aggregation over seeds and the one-sided paired t-test behind every claim's verdict.

The test is the evaluation protocol of Davis & Frank's official code:
``scipy.stats.ttest_rel(better, worse, alternative="greater")`` over seeds paired across methods,
significant at ``p <= alpha`` (0.05). A claim is tested in both directions: "held" when the
claimed direction is significant, "did not hold" when the opposite direction is, and
"inconclusive at this size" otherwise, or with fewer than two paired seeds.
"""

from __future__ import annotations

import math
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
    "finite_or_none",
    "paired_test",
]

HELD = "held"
NOT_HELD = "did not hold"
INCONCLUSIVE = "inconclusive at this size"
NOT_TESTED = "not tested"

MIN_PAIRS = 2


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
    """Number of paired seeds used."""
    mean_diff: float | None
    """Mean of (better - worse), sign-flipped for a lower-is-better metric (margin not added)."""
    std_diff: float | None
    t: float | None
    """The t statistic (``None`` when undefined: fewer than 2 pairs, or zero variance)."""
    p: float | None
    """p-value of the claimed direction (``None`` when there is no test)."""
    p_opposite: float | None
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

    ``better[i]`` and ``worse[i]`` come from the same seed. Pairs with a non-finite value are
    dropped (and counted in the note). With the differences ``d = better - worse`` (negated for
    a lower-is-better metric), the claimed direction is H1: mean(d) > -margin, tested by
    ``ttest_rel(d + margin, 0, alternative="greater")``, and the opposite direction by
    ``alternative="less"``.

    Zero-variance differences make the t statistic undefined; then, if every shifted
    difference is the same non-zero number the direction is plain, and that direction gets
    p = 0 (the other p = 1); if they are all zero there is no evidence either way
    (inconclusive, p = ``None``).
    """
    if len(better) != len(worse):
        raise ValueError(f"paired_test: expected equal lengths, got {len(better)} and {len(worse)}")
    pairs = [
        (b, w)
        for b, w in ((finite_or_none(b), finite_or_none(w)) for b, w in zip(better, worse))
        if b is not None and w is not None
    ]
    dropped = len(better) - len(pairs)
    notes = [f"{dropped} pair(s) with a non-finite value dropped"] if dropped else []
    sign = 1.0 if higher_is_better else -1.0
    diffs = [sign * (b - w) for b, w in pairs]
    n = len(diffs)
    summary = aggregate(diffs)
    mean_diff, std_diff = summary["mean"], summary["std"]

    def result(t: float | None, p: float | None, p_opp: float | None, verdict: str) -> PairedTest:
        return PairedTest(n, mean_diff, std_diff, t, p, p_opp, verdict, "; ".join(notes))

    if n < MIN_PAIRS:
        notes.append(f"{n} paired seed(s); a paired t-test needs at least {MIN_PAIRS}")
        return result(None, None, None, INCONCLUSIVE)
    shifted = [d + margin for d in diffs]
    scale = max(1.0, *(abs(d) for d in shifted))
    if max(shifted) - min(shifted) <= 1e-12 * scale:
        # ttest_rel would return NaN: the standard error is zero.
        level = math.fsum(shifted) / n
        if abs(level) <= 1e-12 * scale:
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
