"""The ``normkit`` command: option errors, ``normkit list``, and ``reproduce`` on a fake study."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from torch import nn

import normkit
from normkit import cli
from normkit.experiments import studies

pytest.importorskip("scipy")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from tests.test_experiments_framework import FakeStudy


@pytest.fixture
def fake_studies(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fake`` is a study module; ``ghost`` is a study whose module does not exist."""
    module = types.ModuleType("normkit.experiments.studies.fake")
    module.STUDY = FakeStudy()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "normkit.experiments.studies.fake", module)
    monkeypatch.setattr(studies, "STUDY_NAMES", ("ghost", "fake"))


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("normkit: error: "), err
    assert "Traceback" not in err
    return err


# --- errors ------------------------------------------------------------------------------------


def test_unknown_study(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, "reproduce", "nope")
    assert "unknown study 'nope'" in err and "microbatch" in err


@pytest.mark.parametrize("seeds", ["0", "-2", "two"])
def test_bad_seeds(capsys: pytest.CaptureFixture[str], seeds: str) -> None:
    assert "--seeds: expected a positive integer" in _error(
        capsys, "reproduce", "microbatch", "--seeds", seeds
    )


def test_unwritable_out(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    err = _error(capsys, "reproduce", "microbatch", "--quick", "--out", str(tmp_path / "a-file"))
    assert "not a directory" in err
    err = _error(capsys, "reproduce", "microbatch", "--out", str(tmp_path / "a-file" / "sub"))
    assert "not writable" in err


def test_bad_study_options(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, "reproduce", "microbatch", "--depths", "10")
    assert "microbatch has no option --depths" in err and "--batch-sizes" in err
    assert "expected comma-separated integers" in _error(
        capsys, "reproduce", "microbatch", "--batch-sizes", "1,x"
    )
    assert "--epochs: expected a positive integer" in _error(
        capsys, "reproduce", "microbatch", "--epochs", "0"
    )
    assert "expects a value" in _error(capsys, "reproduce", "microbatch", "--epochs")


def test_study_errors_name_the_study_once(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, "reproduce", "microbatch", "--epochs", "0")
    assert "--epochs: expected a positive integer" in err and err.count("microbatch") == 1
    err = _error(capsys, "reproduce", "all", "--quick", "--epochs", "0")
    assert err.count("microbatch") == 1


def test_a_repeated_study_option_is_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # (The last value is a bad one: were the first one dropped, this would fail, not train.)
    for argv in (["--epochs", "1", "--epochs", "0"], ["--epochs=1", "--epochs=0"]):
        err = _error(capsys, "reproduce", "microbatch", "--out", str(tmp_path), *argv)
        assert "--epochs is given more than once" in err


def test_a_missing_value_is_reported_after_an_unknown_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = _error(capsys, "reproduce", "microbatch", "--depths")
    assert "microbatch has no option --depths" in err


def test_version_after_reproduce(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    version = capsys.readouterr().out
    assert version.startswith("normkit ")
    for argv in (["reproduce", "microbatch", "--quick", "--version"], ["reproduce", "--version"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0
        captured = capsys.readouterr()
        assert captured.out == version and captured.err == ""


def test_bad_device_and_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--device 'nonsense'" in _error(
        capsys, "reproduce", "microbatch", "--device", "nonsense"
    )
    assert "invalid choice" in _error(capsys, "frobnicate")
    assert "required: STUDY" in _error(capsys, "reproduce")


def test_a_missing_study_module_is_reported_not_raised(
    capsys: pytest.CaptureFixture[str], fake_studies: None
) -> None:
    err = _error(capsys, "reproduce", "ghost")
    assert "study 'ghost' is not available" in err


# --- normkit list --------------------------------------------------------------------------------


def test_list_names_every_public_layer(capsys: pytest.CaptureFixture[str]) -> None:
    layers = [
        name
        for name in normkit.__all__
        if inspect.isclass(getattr(normkit, name)) and issubclass(getattr(normkit, name), nn.Module)
    ]
    assert len(layers) >= 20
    assert cli.layer_names() == layers
    missing = [name for name in layers if name not in cli.LAYERS]
    assert not missing, f"add these layers to normkit.cli.LAYERS: {missing}"
    stale = [name for name in cli.LAYERS if name not in layers]
    assert not stale, f"normkit.cli.LAYERS lists names that are not public layers: {stale}"
    assert all(paper in cli.PAPERS for paper, _ in cli.LAYERS.values())

    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name, (paper, purpose) in cli.LAYERS.items():
        assert f"  {name} " in out and purpose in out
        assert cli.PAPERS[paper] in out
    assert "weight_standardize_" in out and "create_norm" in out


def test_python_dash_m_normkit_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "normkit", "list"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "SandwichBatchNorm2d" in proc.stdout and "arXiv 1903.10520" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "normkit", "reproduce", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


# --- normkit reproduce ---------------------------------------------------------------------------


def test_reproduce_a_study(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fake_studies: None
) -> None:
    argv = ["reproduce", "fake", "--quick", "--seeds", "2", "--out", str(tmp_path), "--jobs", "1"]
    assert cli.main([*argv, "--scale", "2"]) == 0
    captured = capsys.readouterr()
    assert "score, mean ± std over 2 seed(s)" in captured.out
    assert "p = " in captured.out and "DID NOT HOLD" in captured.out
    assert f"report: {tmp_path / 'fake' / 'report.md'}" in captured.out
    assert "\r" not in captured.err  # no progress bar off a terminal
    results = json.loads((tmp_path / "fake" / "results.json").read_text())
    assert results["config"]["scale"] == 2.0 and results["config"]["steps"] == 3
    assert results["command"].startswith("normkit reproduce fake --quick")

    # Resuming reuses every run; another configuration in the same --out is refused.
    assert cli.main([*argv, "--scale", "2", "--resume"]) == 0
    assert "0 run(s) to do, 8 reused" in capsys.readouterr().err
    err = _error(capsys, *argv, "--scale=3", "--resume")
    assert "different configuration (differs in: scale)" in err


def test_reproduce_all_skips_unavailable_studies(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fake_studies: None
) -> None:
    argv = ["reproduce", "all", "--quick", "--seeds", "2", "--out", str(tmp_path), "--jobs", "1"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "skipping study 'ghost' is not available" in captured.err
    assert (tmp_path / "fake" / "report.md").exists()
    assert "overview" not in captured.out  # one study ran
    assert "A fake study" in (tmp_path / "report.md").read_text()
    err = _error(capsys, *argv, "--depths", "1,2")
    assert "no selected study has the option(s) --depths" in err


def test_reproduce_help_lists_each_study_and_its_options(
    capsys: pytest.CaptureFixture[str], fake_studies: None
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["reproduce", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "ghost: unavailable" in out
    assert "fake: A fake study" in out and "--steps 6" in out and "--settings s1,s2" in out
