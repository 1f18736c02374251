"""Model size and cost, as msModelSlim's ``count_parameters`` and a multiply-add counter."""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once; a lazy module's uninitialised ones,
    whose size is not known yet, are not counted)."""
    return sum(p.numel() for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter))


@torch.no_grad()
def count_flops(model: nn.Module, example_input) -> int:
    """Multiply-adds of one forward pass on ``example_input`` (a tensor, or a tuple of positional
    arguments), counted by PyTorch's FLOP counter: convolutions, matrix products and attention. The
    model runs in eval mode (batch norm accepts a batch of one, running statistics stay untouched)
    and gets its mode back."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(*args)
    finally:
        for module, training in modes.items():
            module.training = training
    return counter.get_total_flops() // 2
