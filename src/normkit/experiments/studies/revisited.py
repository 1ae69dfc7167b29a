"""Study ``revisited`` (Davis & Frank 2021, "Revisiting Batch Normalization", arXiv 2110.13989).

The paper's claim: initializing every BN scale to ``γ0 = 0.1`` (instead of 1) and training the
BN scales at ``lr / 100``, optionally with online BN-based input normalization, gives better
accuracy than standard BN, significantly in a one-sided paired t-test over seeds.

Methods (``γ0``, ``c`` = the BN-scale lr divisor, input normalization):

=============================== ===== ===== ====================================================
``standard``                    1     1     fixed dataset statistics
``scale0.1-lrdiv100``           0.1   100   fixed dataset statistics
``scale0.1-lrdiv100+inputnorm`` 0.1   100   :class:`normkit.InputNorm2d` (``γ_in = 0.1 · 0.58``)
``standard+inputnorm``          1     1     :class:`normkit.InputNorm2d` (``γ_in = 0.58``)
=============================== ===== ===== ====================================================

("lrdiv100" reads "lr / 100"; the name has no slash because run keys may become file names.)
"Fixed dataset statistics" standardizes the images with the scalar mean and std of the training
set; the input-normalization arms take the raw images and learn the statistics online (running
mean and variance, used at test time). Every arm uses :func:`normkit.bn_param_groups`: weight
decay 1e-4 on conv and linear weights only, none on biases and BN parameters, the BN scales (the
input BN's included) at ``lr / c``; so the baseline gets the same no-decay treatment and only
``γ0`` and the scale lr differ (reference ``core-methods.md`` §3.3, quirk 5). ``γ0`` is set by
:func:`normkit.init_bn_scale_`.

Data, **a harder digits variant** (§3.6: on easy data every arm hits the ceiling): scikit-learn's
8x8 digits, stratified 1347/450 split (``random_state=0``); a stratified 300-image training
subset (``random_state=data_seed``) and additive Gaussian pixel noise of std 0.3 on images
scaled to [0, 1], drawn once from ``numpy.random.default_rng(data_seed)`` for the training and
the test images alike (not clipped). Why this variant rather than 25% label noise: it is hard
through the inputs, which is where input normalization and the BN statistics act, it leaves the
test labels clean, and its 300 images make the long schedule (40 epochs) affordable on a CPU.
With it the baseline ends near 81% test accuracy, where the same net on the same 300 clean
images reaches about 96%.

Model: a CIFAR-style ResNet-8 (:func:`normkit.models.cifar_resnet`, 3 basic blocks of widths
16/32/64, BN, one input channel), torchvision's init (He ``fan_out`` convs, BN 1/0, default
linear). Training: SGD momentum 0.9, lr 0.1, batch 32 (last incomplete batch dropped), cosine
decay per step to 0 over ``epochs`` (40; §3.6 asks for at least 40, since γ0 = 0.1 starts nearly
linear and needs a long schedule), weight decay 1e-4. Deterministic for a seed: the global torch
seed is set from ``run.seed`` before the model is built, and the data order comes from a
``torch.Generator`` seeded with it (the same batches for every method).

Metrics of a run (:meth:`RevisitedStudy.run`):

``test_acc``
    test accuracy after the last epoch (eval mode, running statistics), in [0, 1].
``gamma_shift``
    the mean ``|γ − γ0|`` over every scale entry of the network's BN layers after training (the
    input BN excluded: its ``γ0`` is ``0.58 c_γ``). The paper's observation: small in every arm.
``xhat_max_ratio``
    the largest ``|x̂| / sqrt(m − 1)`` over the BN layers (input BN included) on one training
    batch after training, ``x̂`` the standardized value before the affine and ``m`` the values per
    channel (``N·H·W``). It is at most 1 by the bound ``|x̂| ≤ sqrt(m − 1)``; near 1 means one
    value carries the whole batch's variance.
``test_acc_curve``, ``train_loss_curve``
    per-epoch test accuracy and mean training loss (``epochs`` values each).

Results mapping expected by :meth:`RevisitedStudy.figures` (the runner passes exactly this)::

    {"config": <the dict from config()>,
     "runs": {run.key: {"run": {"method": str, "setting": str, "seed": int},
                        "metrics": <the dict from run()>}, ...}}

Other keys at either level are ignored.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit import InputNorm2d, bn_param_groups, init_bn_scale_
from normkit.experiments.study import Claim, Metrics, Progress, Run, Study
from normkit.models import cifar_resnet

__all__ = ["ARMS", "METHODS", "STUDY", "RevisitedStudy", "build_model", "setting_name"]

STANDARD = "standard"
SMALL = "scale0.1-lrdiv100"
SMALL_IN = "scale0.1-lrdiv100+inputnorm"
STANDARD_IN = "standard+inputnorm"

#: method -> (γ0, BN-scale lr divisor c, online input normalization)
ARMS: dict[str, tuple[float, float, bool]] = {
    STANDARD: (1.0, 1.0, False),
    SMALL: (0.1, 100.0, False),
    SMALL_IN: (0.1, 100.0, True),
    STANDARD_IN: (1.0, 1.0, True),
}
METHODS: tuple[str, ...] = tuple(ARMS)
NUM_CLASSES = 10
_TEST_SIZE = 450
_FULL_TRAIN = 1347

_DEFAULTS: dict[str, Any] = {
    "methods": list(METHODS),
    "train_size": 300,
    "noise_std": 0.3,
    "data_seed": 0,
    "depth": 8,
    "width": 16,
    "epochs": 40,
    "batch_size": 32,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "device": "cpu",
}
_QUICK: dict[str, Any] = {"epochs": 20}


def setting_name(config: Mapping[str, Any]) -> str:
    """The study's one setting, naming the data variant: ``"digits300-noise0.3"``."""
    return f"digits{config['train_size']}-noise{config['noise_std']:g}"


