"""Which layers can be replaced safely: checks on the model's objects, not on its code.

A Conv2d or Linear is left alone when its replacement would not take over everything the model holds
of it: a module shared under several names, parameters tied to another layer or held outside the
registered ones, hooks, parametrizations, a subclass with its own ``forward``, a configuration that
no longer describes its weight, or an owner that is compiled or fused for quantization as a whole.
What the owner's code does with the layer is not read here: the replacement answers for the dense
layer (``lowrank.modules``), and with an example input one observed forward pass finds the layers
whose weights are used outside their own ``forward`` (``lowrank.observe``).
"""

from collections import defaultdict

import torch
from torch import nn
from torch.ao.nn.intrinsic import _FusedModule
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from .info import Replacement
from .methods import build_module, layer_spec

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What the scan looks at: the layers it can replace (Conv2d, Linear) and those it reports as not supported.
LAYER_TYPES = (_ConvNd, nn.Linear)
# A module's own hooks, which its replacement would not carry.
HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# What every nn.Module keeps in its __dict__ (parameters, submodules, hooks, flags): the rest is the
# model's own.
MODULE_INTERNALS = frozenset(vars(nn.Module()))


class References:
    """The other ways a layer is reached, which its replacement would not take over, by ``id``: every
    name of each module and of each parameter (shared modules and tied parameters have several), and
    what is held outside the registered submodules and parameters (``held_outside``)."""

    def __init__(self, model: nn.Module):
        self.names_of, self.owners = defaultdict(list), defaultdict(list)
        for name, module in model.named_modules(remove_duplicate=False):
            self.names_of[id(module)].append(name)
        for name, param in model.named_parameters(remove_duplicate=False):
            self.owners[id(param)].append(name)
        self.held = held_outside(model)


def held_outside(model: nn.Module) -> dict[int, str]:
    """Modules and tensors (parameters) that a module also holds outside its registered submodules and
    parameters, by ``id``, with where: in a dict, list, tuple or set (``self.heads = {"main": self.fc}``,
    ``self.weights = [self.fc.weight]``) or as a bound method (``self.act = self.fc.forward``). Replacing
    the registered module would leave these on the old one, which the state dict no longer holds."""
    held = {}

    def visit(value, where, depth):
        if isinstance(value, (nn.Module, torch.Tensor)):
            held.setdefault(id(value), where)
        elif isinstance(getattr(value, "__self__", None), nn.Module):
            held.setdefault(id(value.__self__), where)
        elif depth < 3 and isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{where}[{key!r}]", depth + 1)
        elif depth < 3 and isinstance(value, (list, tuple, set, frozenset)):
            for index, item in enumerate(value):
                visit(item, f"{where}[{index}]", depth + 1)

    for owner_name, owner in model.named_modules():
        for attribute, value in vars(owner).items():
            if attribute not in MODULE_INTERNALS:
                visit(value, f"{owner_name}.{attribute}" if owner_name else attribute, 0)
    return held


