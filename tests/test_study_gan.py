"""The ``gan`` study (SaBN against CCBN in a conditional GAN on the digits), in tiny sizes."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("sklearn")

import normkit as nk
from normkit.experiments import runner
from normkit.experiments.studies import gan
from normkit.experiments.studies.gan import METHODS, STUDY
from normkit.experiments.study import ConfigError, Run, Study

TINY: dict[str, Any] = {
    "iterations": 4,
    "n_critic": 2,
    "clf_epochs": 1,
    "eval_per_class": 4,
    "eval_points": 2,
    "grid_per_class": 2,
    "g_width": 4,
    "d_width": 4,
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # As the runner runs studies: results depend on the intra-op thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(**extra: Any) -> dict[str, Any]:
    return STUDY.config(quick=True, overrides={**TINY, **extra})


def test_study_exposes_the_contract_and_the_claims() -> None:
    assert isinstance(STUDY, Study) and STUDY.name == "gan"
    claims = {(c.better, c.worse, c.metric, c.higher_is_better) for c in STUDY.claims}
    assert claims == {("sabn", "ccbn", "fd", False), ("sabn", "ccbn", "cond_acc", True)}


def test_config_quick_is_smaller_and_keeps_the_paper_optimizer() -> None:
    quick, full = STUDY.config(True, {}), STUDY.config(False, {})
    assert set(quick) == set(full)
    assert quick["iterations"] < full["iterations"]
    assert (quick["seeds"], full["seeds"]) == (2, 5)
    assert (full["lr"], full["beta1"], full["beta2"]) == (2e-4, 0.0, 0.9)
    assert full["n_critic"] >= 2
    assert full["methods"] == list(METHODS)
    assert STUDY.config(True, quick) == quick
    json.dumps(full, allow_nan=False)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"iteration": 3}, "--iteration: unknown option"),
        ({"iterations": 0}, "--iterations"),
        ({"n_critic": 1.5}, "--n-critic"),
        ({"lr": 0.0}, "--lr"),
        ({"beta2": 1.0}, "--beta2"),
        ({"eval_per_class": 1}, "--eval-per-class"),
        ({"methods": ["bn"]}, "--methods"),
        ({"methods": []}, "--methods"),
    ],
)
def test_config_rejects_bad_options_naming_them(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        STUDY.config(False, overrides)


def test_runs_pair_every_method_with_every_seed() -> None:
    runs = STUDY.runs(STUDY.config(True, {}), [0, 1, 2])
    assert len(runs) == len({r.key for r in runs}) == 6
    for method in METHODS:
        assert sorted(r.seed for r in runs if r.method == method) == [0, 1, 2]


# --- the Fréchet distance -------------------------------------------------------------------


def test_frechet_distance_matches_the_closed_form_of_diagonal_gaussians() -> None:
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(5, generator=g).double(), torch.randn(5, generator=g).double()
    s1, s2 = torch.rand(5, generator=g).double() + 0.1, torch.rand(5, generator=g).double() + 0.1
    expected = float((mu1 - mu2).square().sum() + (s1 - s2).square().sum())
    got = gan.frechet_distance(mu1, torch.diag(s1**2), mu2, torch.diag(s2**2))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_on_full_covariances() -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 6, generator=g).double(), torch.randn(6, 6, generator=g).double()
    cov1, cov2 = a @ a.T + 0.1 * torch.eye(6), b @ b.T
    mu1, mu2 = torch.randn(6, generator=g).double(), torch.zeros(6).double()
    root = scipy_linalg.sqrtm((cov1 @ cov2).numpy()).real
    expected = float(
        (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * float(root.trace())
    )
    assert gan.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-7)
    assert gan.frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-9)
    assert gan.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(
        gan.frechet_distance(mu2, cov2, mu1, cov1), rel=1e-9
    )


def test_gaussian_stats_are_the_sample_mean_and_unbiased_covariance() -> None:
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(2))
    mu, cov = gan.gaussian_stats(f)
    torch.testing.assert_close(mu, f.double().mean(0))
    torch.testing.assert_close(cov, torch.cov(f.double().T))
    with pytest.raises(ValueError, match="gaussian_stats"):
        gan.gaussian_stats(torch.zeros(1, 4))


# --- the models -----------------------------------------------------------------------------


def test_projection_discriminator_adds_the_class_embedding_inner_product() -> None:
    _, disc = gan._build("sabn", _tiny(), 0)
    disc.eval()  # spectral norm: no power iteration, the same weights for every call
    x = torch.randn(6, 1, 8, 8)
    y1, y2 = torch.arange(6), (torch.arange(6) + 3) % 10
    with torch.no_grad():
        h = disc.features(x)
        out1, out2 = disc(x, y1), disc(x, y2)
        unconditional = disc.linear(h).squeeze(1)
        embed = disc.embed.weight
    torch.testing.assert_close(out1, unconditional + (embed[y1] * h).sum(1))
    torch.testing.assert_close(out1 - out2, ((embed[y1] - embed[y2]) * h).sum(1))
    assert not torch.allclose(out1, out2)
    # Spectral norm: the embedding's largest singular value is about 1.
    assert torch.linalg.matrix_norm(embed, ord=2) == pytest.approx(1.0, abs=0.2)


@pytest.mark.parametrize(
    ("method", "layer"),
    [("ccbn", nk.CategoricalConditionalBatchNorm2d), ("sabn", nk.SandwichBatchNorm2d)],
)
def test_generator_norms_are_the_methods_and_condition_on_the_class(
    method: str, layer: type
) -> None:
    gen, _ = gan._build(method, _tiny(), 0)
    assert all(type(n) is layer for n in gen.norms) and len(gen.norms) == 2
    assert all(not n.split_stats and n.num_domains == 10 for n in gen.norms)
    assert type(gen.out_norm) is torch.nn.BatchNorm2d  # the last BN is unconditional
    if method == "sabn":
        assert all(n.affine for n in gen.norms)
    z = torch.randn(4, 32).repeat(2, 1)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    with torch.no_grad():
        for n in gen.norms:  # make the class affines differ visibly
            n.domain_bias.normal_()
        x = gen.eval()(z, y)
    assert x.shape == (8, 1, 8, 8) and x.abs().max() <= 1.0
    assert not torch.allclose(x[:4], x[4:])


def test_methods_share_the_generator_and_discriminator_init_for_a_seed() -> None:
    g1, d1 = gan._build("ccbn", _tiny(), 3)
    g2, d2 = gan._build("sabn", _tiny(), 3)
    for a, b in ((g1.fc, g2.fc), (g1.conv, g2.conv), (g1.up, g2.up), (g1.out_conv, g2.out_conv)):
        assert torch.equal(a.weight, b.weight)
    for (na, pa), (nb, pb) in zip(d1.state_dict().items(), d2.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_sample_grid_round_trips_through_json() -> None:
    images = torch.rand(10, 3, 8, 8)
    grid = json.loads(json.dumps(gan._encode_grid(images)))
    back = gan.decode_grid(grid)
    assert back.shape == (10, 3, 8, 8)
    assert (back - images).abs().max() <= 0.5 / 255 + 1e-6


def test_classifier_is_cached_per_seed_and_accurate() -> None:
    clf, acc = gan._classifier(0, 1)
    assert gan._classifier(0, 1)[0] is clf
    assert not clf.training and acc > 0.5


# --- a run and the whole study --------------------------------------------------------------


def test_a_tiny_run_returns_json_metrics_and_is_deterministic() -> None:
    fractions: list[float] = []
    cfg = _tiny()
    metrics = STUDY.run(Run("sabn", gan.SETTING, 0), cfg, fractions.append)
    json.dumps(metrics, allow_nan=False)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert metrics["fd"] >= 0.0 and 0.0 <= metrics["cond_acc"] <= 1.0
    assert len(metrics["curve_fd"]) == len(metrics["curve_cond_acc"]) == 2
    assert metrics["curve_fd"][-1] == metrics["fd"]
    assert len(metrics["cond_acc_per_class"]) == 10
    assert metrics["cond_acc"] == pytest.approx(sum(metrics["cond_acc_per_class"]) / 10)
    assert gan.decode_grid(metrics["sample_grid"]).shape == (10, 2, 8, 8)
    assert STUDY.run(Run("sabn", gan.SETTING, 0), cfg, lambda f: None) == metrics


def test_the_runner_writes_results_report_and_figures(tmp_path: Path) -> None:
    stream = io.StringIO()
    results = runner.run_study(
        STUDY, out=tmp_path, quick=True, seeds=2, overrides=TINY, progress=False, stream=stream
    )
    study_dir = tmp_path / "gan"
    on_disk = json.loads((study_dir / "results.json").read_text())
    assert on_disk["methods"] == ["ccbn", "sabn"] and on_disk["seeds"] == [0, 1]
    for name in ("fd", "cond_acc", "fd_real", "clf_test_acc"):
        assert name in on_disk["metrics"]
    assert "sample_grid" not in on_disk["metrics"] + on_disk["curve_metrics"]
    assert "curve_fd" in on_disk["curve_metrics"]
    assert on_disk["aggregates"]["sabn"][gan.SETTING]["fd"]["n"] == 2
    assert [(c["metric"], c["better"]["method"]) for c in on_disk["claims"]] == [
        ("fd", "sabn"),
        ("cond_acc", "sabn"),
    ]
    assert all(c["n"] == 2 and c["verdict"] for c in on_disk["claims"])
    assert set(on_disk["figures"]) == {"gan_samples.png", "gan_scores.png", "gan_curves.png"}
    for fig in on_disk["figures"]:
        assert (study_dir / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (study_dir / "report.md").read_text()
    assert "SaBN gives a lower Fréchet distance than CCBN" in report
    assert "![gan samples](gan_samples.png)" in report
    assert len(list((study_dir / "runs").glob("*.json"))) == 4
    assert results["claims"] == on_disk["claims"]

    # --resume reuses every checkpoint and gives the same results.
    again = runner.run_study(
        STUDY,
        out=tmp_path,
        quick=True,
        seeds=2,
        overrides=TINY,
        resume=True,
        progress=False,
        stream=stream,
    )
    assert again["elapsed_s"]["reused_runs"] == 4
    assert again["aggregates"] == on_disk["aggregates"]


def test_figures_skip_unfinished_runs_and_survive_missing_values(tmp_path: Path) -> None:
    grid = gan._encode_grid(torch.rand(10, 2, 8, 8))
    good = {"fd": 1.0, "cond_acc": 0.5, "fd_real": 0.1, "clf_test_acc": 0.9, "sample_grid": grid}
    good |= {"curve_fd": [2.0, 1.0], "curve_cond_acc": [0.2, 0.5]}
    bad = {k: None for k in good} | {"curve_fd": [None, None]}
    runs = {
        f"{m}-{seed}": {"run": {"method": m, "setting": "s", "seed": seed}, "metrics": met}
        for m in METHODS
        for seed, met in enumerate([good, bad])
    }
    runs["ccbn-9"] = {"run": {"method": "ccbn", "setting": "s", "seed": 9}}
    paths = STUDY.figures({"config": {"iterations": 10}, "runs": runs}, tmp_path)
    assert {p.name for p in paths} == {"gan_samples.png", "gan_scores.png", "gan_curves.png"}
    assert STUDY.figures({"runs": {}}, tmp_path / "none") == []
