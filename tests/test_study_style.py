"""The ``style`` study (SaAdaIN against AdaIN in style transfer on digits), tiny configs."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import normkit as nk
from normkit.experiments import runner
from normkit.experiments.studies import style
from normkit.experiments.studies.style import METHODS, STUDY
from normkit.experiments.study import ConfigError, Run, Study

pytest.importorskip("sklearn")

TINY: dict[str, Any] = {
    "encoder_epochs": 1,
    "steps": 4,
    "eval_every": 2,
    "batch_size": 8,
    "val_pairs": 24,
    "n_examples": 3,
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_study_exposes_the_contract() -> None:
    assert isinstance(STUDY, Study)
    assert STUDY.name == "style"
    assert {(c.better, c.worse, c.metric, c.higher_is_better) for c in STUDY.claims} == {
        ("saadain", "adain", "val_style_loss", False),
        ("saadain", "adain", "val_content_loss", False),
    }


def test_config_quick_is_smaller_json_and_validated() -> None:
    quick, full = STUDY.config(True, {}), STUDY.config(False, {})
    assert set(quick) == set(full)
    assert quick["steps"] < full["steps"] and full["seeds"] >= 5
    assert (full["content_weight"], full["style_weight"]) == (1.0, 10.0)
    json.dumps(full, allow_nan=False)
    assert STUDY.config(False, {"methods": ["saadain", "adain"]})["methods"] == list(METHODS)
    for bad, match in [
        ({"step": 3}, "--step: unknown option"),
        ({"steps": 0}, "--steps"),
        ({"lr": 0}, "--lr"),
        ({"val_pairs": 451}, "--val-pairs"),
        ({"batch_size": 1}, "--batch-size"),
        ({"methods": ["in"]}, "--methods"),
    ]:
        with pytest.raises(ConfigError, match=match):
            STUDY.config(False, bad)


def test_mean_std_is_the_spatial_mean_and_unbiased_std_plus_eps() -> None:
    feat = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])  # mean 3, unbiased var 14/3
    mean, std = style.mean_std(feat)
    torch.testing.assert_close(mean, torch.tensor([[3.0]]))
    torch.testing.assert_close(std, torch.tensor([[(14 / 3 + 1e-5) ** 0.5]]))


def test_style_and_content_losses_against_hand_computations() -> None:
    a = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])
    b = torch.tensor([[[[0.0, 0.0], [2.0, 2.0]]]])  # mean 1, unbiased var 4/3
    torch.testing.assert_close(style.content_loss(a, b), torch.tensor((1 + 4 + 1 + 16) / 4))
    std_a, std_b = (14 / 3 + 1e-5) ** 0.5, (4 / 3 + 1e-5) ** 0.5
    one_layer = (3 - 1) ** 2 + (std_a - std_b) ** 2
    torch.testing.assert_close(style.style_loss([a], [b]), torch.tensor(one_layer))
    torch.testing.assert_close(style.style_loss([a, a], [b, a]), torch.tensor(one_layer))
    # Means and stds are compared per (sample, channel) and averaged.
    two = torch.cat([a, a], dim=1)
    torch.testing.assert_close(
        style.style_loss([two], [torch.cat([b, a], dim=1)]), torch.tensor(one_layer / 2)
    )


def test_styles_are_fixed_and_follow_their_formula() -> None:
    bank = style.style_bank(0, 4)
    assert bank["fg"].shape == (4, 3) and bank["texture"].shape == (4, 3, 8, 8)
    again = style.style_bank.__wrapped__(0, 4)
    for key in bank:
        torch.testing.assert_close(bank[key], again[key])
    assert not torch.equal(style.style_bank.__wrapped__(1, 4)["fg"], bank["fg"])
    x = torch.rand(2, 1, 8, 8)
    out = style.apply_style(x, torch.tensor([1, 3]), bank)
    expected = (
        bank["bg"][3, :, None, None]
        + (bank["fg"][3, :, None, None] - bank["bg"][3, :, None, None]) * x[1]
        + bank["texture"][3]
    )
    torch.testing.assert_close(out[1], expected)


def test_saadain_starts_as_adain_and_only_it_has_a_shared_affine() -> None:
    encoder = style.Encoder(3)
    a, s = (style._build(m, encoder, 4) for m in METHODS)
    assert isinstance(a.norm, nk.SandwichAdaIN) and a.norm.weight is None
    assert s.norm.weight is not None and torch.equal(s.norm.weight, torch.ones(32))
    torch.testing.assert_close(a.decoder[0][1].weight, s.decoder[0][1].weight)  # paired init
    content, sty = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    for x, y in zip(a.losses(content, sty), s.losses(content, sty)):
        torch.testing.assert_close(x, y)


def test_study_end_to_end_through_the_runner(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {
        "out": tmp_path,
        "quick": True,
        "seeds": 2,
        "overrides": TINY,
        "progress": False,
        "stream": io.StringIO(),
    }
    runner.run_study(STUDY, **kwargs)
    study_dir = tmp_path / "style"
    saved = json.loads((study_dir / "results.json").read_text())
    assert saved["methods"] == list(METHODS) and saved["seeds"] == [0, 1]
    for metric in ("val_content_loss", "val_style_loss", "content_acc", "style_acc"):
        assert metric in saved["metrics"]
    assert {"curve_val_content", "curve_val_style", "curve_train_style"} <= set(
        saved["curve_metrics"]
    )
    assert [c["verdict"] for c in saved["claims"]] and all(c["n"] == 2 for c in saved["claims"])
    for seed in (0, 1):
        a = saved["runs"][f"adain__digits__seed{seed}"]["metrics"]
        s = saved["runs"][f"saadain__digits__seed{seed}"]["metrics"]
        assert len(a["curve_val_content"]) == 3  # steps 0, 2, 4
        assert a["eval_steps"]["steps"] == [0, 2, 4]
        # Same encoder, decoder init and pairs: identical before training.
        assert a["curve_val_content"][0] == s["curve_val_content"][0]
        assert a["curve_val_style"][0] == s["curve_val_style"][0]
        assert "shared_weight_mean" in s and "shared_weight_mean" not in a
        assert torch.tensor(s["examples"]["output"]).shape == (3, 3, 8, 8)
    figures = {"style_losses.png", "style_final.png", "style_examples.png"}
    assert set(saved["figures"]) == figures
    for name in figures:
        assert (study_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (study_dir / "report.md").read_text()
    assert "SaAdaIN reaches a lower style loss" in report and "val_content_loss" in report

    cfg = STUDY.config(True, TINY)
    assert (
        STUDY.run(Run("saadain", style.SETTING, 1), cfg, lambda f: None)
        == (saved["runs"]["saadain__digits__seed1"]["metrics"])
    )
    again = runner.run_study(STUDY, resume=True, **kwargs)
    assert again["elapsed_s"]["reused_runs"] == 4


def test_figures_skip_unfinished_runs(tmp_path: Path) -> None:
    assert STUDY.figures({"runs": {}}, tmp_path) == []
    m = {"val_content_loss": 1.0, "val_style_loss": None, "curve_val_content": [2.0, None]}
    runs = {
        f"k{s}": {"run": {"method": "adain", "setting": "digits", "seed": s}, "metrics": x}
        for s, x in enumerate([m, None])
    }
    paths = STUDY.figures({"runs": runs}, tmp_path)
    assert {p.name for p in paths} == {"style_losses.png", "style_final.png"}
