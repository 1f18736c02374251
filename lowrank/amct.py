"""AMCT's tensor decomposition, reproduced: which Conv2d layers it decomposes, at which rank and in
which of its four modes, the weights, and its decomposition info file.

``lowrank.auto_decomposition(model, path)`` called as AMCT calls it (no policy keywords) runs
``decompose``; ``../shared/peers/SPEC.md`` Part A describes the tool.
"""

import json
import os
import time

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import functional as F
from . import functional_peers as peers
from .arguments import check_info_path
from .eligibility import References, broken_ties, why_not
from .info import Replacement
from .io import atomic_write
from .log import logger
from .methods import METHODS, dense_cost
from .observe import observe
from .plan import build, log_done, swap
from .stats import count_parameters

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
    return peers.amct_mode(out_channels, in_channels, kh, kw)


def plan_layer(name: str, layer: nn.Conv2d) -> Replacement:
    """AMCT's rank, structure and weights for a layer it decomposes (see ``skip_reason``)."""
    layer_mode = mode(layer)
    matrix = peers.amct_matrix(layer.weight, layer_mode)
    rows, cols = matrix.shape
    values = F.evbmf_values(matrix, torch.linalg.svdvals)
    rank, estimate = peers.amct_rank(values, rows, cols, min(layer.weight.shape[:2]))
    if estimate == 0:
        logger.warning("Estimated rank of %r is 0, please check if pretrained weight is correct.", name)
    method = METHODS["spatial"]
    ranks = (rank,)
    specs = method.specs(layer, ranks, vertical_first=peers.amct_vertical_first(layer_mode))
    replacement = Replacement(
        name, method.name, ranks, specs, before=dense_cost(layer), after=method.cost(layer, ranks)
    )
    replacement.weights = list(peers.amct_factors(layer.weight, rank, layer_mode))
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


def decompose(model: nn.Module, info_path, example_input=None) -> tuple[nn.Module, dict[str, list[str]]]:
    """AMCT's ``auto_decomposition``: its layers, ranks, modes and weights, its info file; layers that
    cannot be replaced safely (``eligibility.why_not``, and with ``example_input`` the observed forward
    pass of ``lowrank.observe``) are left alone too, with the reason."""
    if info_path is not None:
        check_info_path(info_path, "decompose_info_path")
    logger.info("auto_decomposition start.")
    start, params_before = time.perf_counter(), count_parameters(model)
    references = References(model)
    convs = {name: layer for name, layer in model.named_modules() if isinstance(layer, nn.Conv2d)}
    reasons = {name: _reason(model, name, layer, references) for name, layer in convs.items()}
    if example_input is not None:
        observed = {name: layer for name, layer in convs.items() if not reasons[name] and not unsupported_dtype(layer)}
        reasons |= observe(model, example_input, observed).keep_dense if observed else {}
    replacements = []
    with logging_redirect_tqdm(loggers=[logger]):
        for name, layer in tqdm(convs.items(), desc="auto_decomposition", unit="layer", disable=None, leave=False):
            logger.info("Processing: %r", name)
            unsupported = unsupported_dtype(layer)
            if unsupported:
                logger.warning("%s of layer %r, ignored.", unsupported, name)
            elif reasons[name]:
                logger.info("Skip: %r: %s", name, reasons[name])
            else:
                replacements.append(plan_layer(name, layer))
    broken = broken_ties(model, replacements, references)
    for name, reason in broken.items():
        logger.info("Skip: %r: %s", name, reason)
    replacements = [replacement for replacement in replacements if replacement.name not in broken]
    if not replacements:
        unsaved = " Decomposition information file is not saved." if info_path is not None else ""
        logger.info("No tensor meets decomposition conditions.%s", unsaved)
    built = build(model, replacements)
    if info_path is not None and replacements:
        write_info(info_path, [info_record(model.get_submodule(r.name), r) for r in replacements])
    model, changes = swap(model, built)
    log_done(changes, params_before, model, start, "auto_decomposition")
    return model, changes


def _reason(model: nn.Module, name: str, layer: nn.Conv2d, references: References) -> str | None:
    """Why a conv of a supported dtype is not decomposed (AMCT's rules, then the safety checks), or None."""
    if unsupported_dtype(layer):
        return None
    lazy = isinstance(layer.weight, nn.parameter.UninitializedParameter)
    # As AMCT, before its skip rules: any conv with an invalid weight stops the call.
    if not lazy and not layer.weight.is_meta and not bool(torch.isfinite(layer.weight).all()):
        raise ValueError(f"weight tensor contains invalid number(inf or nan): layer {name!r}; nothing was decomposed")
    reason = skip_reason(layer) or why_not(model, name, layer, references, amct_rules=True)
    if not reason and layer.weight.is_meta:
        reason = "its weights are on the meta device (load them first)"
    return reason
