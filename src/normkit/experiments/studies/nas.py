"""The ``nas`` study (Gong et al., Sandwich Batch Normalization, arXiv 2102.11382, §NAS).

The paper's claim: in a DARTS supernet, where the features reaching a node come from a different
sampled combination of candidate operations at every step, split-statistics Sandwich BN (SaBN)
makes the architecture search both *better* (the derived architecture is more accurate) and
*more consistent* (its accuracy varies far less across search seeds: 71.56 ± 1.39 against
44.05 ± 7.47 on NAS-Bench-201 CIFAR-100).

Setup (``reference/core-methods.md`` §1.2 "NAS SaBN" and §1.6 B), scaled to 8×8 digits:

* **Data.** :func:`normkit.experiments.data.digits_split` (1347 train / 450 test). The training
  images are split in two fixed halves by a permutation seeded with ``data_seed``: the
  *search-train* half trains the supernet's weights and the *search-val* half its architecture
  weights (DARTS). The derived architecture is then retrained on all the training images (the
  first ``train_size`` of them) and tested on the 450 test images.
* **Supernet.** A NAS-Bench-201 skeleton: a stem (3×3 conv, BN), a searched cell at 8×8 with
  ``width`` channels, a residual reduction block (stride 2, twice the channels), a second searched
  cell at 4×4, then BN, ReLU, global average pooling and a linear classifier. A cell has nodes
  0 (its input) to 3 (its output); node ``i`` sums one *mixed edge* from every node ``j < i``
  (6 edges). A mixed edge is the softmax-weighted sum of the candidate operations :data:`OPS`:
  ReLU-conv3×3-norm, ReLU-conv1×1-norm, 3×3 average pooling and skip. Both cells share one set of
  architecture weights ``alpha`` (6 × 4, initialised ``1e-3 · N(0, 1)``), as in NAS-Bench-201.
* **Norm index** (the official ``search_cells_sabn.py``): at every forward pass each cell draws
  one operation per edge from ``softmax(alpha)`` (``multinomial``, not argmax; one draw for the
  whole batch). The norm layers of the operations on the edges leaving node ``j`` then get the
  index of the combination of operations drawn on the edges *feeding* node ``j``, in mixed radix:
  ``index = Σ_k |OPS|^k · op(j ← k)`` over ``k < j``, among ``|OPS|^j`` indices (:func:`norm_index`;
  node 0 has one index). The mixed sum itself still weights every operation by ``softmax(alpha)``.
* **Methods** (the norm inside the candidate convolutions; the stem, the reduction block and the
  head always use ``nn.BatchNorm2d``): ``bn`` (``nn.BatchNorm2d``, blind to the index), ``ccbn``
  (:class:`normkit.CategoricalConditionalBatchNorm2d`: shared statistics, per-index affine) and
  ``sabn`` (:class:`normkit.SandwichBatchNorm2d` with ``split_stats=True``: per-index statistics,
  a shared affine initialised ``N(1, 0.02)`` as in the official NAS code, then the per-index
  affine). As in the official run (``--track_running_stats 0``) the searched norms keep no
  running statistics, so they always normalize with batch statistics; since one index covers a
  whole batch, split statistics then coincide with shared ones, and what separates ``sabn`` from
  ``ccbn`` is the shared (sandwich) affine.
* **Search** (first-order DARTS, NAS-Bench-201's DARTS-V1): per step, one SGD step of the weights
  on a search-train batch (lr ``w_lr`` with a cosine decay to 4 % of it, momentum 0.9, weight
  decay 5e-4, gradient clipping at 5), then one Adam step of ``alpha`` on a search-val batch (lr
  ``arch_lr``, betas (0.5, 0.999), weight decay 1e-3). ``arch_lr`` is larger than DARTS's 3e-4
  because the search is about a hundred steps long rather than tens of thousands, and the first
  ``warmup_epochs`` train the weights only (a common DARTS warm-up, not in the official run), so
  that the architecture is not chosen while every convolution is still random.
* **Derived architecture**: the argmax of ``alpha`` on every edge (:func:`derive`). It is built
  with ``nn.BatchNorm2d`` everywhere, whatever the search method (the norm under study only
  steers the search, as in the paper, which reads the derived architecture's accuracy from
  NAS-Bench-201), trained briefly (``retrain_epochs`` of SGD at ``retrain_lr``, cosine, batch
  ``batch_size``) and tested.
* **Paired seeds.** The seed fixes the convolution and classifier initialization (the norm layers
  are built from their own generator, so every method starts from the same convolutions), the
  initial ``alpha``, the order of the batches and the operation draws; the retraining of the
  derived architecture starts from an initialization that depends on the seed only. Two methods
  that derive the same architecture at a seed therefore score exactly the same.

Metrics of a run (:meth:`NasStudy.run`): ``derived_acc`` (test accuracy of the retrained derived
architecture; the claims' metric), ``supernet_val_acc`` (the supernet on the search-val half),
``arch_entropy`` (mean entropy of ``softmax(alpha)`` over the edges, in nats; ``log 4 ≈ 1.386``
is uniform), ``n_conv_ops`` and ``n_skip_ops`` (in the derived cell: DARTS's failure mode is a
cell of skips and pools), ``genotype`` (the derived operations, ``"target<-source:op"`` joined by
``|``), and the curves ``curve_search_loss`` (weight-step loss per search epoch) and
``curve_arch_entropy`` (after each search epoch).

**Claims and tests.** "Better": SaBN's derived accuracy beats BN's and CCBN's (two one-sided
paired t-tests over the seeds, the framework's :class:`~normkit.experiments.study.Claim`).
"More consistent" is a claim about the spread across seeds, which a paired t-test on the
accuracies does not test. It is tested here by the **Pitman–Morgan test** for the equality of two
variances of *paired* samples (the seeds pair the methods, so the two samples are correlated and
an F- or Levene test would be wrong): with ``u = worse + better`` and ``v = worse − better`` over
the seeds, ``var(worse) − var(better) = cov(u, v)``, so the one-sided claim "SaBN's accuracy varies
less than BN's" is the one-sided test of a positive Pearson correlation of ``u`` and ``v``,
``t = r · sqrt((n − 2) / (1 − r²))`` with ``n − 2`` degrees of freedom (:func:`pitman_morgan`).
Verdicts follow the framework's rule (held at p ≤ 0.05, did not hold when the opposite
direction is significant, inconclusive otherwise, and with fewer than 3 seeds, where the test
has no degree of freedom). :meth:`NasStudy.extra_claims` adds these two tests to the claims (they
appear in ``results.json``, ``report.md`` and the terminal summary, with a note naming the test;
their "mean diff" column is ``std(worse) − std(better)`` over the seeds) and draws them in
``nas_spread.png``. With 2 seeds (``--quick``) they are inconclusive by construction.

Time, measured through the runner (2 jobs of 1 thread) on 2 CPU cores shared with other jobs
(load 5–7, so wall times are 2–3 times an idle machine's): ``--quick`` (3 methods × 2 seeds)
took 66 s wall, its runs 27.5 s of CPU (about 20 s on 2 idle cores); a default run uses about
19 s of CPU, so the default study (3 methods × 10 seeds) needs about 580 s of CPU, about 5 min
on 2 idle cores.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import normkit as nk
from normkit.experiments import data, stats, training
from normkit.experiments.stats import finite_values, mean_std
from normkit.experiments.study import (
    Claim,
    ConfigError,
    Metrics,
    Progress,
    Run,
    Study,
    check_ints,
    check_methods,
    check_numbers,
    merge_config,
    metrics_by_method,
)

__all__ = [
    "EDGES",
    "METHODS",
    "OPS",
    "STUDY",
    "MixedEdge",
    "NasStudy",
    "derive",
    "norm_index",
    "num_indices",
    "pitman_morgan",
    "spread_tests",
]

#: The study's methods: the norm layer inside the candidate convolutions.
METHODS: tuple[str, ...] = ("bn", "ccbn", "sabn")

#: The candidate operations of every edge, in index order.
OPS: tuple[str, ...] = ("conv3x3", "conv1x1", "avgpool", "skip")

#: Nodes per cell: node 0 is the cell's input, node ``NODES - 1`` its output.
NODES = 4

#: The edges ``(target, source)`` of a cell, in the order of the rows of ``alpha``.
EDGES: tuple[tuple[int, int], ...] = tuple((i, j) for i in range(1, NODES) for j in range(i))

#: The searched cells of the supernet (one at 8×8, one at 4×4 after the reduction block).
NUM_CELLS = 2

#: The study has one setting.
SETTING = "darts"

_EDGE_ROW = {edge: row for row, edge in enumerate(EDGES)}

_DEFAULTS: dict[str, Any] = {
    "methods": list(METHODS),
    "width": 8,
    "warmup_epochs": 2,
    "search_epochs": 10,
    "search_size": 1347,
    "batch_size": 64,
    "w_lr": 0.05,
    "arch_lr": 0.03,
    "retrain_epochs": 3,
    "retrain_lr": 0.05,
    "train_size": 1347,
    "data_seed": 0,
    "seeds": 10,
}
_QUICK: dict[str, Any] = {
    "warmup_epochs": 1,
    "search_epochs": 4,
    "search_size": 640,
    "retrain_epochs": 2,
    "seeds": 2,
}


# --------------------------------------------------------------------------------------------
# The norm index


def num_indices(source: int, num_ops: int = len(OPS)) -> int:
    """How many norm indices the operations on the edges leaving node ``source`` have:
    one per combination of the operations feeding it (``num_ops ** source``; 1 for node 0)."""
    return num_ops**source


def norm_index(sampled: Sequence[int], source: int, num_ops: int = len(OPS)) -> int:
    """The norm index of an operation on an edge leaving node ``source``.

    ``sampled[row]`` is the operation drawn on edge ``EDGES[row]``; the index is the mixed-radix
    number ``Σ_k num_ops^k · sampled[edge (source ← k)]`` over the ``source`` edges feeding the
    node (0 for node 0), as in the official ``search_cells_sabn.py``.
    """
    return sum(num_ops**k * int(sampled[_EDGE_ROW[(source, k)]]) for k in range(source))


# --------------------------------------------------------------------------------------------
# Operations, cells and networks

NormFactory = Callable[[int, int], nn.Module]
"""``factory(channels, num_indices) -> norm layer``."""


def _norm_factory(method: str, seed: int) -> NormFactory:
    """The searched convolutions' norm for ``method``; built from its own generator, so that
    the global one (which initialises the convolutions) is consumed alike by every method."""
    counter = [0]

    def make(channels: int, k: int) -> nn.Module:
        counter[0] += 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10_000 * (seed + 1) + counter[0])
            if method == "bn":
                # With an affine, unlike the official DARTS script's baseline (no --affine):
                # see docs/reproduction.md, where an affine-free rerun gives the same verdict.
                return nn.BatchNorm2d(channels, track_running_stats=False)
            if method == "ccbn":
                return nk.CategoricalConditionalBatchNorm2d(channels, k, track_running_stats=False)
            if method == "sabn":
                return nk.SandwichBatchNorm2d(
                    channels, k, track_running_stats=False, split_stats=True, shared_std=0.02
                )
        raise ValueError(f"nas: unknown method {method!r}; known: {', '.join(METHODS)}")

    return make


def _plain_bn(channels: int, k: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


class _ConvNorm(nn.Module):
    """ReLU, conv, norm; the ReLU is applied by the caller (once per mixed edge)."""

    pre_relu = True

    def __init__(self, channels: int, kernel: int, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False)
        self.norm = norm

    def forward(self, x: Tensor, index: int) -> Tensor:
        x = self.conv(x)
        if getattr(self.norm, "takes_domain", False):
            return self.norm(x, index)
        return self.norm(x)


class _Pool(nn.Module):
    pre_relu = False

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x: Tensor, index: int) -> Tensor:
        return self.pool(x)


class _Skip(nn.Module):
    pre_relu = False

    def forward(self, x: Tensor, index: int) -> Tensor:
        return x


def _make_op(name: str, channels: int, norm: NormFactory, k: int) -> nn.Module:
    if name == "conv3x3":
        return _ConvNorm(channels, 3, norm(channels, k))
    if name == "conv1x1":
        return _ConvNorm(channels, 1, norm(channels, k))
    if name == "avgpool":
        return _Pool()
    if name == "skip":
        return _Skip()
    raise ValueError(f"nas: unknown operation {name!r}; known: {', '.join(OPS)}")


def _apply(op: nn.Module, x: Tensor, index: int) -> Tensor:
    """One operation on its own: ReLU-conv-norm, pooling or skip."""
    return op(F.relu(x) if op.pre_relu else x, index)


class MixedEdge(nn.Module):
    """``Σ_o w_o · op_o(x)`` over the candidate operations :data:`OPS` (a DARTS edge); the
    convolutions' norms get ``index``."""

    def __init__(self, channels: int, norm: NormFactory, k: int) -> None:
        super().__init__()
        self.ops = nn.ModuleList(_make_op(name, channels, norm, k) for name in OPS)

    def forward(self, x: Tensor, weights: Tensor, index: int) -> Tensor:
        relu = F.relu(x)
        outs = torch.stack([op(relu if op.pre_relu else x, index) for op in self.ops])
        return (weights.view(-1, 1, 1, 1, 1) * outs).sum(0)


