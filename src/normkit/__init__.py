"""normkit: faithful, fast drop-in normalization layers for PyTorch.

The layers of four papers (Sandwich Batch Normalization; Weight Standardization and
Batch-Channel Normalization; Revisiting Batch Normalization; Fixup initialization), usable in any
PyTorch model.
"""

from __future__ import annotations

from normkit import functional, models
from normkit.agc import adaptive_grad_clip_
from normkit.checkpoints import load_official_sandwich
from normkit.conditioning import condition, conditional_layers
from normkit.convert import (
    ConversionReport,
    NormChange,
    convert_norm,
    freeze_norm,
    unfreeze_norm,
)
from normkit.distributed import convert_sync, revert_sync
from normkit.fixup import (
    Bias,
    FixupBlock,
    Scale,
    fixup_init_,
    fixup_param_groups,
    fixup_scale,
    he_normal_fan_out_,
)
from normkit.inference import InferenceReport, prepare_for_inference
from normkit.layers.batch_channel import (
    BatchChannelNorm1d,
    BatchChannelNorm2d,
    BatchChannelNorm3d,
)
from normkit.layers.batch_group import BatchGroupNorm2d
from normkit.layers.bnet import BNET2d
from normkit.layers.core import SyncBatchNorm
from normkit.layers.evonorm import EvoNormB0, EvoNormS0
from normkit.layers.frozen import FrozenBatchNorm2d
from normkit.layers.group_norm import GroupNorm
from normkit.layers.iternorm import IterNorm1d, IterNorm2d
from normkit.layers.mabn import CenConv2d, MovingAverageBatchNorm2d
from normkit.layers.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from normkit.layers.residual import ResidualGate
from normkit.layers.response import TLU, FilterResponseNorm2d
from normkit.layers.revisited import (
    RELU_STD,
    InputNorm1d,
    InputNorm2d,
    bn_param_groups,
    init_bn_scale_,
)
from normkit.layers.sandwich import (
    AuxBatchNorm1d,
    AuxBatchNorm2d,
    AuxBatchNorm3d,
    CategoricalConditionalBatchNorm1d,
    CategoricalConditionalBatchNorm2d,
    CategoricalConditionalBatchNorm3d,
    SandwichAdaIN,
    SandwichBatchNorm1d,
    SandwichBatchNorm2d,
    SandwichBatchNorm3d,
)
from normkit.layers.weight_std import (
    WS_PRESETS,
    ScaledWSConv2d,
    WSConv1d,
    WSConv2d,
    WSConv3d,
    WSLinear,
    weight_standardize_,
)
from normkit.registry import (
    create_norm,
    get_norm_layer,
    list_norms,
    register_norm,
)

__version__ = "0.1.0"

__all__ = [
    "RELU_STD",
    "TLU",
    "WS_PRESETS",
    "AuxBatchNorm1d",
    "AuxBatchNorm2d",
    "AuxBatchNorm3d",
    "BNET2d",
    "BatchChannelNorm1d",
    "BatchChannelNorm2d",
    "BatchChannelNorm3d",
    "BatchGroupNorm2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "Bias",
    "CategoricalConditionalBatchNorm1d",
    "CategoricalConditionalBatchNorm2d",
    "CategoricalConditionalBatchNorm3d",
    "CenConv2d",
    "ConversionReport",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm2d",
    "FixupBlock",
    "FrozenBatchNorm2d",
    "GroupNorm",
    "InferenceReport",
    "InputNorm1d",
    "InputNorm2d",
    "IterNorm1d",
    "IterNorm2d",
    "MovingAverageBatchNorm2d",
    "NormChange",
    "ResidualGate",
    "SandwichAdaIN",
    "SandwichBatchNorm1d",
    "SandwichBatchNorm2d",
    "SandwichBatchNorm3d",
    "Scale",
    "ScaledWSConv2d",
    "SyncBatchNorm",
    "WSConv1d",
    "WSConv2d",
    "WSConv3d",
    "WSLinear",
    "__version__",
    "adaptive_grad_clip_",
    "bn_param_groups",
    "condition",
    "conditional_layers",
    "convert_norm",
    "convert_sync",
    "create_norm",
    "fixup_init_",
    "fixup_param_groups",
    "fixup_scale",
    "freeze_norm",
    "functional",
    "get_norm_layer",
    "he_normal_fan_out_",
    "init_bn_scale_",
    "list_norms",
    "load_official_sandwich",
    "models",
    "prepare_for_inference",
    "register_norm",
    "revert_sync",
    "unfreeze_norm",
    "weight_standardize_",
]
