"""The reference ResNets: architecture, normalized forms, and the Fixup form and its init."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normkit.models
from normkit import Bias, Scale
from normkit.models import (
    BasicBlock,
    Bottleneck,
    CifarResNet,
    FixupBasicBlock,
    FixupBottleneck,
    ImageNetResNet,
    ZeroPadShortcut,
    cifar_resnet,
    imagenet_resnet,
    resnet18,
    resnet20,
    resnet34,
    resnet50,
    resnet110,
)

Builder = Callable[[], CifarResNet | ImageNetResNet]

# Small Fixup nets of each kind: (builder, L, m). Widths are cut to keep the suite fast; the init
# rule does not depend on width.
FIXUP_NETS: dict[str, tuple[Builder, int, int]] = {
    "cifar20": (lambda: resnet20(fixup=True), 9, 2),
    "cifar110": (lambda: resnet110(fixup=True), 54, 2),
    "imagenet_basic": (lambda: resnet34(fixup=True, width=16, num_classes=10), 16, 2),
    "imagenet_bottleneck": (lambda: resnet50(fixup=True, width=16, num_classes=10), 16, 3),
}


def build(name: str, seed: int = 0) -> tuple[CifarResNet | ImageNetResNet, int, int]:
    torch.manual_seed(seed)
    builder, num_branches, m = FIXUP_NETS[name]
    return builder(), num_branches, m


def std_tolerance(n: int, kurtosis: float = 3.0) -> float:
    """Six standard errors of the relative sample std of n i.i.d. values: the sample variance has
    relative variance (kurtosis - 1) / n, so the std has relative error sqrt((kurtosis - 1) / n)
    / 2 (1/sqrt(2n) for a normal). A false failure is about a one-in-10^9 event."""
    return 6 * math.sqrt((kurtosis - 1) / n) / 2


def assert_std(weight: Tensor, expected: float, kurtosis: float = 3.0) -> None:
    rel = weight.std().item() / expected
    assert abs(rel - 1) < std_tolerance(weight.numel(), kurtosis), (rel, weight.shape)
    assert abs(weight.mean().item()) < 6 * expected / math.sqrt(weight.numel())


def fan_out(conv: nn.Conv2d) -> int:
    return conv.weight.shape[0] * conv.weight[0][0].numel()


def block_inputs(model: nn.Module, x: Tensor) -> list[tuple[nn.Module, Tensor]]:
    seen: list[tuple[nn.Module, Tensor]] = []
    handles = [
        blk.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])))
        for blk in model.blocks()  # type: ignore[operator]
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


# --- the Fixup form at init ----------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXUP_NETS)
def test_fixup_network_outputs_exactly_zero_and_every_branch_is_zero_at_init(name: str) -> None:
    model, num_branches, _ = build(name)
    size = 16 if isinstance(model, CifarResNet) else 32
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 10) and bool((out == 0).all())
    inputs = block_inputs(model, x)
    assert len(inputs) == num_branches == model.num_blocks
    for block, inp in inputs:
        with torch.no_grad():
            assert bool((block.branch(inp) == 0).all())  # type: ignore[operator]
            # with a zero branch the block is relu(shortcut): the identity on post-ReLU inputs
            assert torch.equal(block(inp), F.relu(block.shortcut(inp)))  # type: ignore[operator]


@pytest.mark.parametrize("name", FIXUP_NETS)
def test_rescaled_branch_convs_have_std_sqrt_2_over_fan_out_times_L_power(name: str) -> None:
    model, num_branches, m = build(name)
    factor = num_branches ** (-1 / (2 * m - 2))  # L^-1/2 (m = 2) or L^-1/4 (m = 3)
    pooled = []
    for block in model.blocks():
        convs = block.fixup_branch_layers()  # type: ignore[operator]
        assert len(convs) == m
        for conv in convs[:-1]:
            expected = math.sqrt(2 / fan_out(conv)) * factor
            # per layer: catches one mis-initialized conv (smallest here: 256 values, 27% tol)
            assert_std(conv.weight, expected)
            pooled.append((conv.weight / expected).flatten())
        assert bool((convs[-1].weight == 0).all())
    # pooled over the net: a tight test of the factor (tolerance well under 1%)
    z = torch.cat(pooled)
    assert abs(z.std().item() - 1) < std_tolerance(z.numel())
    assert bool((model.fc.weight == 0).all()) and bool((model.fc.bias == 0).all())


@pytest.mark.parametrize("name", FIXUP_NETS)
def test_stem_keeps_pytorch_default_init_and_shortcut_convs_are_he_unscaled(name: str) -> None:
    model, _, _ = build(name)
    stem = model.conv1.weight
    bound = 1 / math.sqrt(stem[0].numel())  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), ..)
    assert stem.abs().max().item() <= bound
    assert stem.abs().max().item() > 0.9 * bound  # a normal init would not fill the bound so
    assert_std(stem, bound / math.sqrt(3), kurtosis=1.8)
    shortcut_convs = [
        blk.downsample for blk in model.blocks() if isinstance(blk.downsample, nn.Conv2d)
    ]
    if isinstance(model, CifarResNet):
        assert shortcut_convs == []
        assert all(
            isinstance(blk.downsample, (ZeroPadShortcut, type(None))) for blk in model.blocks()
        )
    else:
        assert len(shortcut_convs) == (3 if name == "imagenet_basic" else 4)
        for conv in shortcut_convs:
            assert_std(conv.weight, math.sqrt(2 / fan_out(conv)))


@pytest.mark.parametrize("name", FIXUP_NETS)
def test_blocks_have_5_or_7_scalars_with_multipliers_at_1_and_biases_at_0(name: str) -> None:
    model, num_branches, m = build(name)
    per_block = 5 if m == 2 else 7
    for block in model.blocks():
        scalars = [mod for mod in block.modules() if isinstance(mod, (Bias, Scale))]
        assert len(scalars) == per_block
        assert [type(s) for s in scalars].count(Scale) == 1
        for s in scalars:
            value = s.weight if isinstance(s, Scale) else s.bias
            assert value.shape == (1,) and value.item() == (1.0 if isinstance(s, Scale) else 0.0)
    all_scalars = [mod for mod in model.modules() if isinstance(mod, (Bias, Scale))]
    assert len(all_scalars) == per_block * num_branches + 2  # + stem bias1 and head bias2
    assert not any(isinstance(mod, nn.modules.batchnorm._NormBase) for mod in model.modules())
    assert all(conv.bias is None for conv in model.modules() if isinstance(conv, nn.Conv2d))


def test_reset_parameters_restores_the_fixup_init_after_training_noise() -> None:
    model, _, _ = build("imagenet_bottleneck")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    assert bool((model(x) != 0).any())
    model.reset_parameters()
    assert bool((model(x) == 0).all())
    assert all(bool((blk.conv3.weight == 0).all()) for blk in model.blocks())


def test_reset_parameters_reinitializes_the_stem_too() -> None:
    # The outputs above are zero whatever the stem holds (the classifier is zero): check the
    # stem's weight itself, back within PyTorch's default bound 1 / sqrt(fan_in).
    torch.manual_seed(0)
    model = cifar_resnet(8, fixup=True)
    with torch.no_grad():
        model.conv1.weight.add_(10.0)
    model.reset_parameters()
    fan_in = model.conv1.weight[0].numel()
    assert model.conv1.weight.abs().max() <= 1.0 / math.sqrt(fan_in) + 1e-7


# --- the Fixup scalar placement ------------------------------------------------------------------


def randomize_(module: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


def test_fixup_basic_block_places_its_scalars_as_the_official_code() -> None:
    for shortcut in ("zero_pad", "conv"):
        block = FixupBasicBlock(6, 8, stride=2, shortcut=shortcut)
        randomize_(block)
        x = torch.randn(2, 6, 7, 7)
        b1a, b1b, b2a, b2b = (
            block.get_submodule(n).bias for n in ("bias1a", "bias1b", "bias2a", "bias2b")
        )
        a = x + b1a
        h = F.relu(F.conv2d(a, block.conv1.weight, stride=2, padding=1) + b1b)
        branch = block.scale.weight * F.conv2d(h + b2a, block.conv2.weight, padding=1) + b2b
        if shortcut == "conv":
            assert isinstance(block.downsample, nn.Conv2d)
            skip = F.conv2d(a, block.downsample.weight, stride=2)  # b1a feeds the shortcut
        else:
            skip = F.pad(a[:, :, ::2, ::2], (0, 0, 0, 0, 0, 2))
        torch.testing.assert_close(block.branch(x), branch)
        torch.testing.assert_close(block.shortcut(x), skip)
        torch.testing.assert_close(block(x), F.relu(branch + skip))


def test_fixup_bottleneck_places_its_7_scalars_as_the_official_code() -> None:
    block = FixupBottleneck(8, 4, stride=2)
    randomize_(block)
    x = torch.randn(2, 8, 6, 6)
    s = {
        n: block.get_submodule(n).bias
        for n in ("bias1a", "bias1b", "bias2a", "bias2b", "bias3a", "bias3b")
    }
    a = x + s["bias1a"]
    h = F.relu(F.conv2d(a, block.conv1.weight) + s["bias1b"])
    h = F.relu(F.conv2d(h + s["bias2a"], block.conv2.weight, stride=2, padding=1) + s["bias2b"])
    branch = block.scale.weight * F.conv2d(h + s["bias3a"], block.conv3.weight) + s["bias3b"]
    assert isinstance(block.downsample, nn.Conv2d)
    skip = F.conv2d(a, block.downsample.weight, stride=2)
    torch.testing.assert_close(block.branch(x), branch)
    torch.testing.assert_close(block(x), F.relu(branch + skip))


def test_fixup_network_adds_the_stem_and_head_biases_where_the_official_code_does() -> None:
    torch.manual_seed(0)
    model = cifar_resnet(8, fixup=True, num_classes=3)
    randomize_(model)
    assert model.bias1 is not None and model.bias2 is not None
    x = torch.randn(2, 3, 8, 8)
    h = F.relu(F.conv2d(x, model.conv1.weight, padding=1) + model.bias1.bias)
    for stage in (model.layer1, model.layer2, model.layer3):
        h = stage(h)
    logits = F.linear(h.mean((2, 3)) + model.bias2.bias, model.fc.weight, model.fc.bias)
    torch.testing.assert_close(model(x), logits)


# --- the normalized forms ------------------------------------------------------------------------

NORMS: dict[str, Callable[[int], nn.Module] | None] = {
    "batchnorm": nn.BatchNorm2d,
    "none": None,
    "groupnorm": functools.partial(nn.GroupNorm, 4),
}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", ["cifar", "imagenet_basic", "imagenet_bottleneck"])
def test_normalized_forms_build_run_and_backprop_with_any_norm_layer(norm: str, arch: str) -> None:
    torch.manual_seed(0)
    norm_layer = NORMS[norm]
    model: nn.Module
    if arch == "cifar":
        model = resnet20(norm_layer=norm_layer, width=8)
        num_norms = 1 + 2 * 9
    elif arch == "imagenet_basic":
        model = resnet18(norm_layer=norm_layer, width=8, num_classes=10)
        num_norms = 1 + 2 * 8 + 3  # stem, two per block, three conv shortcuts
    else:
        model = imagenet_resnet(
            "bottleneck", [1, 1], norm_layer=norm_layer, width=8, num_classes=10
        )
        num_norms = 1 + 3 * 2 + 2
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10) and bool(out.isfinite().all())
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    kinds = {"batchnorm": nn.BatchNorm2d, "groupnorm": nn.GroupNorm, "none": nn.Identity}
    slots = [mod for mod in model.modules() if mod is not model.get_submodule("maxpool")]
    assert sum(isinstance(mod, kinds[norm]) for mod in slots) == num_norms
    if norm == "none":
        assert all(
            isinstance(mod, (nn.Conv2d, nn.Linear))
            for mod in model.modules()
            if list(mod.parameters(recurse=False))
        )


def test_normalized_form_inits_convs_he_fan_out_and_norms_at_one_and_zero() -> None:
    torch.manual_seed(0)
    model = resnet110(width=32)
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d) and mod.weight.numel() >= 9000:
            assert_std(mod.weight, math.sqrt(2 / fan_out(mod)))
        if isinstance(mod, nn.BatchNorm2d):
            assert bool((mod.weight == 1).all()) and bool((mod.bias == 0).all())


@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm"])
def test_zero_init_residual_zeroes_the_last_norm_weight_of_every_branch(norm: str) -> None:
    torch.manual_seed(0)
    for model in (
        resnet20(norm_layer=NORMS[norm], width=8, zero_init_residual=True),
        imagenet_resnet(
            "bottleneck", [2, 1], norm_layer=NORMS[norm], width=8, zero_init_residual=True
        ),
    ):
        x = torch.randn(4, 3, 16, 16)
        for block, inp in block_inputs(model, x):
            assert isinstance(block, (BasicBlock, Bottleneck))
            last = block.last_norm()
            assert bool((last.weight == 0).all())
            others = [
                mod for mod in block.modules() if isinstance(mod, type(last)) and mod is not last
            ]
            assert others and all(bool((mod.weight == 1).all()) for mod in others)
            with torch.no_grad():
                assert bool((block.branch(inp) == 0).all())
    default = resnet20(width=8)
    assert all(bool((blk.last_norm().weight == 1).all()) for blk in default.blocks())


# --- shortcuts, errors, shapes, layout -----------------------------------------------------------


def test_zero_pad_shortcut_subsamples_and_appends_zero_channels_for_any_increase() -> None:
    x = torch.randn(2, 16, 7, 7)
    y = ZeroPadShortcut(16, 24, stride=2)(x)
    assert y.shape == (2, 24, 4, 4)  # ceil(7 / 2), as a padded stride-2 3x3 conv
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2])
    assert bool((y[:, 16:] == 0).all())
    assert list(ZeroPadShortcut(16, 24).parameters()) == []
    with pytest.raises(ValueError, match=r"ZeroPadShortcut: expected out_channels >= in_chan"):
        ZeroPadShortcut(16, 8)


@pytest.mark.parametrize("fixup", [False, True])
def test_cifar_resnet_with_non_doubling_stage_widths_runs_on_odd_sizes(fixup: bool) -> None:
    torch.manual_seed(0)
    model = cifar_resnet(14, width=(8, 12, 20), fixup=fixup)
    out = model(torch.randn(2, 3, 9, 9))
    assert out.shape == (2, 10)
    if fixup:
        assert bool((out == 0).all())
    with pytest.raises(ValueError, match=r"ZeroPadShortcut: .* got 12 -> 8"):
        cifar_resnet(14, width=(12, 8, 16))
    with pytest.raises(ValueError, match=r"CifarResNet: expected width as an int or 3 stage"):
        cifar_resnet(14, width=(8, 16))


@pytest.mark.parametrize("depth", [21, 2, 0, 19])
def test_cifar_depth_must_be_6n_plus_2(depth: int) -> None:
    with pytest.raises(ValueError, match=rf"CifarResNet: expected depth = 6n \+ 2 .* got {depth}"):
        cifar_resnet(depth)


def test_bad_arguments_are_refused_with_the_model_named() -> None:
    with pytest.raises(TypeError, match=r"CifarResNet: expected depth to be an int, got '20'"):
        cifar_resnet("20")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ImageNetResNet: expected block 'basic' or 'bottl"):
        imagenet_resnet("wide", [2, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ImageNetResNet: expected every entry of layers >= 1"):
        imagenet_resnet("basic", [2, 0])
    with pytest.raises(TypeError, match=r"CifarResNet: expected norm_layer to be a callable"):
        cifar_resnet(20, norm_layer="bn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"CifarResNet: expected 3 channels .* got 1"):
        resnet20()(torch.randn(1, 1, 8, 8))


def test_fixup_refuses_a_norm_layer_other_than_the_default_and_zero_init_residual() -> None:
    with pytest.raises(ValueError, match=r"fixup=True builds a network without normalization"):
        cifar_resnet(20, fixup=True, norm_layer=functools.partial(nn.GroupNorm, 4))
    with pytest.raises(ValueError, match=r"zero_init_residual applies to the normalized form"):
        resnet18(fixup=True, zero_init_residual=True)
    with pytest.raises(ValueError, match=r"zero_init_residual needs a norm layer .* Identity"):
        resnet20(norm_layer=None, zero_init_residual=True)
    with pytest.raises(ValueError, match=r"zero_init_residual needs .* GroupNorm"):
        resnet20(norm_layer=lambda c: nn.GroupNorm(4, c, affine=False), zero_init_residual=True)
    assert resnet20(fixup=True, norm_layer=None).fixup


def test_output_shapes_follow_num_classes_in_channels_and_width() -> None:
    torch.manual_seed(0)
    cifar = cifar_resnet(8, num_classes=100, in_channels=1, width=4)
    assert cifar(torch.randn(3, 1, 28, 28)).shape == (3, 100)
    assert cifar.num_features == 16 and cifar.depth == 8
    imnet = imagenet_resnet("bottleneck", [1, 1, 1], num_classes=7, width=4, fixup=True)
    assert imnet(torch.randn(2, 3, 40, 40)).shape == (2, 7)
    assert imnet.num_features == 4 * 4 * 4  # last stage planes times the expansion
    assert imnet.layer2[0].conv2.stride == (2, 2) and imnet.layer2[0].conv1.stride == (1, 1)


def test_layouts_match_he_et_al_and_torchvision_parameter_counts_and_keys() -> None:
    def count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    assert count(resnet20()) == 269_722  # the 0.27M of He et al. 2016, table 6
    assert count(resnet18()) == 11_689_512  # torchvision's resnet18, 34, 50
    assert count(resnet34()) == 21_797_672
    r50 = resnet50()
    assert count(r50) == 25_557_032
    keys = set(r50.state_dict())
    assert {
        "bn1.running_var",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.bias",
        "layer4.2.bn3.weight",
        "fc.bias",
    } <= keys


def test_fixup_state_dict_uses_the_official_scalar_names() -> None:
    keys = set(resnet18(fixup=True, width=8).state_dict())
    assert {
        "bias1.bias",
        "layer1.0.bias1a.bias",
        "layer1.0.bias2b.bias",
        "layer1.0.scale.weight",
        "layer2.0.downsample.weight",
        "bias2.bias",
        "fc.weight",
    } <= keys
    assert not any("bn" in key for key in keys)


def test_every_public_model_name_is_exported() -> None:
    for name in normkit.models.__all__:
        assert getattr(normkit.models, name) is getattr(normkit.models.resnet, name)


def _official_branch(block: nn.Module, a: Tensor) -> Tensor:
    """The Fixup branch as the official code writes it, module by module (no folding)."""
    names = [n for n, _ in block.named_children() if n.startswith("conv")]
    h = a
    for i, name in enumerate(names, start=1):
        conv = block.get_submodule(name)
        h = conv(block.get_submodule(f"bias{i}a")(h) if i > 1 else h)
        if i == len(names):
            return block.get_submodule(f"bias{i}b")(block.scale(h))
        h = F.relu(block.get_submodule(f"bias{i}b")(h))
    raise AssertionError("unreachable")


def test_fixup_fold_scales_a_convolutions_own_bias() -> None:
    """A biased ``nn.Conv2d`` put into a block (the blocks build bias-free ones) is folded as
    ``bias2b(scale(conv2(h)))`` too: its bias multiplied by the scale."""
    block = FixupBasicBlock(6, 6).double()
    block.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=True).double()
    randomize_(block)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    a = x + block.bias1a.bias
    h = F.relu(F.conv2d(a, block.conv1.weight, padding=1) + block.bias1b.bias)
    conv2 = F.conv2d(h + block.bias2a.bias, block.conv2.weight, block.conv2.bias, padding=1)
    want = block.scale.weight * conv2 + block.bias2b.bias
    torch.testing.assert_close(block.branch(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_fixup_blocks_fold_their_scalars_into_the_convolutions_exactly(kind: str) -> None:
    """The blocks compute each branch convolution and the scalars after it as one convolution
    (scale in the weight, bias in the conv bias): the same values and gradients as the modules
    one by one, to 1e-10 in float64; with a hook on a scalar, the modules run as written."""
    block = FixupBasicBlock(6, 8, stride=2) if kind == "basic" else FixupBottleneck(8, 4, stride=2)
    block = block.double()
    randomize_(block)
    x = torch.randn(2, 6 if kind == "basic" else 8, 7, 7, dtype=torch.float64)
    params = list(block.parameters())
    upstream = torch.randn_like(block.branch(x))

    def grads(fn: Callable[[], Tensor]) -> tuple[Tensor, ...]:
        out = fn()
        return (out, *torch.autograd.grad(out, params, upstream, allow_unused=True))

    fused = grads(lambda: block.branch(x))
    official = grads(lambda: _official_branch(block, block.bias1a(x)))
    for got, want in zip(fused, official):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    calls: list[int] = []
    handle = block.scale.register_forward_hook(lambda *_: calls.append(1))
    try:
        hooked = grads(lambda: block.branch(x))
    finally:
        handle.remove()
    assert calls == [1]
    for got, want in zip(hooked, official):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
