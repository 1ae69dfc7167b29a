"""Reference models: CIFAR- and ImageNet-style ResNets taking any ``norm_layer``, and their Fixup
(normalization-free) form."""

from __future__ import annotations

from normkit.models.resnet import (
    BasicBlock,
    Bottleneck,
    CifarResNet,
    FixupBasicBlock,
    FixupBottleneck,
    ImageNetResNet,
    NormLayer,
    ZeroPadShortcut,
    cifar_resnet,
    imagenet_resnet,
    resnet18,
    resnet20,
    resnet32,
    resnet34,
    resnet44,
    resnet50,
    resnet56,
    resnet110,
)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "FixupBasicBlock",
    "FixupBottleneck",
    "ImageNetResNet",
    "NormLayer",
    "ZeroPadShortcut",
    "cifar_resnet",
    "imagenet_resnet",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet50",
    "resnet56",
    "resnet110",
]
