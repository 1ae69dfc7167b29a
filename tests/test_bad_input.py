"""Bad input to every public layer and helper, completing ``tests/test_errors.py``.

Every refused input gets a ``ValueError`` or ``TypeError`` whose message names the layer or
helper, says what was expected and shows what was received, and nothing changes (no buffer, no
parameter, no module of a model). The cases are tables: one public class per layer record
(``tests/layer_table.py``), and per helper the arguments it refuses.

Helpers given a model with nothing to act on follow one rule, by what users of each expect:

=========================  ====================================================================
``convert_norm``           error (``strict=True``, the default): the target layers were wanted
``condition``              error: the index would be silently ignored
``fixup_init_``            error: the init would silently not happen
``convert_sync``           no-op with a ``UserWarning`` (nothing would be synchronized)
``freeze_norm``            no-op with a ``UserWarning`` (a group-norm model needs
                           ``include_groupnorm=True``)
``weight_standardize_``    no-op with a ``UserWarning`` (an MLP needs ``include_linear=True``)
``init_bn_scale_``         no-op with a ``UserWarning``; returns 0
``prepare_for_inference``  documented no-op, silent: any model can be prepared
``bn_param_groups``        documented no-op, silent: decay / no-decay groups for any model
``revert_sync``,           silent: undoing nothing is not a mistake
``unfreeze_norm``
=========================  ====================================================================
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import normkit as nk
from normkit.layers.sandwich import SandwichAdaIN
from tests.layer_table import LAYERS, LayerRecord

NAN, INF = float("nan"), float("inf")

# One record per public layer class (the first of each class in the layer table).
BY_CLASS: dict[type[nn.Module], LayerRecord] = {}
for _rec in LAYERS:
    BY_CLASS.setdefault(_rec.cls, _rec)
RECORDS = list(BY_CLASS.values())
CONDITIONAL = [r for r in RECORDS if r.takes_domain]
# Per-domain statistics take the index down another path: cover it too.
SPLIT = [r for r in LAYERS if r.init_kwargs.get("split_stats") and r.name.endswith("split")]
SCALARS = (nk.Bias, nk.Scale, nk.ResidualGate)  # any shape: no rank or channel count to refuse


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module: nn.Module, before: dict[str, Tensor]) -> bool:
    after = module.state_dict()
    return after.keys() == before.keys() and all(
        torch.equal(after[k], v) or (v.is_floating_point() and bool(after[k].isnan().all()))
        for k, v in before.items()
    )


def _refused(
    name: str,
    call: Callable[[], Any],
    exc: type[Exception],
    *fragments: str,
    module: nn.Module | None = None,
) -> str:
    """``call`` raises ``exc`` naming ``name``, with every fragment; ``module`` is untouched."""
    before = _state(module) if module is not None else None
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert type(info.value) in (ValueError, TypeError), type(info.value)
    assert message.startswith(f"{name}: ") or f"{name}:" in message, message
    assert "expected" in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    if module is not None:
        assert before is not None and _unchanged(module, before), "state changed"
    return message


def _channel_dim(rec: LayerRecord) -> int:
    return -1 if rec.cls is nk.WSLinear else 1


def _call(layer: nn.Module, rec: LayerRecord, *tensors: Any) -> Any:
    """Forward ``tensors`` (with the record's other inputs, and domain 0 if it takes one)."""
    if rec.cls is SandwichAdaIN and len(tensors) == 1:
        tensors = (tensors[0], rec.tensors()[1])
    return layer(*tensors, 0) if rec.takes_domain else layer(*tensors)


# --- forward: rank, channels, dtype ---------------------------------------------------------


def _accepted_ranks(rec: LayerRecord) -> tuple[int, ...] | None:
    """The ranks a layer accepts, or None for "at least" layers (checked separately)."""
    layer = rec.make()
    ranks = getattr(layer, "_ranks", None)
    if ranks is not None:
        return tuple(ranks)
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        spatial = len(layer.kernel_size)
        return (spatial + 1, spatial + 2)  # unbatched or batched, as torch's convs
    return None


def _rank_cases() -> list[Any]:
    cases = []
    for rec in RECORDS:
        if rec.cls in SCALARS:
            continue
        x = rec.tensors()[0]
        ranks = _accepted_ranks(rec)
        if ranks is None:  # SaAdaIN: at least 3D; WSLinear: at least 1D
            low = 2 if rec.cls is SandwichAdaIN else 0
            shapes = [tuple(x.shape[:low])]
        else:
            shapes = [tuple(x.shape[: min(ranks) - 1])]
            shapes.append((*x.shape, *([2] * (max(ranks) + 1 - x.dim()))))
        for shape in shapes:
            cases.append(pytest.param(rec, shape, id=f"{rec.cls.__name__}-{len(shape)}D"))
    return cases


@pytest.mark.parametrize(("rec", "shape"), _rank_cases())
def test_wrong_rank_is_refused(rec: LayerRecord, shape: tuple[int, ...]) -> None:
    layer = rec.build()
    x = torch.randn(shape)
    _refused(rec.cls.__name__, lambda: _call(layer, rec, x), ValueError, str(shape), module=layer)


@pytest.mark.parametrize(
    "rec", [pytest.param(r, id=r.cls.__name__) for r in RECORDS if r.cls not in SCALARS]
)
@pytest.mark.parametrize("delta", [1, -1])
def test_wrong_channel_count_is_refused(rec: LayerRecord, delta: int) -> None:
    layer = rec.build()
    shape = list(rec.tensors()[0].shape)
    dim = _channel_dim(rec)
    shape[dim] += delta
    x = torch.randn(shape)
    expected = rec.init_args[0]
    message = _refused(
        rec.cls.__name__, lambda: _call(layer, rec, x), ValueError, str(tuple(shape)), module=layer
    )
    assert str(expected) in message.split("got")[0], message  # the expected channel count


@pytest.mark.parametrize("rec", [pytest.param(r, id=r.cls.__name__) for r in RECORDS])
@pytest.mark.parametrize(
    ("make", "received"),
    [
        pytest.param(lambda x: x.long(), "torch.int64", id="int64"),
        pytest.param(lambda x: x > 0, "torch.bool", id="bool"),
        pytest.param(lambda x: x.to(torch.complex64), "torch.complex64", id="complex"),
        pytest.param(lambda x: x.tolist(), "list", id="list"),
    ],
)
def test_non_float_input_is_refused(
    rec: LayerRecord, make: Callable[[Tensor], Any], received: str
) -> None:
    layer = rec.build()
    x = make(rec.tensors()[0])
    _refused(rec.cls.__name__, lambda: _call(layer, rec, x), TypeError, received, module=layer)


@pytest.mark.parametrize(
    ("content", "style", "exc", "fragment"),
    [
        ((2, 4, 3, 3), (2, 4), ValueError, "style of shape (N, 4, *spatial)"),
        ((2, 4, 3, 3), (2, 3, 3, 3), ValueError, "got shape (2, 3, 3, 3)"),
        ((2, 4, 3, 3), (3, 4, 3, 3), ValueError, "a style batch of 1 or 2"),
        ((2, 4, 3, 3), "int64", TypeError, "torch.int64"),
        ((2, 4, 3, 3), "meta", ValueError, "the style on device cpu, got meta"),
        ((2, 4, 1, 1), (2, 4, 3, 3), ValueError, "at least 2 spatial positions in the content"),
    ],
)
def test_sandwich_adain_refuses_a_bad_style(
    content: tuple[int, ...], style: Any, exc: type[Exception], fragment: str
) -> None:
    layer = nk.SandwichAdaIN(4)
    x = torch.randn(content)
    if style == "int64":
        s = torch.ones(2, 4, 3, 3, dtype=torch.long)
    elif style == "meta":
        s = torch.randn(2, 4, 3, 3, device="meta")
    else:
        s = torch.randn(style)
    _refused("SandwichAdaIN", lambda: layer(x, s), exc, fragment, module=layer)


# --- forward: the domain index ------------------------------------------------------------

# Kinds of bad index: (index for a batch of 7 and K = 3, error, fragments).
BAD_INDEX: dict[str, tuple[Any, type[Exception], tuple[str, ...]]] = {
    "int-too-large": (3, ValueError, ("in [0, 3)", "got 3")),
    "int-negative": (-1, ValueError, ("in [0, 3)", "got -1")),
    "tensor-too-large": (torch.tensor([0, 1, 2, 3, 0, 1, 2]), ValueError, ("[0, 3)", "got 3")),
    "tensor-negative": (torch.tensor([0, 1, 2, -4, 0, 1, 2]), ValueError, ("[0, 3)", "got -4")),
    "python-float": (1.0, TypeError, ("int or integer tensor", "float")),
    "float-tensor": (torch.zeros(7), TypeError, ("integer domain index", "torch.float32")),
    "bool-tensor": (torch.zeros(7, dtype=torch.bool), TypeError, ("integer", "torch.bool")),
    "too-short": (torch.zeros(6, dtype=torch.long), ValueError, ("shape (7,)", "got shape (6,)")),
    "too-long": (torch.zeros(8, dtype=torch.long), ValueError, ("shape (7,)", "got shape (8,)")),
    "2d": (torch.zeros(1, 7, dtype=torch.long), ValueError, ("shape (7,)", "(1, 7)")),
    "0d": (torch.tensor(1), ValueError, ("shape (7,)", "got shape ()")),
    "meta-device": (
        torch.zeros(7, dtype=torch.long, device="meta"),
        ValueError,
        ("input's device cpu", "on the meta device"),
    ),
    "string": ("1", TypeError, ("int or integer tensor", "str")),
}
# test_errors.py covers SaBN 1d/2d/3d, split SaBN 2d, CCBN 2d and AuxBN 2d with the first ten
# kinds above; here: every kind for the other conditional classes and configurations, and the
# new kinds for all.
_COVERED = {"SandwichBatchNorm1d", "SandwichBatchNorm2d", "SandwichBatchNorm3d"}
_COVERED |= {"CategoricalConditionalBatchNorm2d", "AuxBatchNorm2d"}
_NEW_KINDS = ("too-long", "0d", "meta-device", "string")


def _index_cases() -> list[Any]:
    cases = []
    for rec in [*CONDITIONAL, *SPLIT]:
        covered = rec.cls.__name__ in _COVERED and rec.name.endswith(("1d", "2d", "3d"))
        covered |= rec.name == "sabn2d-split"
        for kind in BAD_INDEX:
            if covered and kind not in _NEW_KINDS:
                continue
            cases.append(pytest.param(rec, kind, id=f"{rec.name}-{kind}"))
    return cases


@pytest.mark.parametrize(("rec", "kind"), _index_cases())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_domain_index_is_refused(rec: LayerRecord, kind: str, training: bool) -> None:
    layer = rec.build().train(training)
    index, exc, fragments = BAD_INDEX[kind]
    x = rec.tensors()[0]
    _refused(rec.cls.__name__, lambda: layer(x, index), exc, *fragments, module=layer)


def test_index_on_another_real_device_or_meta_with_meta_input_is_accepted() -> None:
    # The refused meta index is the only cross-device case: meta input takes a meta index, and
    # a CPU index goes to a meta input (the layers move indices to the input's device).
    layer = nk.SandwichBatchNorm2d(4, 3, split_stats=True, device="meta")
    x = torch.randn(7, 4, 3, 3, device="meta")
    assert layer(x, torch.zeros(7, dtype=torch.long, device="meta")).device.type == "meta"
    assert layer(x, torch.tensor([0, 1, 2, 0, 1, 2, 0])).device.type == "meta"


# --- constructors ---------------------------------------------------------------------------

# class -> factory taking keyword overrides.
WITH_MOMENTUM: dict[str, Callable[..., nn.Module]] = {
    "SandwichBatchNorm1d": lambda **k: nk.SandwichBatchNorm1d(4, 3, **k),
    "SandwichBatchNorm3d": lambda **k: nk.SandwichBatchNorm3d(4, 3, split_stats=True, **k),
    "CategoricalConditionalBatchNorm1d": lambda **k: nk.CategoricalConditionalBatchNorm1d(
        4, 3, **k
    ),
    "CategoricalConditionalBatchNorm3d": lambda **k: nk.CategoricalConditionalBatchNorm3d(
        4, 3, **k
    ),
    "AuxBatchNorm1d": lambda **k: nk.AuxBatchNorm1d(4, 3, **k),
    "AuxBatchNorm2d": lambda **k: nk.AuxBatchNorm2d(4, 3, **k),
    "AuxBatchNorm3d": lambda **k: nk.AuxBatchNorm3d(4, 3, **k),
    "BatchChannelNorm1d": lambda **k: nk.BatchChannelNorm1d(4, 2, **k),
    "BatchChannelNorm2d": lambda **k: nk.BatchChannelNorm2d(4, 2, estimate=True, **k),
    "BatchChannelNorm3d": lambda **k: nk.BatchChannelNorm3d(4, 2, **k),
    "SyncBatchNorm": lambda **k: nk.SyncBatchNorm(4, **k),
    "InputNorm1d": lambda **k: nk.InputNorm1d(4, **k),
    "InputNorm2d": lambda **k: nk.InputNorm2d(4, **k),
}


def _ctor_cases() -> list[Any]:
    cases = []
    for name, make in WITH_MOMENTUM.items():
        for value, exc, fragment in [
            (-0.1, ValueError, "expected momentum in [0, 1] or None, got -0.1"),
            (1.5, ValueError, "expected momentum in [0, 1] or None, got 1.5"),
            (NAN, ValueError, "expected momentum in [0, 1] or None, got nan"),
            (INF, ValueError, "got inf"),
            ("0.1", TypeError, "expected momentum to be a float or None, got '0.1'"),
        ]:
            cases.append(pytest.param(name, make, {"momentum": value}, exc, fragment))
        for value, fragment in [(0, "expected eps > 0, got 0"), (NAN, "got nan")]:
            cases.append(pytest.param(name, make, {"eps": value}, ValueError, fragment))
        cases.append(pytest.param(name, make, {"eps": INF}, ValueError, "finite eps > 0, got inf"))
    bcn = WITH_MOMENTUM["BatchChannelNorm2d"]
    for value, exc, fragment in [
        (0, ValueError, "estimate_rate in (0, 1], got 0"),
        (-0.5, ValueError, "estimate_rate in (0, 1], got -0.5"),
        (1.5, ValueError, "estimate_rate in (0, 1], got 1.5"),
        (NAN, ValueError, "estimate_rate in (0, 1], got nan"),
        (INF, ValueError, "estimate_rate in (0, 1], got inf"),
        ("0.1", TypeError, "expected estimate_rate to be a float, got '0.1'"),
    ]:
        cases.append(
            pytest.param("BatchChannelNorm2d", bcn, {"estimate_rate": value}, exc, fragment)
        )
    for name in ("InputNorm1d", "InputNorm2d"):
        for value, fragment in [(0, "scale > 0, got 0"), (NAN, "got nan"), (INF, "got inf")]:
            cases.append(
                pytest.param(name, WITH_MOMENTUM[name], {"scale": value}, ValueError, fragment)
            )
    return cases


@pytest.mark.parametrize(("name", "make", "kwargs", "exc", "fragment"), _ctor_cases())
def test_bad_constructor_argument_is_refused(
    name: str,
    make: Callable[..., nn.Module],
    kwargs: dict[str, Any],
    exc: type[Exception],
    fragment: str,
) -> None:
    _refused(name, lambda: make(**kwargs), exc, fragment)


@pytest.mark.parametrize(
    ("name", "build", "fragment"),
    [
        (
            "BatchChannelNorm1d",
            lambda: nk.BatchChannelNorm1d(6, 4),
            "divide num_features=6, got num_groups=4",
        ),
        (
            "BatchChannelNorm3d",
            lambda: nk.BatchChannelNorm3d(4, 3),
            "divide num_features=4, got num_groups=3",
        ),
        (
            "BatchChannelNorm2d",
            lambda: nk.BatchChannelNorm2d(4, 8),
            "divide num_features=4, got num_groups=8",
        ),
        (
            "WSConv1d",
            lambda: nk.WSConv1d(4, 6, 3, groups=4),
            "in_channels=4 and out_channels=6, got groups=4",
        ),
        (
            "WSConv2d",
            lambda: nk.WSConv2d(6, 4, 3, groups=4),
            "in_channels=6 and out_channels=4, got groups=4",
        ),
        ("WSConv3d", lambda: nk.WSConv3d(4, 6, 3, groups=4), "got groups=4"),
        ("ScaledWSConv2d", lambda: nk.ScaledWSConv2d(4, 6, 3, groups=4), "got groups=4"),
        (
            "GroupNorm",
            lambda: nk.create_norm("gn", 6, num_groups=4),
            "divide num_features=6, got num_groups=4",
        ),
        ("SandwichAdaIN", lambda: nk.SandwichAdaIN(4, eps=INF), "finite eps > 0, got inf"),
        ("WSConv2d", lambda: nk.WSConv2d(4, 4, 3, eps=INF), "finite eps > 0, got inf"),
        ("WSLinear", lambda: nk.WSLinear(4, 4, eps=NAN), "eps > 0, got nan"),
    ],
)
def test_group_count_and_eps_are_checked(
    name: str, build: Callable[[], nn.Module], fragment: str
) -> None:
    _refused(name, build, ValueError, fragment)


# --- helpers: arguments -------------------------------------------------------------------


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nk.SandwichBatchNorm2d(4, 2), nn.Linear(2, 2)
    )


