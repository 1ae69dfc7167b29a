"""``prepare_for_inference``: a model reduced to plain, export-friendly layers for eval.

Three steps, each equal in eval mode to what it replaces:

1. sync layers become local again (:func:`normkit.revert_sync`);
2. WS layers are baked into plain convolutions and linear layers holding the standardized weight;
3. an eval-mode scale-and-shift that directly follows a convolution (or a linear layer) and is
   the only user of its output is folded into that layer's weight and bias:

   * torch's batch norms and :class:`normkit.SyncBatchNorm` (with running statistics), and
     :class:`normkit.FrozenBatchNorm2d`;
   * Sandwich BN, CCBN and AuxBN when ``domain`` is given as an int (their eval affine is then
     one per-channel scale and shift); with a per-sample index they stay as they are;
   * BCN's batch part, after which the layer becomes an ``nn.GroupNorm`` carrying the channel
     part's affine (per group affines are repeated per channel);
   * BNET's normalization, after a plain ``nn.Conv2d``: the layer becomes its depthwise
     convolution, a plain ``nn.Conv2d`` (:meth:`normkit.BNET2d.depthwise_conv`).

Pairs are found by tracing the model with ``torch.fx`` (norm and conv layers as leaves). A pair is
folded only where nothing else can see the change: the conv's output feeds the norm alone, no code
reads either module's attributes (a weight reused in ``F.conv2d``), neither module is reachable
under two names or called twice, and neither has hooks, forward or backward
(``nn.utils.weight_norm`` is one). A model that does not trace gets no folding unless
``sequential_fallback=True`` asks for pairs that sit next to each other in an ``nn.Sequential``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from normkit.convert import _has_hooks
from normkit.distributed import revert_sync
from normkit.layers.batch_channel import _BatchChannelNorm
from normkit.layers.bnet import BNET2d
from normkit.layers.core import _BatchNormCore
from normkit.layers.frozen import FrozenBatchNorm2d
from normkit.layers.weight_std import _StandardizedWeight

__all__ = ["InferenceReport", "prepare_for_inference"]

_FOLD_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class FoldedNorm(nn.Module):
    """What a norm folded into the preceding layer becomes: the identity.

    It accepts and ignores extra arguments, so ``norm(x, domain)`` calls keep working. After a
    linear layer (``after_linear``) it refuses an input that is not ``(N, C)``: the fold scaled
    the linear layer's output features, which are the norm's channels only for 2-D input.
    """

    def __init__(self, after_linear: bool = False) -> None:
        super().__init__()
        self.after_linear = after_linear

    def forward(self, input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.after_linear and input.dim() != 2:
            raise ValueError(
                "FoldedNorm: this norm was folded into the linear layer before it, which is "
                f"the same function for (N, C) input only; got a {input.dim()}-D input "
                f"{tuple(input.shape)}. For a model that runs its linear layers on more "
                "dimensions, prepare it with prepare_for_inference(..., fold_linear=False)."
            )
        return input

    def extra_repr(self) -> str:
        return "after_linear=True" if self.after_linear else ""


@dataclass
class InferenceReport:
    """What :func:`prepare_for_inference` did, by qualified module name."""

    baked: list[str] = field(default_factory=list)
    folded: list[tuple[str, str]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    traced: bool = True

    def __str__(self) -> str:
        lines = [f"baked WS layers: {len(self.baked)}", f"folded norms: {len(self.folded)}"]
        lines += [f"  {norm} -> {conv}" for conv, norm in self.folded]
        if self.kept:
            lines.append("norms kept: " + ", ".join(self.kept))
        if not self.traced:
            lines.append(
                "(the model did not trace with torch.fx: nothing folded, unless "
                "sequential_fallback=True folded nn.Sequential neighbours)"
            )
        return "\n".join(lines)


def _eval_affine(norm: nn.Module, domain: int | None) -> tuple[Tensor, Tensor] | None:
    """The per-channel ``(scale, shift)`` a norm applies in eval, or None if there is none."""
    if isinstance(norm, FrozenBatchNorm2d):
        return norm.scale_shift()
    if not isinstance(norm, _BatchNorm) or isinstance(norm, _BatchChannelNorm):
        return None
    if norm.running_mean is None or norm.running_var is None:
        return None
    mean, var = norm.running_mean, norm.running_var
    g: Tensor | None = None
    b: Tensor | None = None
    if isinstance(norm, _BatchNormCore) and norm._needs_domain:
        if domain is None:
            return None
        if norm.split_stats:
            mean, var = mean[domain], var[domain]
        if norm.domain_weight is not None and norm.domain_bias is not None:
            g, b = norm.domain_weight[domain], norm.domain_bias[domain]
    if mean.shape[-1] != norm.num_features:
        # One statistic per group of consecutive channels (BatchGroupNorm2d): per channel.
        repeat = norm.num_features // mean.shape[-1]
        mean, var = mean.repeat_interleave(repeat), var.repeat_interleave(repeat)
    scale = torch.rsqrt(var + norm.eps)
    shift = -mean * scale
    if norm.weight is not None:
        scale = scale * norm.weight
        shift = shift * norm.weight + (norm.bias if norm.bias is not None else 0)
    if g is not None and b is not None:
        scale, shift = scale * g, shift * g + b
    return scale, shift


def _bcn_batch_affine(norm: _BatchChannelNorm) -> tuple[Tensor, Tensor]:
    assert norm.running_mean is not None and norm.running_var is not None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.affine:
        scale = scale * norm.weight
        shift = shift * norm.weight + norm.bias
    return scale, shift


def _as_group_norm(norm: _BatchChannelNorm) -> nn.GroupNorm:
    """BCN's channel part as a GroupNorm (the batch part having been folded away)."""
    gn = nn.GroupNorm(
        norm.num_groups,
        norm.num_features,
        norm.eps,
        affine=norm.group_weight is not None,
        device=norm.running_mean.device if norm.running_mean is not None else None,
        dtype=norm.running_mean.dtype if norm.running_mean is not None else None,
    )
    if norm.group_weight is not None and norm.group_bias is not None:
        repeat = 1 if norm.group_affine == "per_channel" else norm.num_features // norm.num_groups
        with torch.no_grad():
            gn.weight.copy_(norm.group_weight.repeat_interleave(repeat))
            gn.bias.copy_(norm.group_bias.repeat_interleave(repeat))
    return gn.train(False)


