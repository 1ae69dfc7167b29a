"""The ``adversarial`` study (BN, AuxBN, SaAuxBN in PGD adversarial training), in tiny sizes."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("sklearn")

import normkit as nk
from normkit.experiments import runner
from normkit.experiments.data import digits_split
from normkit.experiments.studies import adversarial as adv
from normkit.experiments.studies.adversarial import ADV, CLEAN, METHODS, STUDY
from normkit.experiments.study import ConfigError, Run, Study

TINY: dict[str, Any] = {"epochs": 1, "train_steps": 1, "width": 4, "batch_size": 128}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(**extra: Any) -> dict[str, Any]:
    return STUDY.config(quick=True, overrides={**TINY, **extra})


def _batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    data = digits_split()
    return data.x_train[:n], data.y_train[:n]


def test_study_exposes_the_contract_and_the_claims() -> None:
    assert isinstance(STUDY, Study) and STUDY.name == "adversarial"
    assert [(c.better, c.worse, c.metric) for c in STUDY.claims] == [
        ("saauxbn", "auxbn", "pgd10_acc"),
        ("saauxbn", "auxbn", "pgd20_acc"),
        ("auxbn", "bn", "pgd10_acc"),
        ("auxbn", "bn", "pgd20_acc"),
    ]
    assert all(c.higher_is_better for c in STUDY.claims)


def test_config_quick_is_smaller_and_json_serializable() -> None:
    quick, full = STUDY.config(True, {}), STUDY.config(False, {})
    assert set(quick) == set(full)
    assert quick["epochs"] < full["epochs"]
    assert (quick["seeds"], full["seeds"]) == (2, 5)
    assert full["methods"] == list(METHODS)
    assert full["step"] <= full["eps"]
    assert STUDY.config(True, quick) == quick
    json.dumps(full, allow_nan=False)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"epoch": 1}, "--epoch: unknown option"),
        ({"epochs": 0}, "--epochs"),
        ({"eps": 0}, "--eps"),
        ({"eps": 2.0}, "--eps"),
        ({"step": -0.1}, "--step"),
        ({"train_steps": 0}, "--train-steps"),
        ({"methods": ["gn"]}, "--methods"),
    ],
)
def test_config_rejects_bad_options_naming_them(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        STUDY.config(False, overrides)


def test_runs_pair_every_method_with_every_seed() -> None:
    runs = STUDY.runs(STUDY.config(True, {}), [0, 1])
    assert len(runs) == len({r.key for r in runs}) == 6
    for method in METHODS:
        assert sorted(r.seed for r in runs if r.method == method) == [0, 1]


# --- the models -----------------------------------------------------------------------------


def test_methods_use_the_papers_layers() -> None:
    assert all(type(n) is torch.nn.BatchNorm2d for n in adv._build("bn", 4, 0).norms)
    aux = adv._build("auxbn", 4, 0).norms
    assert all(type(n) is nk.AuxBatchNorm2d and n.num_domains == 2 for n in aux)
    sa = adv._build("saauxbn", 4, 0).norms
    assert all(type(n) is nk.SandwichBatchNorm2d for n in sa)
    assert all(n.split_stats and n.num_domains == 2 and n.affine for n in sa)
    a, b = adv._build("bn", 4, 7), adv._build("saauxbn", 4, 7)
    for ca, cb in zip(a.convs, b.convs):
        assert torch.equal(ca.weight, cb.weight)
    assert torch.equal(a.head.weight, b.head.weight)


@pytest.mark.parametrize("method", ["auxbn", "saauxbn"])
def test_each_branch_updates_only_its_own_running_statistics(method: str) -> None:
    model = adv._build(method, 4, 0).train()
    x, _ = _batch()
    before = model.norms[0].running_mean.clone()
    model(x, ADV)
    after = model.norms[0].running_mean
    assert torch.equal(after[CLEAN], before[CLEAN])
    assert not torch.equal(after[ADV], before[ADV])


# --- the attack -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_pgd_stays_in_the_eps_ball_and_leaves_running_buffers_unchanged(method: str) -> None:
    model = adv._build(method, 4, 0).train()
    x, y = _batch()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    eps = 0.1
    with adv.frozen_buffers(model):
        x_adv = adv.pgd_attack(
            model,
            x,
            y,
            branch=ADV,
            eps=eps,
            step=0.03,
            steps=5,
            generator=torch.Generator().manual_seed(0),
        )
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert not x_adv.requires_grad
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert all(p.grad is None for p in model.parameters())
    # Without the context, the same train-mode attack would have moved the statistics.
    adv.pgd_attack(
        model,
        x,
        y,
        branch=ADV,
        eps=eps,
        step=0.03,
        steps=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert not torch.equal(model.norms[0].running_var, buffers["norms.0.running_var"])


def test_pgd_in_eval_mode_raises_the_loss_and_touches_no_buffer() -> None:
    model = adv._build("saauxbn", 8, 0)
    x, y = _batch(128)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):  # a little training, so that the loss has a slope to climb
        loss = F.cross_entropy(model(x, ADV), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x_adv = adv.pgd_attack(
        model,
        x,
        y,
        branch=ADV,
        eps=0.2,
        step=0.05,
        steps=10,
        generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        clean, attacked = F.cross_entropy(model(x, ADV), y), F.cross_entropy(model(x_adv, ADV), y)
    assert attacked > clean
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k


def test_frozen_buffers_restores_them_even_when_the_block_raises() -> None:
    model = adv._build("auxbn", 4, 0).train()
    x, _ = _batch()
    before = {k: v.clone() for k, v in model.named_buffers()}
    with pytest.raises(RuntimeError, match="boom"), adv.frozen_buffers(model):
        model(x, CLEAN)
        raise RuntimeError("boom")
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k


# --- a run and the whole study --------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_a_tiny_run_returns_json_metrics(method: str) -> None:
    fractions: list[float] = []
    metrics = STUDY.run(Run(method, adv.SETTING, 0), _tiny(), fractions.append)
    json.dumps(metrics, allow_nan=False)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert ("clean_acc_clean_branch" in metrics) == (method != "bn")
    for k in ("clean_acc_adv_branch", "pgd10_acc", "pgd20_acc"):
        assert 0.0 <= metrics[k] <= 1.0
    assert metrics["pgd20_acc"] <= metrics["clean_acc_adv_branch"]
    assert len(metrics["curve_train_loss"]) == len(metrics["curve_clean_acc"]) == 1


def test_a_run_is_deterministic_for_a_seed() -> None:
    run = Run("saauxbn", adv.SETTING, 2)
    assert STUDY.run(run, _tiny(), lambda f: None) == STUDY.run(run, _tiny(), lambda f: None)


def test_the_runner_writes_results_report_and_figures(tmp_path: Path) -> None:
    results = runner.run_study(
        STUDY,
        out=tmp_path,
        quick=True,
        seeds=2,
        overrides={**TINY, "methods": ["bn", "auxbn", "saauxbn"]},
        progress=False,
        stream=io.StringIO(),
    )
    study_dir = tmp_path / "adversarial"
    on_disk = json.loads((study_dir / "results.json").read_text())
    assert on_disk["methods"] == list(METHODS) and on_disk["seeds"] == [0, 1]
    for name in ("clean_acc_clean_branch", "clean_acc_adv_branch", "pgd10_acc", "pgd20_acc"):
        assert name in on_disk["metrics"]
    assert "clean_acc_clean_branch" not in on_disk["aggregates"]["bn"][adv.SETTING]
    assert len(on_disk["claims"]) == 4 and all(c["n"] == 2 for c in on_disk["claims"])
    assert set(on_disk["figures"]) == {"adversarial_accuracy.png", "adversarial_curves.png"}
    for fig in on_disk["figures"]:
        assert (study_dir / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (study_dir / "report.md").read_text()
    assert "SaAuxBN is more robust than AuxBN (PGD-20)" in report
    assert "### pgd20_acc" in report
    assert results["claims"] == on_disk["claims"]


def test_figures_survive_missing_values(tmp_path: Path) -> None:
    good = {"clean_acc_adv_branch": 0.9, "pgd10_acc": 0.5, "pgd20_acc": 0.4}
    good |= {"curve_train_loss": [1.0, 0.5], "curve_clean_acc": [0.8, 0.9]}
    bad = {k: None for k in good} | {"curve_clean_acc": [0.5, None]}
    runs = {
        f"{m}-{s}": {"run": {"method": m, "setting": "x", "seed": s}, "metrics": met}
        for m in METHODS
        for s, met in enumerate([good, bad])
    }
    paths = STUDY.figures({"config": {"eps": 0.1}, "runs": runs}, tmp_path)
    assert {p.name for p in paths} == {"adversarial_accuracy.png", "adversarial_curves.png"}
    assert STUDY.figures({"runs": {}}, tmp_path / "none") == []
