"""Checkpoints that must keep loading: torch's version-1 batch-norm layout, and the official
Sandwich BN layouts (``normkit.load_official_sandwich``).

The official modules are rewritten here from their key layouts (a batch norm or a list of them,
an embedding of per-index affines, explicit shared parameters) with the forward each layout
implies; the tests check that the migrated normkit layer computes the same function, in eval and
in training (outputs and the running statistics after a step).
"""

from __future__ import annotations

import ast
import copy
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import normkit as nk
from tests.layer_table import LAYERS, LayerRecord, layer_params

F64 = torch.float64
C, K = 4, 3

# --- version 1 (no num_batches_tracked) --------------------------------------------------------

BN_RECORDS = [r for r in LAYERS if isinstance(r.make(), _BatchNorm)]


def _version1(state: dict[str, Tensor], prefix: str = "") -> Any:
    """``state`` as torch's batch norms saved it before ``num_batches_tracked`` (version 1)."""
    old: Any = OrderedDict(
        (k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")
    )
    old._metadata = OrderedDict({prefix.rstrip("."): {"version": 1}})
    return old


def _eval_out(layer: nn.Module, rec: LayerRecord, kind: str | None) -> Tensor:
    with torch.no_grad():
        return layer.eval()(*rec.args(kind))


def test_every_batch_norm_layer_is_covered() -> None:
    names = {type(r.make()).__name__ for r in BN_RECORDS}
    assert {"SandwichBatchNorm2d", "AuxBatchNorm1d", "BatchChannelNorm3d", "InputNorm2d"} <= names
    assert {"SyncBatchNorm", "CategoricalConditionalBatchNorm3d", "InputNorm1d"} <= names
    assert any(r.init_kwargs.get("split_stats") for r in BN_RECORDS)


@pytest.mark.parametrize(("rec", "kind"), layer_params(BN_RECORDS, kinds=("per_sample",)))
def test_version1_checkpoint_loads_strictly_with_equal_outputs(
    rec: LayerRecord, kind: str | None
) -> None:
    source = rec.build(seed=3)
    state = source.state_dict()
    assert state._metadata[""]["version"] == 2  # type: ignore[attr-defined]
    fresh = rec.make()
    own_count = fresh.num_batches_tracked.clone()
    result = fresh.load_state_dict(_version1(state), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            # Version 1 has no count: the layer keeps its own, as torch's batch norm does
            # (a (K,) count for per-domain statistics).
            assert torch.equal(fresh.num_batches_tracked, own_count)
            assert fresh.num_batches_tracked.shape == value.shape
        else:
            assert torch.equal(fresh.state_dict()[key], value), key
    torch.testing.assert_close(_eval_out(fresh, rec, kind), _eval_out(source, rec, kind))


@pytest.mark.parametrize(
    "name", ["sabn2d-split", "auxbn1d", "bcn2d-estimate", "inputnorm2d", "syncbn"]
)
def test_version1_checkpoint_of_a_nested_layer_loads_strictly(name: str) -> None:
    rec = next(r for r in BN_RECORDS if r.name == name)
    source = nn.Sequential(nn.Identity(), rec.build(seed=4))
    fresh = nn.Sequential(nn.Identity(), rec.make())
    fresh.load_state_dict(_version1(source.state_dict(), "1."), strict=True)
    kind = "per_sample" if rec.takes_domain else None
    torch.testing.assert_close(_eval_out(fresh[1], rec, kind), _eval_out(source[1], rec, kind))


@pytest.mark.parametrize("name", ["sabn2d-split", "bcn2d", "inputnorm1d"])
def test_version2_checkpoint_without_the_count_is_refused_strictly(name: str) -> None:
    # The migration is tied to the version: a current checkpoint missing the count is damaged.
    rec = next(r for r in BN_RECORDS if r.name == name)
    state = _version1(rec.build().state_dict())
    state._metadata[""]["version"] = 2
    with pytest.raises(RuntimeError, match=r"Missing key.*num_batches_tracked"):
        rec.make().load_state_dict(state, strict=True)


# --- the official layouts ---------------------------------------------------------------------


class OfficialSharedSaBN(nn.Module):
    """GAN SaBN (``affine=True``) and GAN/NAS CCBN (``affine=False``): one BN, one embedding."""

    def __init__(self, c: int, k: int, affine: bool) -> None:
        super().__init__()
        self.c = c
        self.bn = nn.BatchNorm2d(c, affine=affine)
        self.embed = nn.Embedding(k, 2 * c)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        gamma, beta = self.embed(y).chunk(2, 1)
        return gamma.view(-1, self.c, 1, 1) * self.bn(x) + beta.view(-1, self.c, 1, 1)


class OfficialNasSaBN(nn.Module):
    """NAS SaBN: one BN without affine per index, a shared affine, an embedding."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.c = c
        self.bns = nn.ModuleList(nn.BatchNorm2d(c, affine=False) for _ in range(k))
        self.shared_weight = nn.Parameter(torch.ones(c))
        self.shared_bias = nn.Parameter(torch.zeros(c))
        self.embed = nn.Embedding(k, 2 * c)

    def forward(self, x: Tensor, y: int) -> Tensor:
        shared = self.bns[y](x) * self.shared_weight.view(1, -1, 1, 1)
        shared = shared + self.shared_bias.view(1, -1, 1, 1)
        gamma, beta = self.embed.weight[y].chunk(2)
        return gamma.view(1, -1, 1, 1) * shared + beta.view(1, -1, 1, 1)


class OfficialAuxBN(nn.Module):
    """Adv AuxBN: one affine BN per branch."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.bn_list = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(k))

    def forward(self, x: Tensor, y: int) -> Tensor:
        return self.bn_list[y](x)


class OfficialSaAuxBN(nn.Module):
    """Adv SaAuxBN: BNs without affine, an embedding whose last row is the shared affine."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.c, self.k = c, k
        self.bn_list = nn.ModuleList(nn.BatchNorm2d(c, affine=False) for _ in range(k))
        self.embed = nn.Embedding(k + 1, 2 * c)

    def forward(self, x: Tensor, y: int) -> Tensor:
        out = self.bn_list[y](x)
        for row in (self.k, y):  # the shared row first, then the branch's
            gamma, beta = self.embed.weight[row].chunk(2)
            out = gamma.view(1, -1, 1, 1) * out + beta.view(1, -1, 1, 1)
        return out


# layout -> (official module, normkit layer, domain of the test batch)
LAYOUTS: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], Any]] = {
    "gan-sabn": (
        lambda: OfficialSharedSaBN(C, K, affine=True),
        lambda: nk.SandwichBatchNorm2d(C, K),
        torch.tensor([0, 2, 1, 2, 0, 0]),
    ),
    "gan-ccbn": (
        lambda: OfficialSharedSaBN(C, K, affine=False),
        lambda: nk.CategoricalConditionalBatchNorm2d(C, K),
        torch.tensor([1, 1, 0, 2, 2, 0]),
    ),
    "nas-sabn": (
        lambda: OfficialNasSaBN(C, K),
        lambda: nk.SandwichBatchNorm2d(C, K, split_stats=True),
        2,
    ),
    "adv-auxbn": (lambda: OfficialAuxBN(C, K), lambda: nk.AuxBatchNorm2d(C, K), 1),
    "adv-saauxbn": (
        lambda: OfficialSaAuxBN(C, K),
        lambda: nk.SandwichBatchNorm2d(C, K, split_stats=True),
        0,
    ),
}


def _trained(official: nn.Module, domain: Any) -> nn.Module:
    """Random parameters, then training steps on every index, so no buffer is at its init."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in official.parameters():
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
    official.train()
    for step in range(K):
        x = 3.0 * torch.randn(6, C, 3, 3, generator=g) + step
        official(x, step if isinstance(domain, int) else domain)
    return official


def _batch(seed: int) -> Tensor:
    return 2.0 * torch.randn(6, C, 3, 3, generator=torch.Generator().manual_seed(seed)) - 1.0


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_official_layout_loads_and_computes_the_official_function(layout: str) -> None:
    make_official, make_layer, domain = LAYOUTS[layout]
    official = _trained(make_official(), domain)
    layer = make_layer()
    result = nk.load_official_sandwich(layer, official.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert not torch.equal(layer.running_var, torch.ones_like(layer.running_var))
    # Eval: running statistics and every affine.
    official.eval(), layer.eval()
    x = _batch(0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, domain), official(x, domain))
    # Training: batch statistics, and the same running statistics after the step.
    official.train(), layer.train()
    x = _batch(1)
    torch.testing.assert_close(layer(x, domain), official(x, domain))
    official.eval(), layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, domain), official(x, domain))