@functools.lru_cache(maxsize=4)
def _data(train_size: int, noise_std: float, data_seed: int) -> tuple[Tensor, ...]:
    """(x_train, y_train, x_test, y_test), images N x 1 x 8 x 8 in [0, 1] plus the fixed noise."""
    import numpy as np
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=_TEST_SIZE, stratify=y, random_state=0
    )
    if train_size < _FULL_TRAIN:
        keep, _ = train_test_split(
            np.arange(len(y_tr)), train_size=train_size, stratify=y_tr, random_state=data_seed
        )
        x_tr, y_tr = x_tr[np.sort(keep)], y_tr[np.sort(keep)]
    rng = np.random.default_rng(data_seed)
    x_tr = x_tr / 16.0 + noise_std * rng.standard_normal(x_tr.shape)
    x_te = x_te / 16.0 + noise_std * rng.standard_normal(x_te.shape)
    return (
        torch.tensor(x_tr, dtype=torch.float32).reshape(-1, 1, 8, 8),
        torch.tensor(y_tr, dtype=torch.long),
        torch.tensor(x_te, dtype=torch.float32).reshape(-1, 1, 8, 8),
        torch.tensor(y_te, dtype=torch.long),
    )


def build_model(method: str, depth: int = 8, width: int = 16) -> nn.Module:
    """The ResNet of ``method`` with its BN scales at ``γ0`` (and the input BN if it has one)."""
    gamma0, _, input_norm = ARMS[method]
    net: nn.Module = cifar_resnet(depth, in_channels=1, width=width, num_classes=NUM_CLASSES)
    if gamma0 != 1.0:
        init_bn_scale_(net, gamma0)
    if input_norm:
        net = nn.Sequential(InputNorm2d(1, scale=gamma0), net)
    return net


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(key: str, want: str, got: Any) -> ValueError:
    return ValueError(f"study revisited: expected {key} to be {want}, got {got!r}")


