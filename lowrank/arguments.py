"""Checks of the public API's arguments, each raising an error that names the argument, before any work."""

import os

import torch
from torch import nn

from .eligibility import is_compiled
from .io import unwritable
from .policy import RankPolicy

CONV_METHODS = ("spatial", "tucker2", "svd")
# Wrappers that hold on to their module's parameters to synchronise or shard them (DDP, FSDP 1 and 2,
# DeepSpeed): the parameters of replacements made under them would be left out.
DISTRIBUTED_WRAPPERS = ("DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine")


def check_model(model) -> nn.Module:
    """Raises TypeError for a model that cannot be decomposed; returns the module to decompose: the
    model, or the one its ``torch.compile`` wrapper (``OptimizedModule``) runs, whose layers keep their
    own names (not ``_orig_mod.<name>``) so that an info file replays on the model compiled or not.
    Dynamo recompiles the wrapper when the layers change."""
    if isinstance(model, torch.jit.ScriptModule):  # its forward is compiled code that calls the old layers
        raise TypeError("a TorchScript module cannot be decomposed: decompose the Python model, then script it")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        wrapper = next((cls.__name__ for cls in type(module).__mro__ if cls.__name__ in DISTRIBUTED_WRAPPERS), None)
        if wrapper:
            where = f" (at {name!r})" if name else ""
            raise TypeError(
                f"the model is wrapped in {wrapper}{where}, which would keep synchronising or sharding the old "
                "layers' parameters and not the new ones: decompose the unwrapped model (model.module), then wrap "
                "it (with Accelerate: before accelerator.prepare)"
            )
    return uncompiled(model)


def uncompiled(model: nn.Module) -> nn.Module:
    """The module that ``model``'s ``torch.compile`` wrappers run, or ``model``."""
    while is_compiled(model):
        model = model._orig_mod
    return model


def returned(model: nn.Module, layers: nn.Module, decomposed: nn.Module) -> nn.Module:
    """What the API returns: ``model`` as given (its ``torch.compile`` wrapper included), whose ``layers``
    were decomposed in place, or the new module when the model itself was the layer (``plan.swap``)."""
    return model if decomposed is layers else decomposed


def check_method(method: str) -> str:
    if method not in CONV_METHODS:
        raise ValueError(f"unknown method {method!r} for k x k convolutions; valid methods: {', '.join(CONV_METHODS)}")
    return method


def check_path(path, argument: str) -> None:
    """Raises TypeError naming ``argument`` when ``path`` is not a path (pathlib's own error names neither)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a path (str or os.PathLike), got {path!r}")


def check_info_path(path, argument: str) -> None:
    """Raises ValueError naming ``argument`` when the info file ``path`` cannot be written: before any work."""
    check_path(path, argument)
    problem = unwritable(path)
    if problem:
        raise ValueError(f"{argument}: {problem}")


def make_policy(options: dict, valid_extra: tuple[str, ...] = ("method",)) -> RankPolicy:
    """RankPolicy(**options), an unknown option named with the valid ones (and ``valid_extra``, the
    caller's own keywords)."""
    valid = [name for name in RankPolicy.__dataclass_fields__ if name != "default"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown policy option(s) {', '.join(unknown)}; valid options: {', '.join([*valid_extra, *valid])}"
        )
    return RankPolicy(**options)
