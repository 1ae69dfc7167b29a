"""The ``adversarial`` study (Gong et al., Sandwich Batch Normalization, arXiv 2102.11382): BN,
AuxBN and SaAuxBN in PGD adversarial training on the 8×8 digits.

The paper's claim (CIFAR-10, ResNet-18): with clean and adversarial images normalized by
separate branches, the sandwich form (SaAuxBN: split statistics, one shared affine under the
per-branch ones) is more robust than AuxBN (split statistics and affines), and AuxBN than plain
BN: PGD-20 accuracy 43.14 > 41.60 > 40.02.

Setup (``reference/core-methods.md`` §1.2 "AuxBN / SaAuxBN", shrunk to the digits):

* Data: :func:`normkit.experiments.data.digits_split`, 1347 train / 450 test, pixels in [0, 1].
* Model: three 3×3 convolutions (``width``, 2·``width``, 2·``width`` channels; 8×8 → 4×4 → 2×2),
  each followed by the method's norm and a ReLU, global average pooling and a linear head.
  ``model(x, branch)`` takes the branch for the whole batch (0 clean, 1 adversarial), as the
  official ``model(x, flag)``. Methods: ``bn`` (``nn.BatchNorm2d``: one branch, the flag is
  ignored), ``auxbn`` (:class:`normkit.AuxBatchNorm2d` with 2 domains: statistics and affine per
  branch, affines at 1 and 0 as two ``BatchNorm2d``), ``saauxbn``
  (:class:`normkit.SandwichBatchNorm2d` with ``split_stats=True`` and 2 domains: statistics per
  branch, the shared affine applied first, then the branch's; every scale starts at
  N(1, 0.02²) and every shift at 0, as the official embedding rows). The convolutions and the head
  are built before the norms, so for a given seed every method starts from the same weights.
* Training (the official recipe, shortened): per batch, the loss is
  ``½ (CE(model(x, 0), y) + CE(model(x_adv, 1), y))`` with ``x_adv`` from PGD-``train_steps``
  (L∞ ball of radius ``eps`` in pixel units, step ``step``, uniform random start, clipped to
  [0, 1]; defaults: 5 steps, radius 0.15, step 0.04, where the official uses 7 steps of 2/255 in
  a radius of 8/255 on CIFAR-10: on the digits, which have 17 grey levels, 8/255 is under one
  level and the attack would barely bite); SGD at ``lr`` with momentum 0.9 and weight decay
  ``weight_decay`` on every parameter, shared affine included (the official code decays
  everything); the lr drops ×0.1 at 25 % and 75 % of the epochs (the official 50 and 150 of
  200). For ``bn`` the clean and adversarial batches still go through the network separately,
  each normalized by its own batch statistics.
* **Attacks leave the running statistics untouched.** The official PGD runs the model in train
  mode and so updates the adversarial branch's running statistics with every intermediate
  iterate. Here the training attacks also run in train mode (batch statistics of the attacked
  batch, as the official code) but inside :func:`frozen_buffers`, which restores every buffer of
  the model afterwards: only the training forwards (one clean, one adversarial per step) update
  the running statistics. Evaluation attacks run in eval mode (running statistics), on the model
  exactly as it is evaluated.
* Seeds: the run's seed fixes the initialization, the shuffle and the attacks' random starts
  (one generator), so every method sees the same batches (paired seeds).

Metrics of a run, all on the 450 held-out digits in eval mode:

* ``clean_acc_clean_branch``: clean accuracy through the clean branch (absent for ``bn``);
* ``clean_acc_adv_branch``: clean accuracy through the adversarial branch (for ``bn``, its only
  clean accuracy);
* ``pgd10_acc``, ``pgd20_acc``: accuracy under PGD-10 and PGD-20 (radius ``eps``, step
  ``step``, random start from a generator seeded by the run's seed) through the adversarial
  branch, the branch used for robust inference in the paper. The claims test both;
* ``final_train_loss``; ``curve_train_loss`` (per epoch); ``curve_clean_acc`` (clean accuracy
  through the adversarial branch after each epoch).

What to expect (measured, default sizes, 5 paired seeds): clean accuracy about 0.98 for every
method and branch, PGD-10 about 0.65 and PGD-20 about 0.64. At PGD-20 SaAuxBN leads (0.648
against AuxBN 0.633 and BN 0.634): "SaAuxBN more robust than AuxBN (PGD-20)" held (+0.014, p
0.003); the PGD-10 comparison and the AuxBN-against-BN ones were inconclusive (see
``docs/reproduction.md``; an earlier run had every claim inconclusive, so the PGD-20 result is
small and sensitive to the run). With ``--quick`` (3 epochs) the methods are indistinguishable.

Time, measured on 2 CPU cores shared with other jobs (load 6–7), 2 jobs of 1 thread: the default
study (3 methods × 5 seeds × 12 epochs) used 467 s of CPU (13 min of wall time on that busy
machine, about 4 minutes on 2 idle cores); AuxBN and SaAuxBN runs cost about twice a BN run
(split statistics). ``--quick`` (3 epochs, 2 seeds) took 29 s of wall time including start-up
on an idle machine (32 s of CPU in the runs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import normkit as nk
from normkit.experiments.data import NUM_CLASSES, digits_split
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
    option_flag,
)

__all__ = ["METHODS", "STUDY", "AdversarialStudy", "Net", "frozen_buffers", "pgd_attack"]

#: The study's methods.
METHODS: tuple[str, ...] = ("bn", "auxbn", "saauxbn")

#: The branches of ``Net.forward``.
CLEAN, ADV = 0, 1

#: One setting: PGD adversarial training on the digits.
SETTING = "digits-pgd"

_DEFAULTS: dict[str, Any] = {
    "methods": list(METHODS),
    "epochs": 12,
    "batch_size": 64,
    "lr": 0.05,
    "weight_decay": 5e-4,
    "width": 16,
    "eps": 0.15,
    "step": 0.04,
    "train_steps": 5,
    "seeds": 5,
}
_QUICK: dict[str, Any] = {"epochs": 3, "seeds": 2}


# --------------------------------------------------------------------------------------------
# Model


def _norm_factory(method: str) -> Callable[[int], nn.Module]:
    if method == "bn":
        return nn.BatchNorm2d
    if method == "auxbn":
        return lambda c: nk.AuxBatchNorm2d(c, 2)
    if method == "saauxbn":
        return lambda c: nk.SandwichBatchNorm2d(
            c, 2, split_stats=True, domain_std=0.02, shared_std=0.02
        )
    raise ValueError(f"adversarial: unknown method {method!r}; known: {', '.join(METHODS)}")


class Net(nn.Module):
    """Three conv-norm-ReLU (8×8 → 4×4 → 2×2), global average pooling, a linear head.
    ``forward(x, branch)``: ``branch`` (int) goes to every conditional norm; plain BN ignores it."""

    def __init__(self, norm: Callable[[int], nn.Module], width: int) -> None:
        super().__init__()
        chans = (1, width, 2 * width, 2 * width)
        self.convs = nn.ModuleList(
            nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False)
            for i in range(3)
        )
        self.head = nn.Linear(chans[-1], NUM_CLASSES)
        # Norms last: the same seed gives every method the same convolutions and head.
        self.norms = nn.ModuleList(norm(c) for c in chans[1:])

    def forward(self, x: Tensor, branch: int = CLEAN) -> Tensor:
        for conv, norm in zip(self.convs, self.norms):
            h = conv(x)
            x = F.relu(norm(h, branch) if getattr(norm, "takes_domain", False) else norm(h))
        return self.head(x.mean(dim=(2, 3)))


def _build(method: str, width: int, seed: int) -> Net:
    norm = _norm_factory(method)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Net(norm, width)


# --------------------------------------------------------------------------------------------
# The attack


@contextlib.contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every buffer of ``model`` (running statistics, ``num_batches_tracked``, ...) on
    exit: forwards inside the block, in train mode, leave no trace in the running statistics."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield model
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    branch: int,
    eps: float,
    step: float,
    steps: int,
    generator: torch.Generator,
) -> Tensor:
    """L∞ PGD (Madry et al.): a uniform random start in the ``eps``-ball, then ``steps`` signed
    gradient steps of size ``step`` on the cross-entropy, each projected back onto the ball and
    onto the pixel range [0, 1]. Runs the model in whatever mode it is in, through ``branch``;
    call it in eval mode or inside :func:`frozen_buffers` to keep running statistics untouched.
    Parameters get no gradient. Returns the detached adversarial images."""
    x = x.detach()
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    x_adv = (x + (2.0 * noise - 1.0) * eps).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv, branch), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()


def _accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    branch: int,
    *,
    attack_steps: int = 0,
    eps: float = 0.0,
    step: float = 0.0,
    generator: torch.Generator | None = None,
) -> float:
    """Eval-mode accuracy through ``branch``, on PGD-``attack_steps`` images if > 0 (the attack
    also in eval mode). The model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        if attack_steps:
            assert generator is not None
            x = pgd_attack(
                model,
                x,
                y,
                branch=branch,
                eps=eps,
                step=step,
                steps=attack_steps,
                generator=generator,
            )
        with torch.no_grad():
            return float((model(x, branch).argmax(1) == y).double().mean())
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# The study