class _SearchCell(nn.Module):
    def __init__(self, channels: int, norm: NormFactory) -> None:
        super().__init__()
        self.edges = nn.ModuleList(MixedEdge(channels, norm, num_indices(j)) for _, j in EDGES)

    def forward(self, x: Tensor, weights: Tensor, sampled: Sequence[int]) -> Tensor:
        nodes = [x]
        for i in range(1, NODES):
            total: Tensor | None = None
            for j in range(i):
                row = _EDGE_ROW[(i, j)]
                h = self.edges[row](nodes[j], weights[row], norm_index(sampled, j))
                total = h if total is None else total + h
            assert total is not None
            nodes.append(total)
        return nodes[-1]


class _FixedCell(nn.Module):
    """The derived cell: one operation per edge, with plain BN."""

    def __init__(self, channels: int, genotype: Sequence[int]) -> None:
        super().__init__()
        self.genotype = list(genotype)
        self.edges = nn.ModuleList(
            _make_op(OPS[op], channels, _plain_bn, 1) for op in self.genotype
        )

    def forward(self, x: Tensor) -> Tensor:
        nodes = [x]
        for i in range(1, NODES):
            total: Tensor | None = None
            for j in range(i):
                h = _apply(self.edges[_EDGE_ROW[(i, j)]], nodes[j], 0)
                total = h if total is None else total + h
            assert total is not None
            nodes.append(total)
        return nodes[-1]


