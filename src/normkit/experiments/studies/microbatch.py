"""Micro-batch training (Qiao et al., arXiv 1903.10520): BN against GN, WS and BCN at batch 1.

A small conv net (conv16 → conv32 → max-pool → conv32 → global average pool → FC, each conv
followed by its norm and a ReLU; 4 groups for GN and BCN) is trained on the digits at per-step
batch sizes 1, 2, 4 and 32 with the paper's five normalizations:

- ``BN``: ``nn.BatchNorm2d`` after plain convs;
- ``GN``: ``nn.GroupNorm(4)`` after plain convs;
- ``GN+WS``: ``nn.GroupNorm(4)`` after :class:`normkit.WSConv2d`;
- ``BCN+WS``: :class:`normkit.BatchChannelNorm2d` in large-batch mode (its batch part is a BN)
  after WS convs;
- ``BCN+WS-micro``: BCN with estimated statistics (``estimate=True``, rate 0.01), the paper's
  micro-batch form, after WS convs.

and with the small-batch methods around the paper (issue 8), each after plain convolutions:

- ``BRN``: :class:`normkit.BatchRenorm2d` (Ioffe 2017), its warm-up schedule scaled to the run
  (below);
- ``MABN``: :class:`normkit.MovingAverageBatchNorm2d` after :class:`normkit.CenConv2d`
  (Yan et al. 2020, the paper's pairing), ring buffers of ``max(1, mabn_batch // b)`` steps so
  that the moving averages span about ``mabn_batch`` (32) samples at every batch size, the
  official warm-up (100 steps) and r clamp (1000 steps);
- ``BGN``: :class:`normkit.BatchGroupNorm2d` (Zhou et al. 2020) with ``groups`` (4) groups;
- ``FRN``: :class:`normkit.FilterResponseNorm2d` with its TLU (Singh & Krishnan 2020), which
  replaces the norm and the ReLU;
- ``EvoNorm-S0``: :class:`normkit.EvoNormS0` (Liu et al. 2020) with ``groups`` groups, which
  also replaces the norm and the ReLU.

**BRN's schedule.** The paper keeps r_max = 1, d_max = 0 (plain BN) for 5k steps, then relaxes
them to d_max = 5 by 25k and r_max = 3 by 40k steps, on a run far longer than these. The run here
is 126 to 4041 steps, so the same proportions are kept with the r_max ramp ending halfway
through the run: warm-up until 1/16 of the steps, d_max reached at 5/16 and r_max at 1/2.

Accuracy is eval-mode accuracy on the 450 test images. At batch 1 BN normalizes each sample
by its own statistics in training but by running averages in eval, and that mismatch is what
the paper's micro-batch methods remove.

**Learning rate.** SGD with momentum 0.9 and weight decay 1e-4 (on every parameter, as the
official code), lr ``0.01 · b / 8`` for batch ``b`` (the linear scaling rule of §2.6 of the
reference), with a cosine decay to 0 over the run. The rule is clipped below at batch 2: batch 1
uses ``0.01 · 2 / 8 = 0.0025`` rather than 0.00125. The linear rule is a large-batch
approximation that stops paying at the small end (gradient noise dominates, and halving an lr
that is already tiny mostly slows training down). Measured at the default sizes (3 epochs,
5 paired seeds, batch 1), 0.0025 against 0.00125 gave BN 67.1 vs 49.7 %, GN 97.5 vs 96.0 %,
GN+WS 99.5 vs 99.1 % and micro-batch BCN+WS 99.0 vs 98.8 %: the clip helps the BN baseline far
more than the method it is compared with, so it cannot make the batch-1 claim easier to hold.
Incomplete last batches are dropped (as the official code does), so
every step has exactly ``b`` samples.

**Step floor.** A run makes at least ``min_steps`` (100) optimizer steps: a large batch on a
small training set gets more epochs. At the default sizes it never binds (batch 32 makes 126
steps in 3 epochs); in ``--quick`` (300 images, 1 epoch) it gives batch 32 twelve epochs, where
one epoch (9 steps) would leave the large-batch baseline untrained and make the comparison
against it meaningless. The extra epochs favour the large-batch side, so they cannot make the
micro-batch claims easier to hold.

**Claims.** (0) For each of BRN, MABN, BGN, FRN and EvoNorm-S0: at the smallest batch it beats
BN (one-sided paired t-test), the small-batch claim each of those papers makes.
(1) At the smallest batch, micro-batch BCN+WS beats BN (one-sided paired t-test).
(2) Micro-batch BCN+WS at the smallest batch is no worse than BN at the largest batch by more
than ``margin`` (1) accuracy point: a non-inferiority test, the same paired t-test on the
differences shifted by the margin, so "held" means significant evidence that the gap is below
one point, not a failure to find a difference. Both compare the same number of epochs, as the
paper does; on these easy 8×8 images a batch-1 run makes 32 times more updates than a batch-32
run, which favours the small batch.

**Time.** With the paper's five methods alone, measured on an idle 2-core machine (``--jobs 2``,
one thread per run): ``--quick`` (2 seeds, batch 1 and 32, 300 images, 1 epoch) took about 22 s;
the default sizes (5 seeds, batch 1, 2, 4, 32, 3 epochs, 100 runs) about 400 s (790 s of CPU).
The ten methods make 200 runs at the default sizes: 2263 s of CPU (1121 s for the five new
methods) on a machine shared with another study and test jobs, where the five original methods
took 1142 s against 790 s idle; so about 1600 s of CPU, some 13 minutes of wall time, on the
idle machine (an estimate). BCN runs are the costly ones (about 3 times a GN+WS run at batch 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normkit.experiments.study import (
    Claim,
    ConfigError,
    Metrics,
    Progress,
    Run,
    Study,
    check_ints,
    check_numbers,
)

MICRO = "BCN+WS-micro"
RELATED = ("BRN", "MABN", "BGN", "FRN", "EvoNorm-S0")
"""The small-batch methods around the paper, each claimed to beat BN at a small batch."""
METHODS = ("BN", "GN", "GN+WS", "BCN+WS", MICRO, *RELATED)
BATCH_FREE_ACT = ("FRN", "EvoNorm-S0")
"""Methods whose layer includes the nonlinearity (no ReLU after it)."""

DEFAULT_CONFIG: dict[str, Any] = {
    "methods": list(METHODS),
    "batch_sizes": [1, 2, 4, 32],
    "epochs": 3,
    "min_steps": 100,
    "train_size": 1347,
    "base_lr": 0.01,
    "base_batch": 8,
    "lr_min_batch": 2,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "groups": 4,
    "estimate_rate": 0.01,
    "mabn_batch": 32,
    "margin": 1.0,
    "seeds": 5,
}
QUICK_CONFIG: dict[str, Any] = {
    **DEFAULT_CONFIG,
    "batch_sizes": [1, 32],
    "epochs": 1,
    "train_size": 300,
    "seeds": 2,
}


def setting_name(batch_size: int) -> str:
    return f"batch={batch_size}"


def batch_of(setting: str) -> int:
    return int(setting.split("=", 1)[1])


def _conv(c_in: int, c_out: int, method: str) -> nn.Module:
    import normkit

    cls: type[nn.Module] = nn.Conv2d
    if method.endswith("WS") or method == MICRO:
        cls = normkit.WSConv2d
    elif method == "MABN":
        cls = normkit.CenConv2d
    return cls(c_in, c_out, 3, padding=1, bias=False)


def brn_schedule(total_steps: int) -> dict[str, int]:
    """BRN's warm-up and ramps, the paper's 5k/25k/40k proportions ending at half the run."""
    half = max(1, total_steps // 2)
    return {
        "warmup_steps": half // 8,
        "d_max_steps": half * 5 // 8,
        "r_max_steps": half,
    }


def _norm(
    method: str,
    channels: int,
    groups: int,
    rate: float,
    batch_size: int = 32,
    total_steps: int = 100,
    mabn_batch: int = 32,
) -> nn.Module:
    import normkit

    if method == "BN":
        return nn.BatchNorm2d(channels)
    if method in ("GN", "GN+WS"):
        return nn.GroupNorm(groups, channels)
    if method == "BCN+WS":
        return normkit.BatchChannelNorm2d(channels, num_groups=groups)
    if method == MICRO:
        return normkit.BatchChannelNorm2d(
            channels, num_groups=groups, estimate=True, estimate_rate=rate
        )
    if method == "BRN":
        schedule = brn_schedule(total_steps)
        return normkit.BatchRenorm2d(
            channels,
            warmup_steps=schedule["warmup_steps"],
            d_max_steps=schedule["d_max_steps"],
            r_max_steps=schedule["r_max_steps"],
        )
    if method == "MABN":
        return normkit.MovingAverageBatchNorm2d(
            channels, buffer_size=max(1, mabn_batch // batch_size)
        )
    if method == "BGN":
        return normkit.BatchGroupNorm2d(channels, num_groups=groups)
    if method == "FRN":
        return normkit.FilterResponseNorm2d(channels)
    if method == "EvoNorm-S0":
        return normkit.EvoNormS0(channels, num_groups=groups)
    raise ValueError(f"microbatch: unknown method {method!r}")


def build_model(
    method: str,
    groups: int = 4,
    estimate_rate: float = 0.01,
    *,
    batch_size: int = 32,
    total_steps: int = 100,
    mabn_batch: int = 32,
) -> nn.Sequential:
    """conv16 → conv32 → max-pool → conv32 → global average pool → FC(10).

    ``batch_size`` and ``total_steps`` size MABN's buffers and BRN's schedule (see the module
    docstring); the other methods ignore them.
    """

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        norm = _norm(method, c_out, groups, estimate_rate, batch_size, total_steps, mabn_batch)
        act = [] if method in BATCH_FREE_ACT else [nn.ReLU()]
        return [_conv(c_in, c_out, method), norm, *act]

    return nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def learning_rate(config: Mapping[str, Any], batch_size: int) -> float:
    """``base_lr · max(b, lr_min_batch) / base_batch`` (see the module docstring)."""
    effective = max(batch_size, int(config["lr_min_batch"]))
    return float(config["base_lr"]) * effective / int(config["base_batch"])


def epochs_for(config: Mapping[str, Any], n_train: int, batch_size: int) -> int:
    """``epochs``, raised for a large batch until the run makes at least ``min_steps`` steps."""
    from normkit.experiments.training import steps_per_epoch

    per_epoch = steps_per_epoch(n_train, batch_size, drop_last=True)
    needed = -(-int(config["min_steps"]) // per_epoch)
    return max(int(config["epochs"]), needed)


@dataclass
class MicrobatchStudy(Study):
    name: str = "microbatch"
    title: str = (
        "Micro-batch training: BN, GN, GN+WS, BCN+WS and micro-batch BCN+WS, with BRN, MABN, "
        "BGN, FRN and EvoNorm-S0"
    )
    paper: str = (
        "Qiao, Wang, Liu, Shen & Yuille, Micro-Batch Training with Batch-Channel Normalization "
        "and Weight Standardization (arXiv 1903.10520)"
    )
    claims: Sequence[Claim] = field(default_factory=tuple)

    def config(self, quick: bool, overrides: Mapping[str, Any]) -> dict[str, Any]:
        config = dict(QUICK_CONFIG if quick else DEFAULT_CONFIG)
        config.update(overrides)
        methods = config["methods"]
        if not isinstance(methods, list) or not methods:
            raise ConfigError("--methods: expected a comma-separated list of methods")
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ConfigError(
                f"--methods: unknown {', '.join(map(str, unknown))}; expected some of "
                f"{', '.join(METHODS)}"
            )
        config["methods"] = [m for m in METHODS if m in methods]
        sizes = config["batch_sizes"]
        if not isinstance(sizes, list) or not sizes:
            raise ConfigError("--batch-sizes: expected a comma-separated list of batch sizes")
        for b in sizes:
            check_ints(self.name, {"batch_sizes": b}, ["batch_sizes"])
        config["batch_sizes"] = sorted(set(sizes))
        ints = ["epochs", "train_size", "base_batch", "lr_min_batch", "groups", "mabn_batch"]
        check_ints(self.name, config, [*ints, "seeds"])
        if isinstance(config["min_steps"], bool) or not isinstance(config["min_steps"], int):
            raise ConfigError("--min-steps: expected an integer")
        check_numbers(self.name, config, ["base_lr", "estimate_rate"], strict=True)
        if config["estimate_rate"] > 1:
            raise ConfigError("--estimate-rate: expected a rate in (0, 1]")
        check_numbers(self.name, config, ["momentum", "weight_decay", "margin"])
        if 16 % config["groups"] or 32 % config["groups"]:
            raise ConfigError("--groups: expected a divisor of 16 (the narrowest layer)")
        # A batch the training set cannot fill once would train on nothing (last batch dropped).
        train_size = min(config["train_size"], 1347)
        too_big = [b for b in config["batch_sizes"] if b > train_size]
        if too_big:
            raise ConfigError(f"--batch-sizes: {too_big} exceed the {train_size} training images")
        return config

    def claims_for(self, config: Mapping[str, Any]) -> Sequence[Claim]:
        methods, sizes = config["methods"], config["batch_sizes"]
        if "BN" not in methods:
            return ()
        small, large = min(sizes), max(sizes)
        claims = [
            Claim(
                text=f"at batch {small}, {method} beats BN",
                better=method,
                worse="BN",
                metric="test_acc",
                settings=(setting_name(small),),
            )
            for method in RELATED
            if method in methods
        ]
        if MICRO not in methods:
            return claims
        claims.append(
            Claim(
                text=f"at batch {small}, micro-batch BCN+WS beats BN",
                better=MICRO,
                worse="BN",
                metric="test_acc",
                settings=(setting_name(small),),
            )
        )
        if large > small:
            margin = config["margin"]
            claims.append(
                Claim(
                    text=(
                        f"micro-batch BCN+WS at batch {small} is within {margin:g} point(s) of "
                        f"(or better than) BN at batch {large}"
                    ),
                    better=MICRO,
                    worse="BN",
                    metric="test_acc",
                    better_setting=setting_name(small),
                    worse_setting=setting_name(large),
                    margin=margin,
                )
            )
        return claims

    def runs(self, config: Mapping[str, Any], seeds: Sequence[int]) -> list[Run]:
        return [
            Run(method, setting_name(b), seed)
            for b in config["batch_sizes"]
            for method in config["methods"]
            for seed in seeds
        ]

    def run(self, run: Run, config: Mapping[str, Any], progress: Progress) -> Metrics:
        from normkit.experiments import data, training

        device = torch.device(config.get("device", "cpu"))
        batch = batch_of(run.setting)
        digits = data.digits_split()
        x, y = digits.x_train, digits.y_train
        if config["train_size"] < len(y):
            # One fixed subset for every seed: the seeds vary the init and the batch order.
            x, y = data.subset(x, y, config["train_size"], seed=0)
        x, y = x.to(device), y.to(device)
        x_test, y_test = digits.x_test.to(device), digits.y_test.to(device)

        epochs = epochs_for(config, len(y), batch)
        total = training.steps_per_epoch(len(y), batch, drop_last=True) * epochs
        training.init_seed(run.seed)
        model = build_model(
            run.method,
            config["groups"],
            config["estimate_rate"],
            batch_size=batch,
            total_steps=total,
            mabn_batch=config.get("mabn_batch", 32),
        ).to(device)
        optimizer = training.sgd(
            model.parameters(),
            learning_rate(config, batch),
            momentum=config["momentum"],
            weight_decay=config["weight_decay"],
        )
        scheduler = training.cosine_lr(optimizer, total)
        result = training.train(
            model,
            x,
            y,
            optimizer=optimizer,
            scheduler=scheduler,
            epochs=epochs,
            batch_size=batch,
            seed=run.seed,
            drop_last=True,
            eval_fn=lambda: training.evaluate(model, x_test, y_test),
            progress=progress,
        )
        final = (
            result.eval_curve[-1] if result.eval_curve else training.evaluate(model, x_test, y_test)
        )
        return {
            "test_acc": 100.0 * final["accuracy"],
            "test_loss": final["loss"],
            "train_loss": result.final_loss,
            "test_acc_curve": [100.0 * e["accuracy"] for e in result.eval_curve],
            "train_loss_curve": result.curve,
        }

    def figures(self, results: Mapping[str, Any], out_dir: Path) -> list[Path]:
        from normkit.experiments import report

        settings = results["settings"]
        sizes = [batch_of(s) for s in settings]
        fig, (ax,) = report.new_figure(width=6.5, height=4.5)
        series = {}
        for method in results["methods"]:
            cells = [
                results["aggregates"].get(method, {}).get(s, {}).get("test_acc") for s in settings
            ]
            series[method] = (
                [c["mean"] if c else None for c in cells],
                [c["std"] if c else None for c in cells],
            )
        report.errorbar_lines(
            ax,
            sizes,
            series,
            title=(
                f"Digits: test accuracy against per-step batch size\n"
                f"({len(results['seeds'])} seeds; {results['config']['epochs']} epoch(s), at "
                f"least {results['config']['min_steps']} steps per run)"
            ),
            xlabel="per-step batch size (log scale)",
            ylabel="eval-mode test accuracy (%), mean ± std",
            logx=True,
        )
        paths = [report.save_figure(fig, out_dir / "accuracy_vs_batch_size.png")]
        if "test_acc_curve" in results.get("curve_metrics", ()):
            paths.append(
                report.curves_figure(
                    results,
                    "test_acc_curve",
                    out_dir / "learning_curves.png",
                    xlabel="epoch",
                    ylabel="eval-mode test accuracy (%)",
                    title=f"Learning curves, mean ± std over {len(results['seeds'])} seeds",
                )
            )
        return paths


STUDY = MicrobatchStudy()