def test_official_generator_block_loads_by_attribute_name() -> None:
    class Block(nn.Module):
        def __init__(self, norm: nn.Module) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, C, 3, padding=1)
            self.b1 = norm

        def forward(self, x: Tensor, y: Tensor) -> Tensor:
            return torch.relu(self.b1(self.c1(x), y))

    domain = torch.tensor([0, 1, 2, 0])
    official = Block(OfficialSharedSaBN(C, K, affine=True))
    _trained(official.b1, domain[:1].repeat(6))
    ours = Block(nk.SandwichBatchNorm2d(C, K))
    nk.load_official_sandwich(ours, official.state_dict())
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x, domain), official.eval()(x, domain))
    assert torch.equal(ours.c1.weight, official.c1.weight)


def test_official_checkpoint_without_the_count_loads_as_version1() -> None:
    official = _trained(OfficialSaAuxBN(C, K), 0)
    state = OrderedDict(
        (k, v) for k, v in official.state_dict().items() if "num_batches_tracked" not in k
    )
    layer = nk.SandwichBatchNorm2d(C, K, split_stats=True)
    nk.load_official_sandwich(layer, state)  # strict
    assert torch.equal(layer.num_batches_tracked, torch.zeros(K, dtype=torch.long))
    x = _batch(2)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x, 1), official.eval()(x, 1))


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("official", "layer", "fragments"),
    [
        (  # an official CCBN has no shared affine
            lambda: OfficialSharedSaBN(C, K, affine=False),
            lambda: nk.SandwichBatchNorm2d(C, K),
            ("expected a CategoricalConditionalBatchNorm(split_stats=False) layer", "got '<root>'"),
        ),
        (  # shared statistics cannot go into split ones: training would differ
            lambda: OfficialSharedSaBN(C, K, affine=True),
            lambda: nk.SandwichBatchNorm2d(C, K, split_stats=True),
            ("expected a SandwichBatchNorm(split_stats=False) layer", "split_stats=True)"),
        ),
        (
            lambda: OfficialSharedSaBN(C, K, affine=False),
            lambda: nk.CategoricalConditionalBatchNorm2d(C, K, split_stats=True),
            ("CategoricalConditionalBatchNorm(split_stats=False)", "split_stats=True)"),
        ),
        (  # an AuxBN's statistics are split
            lambda: OfficialSharedSaBN(C, K, affine=False),
            lambda: nk.AuxBatchNorm2d(C, K),
            ("CategoricalConditionalBatchNorm(split_stats=False)", "got '<root>' (AuxBatchNorm2d"),
        ),
        (  # per-index statistics cannot go into shared ones
            lambda: OfficialNasSaBN(C, K),
            lambda: nk.SandwichBatchNorm2d(C, K),
            ("expected a SandwichBatchNorm(split_stats=True) layer", "split_stats=False"),
        ),
        (  # K classes in the checkpoint, K + 1 in the layer
            lambda: OfficialSharedSaBN(C, K, affine=True),
            lambda: nk.SandwichBatchNorm2d(C, K + 1),
            ("expected 'embed.weight' of shape (4, 8)", "got (3, 8)"),
        ),
        (  # the SaAuxBN embedding has one more row than branches
            lambda: OfficialSaAuxBN(C, K),
            lambda: nk.SandwichBatchNorm2d(C, K + 1, split_stats=True),
            ("expected 'embed.weight' of shape (5, 8)", "got (4, 8)"),
        ),
        (
            lambda: OfficialAuxBN(C, K),
            lambda: nk.AuxBatchNorm2d(C, K - 1),
            ("expected 2 official batch norms bn_list.0 ... bn_list.1", "got indices [0, 1, 2]"),
        ),
        (
            lambda: OfficialSharedSaBN(C + 2, K, affine=True),
            lambda: nk.SandwichBatchNorm2d(C, K),
            ("expected 'embed.weight' of shape (3, 8)", "got (3, 12)"),
        ),
        (  # nothing official in a plain normkit checkpoint
            lambda: nk.SandwichBatchNorm2d(C, K),
            lambda: nk.SandwichBatchNorm2d(C, K),
            ("expected official keys", "conditional layers: '<root>'", "got none"),
        ),
    ],
)
def test_official_layout_mismatch_is_refused_and_loads_nothing(
    official: Callable[[], nn.Module], layer: Callable[[], nn.Module], fragments: tuple[str, ...]
) -> None:
    target = layer()
    before = _state(target)
    source = official().state_dict()
    kept = copy.deepcopy(source)
    with pytest.raises(ValueError) as info:
        nk.load_official_sandwich(target, source)
    message = str(info.value)
    assert message.startswith("load_official_sandwich: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    assert source.keys() == kept.keys()  # the caller's dict is not modified


def test_official_loader_refuses_non_modules_and_non_mappings() -> None:
    with pytest.raises(TypeError, match=r"load_official_sandwich: expected an nn\.Module, got str"):
        nk.load_official_sandwich("model", {})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a state dict"):
        nk.load_official_sandwich(nk.SandwichBatchNorm2d(C, K), [1, 2])  # type: ignore[arg-type]


def test_every_torch_load_in_the_library_is_weights_only() -> None:
    # normkit must never unpickle arbitrary objects: a torch.load without weights_only=True
    # (in the library or its studies) fails here.
    root = Path(nk.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name != "load" or not isinstance(func, ast.Attribute):
                continue
            if getattr(func.value, "id", None) != "torch":
                continue
            safe = any(
                k.arg == "weights_only"
                and isinstance(k.value, ast.Constant)
                and k.value.value is True
                for k in node.keywords
            )
            if not safe:
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders
    assert len(list(root.rglob("*.py"))) > 20  # the scan saw the package