HELPERS_TAKING_A_MODEL: dict[str, Callable[[Any], Any]] = {
    "convert_norm": lambda m: nk.convert_norm(m, "sabn", num_domains=2),
    "convert_sync": nk.convert_sync,
    "revert_sync": nk.revert_sync,
    "freeze_norm": nk.freeze_norm,
    "unfreeze_norm": nk.unfreeze_norm,
    "prepare_for_inference": nk.prepare_for_inference,
    "weight_standardize_": nk.weight_standardize_,
    "init_bn_scale_": nk.init_bn_scale_,
    "bn_param_groups": lambda m: nk.bn_param_groups(m, 0.1, 1e-4),
    "fixup_init_": nk.fixup_init_,
    "fixup_param_groups": lambda m: nk.fixup_param_groups(m, 0.1),
    "conditional_layers": nk.conditional_layers,
    "load_official_sandwich": lambda m: nk.load_official_sandwich(m, {}),
}


@pytest.mark.parametrize("helper", list(HELPERS_TAKING_A_MODEL))
@pytest.mark.parametrize("model", ["model", None, 3], ids=["str", "None", "int"])
def test_helper_refuses_a_non_module(helper: str, model: Any) -> None:
    _refused(
        helper,
        lambda: HELPERS_TAKING_A_MODEL[helper](model),
        TypeError,
        "nn.Module",
        type(model).__name__,
    )