class AdversarialStudy(Study):
    """BN, AuxBN and SaAuxBN in PGD adversarial training on the digits.

    ``figures(results, out_dir)`` writes ``adversarial_accuracy.png`` (clean accuracy through
    each branch, PGD-10 and PGD-20 accuracy; one bar per method, mean ± std over seeds, one dot
    per seed) and ``adversarial_curves.png`` (training loss and clean accuracy per epoch).
    """

    def config(self, quick: bool, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The sizes: ``methods`` (bn, auxbn, saauxbn), ``epochs`` (12; 3 quick),
        ``batch_size`` (64), ``lr`` (0.05), ``weight_decay`` (5e-4), ``width`` (16), ``eps``
        (0.15: the L∞ radius in pixel units of [0, 1]), ``step`` (0.04: the PGD step, training
        and evaluation), ``train_steps`` (5: PGD steps of the training attack) and ``seeds`` (5;
        2 quick). Evaluation uses PGD-10 and PGD-20.

        An override of ``None`` keeps the default; a bad or unknown option raises
        :class:`ConfigError` naming it.
        """
        cfg = merge_config("adversarial", _DEFAULTS, _QUICK, quick, overrides)
        _validate(cfg)
        return cfg

    def runs(self, config: Mapping[str, Any], seeds: Sequence[int]) -> list[Run]:
        return [Run(m, SETTING, int(s)) for m in config["methods"] for s in seeds]

    def run(self, run: Run, config: Mapping[str, Any], progress: Progress) -> Metrics:
        """Adversarially train one method at one seed and evaluate it (see the module
        docstring for the metrics)."""
        if run.method not in METHODS:
            raise ValueError(
                f"adversarial: unknown method {run.method!r}; known: {', '.join(METHODS)}"
            )
        device = torch.device(config.get("device", "cpu"))
        epochs, batch = int(config["epochs"]), int(config["batch_size"])
        eps, step = float(config["eps"]), float(config["step"])
        train_steps = int(config["train_steps"])
        data = digits_split().to(device)
        x_tr, y_tr, x_te, y_te = data.x_train, data.y_train, data.x_test, data.y_test

        model = _build(run.method, int(config["width"]), run.seed).to(device).train()
        opt = torch.optim.SGD(
            model.parameters(),
            lr=float(config["lr"]),
            momentum=0.9,
            weight_decay=float(config["weight_decay"]),
        )
        steps_per_epoch = len(y_tr) // batch
        # The official drops at epochs 50 and 150 of 200; never at step 0 (tiny runs).
        milestones = [max(1, round(frac * epochs) * steps_per_epoch) for frac in (0.25, 0.75)]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        rng = torch.Generator().manual_seed(run.seed)
        curve_loss: list[float] = []
        curve_acc: list[float] = []
        total = epochs * steps_per_epoch
        done = 0
        progress(0.0)
        for _ in range(epochs):
            order = torch.randperm(len(y_tr), generator=rng).to(device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for s in range(steps_per_epoch):
                idx = order[s * batch : (s + 1) * batch]
                x, y = x_tr[idx], y_tr[idx]
                with frozen_buffers(model):
                    x_adv = pgd_attack(
                        model,
                        x,
                        y,
                        branch=ADV,
                        eps=eps,
                        step=step,
                        steps=train_steps,
                        generator=rng,
                    )
                loss = 0.5 * (
                    F.cross_entropy(model(x, CLEAN), y) + F.cross_entropy(model(x_adv, ADV), y)
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach().double()
                done += 1
                if done % max(1, total // 50) == 0:
                    progress(0.8 * done / total)
            curve_loss.append(float(loss_sum) / steps_per_epoch)
            curve_acc.append(_accuracy(model, x_te, y_te, ADV))

        # The evaluation attacks draw their random starts from their own generator, so that they
        # are the same whatever the training consumed.
        metrics: Metrics = {}
        if run.method != "bn":
            metrics["clean_acc_clean_branch"] = _accuracy(model, x_te, y_te, CLEAN)
        metrics["clean_acc_adv_branch"] = _accuracy(model, x_te, y_te, ADV)
        for k, steps in (("pgd10_acc", 10), ("pgd20_acc", 20)):
            metrics[k] = _accuracy(
                model,
                x_te,
                y_te,
                ADV,
                attack_steps=steps,
                eps=eps,
                step=step,
                generator=torch.Generator().manual_seed(2**32 + run.seed),
            )
            progress(0.8 + (0.07 if steps == 10 else 0.2))
        metrics["final_train_loss"] = curve_loss[-1]
        metrics["curve_train_loss"] = curve_loss
        metrics["curve_clean_acc"] = curve_acc
        progress(1.0)
        return metrics

    def figures(self, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
        return _figures(results, Path(out_dir))


def _validate(cfg: dict[str, Any]) -> None:
    check_ints("adversarial", cfg, ("epochs", "batch_size", "width", "train_steps", "seeds"))
    check_numbers("adversarial", cfg, ("lr", "weight_decay", "eps", "step"))
    for key in ("lr", "eps", "step"):
        if cfg[key] == 0:
            raise ConfigError(
                f"study adversarial: {option_flag(key)}: expected a number > 0, got 0"
            )
    if cfg["eps"] > 1:
        raise ConfigError(f"study adversarial: --eps: expected at most 1, got {cfg['eps']}")
    if not 2 <= cfg["batch_size"] <= 1347:
        raise ConfigError(
            f"study adversarial: --batch-size: expected 2 to 1347, got {cfg['batch_size']}"
        )
    check_methods("adversarial", cfg, METHODS)


# --------------------------------------------------------------------------------------------
# Figures


_BARS = (
    ("clean_acc_clean_branch", "clean,\nclean branch"),
    ("clean_acc_adv_branch", "clean,\nadv. branch"),
    ("pgd10_acc", "PGD-10"),
    ("pgd20_acc", "PGD-20"),
)


def _figures(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    groups = metrics_by_method(results, METHODS)
    if not groups:
        return []
    methods = list(groups)
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    n_seeds = max(len(v) for v in groups.values())
    cfg = results.get("config", {})
    paths: list[Path] = []

    fig = Figure(figsize=(8.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        for j, (key, _) in enumerate(_BARS):
            values = [met.get(key) for met in groups[m]]
            dots = finite_values(values)
            if not dots:
                continue
            mu, sd = mean_std(values)
            x = j + (i - (len(methods) - 1) / 2) * width
            ax.bar(
                x,
                mu,
                width,
                yerr=sd,
                capsize=3,
                color=colors[m],
                alpha=0.85,
                label=m if j == 1 else None,
            )
            ax.plot([x] * len(dots), dots, "o", color="black", markersize=2.5)
    ax.set_xticks(range(len(_BARS)), [label for _, label in _BARS])
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("evaluation (held-out digits)")
    ax.set_ylabel("accuracy")
    eps = cfg.get("eps")
    ax.set_title(
        "PGD adversarial training on digits: accuracy "
        f"(mean ± std over {n_seeds} seed(s), dots = seeds"
        + (f"; ε = {eps:g}" if isinstance(eps, (int, float)) else "")
        + ")",
        fontsize="medium",
    )
    ax.legend(title="norm layer", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    paths.append(out_dir / "adversarial_accuracy.png")
    fig.savefig(paths[-1], dpi=120)

    fig = Figure(figsize=(10, 4.0), layout="constrained")
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    drawn = False
    for ax, (key, ylabel) in zip(
        axes,
        (
            ("curve_train_loss", "training loss ½(CE clean + CE adv)"),
            ("curve_clean_acc", "clean accuracy, adv. branch"),
        ),
    ):
        for m in methods:
            curves = [met[key] for met in groups[m] if isinstance(met.get(key), list)]
            length = min((len(c) for c in curves), default=0)
            if not length:
                continue
            stats = [mean_std([c[e] for c in curves]) for e in range(length)]
            epochs = list(range(1, length + 1))
            means = [s[0] for s in stats]
            ax.errorbar(
                epochs,
                means,
                yerr=[s[1] for s in stats],
                marker="o",
                markersize=3,
                capsize=2,
                color=colors[m],
                label=m,
            )
            drawn = True
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel, fontsize="medium")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(title="norm layer", fontsize="small")
    if drawn:
        fig.suptitle(f"Training curves (mean ± std over {n_seeds} seed(s))")
        paths.append(out_dir / "adversarial_curves.png")
        fig.savefig(paths[-1], dpi=120)
    return paths


STUDY = AdversarialStudy(
    name="adversarial",
    title="Sandwich BN (SaAuxBN) in PGD adversarial training on the digits",
    paper="Gong et al., Sandwich Batch Normalization, arXiv 2102.11382 (WACV 2022)",
    claims=(
        Claim(
            text="SaAuxBN is more robust than AuxBN (PGD-10)",
            better="saauxbn",
            worse="auxbn",
            metric="pgd10_acc",
        ),
        Claim(
            text="SaAuxBN is more robust than AuxBN (PGD-20)",
            better="saauxbn",
            worse="auxbn",
            metric="pgd20_acc",
        ),
        Claim(
            text="AuxBN is more robust than BN (PGD-10)",
            better="auxbn",
            worse="bn",
            metric="pgd10_acc",
        ),
        Claim(
            text="AuxBN is more robust than BN (PGD-20)",
            better="auxbn",
            worse="bn",
            metric="pgd20_acc",
        ),
    ),
)
