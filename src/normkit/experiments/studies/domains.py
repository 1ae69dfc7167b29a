"""The ``domains`` study (Gong et al., Sandwich Batch Normalization, arXiv 2102.11382).

The paper's claim: on heterogeneous data, the sandwich affine (one shared affine under the
per-domain ones) beats plain BN and categorical conditional BN (CCBN), because the shared affine
balances the gradient norms of the per-domain affines while they keep their own directions.

Setup (``reference/core-methods.md`` §1.6 A):

* Data: scikit-learn's 8×8 digits scaled to [0, 1], split 1347 train / 450 test (stratified,
  ``random_state=0``). Every training and test image gets one of three domains at random, from a
  generator seeded by ``data_seed`` (the same assignment for every run): ``identity``;
  ``inverted`` (``1 − x``); ``rotated`` (rotated 90°, then ``3x + 0.5``).
* Model: three 3×3 convolutions (8×8 → 4×4 → 2×2), each followed by the method's norm layer and a
  ReLU, then global average pooling and a linear classifier. Every norm layer gets the per-sample
  domain index through :func:`normkit.condition`.
* Methods: ``bn`` (``nn.BatchNorm2d``, blind to the domain), ``auxbn`` (per-domain statistics and
  affine), ``ccbn`` (shared statistics, per-domain affine), ``sabn`` (shared statistics, shared
  affine under the per-domain one) and ``sabn-split`` (the same with per-domain statistics).
* Training: mixed batches of ``batch_size`` (32) drawn by a shuffle seeded by the run's seed
  (an incomplete last batch is dropped), plain SGD at ``lr`` 0.05, 6 epochs (4 with
  ``--quick``): short training separates the methods more than training to convergence. The seed
  also fixes the initialization, and the convolutions and classifier are built first, so for a
  given seed every method starts from the same convolution weights and sees the same batches
  (paired seeds).

Metrics of a run (:meth:`DomainsStudy.run`):

* ``acc_mean``: test accuracy averaged over the three domains (the claims' metric);
* ``acc_identity``, ``acc_inverted``, ``acc_rotated``: the per-domain test accuracies, also as the
  list ``acc_per_domain`` in that order;
* ``acc``: test accuracy over all test images;
* ``grad_cv``: the mechanism. At every step, the gradient of each domain's rows of
  ``domain_weight`` and ``domain_bias`` in all norm layers is gathered into one vector per domain
  and divided by that domain's share of the batch (``n_k / N``: the batch-mean loss hands a domain
  a gradient in proportion to how many of its images the shuffle drew, noise unrelated to the
  method); the coefficient of variation (population std / mean) of the three vectors' norms is
  averaged over the training steps. Lower means more balanced. ``grad_cv_raw`` is the same
  without the division; ``grad_cv_layers`` is ``grad_cv`` per norm layer (list, input to
  output). All three are absent for ``bn``, which has no per-domain affine;
* ``final_train_loss``, ``curve_train_loss`` (per epoch) and ``curve_acc_mean`` (test ``acc_mean``
  after each epoch).

What to expect (measured, 10 paired seeds): the methods with per-domain statistics (``auxbn``,
``sabn-split``) lead clearly, with lower ``grad_cv``; the three with shared statistics (``bn``,
``ccbn``, ``sabn``) stay within about a point of each other, and ``sabn``'s edge over ``ccbn``
depends on the epoch count (one-sided p ≈ 0.15, 0.02, 0.85, 0.22 at 4, 6, 8, 12 epochs), so
read a verdict on it as fragile, as the reference warns.

Time, measured through ``normkit reproduce`` on 2 CPU cores shared with other jobs (load 3–6),
2 jobs of 1 thread: the default study, 5 methods × 10 seeds (the reference asks for at least 10
paired seeds) at 6 epochs, took 3 min 17 s (131 s of CPU, 1347 training images); ``--quick``
(4 epochs, 2 seeds) took 41 s including start-up (29 s of CPU). An idle machine is faster.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import normkit
from normkit.experiments.stats import mean_std
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

__all__ = ["DOMAINS", "METHODS", "STUDY", "DomainsStudy"]

#: The study's methods; each is also the name of its layer in :func:`normkit.get_norm_layer`.
METHODS: tuple[str, ...] = ("bn", "auxbn", "ccbn", "sabn", "sabn-split")

#: The domains, in index order.
DOMAINS: tuple[str, ...] = ("identity", "inverted", "rotated")

#: The study has one setting: the three domains mixed in every batch.
SETTING = "mixed"

_DEFAULTS: dict[str, Any] = {
    "methods": list(METHODS),
    "epochs": 6,
    "batch_size": 32,
    "lr": 0.05,
    "momentum": 0.0,
    "width": 16,
    "train_size": 1347,
    "data_seed": 0,
    "seeds": 10,
}
_QUICK: dict[str, Any] = {"epochs": 4, "seeds": 2}

_NUM_TRAIN, _NUM_TEST = 1347, 450


# --------------------------------------------------------------------------------------------
# Data


def _transform(x: Tensor, domain: Tensor) -> Tensor:
    """Apply each image's domain transform; ``x`` is (N, 8, 8) in [0, 1]."""
    inverted = 1.0 - x
    rotated = torch.rot90(x, 1, dims=(1, 2)) * 3.0 + 0.5
    d = domain.view(-1, 1, 1)
    return torch.where(d == 0, x, torch.where(d == 1, inverted, rotated))