def _value_cases() -> list[Any]:
    cases = []
    for value, exc, fragment in [
        (0, ValueError, "expected value > 0, got 0"),
        (-1, ValueError, "got -1"),
        (NAN, ValueError, "got nan"),
        (INF, ValueError, "finite value > 0, got inf"),
        ("0.1", TypeError, "value to be a number, got '0.1'"),
    ]:
        cases.append(
            pytest.param(
                "init_bn_scale_", lambda m, v=value: nk.init_bn_scale_(m, v), exc, fragment
            )
        )
    for arg in ("lr", "weight_decay"):
        for value, exc, fragment in [
            (-1, ValueError, f"expected {arg} >= 0 and finite, got -1"),
            (NAN, ValueError, "got nan"),
            (INF, ValueError, "got inf"),
            ("0.1", TypeError, f"{arg} to be a number, got '0.1'"),
        ]:
            kwargs = {"lr": 0.1, "weight_decay": 1e-4, arg: value}
            cases.append(
                pytest.param(
                    "bn_param_groups", lambda m, k=kwargs: nk.bn_param_groups(m, **k), exc, fragment
                )
            )
    for value, fragment in [(0, "scale_lr_divisor > 0, got 0"), (INF, "finite scale_lr_divisor")]:
        cases.append(
            pytest.param(
                "bn_param_groups",
                lambda m, v=value: nk.bn_param_groups(m, 0.1, 0.0, scale_lr_divisor=v),
                ValueError,
                fragment,
            )
        )
    cases.append(
        pytest.param(
            "fixup_param_groups",
            lambda m: nk.fixup_param_groups(m, INF),
            ValueError,
            "finite lr >= 0, got inf",
        )
    )
    for value, exc, fragment in [
        (-1, ValueError, "expected a domain in [0, 2) for '2' (SandwichBatchNorm2d), got -1"),
        (2, ValueError, "expected a domain in [0, 2) for '2' (SandwichBatchNorm2d), got 2"),
        (1.0, TypeError, "expected domain to be an int or None, got 1.0"),
        (True, TypeError, "got True"),
        (torch.tensor(1), TypeError, "got tensor(1)"),
    ]:
        cases.append(
            pytest.param(
                "prepare_for_inference",
                lambda m, v=value: nk.prepare_for_inference(m, domain=v, inplace=True),
                exc,
                fragment,
            )
        )
    for value, fragment in [(NAN, "scale >= 0 and finite, got nan"), (-1.0, "got -1.0")]:
        cases.append(
            pytest.param(
                "he_normal_fan_out_",
                lambda m, v=value: nk.he_normal_fan_out_(m[0], v),
                ValueError,
                fragment,
            )
        )
    for arg in ("clip_factor", "eps"):
        for value, exc, fragment in [
            (0, ValueError, f"expected {arg} > 0, got 0"),
            (-0.1, ValueError, "got -0.1"),
            (NAN, ValueError, "got nan"),
            (INF, ValueError, f"finite {arg} > 0, got inf"),
            ("0.1", TypeError, f"{arg} to be a number, got '0.1'"),
        ]:
            cases.append(
                pytest.param(
                    "adaptive_grad_clip_",
                    lambda m, k={arg: value}: nk.adaptive_grad_clip_(m.parameters(), **k),
                    exc,
                    fragment,
                )
            )
    for value, fragment in [(3, "got int"), ([torch.ones(1), "w"], "got str at position 1")]:
        cases.append(
            pytest.param(
                "adaptive_grad_clip_",
                lambda m, v=value: nk.adaptive_grad_clip_(v),
                TypeError,
                fragment,
            )
        )
    return cases


