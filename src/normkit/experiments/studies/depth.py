"""Study ``depth`` (Zhang, Dauphin & Ma 2019, Fixup): residual nets of growing depth, no norm.

The paper's claim (its Fig. 3): with Fixup, residual networks train at every depth, as with batch
norm, where unnormalized networks with standard init degrade or diverge.

Setup (reference ``core-methods.md`` §4.6, "deep residual MLP on digits"): scikit-learn's 8x8
digits, flattened to 64 features standardized with the training split's per-pixel mean and std
(stratified 1347/450 split, ``random_state=0``). The network is a residual MLP of width 64::

    stem Linear(64, 64) -> ReLU -> L blocks  x -> relu(x + branch(x))  -> head Linear(64, 10)

with one of six arms (the ``methods``):

``fixup``
    branch ``scale * fc2(relu(fc1(x + b1a) + b1b) + b2a) + b2b`` (:class:`normkit.Bias`,
    :class:`normkit.Scale`), ``+ bias`` after the stem and before the head, as the official
    basic block. Init by :func:`normkit.fixup_init_`: ``fc1`` He (``fan_out``) times ``L ** -0.5``,
    ``fc2`` and the head 0; the stem keeps PyTorch's default (as the official stem conv). The
    scalars train at ``lr * scalar_lr_mult`` (:func:`normkit.fixup_param_groups`), see below.
``bn``
    branch ``bn2(fc2(relu(bn1(fc1(x)))))`` (post-activation, BN after each linear layer, linear
    layers without bias) and a BN after the stem; PyTorch's default init, and each branch's last
    BN scale set to 0, as the official repository's BN baseline (``zero_init_residual``).
``none-default``
    branch ``fc2(relu(fc1(x)))``, PyTorch's default init everywhere (``kaiming_uniform_(a=√5)``,
    weight variance ``1 / (3 fan_in)``).
``none-he``
    the same network, every linear layer He normal (``fan_in``, ReLU gain), biases 0.
``rezero``
    SkipInit / ReZero (De & Smith 2020; Bachlechner et al. 2020): the ``none-he`` branch behind
    a :class:`normkit.ResidualGate`, ``relu(x + g * fc2(relu(fc1(x))))`` with the scalar ``g``
    initialised to 0, so every block is the identity at init; He init, no normalization.
``nf-agc``
    the normalizer-free recipe (Brock et al. 2021): ``x + alpha * fc2(relu(fc1(relu(x / beta))))``
    with scaled weight standardization (:class:`normkit.ScaledWSConv2d` as 1x1 convolutions, that
    is, linear layers; ReLU gain ``gamma = 1.7139588594436646``), ``alpha = 0.2`` and
    ``beta_i = sqrt(1 + i * alpha**2)`` the expected std of the stream before block ``i``, and
    adaptive gradient clipping (:func:`normkit.adaptive_grad_clip_`, ``agc_clip_factor``) of every
    parameter but the head's after each backward. No ReLU after the addition, as NF-ResNets.
    The clip factor is the function's default, 0.01, untuned. The paper tunes it per batch size
    (larger for smaller batches); on seed 0 at batch 64, 0.16 gave 0.95 / 0.89 test accuracy at
    10 / 100 blocks against 0.87 / 0.87 for 0.01. The arm costs about 2.5 times a Fixup arm
    per block (the weight standardization of every layer at every step).

**The Fixup scalars' learning rate shrinks with depth**: ``scalar_lr_mult(L) =
min(scalar_lr_base, scalar_lr_depth_const / L)``, by default ``min(0.1, 10 / L)``: 0.1 at 10 and
100 blocks, 0.01 at 1000, 0.001 at 10,000. Why: the ``5 L`` scalars all act on the one residual
stream, and a scalar's gradient sums over all 64 features, so it is large and its sign tends to
be shared across blocks; one step can then move the stream by up to ``Θ(L · η_s)``. Keeping
``L · η_s`` fixed keeps that drift independent of depth, the same Θ(η/L)-per-branch argument
Fixup makes for the weights. The rule keeps the official ``lr / 10`` up to 100 blocks, where the
reference reports it adequate, and gives the ÷100 the reference (§4.6) found safe at about 1000
blocks. Measured here at 1000 blocks (lr 0.02, 3 epochs, seed 0): 80% test accuracy with the
rule's 0.01 against 62% with the official 0.1. At ~10,000 blocks the reference found about
``1e-4`` necessary, steeper than ``1 / L``: pass ``scalar_lr_mult={"10000": 1e-4}`` in the
overrides for such a run. The multiplier of every depth
is recorded in the config (``scalar_lr_mult``, keyed by the depth as a string).

Training: SGD with momentum 0.9, batch 64 (the last incomplete batch of an epoch is dropped: the
3-sample remainder through a hundred BN layers wrecks the BN arm's running statistics), no weight
decay, a fixed number of epochs (the fixed budget, 3 by default), float32, and **lr 0.02 for
every arm**. The reference setup (§4.6) says lr 0.1, but in this MLP lr 0.1, and 0.05, kill the
Fixup net's residual stream at 1000 blocks within about a dozen steps (the ReLUs after the
additions go dead and the accuracy falls to chance) even with the scalars frozen, so the weights'
lr, not only the scalars', is at fault there; at 0.02 Fixup trains at every depth, and BN too.
All arms share the lr, so the comparison stays paired on everything but the method.

Each run is deterministic for its seed: the global torch seed is set from ``run.seed`` before the
model is built and the data order comes from a ``torch.Generator`` seeded with it, so every
method sees the same batches for a given seed.

Metrics of a run (:meth:`DepthStudy.run`):

``test_acc``
    accuracy on the 450 test images after the budget, in [0, 1]. **A diverged run scores
    chance, 0.1** (its model is unusable; a NaN model's argmax would otherwise return class 0
    and score the share of zeros).
``diverged``
    1.0 if a training loss was non-finite (training stops at that step: further steps cannot
    recover a NaN) or the mean training loss of the last epoch is above ``diverge_loss`` (default
    1000; chance is ln 10 ≈ 2.3), else 0.0. A huge loss at init alone is not a divergence: the
    He-init net starts with logits of std near 100 at ten blocks, and is given its budget.
``grad_norm_init``
    the total gradient 2-norm over all parameters at init, on the first training batch (the
    first step's gradient), and
``logit_std_init``
    the std of the logits on that batch at init. Both are computed on a **float64 copy** of the
    model, so the growth with depth can be read past float32's range (training itself is
    float32); a value that overflows even float64 is stored as ``sys.float_info.max``.
``loss_curve``
    the training loss of every step (``epochs * (1347 // 64)`` values); ``None`` for a
    non-finite loss and for the steps not run after a divergence.

Settings are the depths, named ``"L10"``, ``"L100"``, ``"L1000"`` (:func:`setting_name`); the
config's ``depths`` lists them in order.

Results mapping expected by :meth:`DepthStudy.figures` (the runner passes exactly this)::

    {"config": <the dict from config()>,
     "runs": {run.key: {"run": {"method": str, "setting": str, "seed": int},
                        "metrics": <the dict from run()>}, ...}}

Other keys at either level are ignored.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normkit import (
    Bias,
    ResidualGate,
    Scale,
    ScaledWSConv2d,
    adaptive_grad_clip_,
    fixup_init_,
    fixup_param_groups,
)
from normkit.experiments.study import Claim, Metrics, Progress, Run, Study

__all__ = ["METHODS", "STUDY", "DepthStudy", "ResidualMLP", "scalar_lr_mult", "setting_name"]

METHODS: tuple[str, ...] = ("fixup", "bn", "none-default", "none-he", "rezero", "nf-agc")
RELU_GAIN = 1.7139588594436646
"""The NF-Net gain of ReLU: ``gamma`` that keeps unit variance through ``relu`` then a layer."""
NUM_CLASSES = 10
_TEST_SIZE = 450

_DEFAULTS: dict[str, Any] = {
    "depths": [10, 100, 1000],
    "methods": list(METHODS),
    "width": 64,
    "epochs": 3,
    "batch_size": 64,
    "lr": 0.02,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "scalar_lr_base": 0.1,
    "scalar_lr_depth_const": 10.0,
    "diverge_loss": 1000.0,
    "nf_alpha": 0.2,
    "agc_clip_factor": 0.01,
    "train_size": None,
    "device": "cpu",
}
_QUICK: dict[str, Any] = {"depths": [10, 100], "epochs": 1}


# --- data -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flattened digits, stratified 1347/450 split (``random_state=0``), standardized per pixel
    with the training split's statistics (constant pixels keep std 1)."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=_TEST_SIZE, stratify=y, random_state=0
    )
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0
    return (
        torch.tensor((x_tr - mean) / std, dtype=torch.float32),
        torch.tensor(y_tr, dtype=torch.long),
        torch.tensor((x_te - mean) / std, dtype=torch.float32),
        torch.tensor(y_te, dtype=torch.long),
    )


# --- model ------------------------------------------------------------------------------------


class _PlainBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.fc2(F.relu(self.fc1(x))))


class _BNBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, width, bias=False)
        self.bn2 = nn.BatchNorm1d(width)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x))))))


class _FixupBlock(nn.Module):
    """The official Fixup basic block with linear layers (5 scalars)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bias1a, self.bias1b = Bias(), Bias()
        self.bias2a, self.bias2b = Bias(), Bias()
        self.scale = Scale()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def fixup_branch_layers(self) -> list[nn.Module]:
        return [self.fc1, self.fc2]

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bias1b(self.fc1(self.bias1a(x))))
        out = self.bias2b(self.scale(self.fc2(self.bias2a(h))))
        return F.relu(x + out)