class _Reduction(nn.Module):
    """NAS-Bench-201's residual reduction block: two ReLU-conv3×3-BN (the first of stride 2)
    plus a shortcut of 2×2 average pooling and a 1×1 convolution."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.conv_b = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn_a, self.bn_b = nn.BatchNorm2d(c_out), nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn_a(self.conv_a(F.relu(x)))
        h = self.bn_b(self.conv_b(F.relu(h)))
        return h + self.shortcut(F.avg_pool2d(x, 2))


class _Net(nn.Module):
    """Stem, cell, reduction, cell, head; ``cells`` are searched or fixed."""

    def __init__(self, width: int, make_cell: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.cell1 = make_cell(width)
        self.reduction = _Reduction(width, 2 * width)
        self.cell2 = make_cell(2 * width)
        self.last_bn = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, data.NUM_CLASSES)

    def _head(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.last_bn(x)).mean(dim=(2, 3)))


class SuperNet(_Net):
    """The supernet; ``alpha`` (``len(EDGES)`` × ``len(OPS)``) is shared by both cells."""

    def __init__(self, width: int, norm: NormFactory) -> None:
        super().__init__(width, lambda c: _SearchCell(c, norm))
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(EDGES), len(OPS)))

    def weights(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name != "alpha"]

    def forward(self, x: Tensor, sampled: Sequence[Sequence[int]]) -> Tensor:
        """``sampled[c]``: the operation drawn on each edge of cell ``c``."""
        w = F.softmax(self.alpha, dim=-1)
        h = self.stem_bn(self.stem(x))
        h = self.cell1(h, w, sampled[0])
        h = self.cell2(self.reduction(h), w, sampled[1])
        return self._head(h)


class DerivedNet(_Net):
    def __init__(self, width: int, genotype: Sequence[int]) -> None:
        super().__init__(width, lambda c: _FixedCell(c, genotype))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem_bn(self.stem(x))
        h = self.cell2(self.reduction(self.cell1(h)))
        return self._head(h)


def derive(alpha: Tensor) -> list[int]:
    """The derived architecture: the argmax operation of every edge (row of ``alpha``)."""
    return [int(i) for i in alpha.detach().argmax(dim=-1)]


def genotype_str(genotype: Sequence[int]) -> str:
    return "|".join(f"{i}<-{j}:{OPS[op]}" for (i, j), op in zip(EDGES, genotype))


def _sample(alpha: Tensor, generator: torch.Generator) -> list[list[int]]:
    probs = F.softmax(alpha.detach().float().cpu(), dim=-1)
    return [
        torch.multinomial(probs, 1, generator=generator).flatten().tolist()
        for _ in range(NUM_CELLS)
    ]


def _entropy(alpha: Tensor) -> float:
    logp = F.log_softmax(alpha.detach(), dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


# --------------------------------------------------------------------------------------------
# Data


@functools.lru_cache(maxsize=4)
def _halves(data_seed: int) -> tuple[Tensor, Tensor]:
    """Index of the search-train and search-val halves of the training images."""
    perm = torch.randperm(data.TRAIN_SIZE, generator=torch.Generator().manual_seed(data_seed))
    return perm[0::2].clone(), perm[1::2].clone()


# --------------------------------------------------------------------------------------------
# The variance test


SPREAD_ALPHA = 0.05
"""The significance level of the consistency claims (the framework's default)."""


def pitman_morgan(
    better: Sequence[float | None], worse: Sequence[float | None], *, alpha: float = SPREAD_ALPHA
) -> dict[str, Any]:
    """One-sided Pitman–Morgan test of "``better`` varies less than ``worse``" (paired samples).

    ``better[i]`` and ``worse[i]`` come from the same seed; pairs with a non-finite value (a
    diverged run) are left out of the test, but, as in the framework's ``paired_test``, the claim
    is never "held" while a value of its ``better`` side is non-finite: a diverged run is no
    evidence of a steadier method. With ``u = worse + better`` and ``v = worse − better``,
    ``cov(u, v) = var(worse) − var(better)``; the test is the one-sided test of a positive Pearson
    correlation ``r`` of u and v: ``t = r · sqrt((n − 2) / (1 − r²))``, Student's t with
    ``n − 2`` degrees of freedom. Returns ``{n, std_better, std_worse, r, t, p, p_opposite,
    verdict, note}``; the verdict rule is the framework's. Needs 3 pairs.
    """
    pairs = [
        (b, w)
        for b, w in (
            (stats.finite_or_none(b), stats.finite_or_none(w)) for b, w in zip(better, worse)
        )
        if b is not None and w is not None
    ]
    n = len(pairs)
    out: dict[str, Any] = {
        "n": n,
        "std_better": None,
        "std_worse": None,
        "r": None,
        "t": None,
        "p": None,
        "p_opposite": None,
        "verdict": stats.INCONCLUSIVE,
        "note": "",
    }
    if n >= 2:
        out["std_better"] = stats.aggregate([b for b, _ in pairs])["std"]
        out["std_worse"] = stats.aggregate([w for _, w in pairs])["std"]
    if n < 3:
        out["note"] = f"{n} paired seed(s); the Pitman–Morgan test needs at least 3"
        return out
    u = torch.tensor([w + b for b, w in pairs], dtype=torch.float64)
    v = torch.tensor([w - b for b, w in pairs], dtype=torch.float64)
    du, dv = u - u.mean(), v - v.mean()
    su, sv = float(du.norm()), float(dv.norm())
    scale = max(1.0, float(u.abs().max()), float(v.abs().max()))
    if su <= 1e-12 * scale or sv <= 1e-12 * scale:
        out["note"] = "the two spreads are equal by construction (u or v is constant)"
        return out
    r = max(-1.0, min(1.0, float((du * dv).sum()) / (su * sv)))
    out["r"] = r
    if abs(r) >= 1.0 - 1e-12:
        out["p"], out["p_opposite"] = (0.0, 1.0) if r > 0 else (1.0, 0.0)
        out["note"] = "perfect correlation of sums and differences; the direction is certain"
    else:
        from scipy import stats as sps  # type: ignore[import-untyped]

        t = r * math.sqrt((n - 2) / (1.0 - r * r))
        out["t"] = t
        out["p"] = float(sps.t.sf(t, n - 2))
        out["p_opposite"] = float(sps.t.cdf(t, n - 2))
    if out["p"] <= alpha:
        out["verdict"] = stats.HELD
    elif out["p_opposite"] <= alpha:
        out["verdict"] = stats.NOT_HELD
    dropped = len(better) - n
    if dropped:
        note = f"{dropped} pair(s) with a non-finite value left out"
        if out["verdict"] == stats.HELD and any(stats.finite_or_none(b) is None for b in better):
            note += "; not held: a diverged run is no evidence of a steadier method"
            out["verdict"] = stats.INCONCLUSIVE
        out["note"] = "; ".join(x for x in (out["note"], note) if x)
    return out


#: The consistency claims: (better, worse) on ``derived_acc``, tested by :func:`pitman_morgan`.
SPREAD_CLAIMS: tuple[tuple[str, str], ...] = (("sabn", "bn"), ("sabn", "ccbn"))

_NAMES = {"bn": "BN", "ccbn": "CCBN", "sabn": "SaBN"}


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def spread_tests(results: Mapping[str, Any], alpha: float = SPREAD_ALPHA) -> list[dict[str, Any]]:
    """The consistency claims as claim entries of ``results.json`` (one per pair in
    :data:`SPREAD_CLAIMS` whose methods both ran), from ``results["runs"]``."""
    values: dict[str, dict[int, Any]] = {}
    setting = SETTING
    for entry in results.get("runs", {}).values():
        metrics = entry.get("metrics") or {}
        run = entry["run"]
        setting = run["setting"]
        values.setdefault(run["method"], {})[int(run["seed"])] = metrics.get("derived_acc")
    tests = []
    for better, worse in SPREAD_CLAIMS:
        if better not in values or worse not in values:
            continue
        seeds = sorted(set(values[better]) & set(values[worse]))
        test = pitman_morgan(
            [values[better][s] for s in seeds], [values[worse][s] for s in seeds], alpha=alpha
        )
        sb, sw = test["std_better"], test["std_worse"]
        diff = sw - sb if sb is not None and sw is not None else None
        detail = (
            f"Pitman–Morgan test for paired variances, not a t-test: std over seeds "
            f"{_NAMES[worse]} {_fmt(sw)}, {_NAMES[better]} {_fmt(sb)}; mean diff = "
            f"std({worse}) − std({better})"
            + (f"; r = {test['r']:.3f}" if test["r"] is not None else "")
        )
        tests.append(
            {
                "text": (
                    f"{_NAMES[better]} makes the search more consistent than {_NAMES[worse]}: "
                    "derived accuracy varies less across seeds"
                ),
                "metric": "derived_acc",
                "better": {"method": better, "setting": setting},
                "worse": {"method": worse, "setting": setting},
                "higher_is_better": True,
                "margin": 0.0,
                "alpha": alpha,
                "test": "pitman-morgan",
                "n": test["n"],
                "mean_diff": diff,
                "std_diff": None,
                "t": test["t"],
                "p": test["p"],
                "p_opposite": test["p_opposite"],
                "verdict": test["verdict"],
                "note": "; ".join(x for x in (detail, test["note"]) if x),
            }
        )
    return tests


# --------------------------------------------------------------------------------------------
# The study


class NasStudy(Study):
    """BN, CCBN and split-statistics SaBN as the norm of a DARTS supernet on the digits.

    ``extra_claims`` adds the consistency tests to the claims (see the module docstring);
    ``figures(results, out_dir)`` writes ``nas_derived_acc.png`` (derived accuracy per method,
    mean ± std and one dot per seed), ``nas_spread.png`` (the std over seeds, with the Pitman–Morgan
    p-values), ``nas_ops.png`` (how often each operation was derived on each edge) and
    ``nas_search.png`` (search loss and architecture entropy per search epoch).
    """

    def config(self, quick: bool, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The sizes: ``methods`` (all three), ``width`` (8: channels of the first cell; 16 in
        the second), ``warmup_epochs`` (2; 1 quick: weight-only epochs before the architecture
        steps start), ``search_epochs`` (10; 4 quick), ``search_size`` (1347: the search uses
        the first that many training images, halved into search-train and search-val; 640
        quick), ``batch_size`` (64), ``w_lr`` (0.05), ``arch_lr`` (0.03), ``retrain_epochs`` (3;
        2 quick), ``retrain_lr`` (0.05), ``train_size`` (1347: images to retrain on),
        ``data_seed`` (0: the halves) and ``seeds`` (10; 2 quick).

        An override of ``None`` keeps the default. Raises :class:`ConfigError` naming the option.
        """
        cfg = merge_config("nas", _DEFAULTS, _QUICK, quick, overrides)
        _validate(cfg)
        return cfg

    def runs(self, config: Mapping[str, Any], seeds: Sequence[int]) -> list[Run]:
        return [Run(m, SETTING, int(s)) for m in config["methods"] for s in seeds]

    def run(self, run: Run, config: Mapping[str, Any], progress: Progress) -> Metrics:
        """Search with one method at one seed, derive, retrain and test (see the module
        docstring). Deterministic for a given run, config and intra-op thread count."""
        if run.method not in METHODS:
            raise ValueError(f"nas: unknown method {run.method!r}; known: {METHODS}")
        device = torch.device(config.get("device", "cpu"))
        digits = data.digits_split().to(device)
        batch = int(config["batch_size"])
        search_idx, val_idx = (
            t[t < int(config["search_size"])] for t in _halves(int(config["data_seed"]))
        )
        search_idx, val_idx = search_idx.to(device), val_idx.to(device)
        x_s, y_s = digits.x_train[search_idx], digits.y_train[search_idx]
        x_v, y_v = digits.x_train[val_idx], digits.y_train[val_idx]

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run.seed)
            net = SuperNet(int(config["width"]), _norm_factory(run.method, run.seed))
        net = net.to(device).train()
        warmup = int(config["warmup_epochs"])
        epochs = warmup + int(config["search_epochs"])
        steps = max(1, len(y_s) // batch)
        w_lr = float(config["w_lr"])
        w_opt = torch.optim.SGD(
            net.weights(), lr=w_lr, momentum=0.9, weight_decay=5e-4, nesterov=True
        )
        w_sched = training.cosine_lr(w_opt, epochs * steps, floor=0.04)
        a_opt = torch.optim.Adam(
            [net.alpha], lr=float(config["arch_lr"]), betas=(0.5, 0.999), weight_decay=1e-3
        )
        order = torch.Generator().manual_seed(run.seed)
        draws = torch.Generator().manual_seed(run.seed + 7919)
        retrain_epochs = int(config["retrain_epochs"])
        total_work = epochs * steps + retrain_epochs * 2  # progress units, roughly
        curve_loss: list[float] = []
        curve_entropy: list[float] = []
        progress(0.0)
        done = 0
        for epoch in range(epochs):
            perm_s = torch.randperm(len(y_s), generator=order).to(device)
            perm_v = torch.randperm(len(y_v), generator=order).to(device)
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            for step in range(steps):
                i_s = perm_s[step * batch : (step + 1) * batch]
                v_at = (step * batch) % max(1, len(y_v) - batch + 1)
                i_v = perm_v[v_at : v_at + batch]
                # Weights on a search-train batch.
                loss = F.cross_entropy(net(x_s[i_s], _sample(net.alpha, draws)), y_s[i_s])
                w_opt.zero_grad(set_to_none=True)
                net.alpha.grad = None
                loss.backward()
                nn.utils.clip_grad_norm_(net.weights(), 5.0)
                w_opt.step()
                w_sched.step()
                loss_sum += loss.detach().double()
                done += 1
                progress(min(1.0, done / total_work))
                if epoch < warmup:
                    continue
                # Architecture on a search-val batch.
                a_loss = F.cross_entropy(net(x_v[i_v], _sample(net.alpha, draws)), y_v[i_v])
                a_opt.zero_grad(set_to_none=True)
                a_loss.backward()
                a_opt.step()
            curve_loss.append(float(loss_sum) / steps)
            curve_entropy.append(_entropy(net.alpha))

        with torch.no_grad():
            logits = net(x_v, _sample(net.alpha, draws))
            supernet_val_acc = float((logits.argmax(1) == y_v).float().mean())
        genotype = derive(net.alpha)

        n_train = int(config["train_size"])
        x_tr, y_tr = digits.x_train[:n_train], digits.y_train[:n_train]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run.seed + 104729)
            derived = DerivedNet(int(config["width"]), genotype)
        derived = derived.to(device)
        opt = training.sgd(derived.parameters(), float(config["retrain_lr"]))
        per_epoch = training.steps_per_epoch(len(y_tr), batch)
        training.train(
            derived,
            x_tr,
            y_tr,
            optimizer=opt,
            scheduler=training.cosine_lr(opt, retrain_epochs * per_epoch),
            epochs=retrain_epochs,
            batch_size=batch,
            seed=run.seed,
            progress=lambda f: progress(min(1.0, (done + f * retrain_epochs * 2) / total_work)),
        )
        result = training.evaluate(derived, digits.x_test, digits.y_test)
        progress(1.0)
        names = [OPS[op] for op in genotype]
        return {
            "derived_acc": result["accuracy"],
            "derived_test_loss": result["loss"],
            "supernet_val_acc": supernet_val_acc,
            "arch_entropy": curve_entropy[-1],
            "n_conv_ops": sum(n.startswith("conv") for n in names),
            "n_skip_ops": names.count("skip"),
            "genotype": genotype_str(genotype),
            "curve_search_loss": curve_loss,
            "curve_arch_entropy": curve_entropy,
        }

    def extra_claims(self, results: Mapping[str, Any]) -> list[dict[str, Any]]:
        return spread_tests(results)

    def figures(self, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
        return _figures(results, Path(out_dir))


# --------------------------------------------------------------------------------------------
# Options


def _validate(cfg: dict[str, Any]) -> None:
    check_ints(
        "nas",
        cfg,
        (
            "width",
            "search_epochs",
            "search_size",
            "batch_size",
            "retrain_epochs",
            "train_size",
            "seeds",
        ),
    )
    check_ints("nas", cfg, ("warmup_epochs", "data_seed"), minimum=0)
    check_numbers("nas", cfg, ("w_lr", "arch_lr", "retrain_lr"), strict=True)
    check_methods("nas", cfg, METHODS)
    # Each half of the search images must hold at least one batch.
    if not 2 * cfg["batch_size"] <= cfg["search_size"] <= data.TRAIN_SIZE:
        raise ConfigError(
            f"--search-size: expected between twice the batch size ({2 * cfg['batch_size']}) "
            f"and {data.TRAIN_SIZE}, got {cfg['search_size']}"
        )
    if not cfg["batch_size"] <= cfg["train_size"] <= data.TRAIN_SIZE:
        raise ConfigError(
            f"--train-size: expected between the batch size ({cfg['batch_size']}) and "
            f"{data.TRAIN_SIZE}, got {cfg['train_size']}"
        )


# --------------------------------------------------------------------------------------------
# Figures


def _figures(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    from matplotlib.ticker import MaxNLocator

    from normkit.experiments import report

    groups = metrics_by_method(results, METHODS)
    if not groups:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(groups)
    n_seeds = max(len(v) for v in groups.values())
    color = {m: f"C{i}" for i, m in enumerate(methods)}
    paths: list[Path] = []

    # Derived accuracy: mean ± std, one dot per seed.
    fig, (ax,) = report.new_figure(width=6.0, height=4.5)
    for i, m in enumerate(methods):
        vals = finite_values([r.get("derived_acc") for r in groups[m]])
        mu, sd = mean_std(vals)
        ax.bar(i, mu, 0.6, yerr=sd, capsize=4, color=color[m], alpha=0.8, label=m)
        ax.plot([i] * len(vals), vals, "o", color="black", markersize=3)
    ax.set_xticks(range(len(methods)), methods)
    lows = [v for m in methods for v in finite_values([r.get("derived_acc") for r in groups[m]])]
    ax.set_ylim(max(0.0, min(lows, default=0.0) - 0.05), 1.0)
    ax.set_xlabel("norm layer during the search")
    ax.set_ylabel("test accuracy of the derived architecture")
    ax.set_title(
        f"DARTS on digits: derived architecture after retraining\n(mean ± std and each of "
        f"{n_seeds} seeds)",
        fontsize="medium",
    )
    ax.legend(title="search norm", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    paths.append(report.save_figure(fig, out_dir / "nas_derived_acc.png"))

    # Spread across seeds, with the Pitman–Morgan tests.
    tests = {(t["better"]["method"], t["worse"]["method"]): t for t in spread_tests(results)}
    fig, (ax,) = report.new_figure(width=6.0, height=4.5)
    for i, m in enumerate(methods):
        sd = mean_std(finite_values([r.get("derived_acc") for r in groups[m]]))[1]
        ax.bar(i, sd, 0.6, color=color[m], label=m)
    ax.set_xticks(range(len(methods)), methods)
    lines = [
        f"{b} vs {w}: one-sided p = {report.format_p(t['p'], SPREAD_ALPHA)} ({t['verdict']})"
        for (b, w), t in tests.items()
    ]
    ax.set_xlabel("norm layer during the search")
    ax.set_ylabel("std over seeds of the derived accuracy")
    ax.set_title(
        f"Consistency of the search ({n_seeds} seeds; Pitman–Morgan test)\n" + "\n".join(lines),
        fontsize="small",
    )
    ax.legend(title="search norm", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    paths.append(report.save_figure(fig, out_dir / "nas_spread.png"))

    # Derived operations: frequency of each op on each edge, per method.
    fig, axes = report.new_figure(len(methods), width=4.2, height=4.0)
    for ax, m in zip(axes, methods):
        counts = torch.zeros(len(EDGES), len(OPS))
        n = 0
        for r in groups[m]:
            g = r.get("genotype")
            if not isinstance(g, str):
                continue
            n += 1
            for row, part in enumerate(g.split("|")):
                counts[row, OPS.index(part.split(":")[1])] += 1
        bottom = torch.zeros(len(EDGES))
        for k, op in enumerate(OPS):
            frac = counts[:, k] / max(1, n)
            ax.bar(range(len(EDGES)), frac.tolist(), 0.7, bottom=bottom.tolist(), label=op)
            bottom += frac
        ax.set_xticks(range(len(EDGES)), [f"{i}←{j}" for i, j in EDGES])
        ax.set_ylim(0, 1)
        ax.set_xlabel("edge (target ← source node)")
        ax.set_ylabel("fraction of seeds")
        ax.set_title(f"{m}: derived operation per edge ({n} seeds)", fontsize="medium")
        ax.legend(fontsize="x-small", title="operation")
    paths.append(report.save_figure(fig, out_dir / "nas_ops.png"))

    # Search curves.
    fig, axes = report.new_figure(2, width=5.0, height=4.0)
    for key, ax, label in (
        ("curve_search_loss", axes[0], "training loss of the supernet's weights"),
        ("curve_arch_entropy", axes[1], "mean entropy of softmax(alpha), nats"),
    ):
        for m in methods:
            curves = [r[key] for r in groups[m] if isinstance(r.get(key), list) and r[key]]
            if not curves:
                continue
            agg = stats.aggregate_curves(curves)
            pts = [
                (k + 1, mu, sd or 0.0)
                for k, (mu, sd) in enumerate(zip(agg["mean"], agg["std"]))
                if mu is not None
            ]
            if not pts:
                continue
            xs, ms, ss = zip(*pts)
            ax.errorbar(xs, ms, yerr=ss, marker=".", capsize=2, label=m, color=color[m])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("search epoch")
        ax.set_ylabel(label)
        ax.set_title(f"Search: {label.split(',')[0]} (mean ± std)", fontsize="medium")
        ax.grid(alpha=0.3)
        ax.legend(title="search norm", fontsize="small")
    paths.append(report.save_figure(fig, out_dir / "nas_search.png"))
    return paths


STUDY = NasStudy(
    name="nas",
    title="Sandwich BN in a DARTS supernet on digits",
    paper="Gong et al., Sandwich Batch Normalization, arXiv 2102.11382 (WACV 2022)",
    claims=(
        Claim(
            text="SaBN's search derives a more accurate architecture than BN's",
            better="sabn",
            worse="bn",
            metric="derived_acc",
        ),
        Claim(
            text="SaBN's search derives a more accurate architecture than CCBN's",
            better="sabn",
            worse="ccbn",
            metric="derived_acc",
        ),
    ),
)