@pytest.mark.parametrize(("helper", "call", "exc", "fragment"), _value_cases())
def test_helper_refuses_a_bad_value_and_changes_nothing(
    helper: str, call: Callable[[nn.Module], Any], exc: type[Exception], fragment: str
) -> None:
    model = _model()
    modules = list(model.modules())
    _refused(helper, lambda: call(model), exc, fragment, module=model)
    assert list(model.modules()) == modules and model.training


# --- helpers: the registry ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "exc", "fragments"),
    [
        (
            lambda: nk.create_norm("nope", 4),
            ValueError,
            ("create_norm", "unknown norm 'nope'", "known norms: "),
        ),
        (
            lambda: nk.create_norm("", 4),
            ValueError,
            (
                "create_norm",
                "unknown norm ''",
            ),
        ),
        (
            lambda: nk.create_norm(None, 4),
            TypeError,
            ("create_norm", "a norm name (str), got NoneType"),
        ),
        (lambda: nk.get_norm_layer("nope"), ValueError, ("get_norm_layer", "unknown norm 'nope'")),
        (
            lambda: nk.get_norm_layer("sabn_splitt"),
            ValueError,
            ("get_norm_layer", "'sabn_splitt'", "sabn-split"),
        ),
        (
            lambda: nk.get_norm_layer(3),
            TypeError,
            ("get_norm_layer", "a norm name or a callable", "int"),
        ),
        (
            lambda: nk.create_norm("sabn", 4),
            TypeError,
            ("create_norm: cannot build 'sabn'", "got num_features=4", "'num_domains'"),
        ),
        (
            lambda: nk.create_norm("bcn", 4, groups=2),
            TypeError,
            ("create_norm: cannot build 'bcn'", "got num_features=4, groups=2", "'groups'"),
        ),
        (
            lambda: nk.get_norm_layer("bcn", num_groups=3)(4),
            ValueError,
            ("get_norm_layer: norm_layer('bcn', num_groups=3)", "got num_groups=3"),
        ),
        (
            lambda: nk.register_norm(3, nn.BatchNorm2d),
            TypeError,
            ("register_norm", "a name (str), got int"),
        ),
        (
            lambda: nk.register_norm("--", nn.BatchNorm2d),
            ValueError,
            ("register_norm", "non-empty name, got '--'"),
        ),
        (
            lambda: nk.register_norm("bn", nn.BatchNorm2d),
            ValueError,
            ("register_norm", "got 'bn', which is taken"),
        ),
        (
            lambda: nk.register_norm("mine", "x"),
            TypeError,
            ("register_norm", "a callable factory, got 'x'"),
        ),
    ],
)
def test_registry_refuses_bad_names_and_arguments(
    call: Callable[[], Any], exc: type[Exception], fragments: tuple[str, ...]
) -> None:
    names = nk.list_norms()
    _refused(fragments[0].split(":")[0], call, exc, *fragments)
    assert nk.list_norms() == names


