"""AMCT's tensor decomposition, reproduced: which Conv2d layers it decomposes, at which rank and in
which of its four modes, the weights, and its decomposition info file.

``lowrank.auto_decomposition(model, path)`` called as AMCT calls it (no policy keywords) uses these;
``../shared/peers/SPEC.md`` Part A describes the tool.
"""

import json
import os

import torch
from torch import nn

from . import functional as F
from .info import Replacement
from .io import atomic_write
from .log import logger
from .methods import METHODS, dense_cost

SUPPORTED_DTYPES = (torch.float16, torch.float32, torch.float64)


def skip_reason(layer: nn.Conv2d) -> str | None:
    """Why AMCT leaves a Conv2d alone (dilated, grouped, a kernel side below 3, a stride above 2, too
    few channels for its kernel), or None."""
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return "its weights are not initialised yet (lazy module)"
    out_channels, in_per_group, kh, kw = layer.weight.shape
    min_channels = min(in_per_group * layer.groups, out_channels)
    min_kernel = min(kh, kw)
    if max(layer.dilation) > 1:
        return f"dilated convolution (dilation={tuple(layer.dilation)})"
    if layer.groups > 1:
        return f"grouped convolution (groups={layer.groups})"
    if min_kernel < 3:
        return f"kernel {kh}x{kw} has a side below 3"
    if max(layer.stride) > 2:
        return f"stride {tuple(layer.stride)} above 2"
    if min_kernel * min_channels < 16 or (min_kernel < 7 and min_channels < 64):
        return f"{min_channels} channels on its smaller side are too few for a {kh}x{kw} kernel"
    return None


def unsupported_dtype(layer: nn.Conv2d) -> str | None:
    if layer.weight.dtype not in SUPPORTED_DTYPES:
        return f"Unsupported data type {layer.weight.dtype}"
    return None


def mode(layer: nn.Conv2d) -> str:
    out_channels, in_channels, kh, kw = layer.weight.shape
    return F.amct_mode(out_channels, in_channels, kh, kw)


def plan_layer(name: str, layer: nn.Conv2d) -> Replacement:
    """AMCT's rank, structure and weights for a layer it decomposes (see ``skip_reason``)."""
    layer_mode = mode(layer)
    matrix = F.amct_matrix(layer.weight, layer_mode)
    rows, cols = matrix.shape
    values = F.evbmf_values(matrix, torch.linalg.svdvals)
    rank, estimate = F.amct_rank(values, rows, cols, min(layer.weight.shape[:2]))
    if estimate == 0:
        logger.warning("Estimated rank of %r is 0, please check if pretrained weight is correct.", name)
    method = METHODS["spatial"]
    ranks = (rank,)
    specs = method.specs(layer, ranks, vertical_first=F.amct_vertical_first(layer_mode))
    replacement = Replacement(
        name, method.name, ranks, specs, before=dense_cost(layer), after=method.cost(layer, ranks)
    )
    replacement.weights = list(F.amct_factors(layer.weight, rank, layer_mode))
    return replacement


def info_record(layer: nn.Conv2d, replacement: Replacement) -> dict:
    """A layer's record in AMCT's info file, which AMCT's ``decompose_network`` reads."""
    first, last = (list(weight.shape) for weight in replacement.weights)
    return {
        "ori_layer_info": {
            "name": replacement.name,
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": list(layer.kernel_size),
            "stride": list(layer.stride),
            "dilation": list(layer.dilation),
            "groups": layer.groups,
        },
        "mode": mode(layer),
        "decom_nodes": {"first": {"weight_shape": first}, "last": {"weight_shape": last}},
    }


def write_info(path, records: list[dict]) -> None:
    """AMCT's info file: a JSON list of records, indented with a tab, written atomically."""
    if os.path.exists(path):
        logger.warning("File %s already exists and will be overwritten.", os.path.realpath(path))
    atomic_write(path, lambda file: json.dump(records, file, indent="\t"), binary=False)
    logger.info("Decomposition information file is saved to: %s", os.path.realpath(path))