class _GatedBlock(nn.Module):
    """SkipInit / ReZero: a plain branch behind a zero-initialised scalar gate."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.gate = ResidualGate()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.gate(self.fc2(F.relu(self.fc1(x)))))


class _NFBlock(nn.Module):
    """A normalizer-free block: ``x + alpha * f(x / beta)`` with scaled-WS linear layers."""

    def __init__(self, width: int, alpha: float, beta: float) -> None:
        super().__init__()
        # 1x1 convolutions on (N, width, 1, 1): linear layers with scaled weight standardization.
        self.fc1 = ScaledWSConv2d(width, width, 1, gamma=RELU_GAIN)
        self.fc2 = ScaledWSConv2d(width, width, 1, gamma=RELU_GAIN)
        self.alpha = alpha
        self.beta = beta

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(x / self.beta)[:, :, None, None]
        out = self.fc2(F.relu(self.fc1(h))).flatten(1)
        return x + self.alpha * out


class ResidualMLP(nn.Module):
    """The residual MLP of the study: stem, ``depth`` blocks, head; one of :data:`METHODS`.

    The init of each arm is described in the module docstring.
    """

    def __init__(
        self,
        method: str,
        depth: int,
        width: int = 64,
        in_features: int = 64,
        *,
        nf_alpha: float = 0.2,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"ResidualMLP: expected a method in {METHODS}, got {method!r}")
        self.method = method
        self.stem = nn.Linear(in_features, width, bias=method != "bn")
        self.stem_post: nn.Module
        if method == "fixup":
            self.stem_post = Bias()
        elif method == "bn":
            self.stem_post = nn.BatchNorm1d(width)
        else:
            self.stem_post = nn.Identity()
        if method == "nf-agc":
            self.blocks = nn.Sequential(
                *[_NFBlock(width, nf_alpha, math.sqrt(1 + i * nf_alpha**2)) for i in range(depth)]
            )
        else:
            block = {"fixup": _FixupBlock, "bn": _BNBlock, "rezero": _GatedBlock}.get(
                method, _PlainBlock
            )
            self.blocks = nn.Sequential(*[block(width) for _ in range(depth)])
        self.head_bias: nn.Module = Bias() if method == "fixup" else nn.Identity()
        self.head = nn.Linear(width, NUM_CLASSES)
        self._init()

    def _init(self) -> None:
        if self.method == "fixup":
            fixup_init_(self.blocks, num_branches=len(self.blocks))
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        elif self.method == "bn":
            for blk in self.blocks:
                assert isinstance(blk, _BNBlock)
                nn.init.zeros_(blk.bn2.weight)
        elif self.method in ("none-he", "rezero"):
            for mod in self.modules():
                if isinstance(mod, nn.Linear):
                    nn.init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu")
                    if mod.bias is not None:
                        nn.init.zeros_(mod.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_post(self.stem(x)))
        return self.head(self.head_bias(self.blocks(x)))


# --- config -----------------------------------------------------------------------------------


def setting_name(depth: int) -> str:
    """The setting of a depth: ``"L<depth>"``."""
    return f"L{depth}"


def scalar_lr_mult(depth: int, base: float = 0.1, depth_const: float = 10.0) -> float:
    """The depth-aware Fixup scalar lr multiplier ``min(base, depth_const / depth)``."""
    return min(base, depth_const / depth)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(key: str, want: str, got: Any) -> ValueError:
    return ValueError(f"study depth: expected {key} to be {want}, got {got!r}")


def _validate(cfg: dict[str, Any]) -> None:
    for key in ("width", "epochs", "batch_size"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _bad(key, "a positive int", v)
    for key in (
        "lr",
        "scalar_lr_base",
        "scalar_lr_depth_const",
        "diverge_loss",
        "nf_alpha",
        "agc_clip_factor",
    ):
        if not _is_number(cfg[key]) or not cfg[key] > 0:
            raise _bad(key, "a positive number", cfg[key])
    for key in ("momentum", "weight_decay"):
        if not _is_number(cfg[key]) or not cfg[key] >= 0:
            raise _bad(key, "a number >= 0", cfg[key])
    depths = cfg["depths"]
    if (
        not isinstance(depths, (list, tuple))
        or not depths
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in depths)
        or len(set(depths)) != len(depths)
    ):
        raise _bad("depths", "a non-empty list of distinct positive ints", depths)
    methods = cfg["methods"]
    if (
        not isinstance(methods, (list, tuple))
        or not methods
        or not all(m in METHODS for m in methods)
        or len(set(methods)) != len(methods)
    ):
        raise _bad("methods", f"a non-empty list of distinct names from {list(METHODS)}", methods)
    n = cfg["train_size"]
    if n is not None and (
        isinstance(n, bool) or not isinstance(n, int) or not cfg["batch_size"] <= n <= 1347
    ):
        raise _bad("train_size", "None or an int from batch_size to 1347", n)
    if not isinstance(cfg["device"], str):
        raise _bad("device", "a device string", cfg["device"])


class DepthStudy(Study):
    """Fixup against BN and unnormalized nets at growing depth; see the module docstring."""

    def config(self, quick: bool, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Default sizes (``quick``: depths 10 and 100, 1 epoch), updated by ``overrides``.

        Every key of the returned dict can be overridden: ``depths``, ``methods``, ``width``,
        ``epochs``, ``batch_size``, ``lr``, ``momentum``, ``weight_decay``, ``scalar_lr_base``,
        ``scalar_lr_depth_const``, ``diverge_loss``, ``train_size`` (``None``: all 1347 training
        images; an int: the first ``train_size`` of the fixed split), ``device``, and
        ``scalar_lr_mult`` (``{str(depth): multiplier}``, overriding the depth rule at those
        depths). An unknown key or a bad value raises ``ValueError``.
        """
        cfg = copy.deepcopy(_DEFAULTS)
        if quick:
            cfg.update(copy.deepcopy(_QUICK))
        given = dict(overrides)
        mult_override = given.pop("scalar_lr_mult", None) or {}
        unknown = sorted(set(given) - set(cfg))
        if unknown:
            raise ValueError(
                f"study depth: unknown option(s) {', '.join(unknown)}; expected some of "
                f"{', '.join(sorted([*cfg, 'scalar_lr_mult']))}"
            )
        cfg.update(copy.deepcopy(given))
        cfg["depths"] = list(cfg["depths"]) if isinstance(cfg["depths"], tuple) else cfg["depths"]
        cfg["methods"] = (
            list(cfg["methods"]) if isinstance(cfg["methods"], tuple) else cfg["methods"]
        )
        _validate(cfg)
        if not isinstance(mult_override, Mapping):
            raise _bad("scalar_lr_mult", "a mapping {str(depth): multiplier}", mult_override)
        known = {str(d) for d in cfg["depths"]}
        for key, value in mult_override.items():
            if str(key) not in known or not _is_number(value) or not value >= 0:
                raise _bad(
                    "scalar_lr_mult",
                    f"a mapping from depths in {sorted(known)} to numbers >= 0",
                    dict(mult_override),
                )
        cfg["scalar_lr_mult"] = {
            str(d): float(
                mult_override.get(
                    str(d),
                    scalar_lr_mult(d, cfg["scalar_lr_base"], cfg["scalar_lr_depth_const"]),
                )
            )
            for d in cfg["depths"]
        }
        return cfg

    def runs(self, config: Mapping[str, Any], seeds: Sequence[int]) -> list[Run]:
        """Depth-major: every method at the shallowest depth for every seed, then deeper."""
        return [
            Run(method, setting_name(depth), int(seed))
            for depth in config["depths"]
            for seed in seeds
            for method in config["methods"]
        ]

    def run(self, run: Run, config: Mapping[str, Any], progress: Progress) -> Metrics:
        """Train one arm at one depth for the fixed budget; see the module docstring."""
        depth = _depth_of(run.setting)
        device = torch.device(config.get("device", "cpu"))
        x_tr, y_tr, x_te, y_te = _digits()
        if config.get("train_size") is not None:
            x_tr, y_tr = x_tr[: config["train_size"]], y_tr[: config["train_size"]]
        x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))

        torch.manual_seed(run.seed)
        model = ResidualMLP(
            run.method, depth, config["width"], x_tr.shape[1], nf_alpha=float(config["nf_alpha"])
        ).to(device)
        clipped: list[nn.Parameter] = []
        if run.method == "nf-agc":
            # AGC on every parameter but the classifier's, as the NF-Net paper prescribes.
            head = {id(p) for p in model.head.parameters()}
            clipped = [p for p in model.parameters() if id(p) not in head]
        lr = float(config["lr"])
        wd = float(config["weight_decay"])
        if run.method == "fixup":
            mult = config.get("scalar_lr_mult", {}).get(
                str(depth),
                scalar_lr_mult(depth, config["scalar_lr_base"], config["scalar_lr_depth_const"]),
            )
            groups = fixup_param_groups(model, lr=lr, scalar_lr_mult=mult, weight_decay=wd)
        else:
            groups = [{"params": list(model.parameters()), "lr": lr, "weight_decay": wd}]
        opt = torch.optim.SGD(groups, lr=lr, momentum=float(config["momentum"]))

        gen = torch.Generator().manual_seed(run.seed)
        bs = int(config["batch_size"])
        steps_per_epoch = len(y_tr) // bs
        total = steps_per_epoch * int(config["epochs"])
        losses: list[float | None] = [None] * total
        diverged = False
        grad_norm = logit_std = 0.0
        step = 0
        for _ in range(int(config["epochs"])):
            perm = torch.randperm(len(y_tr), generator=gen).to(device)
            model.train()
            for i in range(steps_per_epoch):
                idx = perm[i * bs : (i + 1) * bs]
                xb, yb = x_tr[idx], y_tr[idx]
                if step == 0:
                    grad_norm, logit_std = _init_diagnostics(model, xb, yb)
                loss = F.cross_entropy(model(xb), yb)
                value = float(loss.item())
                if not math.isfinite(value):
                    diverged = True
                    break
                losses[step] = value
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clipped:
                    adaptive_grad_clip_(clipped, clip_factor=float(config["agc_clip_factor"]))
                opt.step()
                step += 1
                if step % max(1, total // 50) == 0:
                    progress(step / total)
            if diverged:
                break

        last_epoch = [v for v in losses[total - steps_per_epoch :] if v is not None]
        if last_epoch and sum(last_epoch) / len(last_epoch) > config["diverge_loss"]:
            diverged = True
        if diverged:
            acc = 1.0 / NUM_CLASSES
        else:
            model.eval()
            with torch.no_grad():
                logits = model(x_te)
            ok = torch.isfinite(logits).all(dim=1) & (logits.argmax(dim=1) == y_te)
            acc = float(ok.float().mean().item())
        progress(1.0)
        return {
            "test_acc": acc,
            "diverged": 1.0 if diverged else 0.0,
            "grad_norm_init": grad_norm,
            "logit_std_init": logit_std,
            "loss_curve": losses,
        }

    def figures(self, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
        """Write two PNGs; return their paths.

        ``depth_accuracy.png``: test accuracy against depth (log x), mean ± std over seeds, chance
        dashed, a cross where a seed diverged. ``depth_grad_norm.png``: first-step gradient norm
        against depth (log-log), geometric mean over seeds with ±1 std of log10 as error bars.
        """
        from matplotlib.figure import Figure

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg = results.get("config", {})
        per: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
        for entry in results["runs"].values():
            r = entry["run"]
            per.setdefault((r["method"], _depth_of(r["setting"])), []).append(entry["metrics"])
        methods = [m for m in cfg.get("methods", METHODS) if any(k[0] == m for k in per)]
        methods += sorted({k[0] for k in per} - set(methods))
        depths = sorted({k[1] for k in per})

        fig = Figure(figsize=(6.4, 4.4), layout="constrained")
        ax = fig.add_subplot()
        for method in methods:
            ds = [d for d in depths if (method, d) in per]
            accs = [[float(m["test_acc"]) for m in per[(method, d)]] for d in ds]
            means = [sum(a) / len(a) for a in accs]
            stds = [_std(a) for a in accs]
            ax.errorbar(ds, means, yerr=stds, marker="o", capsize=4, label=method)
            blown = [
                (d, mu)
                for d, mu in zip(ds, means)
                if any(float(m.get("diverged", 0.0)) for m in per[(method, d)])
            ]
            if blown:
                bx, by = [b[0] for b in blown], [b[1] for b in blown]
                ax.scatter(bx, by, marker="x", s=80, color="black", zorder=3)
        ax.scatter([], [], marker="x", color="black", label="a seed diverged")
        ax.axhline(1.0 / NUM_CLASSES, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xscale("log")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("residual blocks L (log scale)")
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        epochs = cfg.get("epochs")
        ax.set_title(
            "Digits residual MLP: accuracy after a fixed budget"
            + (f" ({epochs} epoch{'s' if epochs != 1 else ''})" if epochs else "")
        )
        ax.legend()
        acc_path = out_dir / "depth_accuracy.png"
        fig.savefig(acc_path, dpi=120)

        fig = Figure(figsize=(6.4, 4.4), layout="constrained")
        ax = fig.add_subplot()
        for method in methods:
            ds, mid, lo, hi = [], [], [], []
            for d in depths:
                vals = [float(m["grad_norm_init"]) for m in per.get((method, d), [])]
                logs = [math.log10(v) for v in vals if v > 0 and math.isfinite(v)]
                if not logs:
                    continue
                mu, sd = sum(logs) / len(logs), _std(logs)
                ds.append(d)
                mid.append(10**mu)
                lo.append(10**mu - 10 ** (mu - sd))
                hi.append(10 ** (mu + sd) - 10**mu)
            if ds:
                ax.errorbar(ds, mid, yerr=[lo, hi], marker="o", capsize=4, label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.set_xlabel("residual blocks L (log scale)")
        ax.set_ylabel("gradient norm at init (log scale)")
        ax.set_title("First-step total gradient norm (float64)")
        ax.legend()
        grad_path = out_dir / "depth_grad_norm.png"
        fig.savefig(grad_path, dpi=120)
        return [acc_path, grad_path]


def _depth_of(setting: str) -> int:
    if not setting.startswith("L") or not setting[1:].isdigit():
        raise ValueError(f"study depth: expected a setting like 'L100', got {setting!r}")
    return int(setting[1:])


def _std(values: Sequence[float]) -> float:
    """Sample std (n - 1), 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _finite_or_max(value: float) -> float:
    return value if math.isfinite(value) else sys.float_info.max


def _safe_std(t: Tensor) -> float:
    """``t.std()`` computed as ``max|t| * std(t / max|t|)``, which cannot overflow."""
    peak = float(t.abs().max().item())
    if not math.isfinite(peak) or peak == 0:
        return peak
    return peak * float((t / peak).std().item())


def _init_diagnostics(model: nn.Module, xb: Tensor, yb: Tensor) -> tuple[float, float]:
    """Total gradient norm and logit std at init on one batch, on a float64 copy of ``model``."""
    if xb.device.type == "mps":  # no float64 on MPS: fall back to float32
        probe, x = copy.deepcopy(model), xb
    else:
        probe, x = copy.deepcopy(model).double(), xb.double()
    probe.train()
    logits = probe(x)
    F.cross_entropy(logits, yb).backward()
    logit_std = _finite_or_max(_safe_std(logits.detach()))
    # The norm of each gradient is taken as max|g| * ||g / max|g|||, which cannot overflow.
    total_sq = 0.0
    norms: list[float] = []
    for p in probe.parameters():
        if p.grad is None:
            continue
        g = p.grad.detach()
        m = float(g.abs().max().item())
        if not math.isfinite(m):
            return sys.float_info.max, logit_std
        if m > 0:
            norms.append(m * float(torch.linalg.vector_norm(g / m).item()))
    peak = max(norms, default=0.0)
    if peak > 0:
        total_sq = sum((n / peak) ** 2 for n in norms)
    grad_norm = peak * math.sqrt(total_sq)
    return _finite_or_max(grad_norm), logit_std


STUDY = DepthStudy(
    name="depth",
    title="Residual nets at growing depth without normalization",
    paper="Zhang, Dauphin & Ma, Fixup Initialization, ICLR 2019 (arXiv 1901.09321)",
    claims=(
        Claim(
            text="Fixup trains at every depth where no normalization with He init fails",
            better="fixup",
            worse="none-he",
            metric="test_acc",
            diverged_metric="diverged",
        ),
        Claim(
            text="Fixup trains at every depth where no normalization with default init fails",
            better="fixup",
            worse="none-default",
            metric="test_acc",
            diverged_metric="diverged",
        ),
        Claim(
            text="SkipInit/ReZero trains at every depth where no normalization with He init fails",
            better="rezero",
            worse="none-he",
            metric="test_acc",
            diverged_metric="diverged",
        ),
        Claim(
            text=(
                "normalizer-free blocks (scaled WS + AGC) train at every depth where no "
                "normalization with He init fails"
            ),
            better="nf-agc",
            worse="none-he",
            metric="test_acc",
            diverged_metric="diverged",
        ),
    ),
)