@torch.no_grad()
def _fold(
    conv: nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear, scale: Tensor, shift: Tensor
) -> None:
    weight = conv.weight
    shape = [-1] + [1] * (weight.dim() - 1)
    conv.weight = nn.Parameter(
        weight * scale.to(weight.dtype).reshape(shape), requires_grad=weight.requires_grad
    )
    # An existing bias keeps its own flag; a new one follows the weight's.
    bias_grad = conv.bias.requires_grad if conv.bias is not None else weight.requires_grad
    old_bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    conv.bias = nn.Parameter((old_bias * scale + shift).to(weight.dtype), requires_grad=bias_grad)


class _LeafTracer(torch.fx.Tracer):
    # Reads of buffers become get_attr nodes (by default they are baked in as constants), so
    # that a pair whose statistics the model reads elsewhere is seen and kept.
    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        leaves = (_ConvNd, nn.Linear, _BatchNorm, nn.GroupNorm, FrozenBatchNorm2d, FoldedNorm)
        if isinstance(m, leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _traced_pairs(model: nn.Module) -> Iterator[tuple[str, str]]:
    graph = _LeafTracer().trace(model)
    calls: dict[str, int] = {}
    read: set[str] = set()  # modules whose attributes the traced code reads (get_attr)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        elif node.op == "get_attr":
            owner = str(node.target)
            while "." in owner:
                owner = owner.rpartition(".")[0]
                read.add(owner)
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        prev = node.args[0]
        if not isinstance(prev, torch.fx.Node) or prev.op != "call_module":
            continue
        norm_name, conv_name = str(node.target), str(prev.target)
        # The conv's output must feed only this norm, neither module may be called twice, and
        # no code may read a parameter or buffer of either (folding rewrites them).
        if len(prev.users) > 1 or calls[norm_name] > 1 or calls[conv_name] > 1:
            continue
        if conv_name in read or norm_name in read:
            continue
        yield conv_name, norm_name


def _sequential_pairs(model: nn.Module) -> Iterator[tuple[str, str]]:
    for name, module in model.named_modules():
        if type(module) is not nn.Sequential:  # a subclass may run its children otherwise
            continue
        children = list(module.named_children())
        for (a, _), (b, _) in itertools.pairwise(children):
            prefix = f"{name}." if name else ""
            yield f"{prefix}{a}", f"{prefix}{b}"


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def prepare_for_inference(
    model: nn.Module,
    *,
    domain: int | None = None,
    inplace: bool = False,
    sequential_fallback: bool = False,
    fold_linear: bool = True,
) -> tuple[nn.Module, InferenceReport]:
    """A model for evaluation and export, equal to ``model.eval()`` on every input.

    Args:
        model: any model.
        domain: fold conditional layers (SaBN, CCBN, AuxBN) for this one index; the prepared
            model then computes the original's output for that domain only. None keeps them.
        inplace: modify ``model`` itself instead of a deep copy.
        sequential_fallback: for a model that ``torch.fx`` cannot trace, fold the (conv, norm)
            neighbours of every exact ``nn.Sequential``. That is only right if each such
            Sequential runs whole through its own forward: code that iterates it, or calls a
            child directly, can read the conv's output before the norm. Default False: an
            untraced model is not folded (the report says so); baking and sync reversal apply.
        fold_linear: fold norms into a preceding ``nn.Linear`` too. That is the same function
            for ``(N, C)`` input only (on ``(N, C, L)`` the norm's channels are not the linear
            layer's features), which the folded norm checks at run time; pass False for a model
            that runs such a pair on more than two dimensions.

    Returns:
        ``(prepared, report)``; ``prepared`` is in eval mode with ``requires_grad`` kept. A model
        with nothing to bake or fold is still a valid input (no warning): the result is its eval
        copy and the report lists no change.

    Raises:
        TypeError: ``domain`` is not an int (a tensor index cannot be folded).
        ValueError: ``domain`` outside ``[0, num_domains)`` of a conditional layer (a negative
            index would otherwise pick a domain from the end).

    Example::

        >>> model = normkit.models.resnet20().eval()
        >>> prepared, report = normkit.prepare_for_inference(model)
        >>> len(report.folded)  # every BN folded into its conv
        19
        >>> x = torch.randn(2, 3, 32, 32)
        >>> torch.allclose(prepared(x), model(x), atol=1e-5)
        True

    ``prepared`` then exports as usual: ``torch.onnx.export(prepared, (x,), "model.onnx")``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_for_inference: expected an nn.Module, got {type(model).__name__}")
    if domain is not None:
        _check_domain(model, domain)
    if not inplace:
        model = copy.deepcopy(model)
    model = revert_sync(model).eval()
    report = InferenceReport()

    # Bake WS layers (including the root) into plain layers.
    baked: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, _StandardizedWeight) and id(module) not in baked:
            baked[id(module)] = module.bake()
            report.baked.append(name)
    if id(model) in baked:
        return baked[id(model)].eval(), report
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in baked:
                setattr(parent, child_name, baked[id(child)])

    shared = _shared_ids(model)
    try:
        pairs = list(_traced_pairs(model))
    except Exception:  # any model fx cannot trace
        report.traced = False
        pairs = list(_sequential_pairs(model)) if sequential_fallback else []
    done: set[str] = set()
    for conv_name, norm_name in pairs:
        if norm_name in done:
            continue
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        if not isinstance(conv, _FOLD_INTO) or type(conv) not in _FOLD_INTO:
            continue
        if type(conv) is nn.Linear and not fold_linear:
            continue
        # A hook may rewrite the weight (nn.utils.weight_norm, spectral_norm) or watch the
        # norm: folding would break it or drop it.
        if id(conv) in shared or id(norm) in shared or _has_hooks(conv) or _has_hooks(norm):
            continue
        out_features = conv.weight.shape[0]
        if getattr(norm, "num_features", None) != out_features:
            continue
        if isinstance(norm, BNET2d):
            # Its normalization (no affine) folds like a batch norm's; its convolution stays.
            # A BNET2d after anything else is kept (BNET2d.to_conv folds it on its own).
            bn_part = _eval_affine(norm, domain)
            if bn_part is None or type(conv) is not nn.Conv2d:
                continue
            _fold(conv, *bn_part)
            _set(model, norm_name, norm.depthwise_conv())
        elif isinstance(norm, _BatchChannelNorm):
            if norm.running_mean is None:
                continue
            _fold(conv, *_bcn_batch_affine(norm))
            _set(model, norm_name, _as_group_norm(norm))
        else:
            affine = _eval_affine(norm, domain)
            if affine is None:
                continue
            _fold(conv, *affine)
            _set(model, norm_name, FoldedNorm(after_linear=isinstance(conv, nn.Linear)))
        report.folded.append((conv_name, norm_name))
        done.add(norm_name)
    norms = (_BatchNorm, _BatchChannelNorm, FrozenBatchNorm2d)
    for name, module in model.named_modules():
        if isinstance(module, norms) and name not in done:
            report.kept.append(name)
        if domain is not None and getattr(type(module), "takes_domain", False):
            # Conditional layers left unfolded run for the chosen domain without a context.
            module.context_domain = domain
    return model.eval(), report


def _check_domain(model: nn.Module, domain: Any) -> None:
    where = "prepare_for_inference"
    if isinstance(domain, bool) or not isinstance(domain, int):
        raise TypeError(f"{where}: expected domain to be an int or None, got {domain!r}")
    for name, module in model.named_modules():
        k = getattr(module, "num_domains", None)
        if not getattr(type(module), "takes_domain", False) or not isinstance(k, int):
            continue
        if not 0 <= domain < k:
            raise ValueError(
                f"{where}: expected a domain in [0, {k}) for {name or '<root>'!r} "
                f"({type(module).__name__}), got {domain}"
            )


def _shared_ids(model: nn.Module) -> set[int]:
    """Modules reachable under more than one name: folding one place would change the other."""
    seen: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        seen[id(module)] = seen.get(id(module), 0) + 1
    return {k for k, count in seen.items() if count > 1}