# --- helpers: a model with nothing to act on --------------------------------------------------


def _no_norm() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize(
    ("helper", "call", "fragment"),
    [
        (
            "convert_norm",
            lambda m: nk.convert_norm(m, "bcn", num_groups=2),
            "norm layer to convert",
        ),
        ("condition", lambda m: nk.condition(m, 0).__enter__(), "conditional layers"),
        ("fixup_init_", nk.fixup_init_, "fixup_branch_layers()"),
    ],
)
def test_nothing_to_convert_is_an_error_where_the_call_would_be_lost(
    helper: str, call: Callable[[nn.Module], Any], fragment: str
) -> None:
    model = _no_norm()
    message = _refused(helper, lambda: call(model), ValueError, fragment, module=model)
    assert "Sequential" in message  # what was received


@pytest.mark.parametrize(
    ("helper", "call", "fragment"),
    [
        ("convert_sync", nk.convert_sync, "batch-statistics layers"),
        ("freeze_norm", nk.freeze_norm, "batch norms, got a Sequential with none"),
        ("weight_standardize_", nk.weight_standardize_, "include_linear=True"),
        ("init_bn_scale_", nk.init_bn_scale_, "got a Sequential with none"),
    ],
)
def test_nothing_to_convert_is_a_no_op_with_a_warning(
    helper: str, call: Callable[[nn.Module], Any], fragment: str
) -> None:
    model = _no_norm()
    before = _state(model)
    modules = list(model.modules())
    with pytest.warns(UserWarning) as record:
        result = call(model)
    messages = [str(w.message) for w in record]
    assert any(m.startswith(f"{helper}: expected") and fragment in m for m in messages), messages
    assert _unchanged(model, before) and list(model.modules()) == modules
    assert result is model or result == 0