def _validate(cfg: dict[str, Any]) -> None:
    for key in ("width", "epochs", "batch_size"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _bad(key, "a positive int", v)
    d = cfg["depth"]
    if isinstance(d, bool) or not isinstance(d, int) or d < 8 or (d - 2) % 6:
        raise _bad("depth", "a CIFAR ResNet depth 6n + 2 >= 8", d)
    if not _is_number(cfg["lr"]) or not cfg["lr"] > 0:
        raise _bad("lr", "a positive number", cfg["lr"])
    for key in ("momentum", "weight_decay", "noise_std"):
        if not _is_number(cfg[key]) or not cfg[key] >= 0:
            raise _bad(key, "a number >= 0", cfg[key])
    if isinstance(cfg["data_seed"], bool) or not isinstance(cfg["data_seed"], int):
        raise _bad("data_seed", "an int", cfg["data_seed"])
    n = cfg["train_size"]
    if isinstance(n, bool) or not isinstance(n, int) or not 20 <= n <= _FULL_TRAIN:
        raise _bad("train_size", f"an int from 20 to {_FULL_TRAIN}", n)
    if cfg["batch_size"] < 2 or cfg["batch_size"] > n:
        raise _bad("batch_size", f"an int from 2 to train_size ({n})", cfg["batch_size"])
    methods = cfg["methods"]
    if (
        not isinstance(methods, list)
        or not methods
        or not all(m in METHODS for m in methods)
        or len(set(methods)) != len(methods)
    ):
        raise _bad("methods", f"a non-empty list of distinct names from {list(METHODS)}", methods)
    if not isinstance(cfg["device"], str):
        raise _bad("device", "a device string", cfg["device"])


class RevisitedStudy(Study):
    """Small BN scale with a reduced scale lr, against standard BN; see the module docstring."""

    def config(self, quick: bool, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Default sizes (40 epochs), updated by ``overrides``.

        ``quick`` halves the schedule to 20 epochs: a first look and a smoke test, too short for
        the method (γ0 = 0.1 starts small-signal and needs the long schedule, §3.6), which
        typically trails the baseline there.

        Every key of the returned dict can be overridden: ``methods``, ``train_size``,
        ``noise_std``, ``data_seed``, ``depth`` (6n + 2), ``width``, ``epochs``, ``batch_size``,
        ``lr``, ``momentum``, ``weight_decay``, ``device``. An unknown key or a bad value raises
        ``ValueError``. (The arms' ``γ0`` and ``c`` are fixed: the method names state them.)
        """
        cfg = copy.deepcopy(_DEFAULTS)
        if quick:
            cfg.update(_QUICK)
        unknown = sorted(set(overrides) - set(cfg))
        if unknown:
            raise ValueError(
                f"study revisited: unknown option(s) {', '.join(unknown)}; expected some of "
                f"{', '.join(sorted(cfg))}"
            )
        cfg.update(copy.deepcopy(dict(overrides)))
        if isinstance(cfg["methods"], tuple):
            cfg["methods"] = list(cfg["methods"])
        _validate(cfg)
        return cfg

    def runs(self, config: Mapping[str, Any], seeds: Sequence[int]) -> list[Run]:
        setting = setting_name(config)
        return [Run(m, setting, int(s)) for s in seeds for m in config["methods"]]

    def run(self, run: Run, config: Mapping[str, Any], progress: Progress) -> Metrics:
        """Train one arm for ``epochs`` with cosine decay; see the module docstring."""
        if run.setting != setting_name(config):
            raise ValueError(
                f"study revisited: run setting {run.setting!r} does not match the config's "
                f"{setting_name(config)!r}"
            )
        gamma0, divisor, input_norm = ARMS[run.method]
        device = torch.device(config.get("device", "cpu"))
        x_tr, y_tr, x_te, y_te = _data(
            int(config["train_size"]), float(config["noise_std"]), int(config["data_seed"])
        )
        if not input_norm:  # fixed dataset statistics of the (noisy) training set
            mean, std = x_tr.mean(), x_tr.std()
            x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
        x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))

        torch.manual_seed(run.seed)
        model = build_model(run.method, int(config["depth"]), int(config["width"])).to(device)
        lr = float(config["lr"])
        groups = bn_param_groups(
            model, lr=lr, weight_decay=float(config["weight_decay"]), scale_lr_divisor=divisor
        )
        opt = torch.optim.SGD(groups, lr=lr, momentum=float(config["momentum"]))
        bs = int(config["batch_size"])
        epochs = int(config["epochs"])
        steps_per_epoch = len(y_tr) // bs
        total = steps_per_epoch * epochs
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
        )

        gen = torch.Generator().manual_seed(run.seed)
        acc_curve: list[float] = []
        loss_curve: list[float] = []
        step = 0
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(len(y_tr), generator=gen).to(device)
            running = torch.zeros((), device=device)
            for i in range(steps_per_epoch):
                idx = perm[i * bs : (i + 1) * bs]
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += loss.detach()
                step += 1
            loss_curve.append(float(running.item()) / steps_per_epoch)
            acc_curve.append(_accuracy(model, x_te, y_te))
            progress(step / total)

        return {
            "test_acc": acc_curve[-1],
            "gamma_shift": _gamma_shift(model, gamma0),
            "xhat_max_ratio": _xhat_max_ratio(model, x_tr[:bs]),
            "test_acc_curve": acc_curve,
            "train_loss_curve": loss_curve,
        }

    def figures(self, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
        """``revisited_accuracy.png`` (final test accuracy per method: mean ± std bars, one dot
        per seed) and ``revisited_learning_curves.png`` (test accuracy and training loss per
        epoch, mean with a ±1 std band over seeds)."""
        from matplotlib.figure import Figure

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg = results.get("config", {})
        per: dict[str, list[Mapping[str, Any]]] = {}
        for entry in results["runs"].values():
            per.setdefault(entry["run"]["method"], []).append(entry["metrics"])
        methods = [m for m in cfg.get("methods", METHODS) if m in per]
        methods += sorted(set(per) - set(methods))
        variant = setting_name(cfg) if "train_size" in cfg and "noise_std" in cfg else ""
        colors = [f"C{i}" for i in range(len(methods))]

        fig = Figure(figsize=(7.0, 4.6), layout="constrained")
        ax = fig.add_subplot()
        lowest = 1.0
        for i, method in enumerate(methods):
            accs = [float(m["test_acc"]) for m in per[method]]
            ax.bar(
                i, sum(accs) / len(accs), yerr=_std(accs), capsize=6, color=colors[i], alpha=0.75
            )
            ax.scatter([i] * len(accs), accs, color="black", s=10, zorder=3)
            lowest = min(lowest, *accs)
        ax.set_xticks(range(len(methods)), methods, rotation=15, ha="right")
        ax.set_ylim(max(0.0, lowest - 0.1), 1.0)
        ax.set_ylabel("final test accuracy (mean ± std; dots: seeds)")
        ax.set_title(f"Revisiting BN on {variant or 'digits'}: accuracy per method")
        acc_path = out_dir / "revisited_accuracy.png"
        fig.savefig(acc_path, dpi=120)

        fig = Figure(figsize=(10.0, 4.2), layout="constrained")
        ax_acc, ax_loss = fig.subplots(1, 2)
        for i, method in enumerate(methods):
            for ax, key in ((ax_acc, "test_acc_curve"), (ax_loss, "train_loss_curve")):
                curves = [list(m[key]) for m in per[method] if m.get(key)]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                mean = [sum(c[e] for c in curves) / len(curves) for e in range(n)]
                std = [_std([c[e] for c in curves]) for e in range(n)]
                epochs = list(range(1, n + 1))
                ax.plot(epochs, mean, color=colors[i], label=method)
                ax.fill_between(
                    epochs,
                    [a - b for a, b in zip(mean, std)],
                    [a + b for a, b in zip(mean, std)],
                    color=colors[i],
                    alpha=0.2,
                )
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("test accuracy")
        ax_acc.set_title("Test accuracy (mean ± std over seeds)")
        ax_acc.legend(fontsize="small")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("training loss (epoch mean)")
        ax_loss.set_yscale("log")
        ax_loss.set_title("Training loss")
        curve_path = out_dir / "revisited_learning_curves.png"
        fig.savefig(curve_path, dpi=120)
        return [acc_path, curve_path]


def _std(values: Sequence[float]) -> float:
    """Sample std (n - 1), 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean().item())


def _gamma_shift(model: nn.Module, gamma0: float) -> float:
    shifts = [
        (mod.weight.detach() - gamma0).abs().flatten()
        for mod in model.modules()
        if isinstance(mod, _BatchNorm) and not isinstance(mod, InputNorm2d) and mod.affine
    ]
    return float(torch.cat(shifts).mean().item())


def _xhat_max_ratio(model: nn.Module, xb: Tensor) -> float:
    """The largest ``|x̂| / sqrt(m − 1)`` over the BN layers, on a copy in training mode."""
    probe = copy.deepcopy(model).train()
    ratios: list[float] = []

    def hook(mod: nn.Module, args: tuple[Tensor, ...], _out: Tensor) -> None:
        assert isinstance(mod, _BatchNorm)
        x = args[0].detach()
        x = x if x.device.type == "mps" else x.double()  # MPS has no float64
        dims = [d for d in range(x.dim()) if d != 1]
        m = x.numel() // x.shape[1]
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, keepdim=True, unbiased=False)
        xhat = (x - mean) / torch.sqrt(var + mod.eps)
        ratios.append(float(xhat.abs().max().item()) / math.sqrt(m - 1))

    for mod in probe.modules():
        if isinstance(mod, _BatchNorm):
            mod.register_forward_hook(hook)
    with torch.no_grad():
        probe(xb)
    return max(ratios)


STUDY = RevisitedStudy(
    name="revisited",
    title="Small BN scale init with a reduced BN-scale learning rate",
    paper="Davis & Frank, Revisiting Batch Normalization (arXiv 2110.13989; ECCV 2022 as v2)",
    claims=(
        Claim(
            text="BN scale 0.1 with its lr / 100 beats standard BN",
            better=SMALL,
            worse=STANDARD,
            metric="test_acc",
        ),
        Claim(
            text="BN scale 0.1 with its lr / 100 and online input BN beats standard BN",
            better=SMALL_IN,
            worse=STANDARD,
            metric="test_acc",
        ),
    ),
)
