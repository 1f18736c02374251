"""Model size and cost, as msModelSlim's ``count_parameters`` and a multiply-add counter, and how
lowrank runs a model once on an example input (here and in ``lowrank.latency``)."""

from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once; a lazy module's uninitialised ones,
    whose size is not known yet, are not counted)."""
    return sum(p.numel() for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter))


def call_arguments(example_input) -> tuple[tuple, dict]:
    """``example_input`` as the model's positional and keyword arguments: a tuple is the positional
    ones, a mapping the keyword ones (``model(**inputs)``, e.g. a tokenizer's output for a Hugging Face
    model), anything else the one positional argument (so a model that takes one dict gets ``(batch,)``)."""
    if isinstance(example_input, tuple):
        return example_input, {}
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    return (example_input,), {}


@contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode inside the block; afterwards every module gets its own training flag back
    (not ``.train()``, which would also set the children)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@torch.no_grad()
def count_flops(model: nn.Module, example_input) -> int:
    """Multiply-adds of one forward pass on ``example_input`` (a tensor, a tuple of positional
    arguments or a dict of keyword arguments), counted by PyTorch's FLOP counter: convolutions, matrix
    products and attention. The model runs in eval mode (batch norm accepts a batch of one, running
    statistics stay untouched) and gets its mode back."""
    with evaluating(model), FlopCounterMode(display=False) as counter:
        args, kwargs = call_arguments(example_input)
        model(*args, **kwargs)
    return counter.get_total_flops() // 2
