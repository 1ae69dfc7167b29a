"""Loading the official Sandwich BN checkpoints into normkit's layers.

The authors' code (VITA-Group/Sandwich-Batch-Normalization) stores the same quantities as normkit
under other names and shapes, one layout per experiment:

==================  ======================================================  =====================
official module     keys under the module's name                            normkit layer
==================  ======================================================  =====================
GAN SaBN            ``bn.weight``, ``bn.bias`` (shared affine), ``bn.run*``  SandwichBatchNorm
                    (statistics), ``embed.weight`` (K, 2C): per-class γ     (split_stats=False)
                    in columns ``[:C]``, β in ``[C:]``
GAN / NAS CCBN      ``bn.run*``, ``embed.weight`` (K, 2C)                   CategoricalConditional
                                                                            BatchNorm
                                                                            (split_stats=False)
NAS SaBN            ``bns.{k}.run*`` (statistics per index),                SandwichBatchNorm
                    ``shared_weight``, ``shared_bias``, ``embed.weight``    (split_stats=True)
Adv AuxBN           ``bn_list.{k}.weight``, ``.bias``, ``.run*``            AuxBatchNorm
Adv SaAuxBN         ``bn_list.{k}.run*``, ``embed.weight`` (K + 1, 2C)      SandwichBatchNorm
                    whose **last** row is the shared affine                 (split_stats=True)
==================  ======================================================  =====================

(``run*`` is ``running_mean``, ``running_var`` and ``num_batches_tracked``.) Each migration is
exact: the normkit layer computes the official module's function, in training and in eval.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from normkit.layers.core import _BatchNormCore

__all__ = ["load_official_sandwich"]

_WHERE = "load_official_sandwich"
_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _describe(name: str, layer: _BatchNormCore) -> str:
    return (
        f"{name or '<root>'!r} ({type(layer).__name__}, num_features={layer.num_features}, "
        f"num_domains={layer.num_domains}, affine={layer.affine}, "
        f"split_stats={layer.split_stats})"
    )


def _layout(sd: Mapping[str, Any], p: str) -> str | None:
    if p + "bn_list.0.running_mean" in sd or p + "bn_list.0.weight" in sd:
        return "adv-saauxbn" if p + "embed.weight" in sd else "adv-auxbn"
    if p + "shared_weight" in sd or p + "bns.0.running_mean" in sd:
        return "nas-sabn"
    if p + "embed.weight" in sd:
        return "gan-sabn" if p + "bn.weight" in sd else "ccbn"
    return None


# The normkit layer each layout needs: (split statistics, shared affine, family). Shared
# statistics stay shared: split ones normalize each index by its own samples in training, a
# different function from the official module's (its eval function alone would match).
_NEEDS: dict[str, tuple[bool, bool, str]] = {
    "gan-sabn": (False, True, "SandwichBatchNorm(split_stats=False)"),
    "ccbn": (False, False, "CategoricalConditionalBatchNorm(split_stats=False)"),
    "nas-sabn": (True, True, "SandwichBatchNorm(split_stats=True)"),
    "adv-auxbn": (True, False, "AuxBatchNorm"),
    "adv-saauxbn": (True, True, "SandwichBatchNorm(split_stats=True)"),
}


def _take(sd: dict[str, Any], key: str, shape: tuple[int, ...] | None, what: str) -> Tensor:
    t = sd.pop(key)
    if not isinstance(t, Tensor):
        raise TypeError(f"{_WHERE}: expected a tensor at {key!r}, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(
            f"{_WHERE}: expected {key!r} of shape {shape} for {what}, got {tuple(t.shape)}"
        )
    return t


def _migrate(
    sd: dict[str, Any], p: str, layout: str, name: str, layer: _BatchNormCore
) -> tuple[dict[str, Tensor], bool]:
    """The normkit keys of one layer, taken out of ``sd``; and whether the count was there."""
    what = _describe(name, layer)
    split, shared, family = _NEEDS[layout]
    if layer.split_stats != split or layer.affine != shared or layer.domain_weight is None:
        raise ValueError(
            f"{_WHERE}: expected a {family} layer for the official {layout} keys under "
            f"{p or '<root>'!r}, got {what}"
        )
    k, c = layer.num_domains, layer.num_features
    out: dict[str, Tensor] = {}
    counted = True

    if layout in ("gan-sabn", "ccbn", "nas-sabn", "adv-saauxbn"):
        rows = k + 1 if layout == "adv-saauxbn" else k
        embed = _take(sd, p + "embed.weight", (rows, 2 * c), what)
        out["domain_weight"], out["domain_bias"] = embed[:k, :c], embed[:k, c:]
        if layout == "adv-saauxbn":  # the shared affine is the last row, applied first
            out["weight"], out["bias"] = embed[k, :c], embed[k, c:]

    if layout in ("gan-sabn", "ccbn"):
        for key in ("weight", "bias") if layout == "gan-sabn" else ():
            out[key] = _take(sd, p + "bn." + key, (c,), what)
        for key in _STATS:
            if p + "bn." + key in sd:
                shape = () if key == "num_batches_tracked" else (c,)
                out[key] = _take(sd, p + "bn." + key, shape, what)
        counted = "running_mean" not in out or "num_batches_tracked" in out
        return out, counted

    if layout == "nas-sabn":
        out["weight"] = _take(sd, p + "shared_weight", (c,), what)
        out["bias"] = _take(sd, p + "shared_bias", (c,), what)
        prefix, affine = "bns", False
    else:
        prefix, affine = "bn_list", layout == "adv-auxbn"
    present = [i for i in range(k + 1) if any(f"{p}{prefix}.{i}.{s}" in sd for s in _STATS)]
    if affine:
        present = sorted({*present, *(i for i in range(k + 1) if f"{p}{prefix}.{i}.weight" in sd)})
    if present and present != list(range(k)):
        raise ValueError(
            f"{_WHERE}: expected {k} official batch norms {p}{prefix}.0 ... {p}{prefix}.{k - 1} "
            f"for {what}, got indices {present}"
        )
    if affine:
        out["domain_weight"] = torch.stack(
            [_take(sd, f"{p}{prefix}.{i}.weight", (c,), what) for i in range(k)]
        )
        out["domain_bias"] = torch.stack(
            [_take(sd, f"{p}{prefix}.{i}.bias", (c,), what) for i in range(k)]
        )
    if present and f"{p}{prefix}.0.running_mean" in sd:
        for key in _STATS:
            keys = [f"{p}{prefix}.{i}.{key}" for i in range(k)]
            if key == "num_batches_tracked" and not all(x in sd for x in keys):
                counted = False
                continue
            shape = () if key == "num_batches_tracked" else (c,)
            out[key] = torch.stack([_take(sd, x, shape, what) for x in keys])
    return out, counted


def load_official_sandwich(
    model: nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True
) -> Any:
    """Load a state dict saved by the official Sandwich BN code into a model with normkit layers.

    Build the model with normkit's layers where the official code has its modules, under the
    same attribute names (a generator whose ``b1`` is a :class:`SandwichBatchNorm2d` where the
    official one had its ``SandwichBatchNorm2d``), then load the official checkpoint with this
    function instead of ``model.load_state_dict``. For every conditional layer of ``model``
    (SaBN, CCBN, AuxBN) whose name has official keys under it, those keys are migrated (see the
    module docstring for the layouts; the layout is recognised from the keys); every other key is
    passed through unchanged, so convolutions and the rest of the model load as usual.

    The official modules use ``nn.BatchNorm2d``'s defaults (eps 1e-5, momentum 0.1): build the
    normkit layers with the same.

    Args:
        model: the normkit model; it is also a single conditional layer (then keys such as
            ``bn.weight`` and ``embed.weight`` sit at the top level).
        state_dict: the official state dict (``torch.load(path, weights_only=True)``, or its
            generator's entry). It is not modified.
        strict: as in ``load_state_dict``, after the migration.

    Returns:
        ``load_state_dict``'s result (missing and unexpected keys).

    Raises:
        ValueError: no conditional layer of ``model`` has official keys; a layer of the wrong
            family for its keys (an official CCBN, without a shared affine, into a SaBN; official
            per-index statistics into shared statistics, or shared ones into split statistics,
            an AuxBN included); shapes that do not match the layer
            (``embed.weight`` not ``(num_domains, 2 * num_features)``, or ``(num_domains + 1,
            ...)`` for SaAuxBN; another number of per-index batch norms). The message names the
            layer, what was expected and what was found. Nothing is loaded.

    Example::

        >>> ckpt = torch.load("sngan_sabn_cifar10.pth", weights_only=True)
        >>> normkit.load_official_sandwich(generator, ckpt["gen_state_dict"])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_WHERE}: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{_WHERE}: expected a state dict (a mapping), got {type(state_dict)}")
    sd: dict[str, Any] = OrderedDict(state_dict)
    metadata: dict[str, Any] = OrderedDict(getattr(state_dict, "_metadata", None) or {})
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNormCore) and getattr(type(m), "takes_domain", False)
    ]
    migrated = 0
    for name, layer in layers:
        p = f"{name}." if name else ""
        layout = _layout(sd, p)
        if layout is None:
            continue
        keys, counted = _migrate(sd, p, layout, name, layer)
        sd.update({p + key: value for key, value in keys.items()})
        # A checkpoint without the batch count is a version-1 one: the layer's migration fills
        # the count in (keeping its own, as torch's batch norm does).
        metadata[name] = {**metadata.get(name, {}), "version": 2 if counted else 1}
        migrated += 1
    if not migrated:
        names = ", ".join(repr(n or "<root>") for n, _ in layers) or "none"
        raise ValueError(
            f"{_WHERE}: expected official keys (bn.*, embed.weight, bns.*, shared_weight, "
            f"bn_list.*) under a conditional layer of {type(model).__name__} (conditional "
            f"layers: {names}), got none"
        )
    out: Any = OrderedDict(sd)
    out._metadata = metadata
    return model.load_state_dict(out, strict=strict)
