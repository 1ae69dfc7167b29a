"""The ``depth`` study (Fixup at growing depth): config, runs, metrics, determinism, figures."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from normkit.experiments.studies import depth
from normkit.experiments.study import Run

STUDY = depth.STUDY
TINY = {"depths": [3], "epochs": 1, "train_size": 128, "width": 16}


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
    assert full["depths"] == [10, 100, 1000]
    assert quick["depths"] == [10, 100]
    assert quick["epochs"] < full["epochs"]
    assert full["methods"] == ["fixup", "bn", "none-default", "none-he", "rezero", "nf-agc"]
    # The depth-aware scalar lr: min(0.1, 10 / L), recorded per depth.
    assert full["scalar_lr_mult"] == {"10": 0.1, "100": 0.1, "1000": 0.01}
    json.dumps(full, allow_nan=False)


def test_config_round_trips_and_takes_overrides() -> None:
    cfg = STUDY.config(quick=True, overrides={"depths": [5, 50], "scalar_lr_mult": {"50": 0.5}})
    assert cfg["scalar_lr_mult"] == {"5": 0.1, "50": 0.5}
    assert STUDY.config(quick=True, overrides=cfg) == cfg


@pytest.mark.parametrize(
    "overrides",
    [
        {"nope": 1},
        {"depths": []},
        {"depths": [0]},
        {"epochs": -1},
        {"methods": ["fixup", "unknown"]},
        {"scalar_lr_mult": {"7": 0.1}},
        {"train_size": 10},
    ],
)
def test_config_refuses_bad_overrides(overrides: dict) -> None:
    with pytest.raises(ValueError, match="study depth"):
        STUDY.config(quick=True, overrides=overrides)


def test_runs_cover_methods_depths_and_seeds_once() -> None:
    cfg = STUDY.config(quick=False, overrides={})
    runs = STUDY.runs(cfg, [0, 1, 2])
    assert len(runs) == len(depth.METHODS) * 3 * 3
    assert len({r.key for r in runs}) == len(runs)
    assert {r.setting for r in runs} == {"L10", "L100", "L1000"}
    assert all("/" not in r.key for r in runs)


def test_claims_name_study_methods() -> None:
    assert STUDY.name == "depth"
    for claim in STUDY.claims:
        assert {claim.better, claim.worse} <= set(depth.METHODS)
        assert claim.metric == "test_acc"


@pytest.mark.parametrize("method", depth.METHODS)
def test_tiny_run_returns_json_metrics(method: str) -> None:
    cfg = STUDY.config(quick=True, overrides=TINY)
    seen: list[float] = []
    metrics = STUDY.run(Run(method, "L3", 0), cfg, seen.append)
    json.dumps(metrics, allow_nan=False)
    assert set(metrics) == {
        "test_acc",
        "diverged",
        "grad_norm_init",
        "logit_std_init",
        "loss_curve",
    }
    assert 0.0 <= metrics["test_acc"] <= 1.0
    assert metrics["diverged"] in (0.0, 1.0)
    assert len(metrics["loss_curve"]) == 128 // cfg["batch_size"]
    assert seen and seen[-1] == 1.0


@pytest.mark.parametrize("method", ["fixup", "bn"])
def test_run_is_deterministic(method: str) -> None:
    cfg = STUDY.config(quick=True, overrides=TINY)
    run = Run(method, "L3", 7)
    assert STUDY.run(run, cfg, _noop) == STUDY.run(run, cfg, _noop)


def test_fixup_trains_at_depth_10() -> None:
    cfg = STUDY.config(quick=True, overrides={"depths": [10], "epochs": 1})
    metrics = STUDY.run(Run("fixup", "L10", 0), cfg, _noop)
    assert metrics["diverged"] == 0.0
    assert all(v is not None and math.isfinite(v) for v in metrics["loss_curve"])
    assert metrics["test_acc"] > 0.5  # chance is 0.1; ~0.75 after one epoch


def test_he_init_without_norm_explodes_where_fixup_does_not() -> None:
    cfg = STUDY.config(quick=True, overrides={"depths": [30], "epochs": 1, "train_size": 64})
    he = STUDY.run(Run("none-he", "L30", 0), cfg, _noop)
    fixup = STUDY.run(Run("fixup", "L30", 0), cfg, _noop)
    assert fixup["logit_std_init"] == 0.0  # zero classifier: the net outputs exactly 0 at init
    assert he["logit_std_init"] > 1e3
    assert he["grad_norm_init"] > 1e4 * fixup["grad_norm_init"]


def test_fixup_model_is_the_identity_plus_zero_head_at_init() -> None:
    torch.manual_seed(0)
    model = depth.ResidualMLP("fixup", 4, width=8, in_features=5)
    assert torch.equal(model(torch.randn(3, 5)), torch.zeros(3, 10))
    block = model.blocks[0]
    assert torch.equal(block.fc2.weight, torch.zeros(8, 8))


def _fake_results() -> dict:
    runs = {}
    for method in depth.METHODS:
        for d in (10, 100):
            for seed in (0, 1):
                run = Run(method, depth.setting_name(d), seed)
                runs[run.key] = {
                    "run": {"method": method, "setting": run.setting, "seed": seed},
                    "metrics": {
                        "test_acc": 0.1 if method == "none-he" else 0.9 - 0.01 * seed,
                        "diverged": 1.0 if method == "none-he" else 0.0,
                        "grad_norm_init": 10.0 ** (d / 10) if method == "none-he" else 1.0 + seed,
                        "logit_std_init": 0.0,
                        "loss_curve": [2.3, None],
                    },
                }
    return {"config": STUDY.config(quick=True, overrides={}), "runs": runs}


def test_figures_write_pngs(tmp_path: Path) -> None:
    paths = STUDY.figures(_fake_results(), tmp_path / "figs")
    assert [p.name for p in paths] == ["depth_accuracy.png", "depth_grad_norm.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rezero_blocks_are_the_identity_at_init_and_their_gates_learn() -> None:
    torch.manual_seed(0)
    model = depth.ResidualMLP("rezero", 6, width=16, in_features=8)
    x = torch.rand(32, 16)  # the stream after the stem's ReLU is non-negative
    torch.testing.assert_close(model.blocks(x), x, rtol=0, atol=0)
    model.blocks(x).square().sum().backward()
    gates = [b.gate.weight.grad for b in model.blocks]
    assert all(g is not None and g.abs().sum() > 0 for g in gates)


def test_nf_blocks_grow_the_stream_variance_as_tracked() -> None:
    # beta_i is the expected std before block i: Var(x_L) = 1 + L alpha^2 for a unit-variance
    # input, which only holds if the scaled WS layers preserve variance through the ReLUs.
    torch.manual_seed(0)
    alpha, blocks = 0.2, 25
    model = depth.ResidualMLP("nf-agc", blocks, width=64, nf_alpha=alpha)
    betas = [b.beta for b in model.blocks]
    assert betas == pytest.approx([math.sqrt(1 + i * alpha**2) for i in range(blocks)])
    x = torch.randn(4096, 64)
    with torch.no_grad():
        var = model.blocks(x).var().item()
    assert 0.7 * (1 + blocks * alpha**2) < var < 1.3 * (1 + blocks * alpha**2), var


def test_nf_agc_run_clips_every_gradient_but_the_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = depth.adaptive_grad_clip_

    def spy(params, clip_factor=0.01, eps=1e-3):  # type: ignore[no-untyped-def]
        params = list(params)
        seen.append(len(params))
        return real(params, clip_factor=clip_factor, eps=eps)

    monkeypatch.setattr(depth, "adaptive_grad_clip_", spy)
    cfg = STUDY.config(quick=True, overrides=TINY)
    STUDY.run(Run("nf-agc", "L3", 0), cfg, _noop)
    model = depth.ResidualMLP("nf-agc", 3, width=16)
    n_params = len(list(model.parameters())) - len(list(model.head.parameters()))
    assert seen and set(seen) == {n_params}