def scan(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Conv2d and Linear layers that can be replaced, and every other conv/linear layer with the reason
    it cannot."""
    references = References(model)
    candidates, skipped = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, LAYER_TYPES):
            continue
        reason = why_not(model, name, module, references)
        if reason:
            skipped[name] = reason
        else:
            candidates[name] = module
    return candidates, skipped


def why_not(model, name, module, references: References, amct_rules: bool = False) -> str | None:
    """Why ``module`` cannot be replaced safely, or None. ``amct_rules``: as AMCT, tied weights stay tied
    (see ``broken_ties``)."""
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        return f"{type(module).__name__} is not supported (Conv2d and Linear are)"
    return (
        (owner_reason(model, name) if name else None)  # the model itself (name '') has no owners
        or _kind_reason(module)
        or _reference_reason(name, module, references, amct_rules)
        or _state_reason(module)
    )


def _kind_reason(module: nn.Module) -> str | None:
    """What the layer is, as opposed to the plain Conv2d or Linear its replacement is built from."""
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "its weights are not initialised yet (lazy module)"
    if parametrize.is_parametrized(module):
        tensors = list(module.parametrizations)
        verb = "is" if len(tensors) == 1 else "are"
        return f"its {' and '.join(tensors)} {verb} parametrized (torch.nn.utils.parametrize)"
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    computes = ("forward", "_conv_forward") if base is nn.Conv2d else ("forward",)
    if any(getattr(type(module), method) is not getattr(base, method) for method in computes):
        cls, base_name = type(module).__name__, base.__name__
        if cls == base_name:  # torch.ao.nn.qat's fake-quantized layers: named in full
            cls, base_name = f"{type(module).__module__}.{cls}", f"torch.nn.{base_name}"
        return f"{cls} is a subclass of {base_name} with its own forward"
    return None


def _reference_reason(name: str, module: nn.Module, references: References, amct_rules: bool) -> str | None:
    """Another way the model reaches the layer or its parameters, which would keep the old ones."""
    others = [other for other in references.names_of[id(module)] if other != name]
    if others:
        return f"the module is shared with {others[0]!r}"
    if id(module) in references.held:
        where = references.held[id(module)]
        return f"it is also held as {where}, outside the registered submodules, which would keep the old layer"
    for param_name, param in module.named_parameters(recurse=False):
        tied = [owner for owner in references.owners[id(param)] if owner.rpartition(".")[0] != name]
        if tied and not amct_rules:
            return f"its parameters are tied with {tied[0]!r}"
        if id(param) in references.held:
            where = references.held[id(param)]
            return (
                f"its {param_name} is also held as {where}, outside the registered parameters, which would keep "
                "the old one"
            )
    return None


def _state_reason(module: nn.Module) -> str | None:
    """What is set on the layer that its replacement would not carry or describe."""
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} convolution (groups={module.groups})"
    reason = stale_configuration(module)
    if reason:
        return reason
    if any(getattr(module, hooks, None) for hooks in HOOKS):
        return "hooks are registered on it and would be lost"
    if "forward" in vars(module):
        return "its forward is replaced on the instance (e.g. by an accelerate hook) and would be lost"
    if any(param._backward_hooks or param._post_accumulate_grad_hooks for param in module.parameters(recurse=False)):
        return "hooks are registered on its parameters and would be lost"
    if module.weight.dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {module.weight.dtype}"
    return None


def owner_reason(model: nn.Module, name: str) -> str | None:
    """Why the module holding the layer ``name`` keeps it from being replaced, if it does."""
    parent = model.get_submodule(name.rpartition(".")[0])
    if is_compiled(parent):  # the wrapper's forward is bound to the module it was given
        return (
            "it is compiled on its own (torch.compile), whose wrapper would keep calling the old layer: decompose "
            "before compiling"
        )
    if isinstance(parent, _FusedModule):  # e.g. ConvReLU2d, which quantization converts from its [0].weight
        return f"it is part of {type(parent).__name__}, a fused module that quantization converts as a whole"
    return None


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper, which runs its ``_orig_mod`` (told by name: no
    import of torch._dynamo)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(module._modules.get("_orig_mod"), nn.Module)


def stale_configuration(module: nn.Module) -> str | None:
    """How the configuration of a Conv2d or Linear, which its replacement is built from, fails to
    describe what it computes: settings changed after construction (by a pruning tool, or by code that
    turns strides into dilations) in a form its constructor never gives, or that its forward reads from
    elsewhere (the weight's shape, the padding of a non-zero ``padding_mode``, computed when it was built)."""
    if isinstance(module, nn.Conv2d):
        for name in ("kernel_size", "stride", "dilation", *(() if isinstance(module.padding, str) else ("padding",))):
            value = getattr(module, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                return f"its {name} {value!r} is not a pair, as Conv2d makes it: set it as one"
        expected = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    else:
        expected = (module.out_features, module.in_features)
    for tensor_name, tensor, shape in (("weight", module.weight, expected), ("bias", module.bias, expected[:1])):
        if tensor is not None and tuple(tensor.shape) != shape:
            return f"its {tensor_name} has shape {tuple(tensor.shape)} where its configuration says {shape}"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        padded = tuple(module._reversed_padding_repeated_twice)
        if padded != tuple(build_module(layer_spec(module), device="meta")._reversed_padding_repeated_twice):
            return (
                f"its padding, kernel, stride or dilation changed after construction: padding_mode="
                f"{module.padding_mode!r} still pads by {padded}, as computed when it was built"
            )
    return None


def broken_ties(model: nn.Module, replacements: list[Replacement], references: References) -> dict[str, str]:
    """The replacements whose weight or bias is tied to a layer that is not replaced with the same
    structure (the tie could not be kept), by name, with the reason."""
    planned = {replacement.name: replacement for replacement in replacements}
    broken = {}
    for replacement in replacements:
        layer = model.get_submodule(replacement.name)
        for param in (layer.weight, layer.bias):
            others = [owner.rpartition(".")[0] for owner in references.owners[id(param)]] if param is not None else []
            other = next((o for o in others if o not in planned or planned[o].specs != replacement.specs), None)
            if other is not None:
                broken[replacement.name] = f"its parameters are tied with {other!r}, which is not decomposed alike"
    return broken