@pytest.mark.parametrize(
    ("helper", "call"),
    [
        ("convert_sync", lambda m: nk.convert_sync(nk.freeze_norm(m))),  # frozen norms count
        ("freeze_norm", lambda m: nk.freeze_norm(nk.freeze_norm(m))),  # idempotent
        ("weight_standardize_", lambda m: nk.weight_standardize_(nk.weight_standardize_(m))),
        ("init_bn_scale_", nk.init_bn_scale_),
        ("revert_sync", nk.revert_sync),
        ("unfreeze_norm", nk.unfreeze_norm),
    ],
)
def test_helpers_with_something_to_act_on_do_not_warn(
    helper: str, call: Callable[[nn.Module], Any]
) -> None:
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(model)


def test_prepare_for_inference_and_bn_param_groups_accept_a_model_without_norms() -> None:
    model = _no_norm()
    x = torch.randn(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared, report = nk.prepare_for_inference(model)
        groups = nk.bn_param_groups(model, 0.1, 1e-4)
        assert nk.revert_sync(model) is model and nk.unfreeze_norm(model) is model
    assert not report.baked and not report.folded and not report.kept
    assert not prepared.training and model.training
    torch.testing.assert_close(prepared(x), model.eval()(x))
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert math.isclose(groups[0]["weight_decay"], 1e-4)
