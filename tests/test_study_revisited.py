"""The ``revisited`` study (Davis & Frank): config, arms, metrics, determinism, figures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

pytest.importorskip("sklearn")

from normkit import InputNorm2d
from normkit.experiments.studies import revisited
from normkit.experiments.study import Run

STUDY = revisited.STUDY
TINY = {"train_size": 60, "epochs": 2, "batch_size": 16, "width": 4}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads, and on a busy machine two spinning threads
    # per process slow these tests down a hundredfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _noop(_: float) -> None:
    pass


def test_config_default_and_quick_sizes() -> None:
    full = STUDY.config(quick=False, overrides={})
    quick = STUDY.config(quick=True, overrides={})
    assert full["epochs"] >= 40  # the method needs a long schedule (core-methods §3.6)
    assert full["weight_decay"] == 1e-4 and full["momentum"] == 0.9
    assert full["methods"] == list(revisited.METHODS)
    assert STUDY.config(quick=True, overrides=quick) == quick
    json.dumps(full, allow_nan=False)


@pytest.mark.parametrize(
    "overrides",
    [{"nope": 1}, {"depth": 9}, {"train_size": 5}, {"batch_size": 1}, {"methods": []}],
)
def test_config_refuses_bad_overrides(overrides: dict) -> None:
    with pytest.raises(ValueError, match="study revisited"):
        STUDY.config(quick=True, overrides=overrides)


def test_runs_pair_every_method_with_every_seed() -> None:
    cfg = STUDY.config(quick=False, overrides={})
    runs = STUDY.runs(cfg, [3, 4])
    assert len(runs) == len(revisited.METHODS) * 2
    assert {r.setting for r in runs} == {"digits300-noise0.3"}
    assert len({r.key for r in runs}) == len(runs)
    assert all("/" not in r.key for r in runs)


def test_claims_compare_the_method_arms_with_standard() -> None:
    assert STUDY.name == "revisited"
    assert [(c.better, c.worse) for c in STUDY.claims] == [
        ("scale0.1-lrdiv100", "standard"),
        ("scale0.1-lrdiv100+inputnorm", "standard"),
    ]


def test_data_variant_is_fixed_and_stratified() -> None:
    a = revisited._data(300, 0.3, 0)
    b = revisited._data.__wrapped__(300, 0.3, 0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    x_tr, y_tr, x_te, _ = a
    assert x_tr.shape == (300, 1, 8, 8) and x_te.shape == (450, 1, 8, 8)
    assert torch.bincount(y_tr).min() >= 29


@pytest.mark.parametrize("method", revisited.METHODS)
def test_model_arms_set_the_initial_scales(method: str) -> None:
    gamma0, _, input_norm = revisited.ARMS[method]
    model = revisited.build_model(method, width=4)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    inputs = [m for m in norms if isinstance(m, InputNorm2d)]
    assert len(inputs) == (1 if input_norm else 0)
    for m in norms:
        want = gamma0 * 0.58 if isinstance(m, InputNorm2d) else gamma0
        assert torch.allclose(m.weight, torch.full_like(m.weight, want))


@pytest.mark.parametrize("method", revisited.METHODS)
def test_tiny_run_returns_json_metrics(method: str) -> None:
    cfg = STUDY.config(quick=True, overrides=TINY)
    seen: list[float] = []
    metrics = STUDY.run(Run(method, revisited.setting_name(cfg), 0), cfg, seen.append)
    json.dumps(metrics, allow_nan=False)
    assert set(metrics) == {
        "test_acc",
        "gamma_shift",
        "xhat_max_ratio",
        "test_acc_curve",
        "train_loss_curve",
    }
    assert 0.0 <= metrics["test_acc"] <= 1.0
    assert metrics["test_acc"] == metrics["test_acc_curve"][-1]
    assert len(metrics["train_loss_curve"]) == 2
    assert metrics["gamma_shift"] >= 0.0
    assert 0.0 < metrics["xhat_max_ratio"] <= 1.0 + 1e-9  # |x̂| <= sqrt(m - 1)
    assert seen and seen[-1] == 1.0


def test_run_is_deterministic() -> None:
    cfg = STUDY.config(quick=True, overrides=TINY)
    run = Run("scale0.1-lrdiv100+inputnorm", revisited.setting_name(cfg), 3)
    assert STUDY.run(run, cfg, _noop) == STUDY.run(run, cfg, _noop)


def test_reduced_scale_lr_keeps_gamma_near_its_init() -> None:
    cfg = STUDY.config(quick=True, overrides={**TINY, "epochs": 3})
    setting = revisited.setting_name(cfg)
    small = STUDY.run(Run("scale0.1-lrdiv100", setting, 0), cfg, _noop)
    standard = STUDY.run(Run("standard", setting, 0), cfg, _noop)
    assert small["gamma_shift"] < standard["gamma_shift"]


def test_figures_write_pngs(tmp_path: Path) -> None:
    cfg = STUDY.config(quick=True, overrides={})
    runs = {}
    for i, method in enumerate(revisited.METHODS):
        for seed in (0, 1):
            run = Run(method, revisited.setting_name(cfg), seed)
            runs[run.key] = {
                "run": {"method": method, "setting": run.setting, "seed": seed},
                "metrics": {
                    "test_acc": 0.8 + 0.01 * i + 0.005 * seed,
                    "gamma_shift": 0.01,
                    "xhat_max_ratio": 0.3,
                    "test_acc_curve": [0.5, 0.7, 0.8 + 0.01 * i],
                    "train_loss_curve": [2.0, 1.0, 0.5],
                },
            }
    paths = STUDY.figures({"config": cfg, "runs": runs}, tmp_path)
    assert [p.name for p in paths] == ["revisited_accuracy.png", "revisited_learning_curves.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