@functools.lru_cache(maxsize=4)
def _digits(data_seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, d_train, x_test, y_test, d_test) on the CPU, images as (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.images, data.target, test_size=_NUM_TEST, stratify=data.target, random_state=0
    )
    g = torch.Generator().manual_seed(data_seed)
    k = len(DOMAINS)
    d_tr = torch.randint(0, k, (len(y_tr),), generator=g)
    d_te = torch.randint(0, k, (len(y_te),), generator=g)
    xs = []
    for images, d in ((x_tr, d_tr), (x_te, d_te)):
        x = torch.as_tensor(images, dtype=torch.float32) / 16.0
        xs.append(_transform(x, d).unsqueeze(1))
    y_train = torch.as_tensor(y_tr, dtype=torch.long)
    y_test = torch.as_tensor(y_te, dtype=torch.long)
    return xs[0], y_train, d_tr, xs[1], y_test, d_te


# --------------------------------------------------------------------------------------------
# Model


class _Net(nn.Module):
    """Three 3×3 convs, each followed by a norm and a ReLU; global pooling; a linear head."""

    def __init__(self, norm: Callable[[int], nn.Module], width: int) -> None:
        super().__init__()
        chans = (1, width, 2 * width, 2 * width)
        # Convs and head first, norms last: the same seed gives every method the same conv init.
        self.convs = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False)
            for i in range(3)
        )
        self.head = nn.Linear(chans[-1], 10)
        self.norms = nn.ModuleList(norm(c) for c in chans[1:])

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def _build(method: str, width: int, seed: int) -> _Net:
    kwargs = {} if method == "bn" else {"num_domains": len(DOMAINS)}
    norm = normkit.get_norm_layer(method, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _Net(norm, width)


def _conditioned(model: nn.Module, domain: Tensor) -> contextlib.AbstractContextManager[Any]:
    if normkit.conditional_layers(model):
        return normkit.condition(model, domain)
    return contextlib.nullcontext()


def _domain_affines(model: _Net) -> list[tuple[Tensor, Tensor]]:
    out = []
    for norm in model.norms:
        w, b = getattr(norm, "domain_weight", None), getattr(norm, "domain_bias", None)
        if isinstance(w, Tensor) and isinstance(b, Tensor):
            out.append((w, b))
    return out


def _cv(norms: Tensor) -> Tensor:
    """Population std / mean over the last dim; 0 where the mean is 0 (no gradient at all)."""
    mean = norms.mean(dim=-1)
    std = norms.std(dim=-1, correction=0)
    return torch.where(mean > 0, std / mean.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, d: Tensor) -> tuple[float, list[float]]:
    model.eval()
    with _conditioned(model, d):
        correct = (model(x).argmax(dim=1) == y).float()
    model.train()
    per_domain = [float(correct[d == k].mean()) for k in range(len(DOMAINS))]
    return float(correct.mean()), per_domain


# --------------------------------------------------------------------------------------------
# The study


class DomainsStudy(Study):
    """BN, AuxBN, CCBN, SaBN and split-statistics SaBN on digits in three domains.

    ``figures(results, out_dir)`` reads the results mapping the runner builds::

        {"config": {...},   # this study's config
         "runs": {run_key: {"run": {"method": str, "setting": str, "seed": int},
                            "metrics": {...}}}}   # what run() returned

    and writes ``domains_accuracy.png`` (test accuracy per domain and averaged, one bar per
    method, mean ± std over seeds), ``domains_grad_cv.png`` (the gradient-norm CV per method with
    a conditional affine, mean ± std and one dot per seed) and ``domains_curves.png`` (mean test
    accuracy over domains after each epoch). Runs without metrics are skipped.
    """

    def config(self, quick: bool, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The sizes: ``methods`` (all five), ``epochs`` (6; 4 quick), ``batch_size`` (32),
        ``lr`` (0.05), ``momentum`` (0), ``width`` (16: the first conv's channels, then 32, 32),
        ``train_size`` (1347: the first that many training images), ``data_seed`` (0: the
        domain assignment) and ``seeds`` (the default number of seeds: 10; 2 quick).

        An override of ``None`` keeps the default. Raises :class:`ConfigError` naming the option
        for an unknown option or a bad value.
        """
        cfg = merge_config("domains", _DEFAULTS, _QUICK, quick, overrides)
        _validate(cfg)
        return cfg

    def runs(self, config: Mapping[str, Any], seeds: Sequence[int]) -> list[Run]:
        return [Run(m, SETTING, int(s)) for m in config["methods"] for s in seeds]

    def run(self, run: Run, config: Mapping[str, Any], progress: Progress) -> Metrics:
        """Train and test one method at one seed (see the module docstring for the metrics).

        The result depends on the number of intra-op threads (reduction order), which the
        runner fixes (1 by default; the model is too small to gain from more).
        """
        if run.method not in METHODS:
            raise ValueError(f"domains: unknown method {run.method!r}; known: {METHODS}")
        device = torch.device(config.get("device", "cpu"))
        epochs, batch = int(config["epochs"]), int(config["batch_size"])
        x_tr, y_tr, d_tr, x_te, y_te, d_te = _digits(int(config["data_seed"]))
        n = int(config["train_size"])
        x_tr, y_tr, d_tr = x_tr[:n], y_tr[:n], d_tr[:n]
        x_tr, y_tr, d_tr = x_tr.to(device), y_tr.to(device), d_tr.to(device)
        x_te, y_te, d_te = x_te.to(device), y_te.to(device), d_te.to(device)

        model = _build(run.method, int(config["width"]), run.seed).to(device).train()
        opt = torch.optim.SGD(
            model.parameters(), lr=float(config["lr"]), momentum=float(config["momentum"])
        )
        affines = _domain_affines(model)
        k = len(DOMAINS)
        shuffle = torch.Generator().manual_seed(run.seed)
        steps_per_epoch = len(y_tr) // batch
        cv_sum = torch.zeros((), device=device)
        cv_layers_sum = torch.zeros(len(affines), device=device)
        cv_raw_sum = torch.zeros((), device=device)
        curve_loss: list[float] = []
        curve_acc: list[float] = []
        progress(0.0)
        for epoch in range(epochs):
            order = torch.randperm(len(y_tr), generator=shuffle).to(device)
            loss_sum = torch.zeros((), device=device)
            for step in range(steps_per_epoch):
                idx = order[step * batch : (step + 1) * batch]
                with _conditioned(model, d_tr[idx]):
                    loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if affines:
                    # Squared gradient norm per (layer, domain) of that domain's rows.
                    sq = torch.stack(
                        [
                            w.grad.square().sum(1) + b.grad.square().sum(1)  # type: ignore[union-attr]
                            for w, b in affines
                        ]
                    )
                    # The batch-mean loss gives domain k a gradient proportional to its count
                    # n_k in the batch, which is binomial noise (CV ~0.25 at 32 over 3 domains)
                    # unrelated to the method: grad_cv compares per-sample gradients (· N / n_k).
                    scale = len(idx) / torch.bincount(d_tr[idx], minlength=k).clamp_min(1)
                    cv_sum += _cv(sq.sum(0).sqrt() * scale)
                    cv_raw_sum += _cv(sq.sum(0).sqrt())
                    cv_layers_sum += _cv(sq.sqrt() * scale)
                opt.step()
                loss_sum += loss.detach()
            curve_loss.append(float(loss_sum) / steps_per_epoch)
            curve_acc.append(sum(_accuracy(model, x_te, y_te, d_te)[1]) / k)
            progress((epoch + 1) / epochs)

        acc, per_domain = _accuracy(model, x_te, y_te, d_te)
        metrics: Metrics = {
            "acc_mean": sum(per_domain) / k,
            **{f"acc_{name}": a for name, a in zip(DOMAINS, per_domain)},
            "acc_per_domain": per_domain,
            "acc": acc,
        }
        total_steps = epochs * steps_per_epoch
        if affines:
            metrics["grad_cv"] = float(cv_sum) / total_steps
            metrics["grad_cv_raw"] = float(cv_raw_sum) / total_steps
            metrics["grad_cv_layers"] = [float(v) / total_steps for v in cv_layers_sum]
        metrics["final_train_loss"] = curve_loss[-1]
        metrics["curve_train_loss"] = curve_loss
        metrics["curve_acc_mean"] = curve_acc
        return metrics

    def figures(self, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
        return _figures(results, Path(out_dir))


def _validate(cfg: dict[str, Any]) -> None:
    check_ints("domains", cfg, ("epochs", "batch_size", "width", "train_size", "seeds"))
    if isinstance(cfg["data_seed"], bool) or not isinstance(cfg["data_seed"], int):
        raise ConfigError(f"--data-seed: expected an integer, got {cfg['data_seed']!r}")
    check_numbers("domains", cfg, ("lr", "momentum"))
    if cfg["lr"] == 0:
        raise ConfigError("--lr: expected a learning rate > 0, got 0")
    check_methods("domains", cfg, METHODS)
    if not cfg["batch_size"] <= cfg["train_size"] <= _NUM_TRAIN:
        # The last incomplete batch is dropped: fewer images than a batch would train on nothing.
        raise ConfigError(
            f"--train-size: expected between the batch size ({cfg['batch_size']}) and "
            f"{_NUM_TRAIN}, got {cfg['train_size']}"
        )


# --------------------------------------------------------------------------------------------
# Figures


def _figures(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    groups = metrics_by_method(results, METHODS)
    if not groups:
        return []
    methods = list(groups)
    n_seeds = max(len(v) for v in groups.values())
    colors = [f"C{i}" for i in range(len(methods))]
    paths: list[Path] = []

    # Per-domain accuracy: one group of bars per domain (and the mean), one bar per method.
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    keys = [f"acc_{d}" for d in DOMAINS] + ["acc_mean"]
    labels = [*DOMAINS, "mean over domains"]
    width = 0.8 / len(methods)
    lows = []
    for i, method in enumerate(methods):
        stats = [mean_std([m[k] for m in groups[method]]) for k in keys]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(keys))]
        means, stds = [s[0] for s in stats], [s[1] for s in stats]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=method, color=colors[i])
        lows += [mu - sd for mu, sd in zip(means, stds)]
    ax.set_xticks(range(len(keys)), labels)
    ax.set_ylim(max(0.0, min((v for v in lows if math.isfinite(v)), default=0.0) - 0.05), 1.0)
    ax.set_xlabel("test domain")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Multi-domain digits: test accuracy per domain (mean ± std, {n_seeds} seeds)")
    ax.legend(
        title="norm layer",
        ncols=min(len(methods), 5),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.14),
        fontsize="small",
    )
    ax.grid(axis="y", alpha=0.3)
    paths.append(out_dir / "domains_accuracy.png")
    fig.savefig(paths[-1], dpi=120)

    # The mechanism: CV across domains of the per-domain affine gradient norms.
    cv_methods = [m for m in methods if all("grad_cv" in r for r in groups[m])]
    if cv_methods:
        fig = Figure(figsize=(6.5, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for i, method in enumerate(cv_methods):
            values = [r["grad_cv"] for r in groups[method]]
            mu, sd = mean_std(values)
            color = colors[methods.index(method)]
            ax.bar(i, mu, 0.6, yerr=sd, capsize=4, color=color, alpha=0.8)
            ax.plot([i] * len(values), values, "o", color="black", markersize=3)
        ax.set_xticks(range(len(cv_methods)), cv_methods)
        ax.set_xlabel("norm layer")
        ax.set_ylabel("CV across domains of gradient norms")
        ax.set_title(
            "Balance of the per-domain affine gradients\n"
            "(per-sample gradient norms, std/mean across domains, averaged over steps;\n"
            f"lower = more balanced; mean ± std and each of {n_seeds} seeds)",
            fontsize="medium",
        )
        ax.grid(axis="y", alpha=0.3)
        paths.append(out_dir / "domains_grad_cv.png")
        fig.savefig(paths[-1], dpi=120)

    # Learning curves: mean test accuracy over domains after each epoch.
    curve_methods = [m for m in methods if all(r.get("curve_acc_mean") for r in groups[m])]
    if curve_methods:
        fig = Figure(figsize=(6.5, 4.5), layout="constrained")
        ax = fig.add_subplot()
        for method in curve_methods:
            curves = [r["curve_acc_mean"] for r in groups[method]]
            length = min(len(c) for c in curves)
            stats = [mean_std([c[e] for c in curves]) for e in range(length)]
            epochs = list(range(1, length + 1))
            means = [s[0] for s in stats]
            color = colors[methods.index(method)]
            ax.plot(epochs, means, "o-", label=method, color=color, markersize=3)
            ax.fill_between(
                epochs,
                [mu - sd for mu, sd in stats],
                [mu + sd for mu, sd in stats],
                color=color,
                alpha=0.15,
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy, mean over domains")
        ax.set_title(f"Learning curves (mean ± std over {n_seeds} seeds)")
        ax.legend(title="norm layer", fontsize="small")
        ax.grid(alpha=0.3)
        paths.append(out_dir / "domains_curves.png")
        fig.savefig(paths[-1], dpi=120)
    return paths


STUDY = DomainsStudy(
    name="domains",
    title="Sandwich BN on digits in three domains",
    paper="Gong et al., Sandwich Batch Normalization, arXiv 2102.11382 (WACV 2022)",
    claims=(
        Claim(
            text="SaBN beats BN on mean test accuracy over the domains",
            better="sabn",
            worse="bn",
            metric="acc_mean",
        ),
        Claim(
            text="SaBN beats CCBN on mean test accuracy over the domains",
            better="sabn",
            worse="ccbn",
            metric="acc_mean",
        ),
    ),
)
