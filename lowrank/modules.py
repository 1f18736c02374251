"""The modules a decomposed layer becomes: an ``nn.Sequential`` of standard layers (so the state_dict
keys stay ``name.0.weight``, ``name.1.weight``, ...) that still answers what its owner asks of the dense
layer. It carries the layer's configuration (``in_channels``, ``kernel_size``, ``padding``...) as
read-only attributes, and exposes ``weight`` (and ``bias``) as the dense equivalent of its factors,
computed on access: code that reads ``self.conv.weight`` (fusing, attention, dtype checks) keeps working,
though only the factors run in ``forward``, which exports as plain convolutions and linear layers.
Changing that computed weight in place, which would change a copy and leave the factors as they were,
raises instead.
"""

import torch
from torch import nn

from .methods import build_module

CONV2D_CONFIG = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
    "output_padding",
    "transposed",
)
LINEAR_CONFIG = ("in_features", "out_features")
EMBEDDING_CONFIG = (
    "num_embeddings",
    "embedding_dim",
    "padding_idx",
    "max_norm",
    "norm_type",
    "scale_grad_by_freq",
    "sparse",
)


# In-place operators of torch.Tensor (methods ending in "_" are the others).
IN_PLACE_OPERATORS = frozenset(
    f"__i{name}__"
    for name in (
        "add",
        "sub",
        "mul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "matmul",
        "and",
        "or",
        "xor",
        "lshift",
        "rshift",
    )
) | {"__setitem__", "__set__"}  # __set__: assigning .data, .requires_grad or .grad


class ComputedWeight(torch.Tensor):
    """A replacement's ``weight``: the dense equivalent of its factors, computed on access. It is read as
    any tensor (results are plain tensors, gradients reach the factors); changing it in place raises,
    since that would change only this copy. ``.data`` and ``detach()`` keep the protection."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        in_place = (name.endswith("_") and not name.endswith("__")) or name in IN_PLACE_OPERATORS
        if (in_place and args and isinstance(args[0], cls)) or isinstance(kwargs.get("out"), cls):
            raise RuntimeError(
                f"{name}: a decomposed layer's weight is computed from its factors on each access, so changing it "
                "would change only this copy; change the factors (the weights of the replacement's modules) instead"
            )
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if name == "detach" or (name == "__get__" and func.__self__.__name__ == "data"):
            return result.as_subclass(cls)
        return result


class Factorized(nn.Sequential):
    """Base of the replacements: the factors in data-flow order, and the dense layer's configuration
    (the names of ``CONFIG`` read from ``layer``), read-only."""

    method = ""
    CONFIG: tuple[str, ...] = ()

    def __init__(self, *modules: nn.Module, layer: nn.Module | None = None):
        super().__init__(*modules)
        # Kept outside nn.Module's attribute handling; a slice of a Sequential (``new[-1:]``) has none.
        config = {name: getattr(layer, name) for name in self.CONFIG} if layer is not None else {}
        self.__dict__["_config"] = config

    def __getattr__(self, name: str):
        config = self.__dict__.get("_config", {})
        if name in config:
            return config[name]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        config = self.__dict__.get("_config", {})
        # Setting the value it has changes nothing (code that sets a layer's padding on every call).
        if name in config and not (type(value) is type(config[name]) and value == config[name]):
            raise AttributeError(
                f"{type(self).__name__}.{name} is read-only: it describes the dense layer these factors replace "
                f"({name}={self._config[name]!r}), and setting it would not change them; decompose the layer "
                "again with the new setting instead"
            )
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if name in self.__dict__.get("_config", {}):
            raise AttributeError(f"{type(self).__name__}.{name} is read-only and cannot be deleted")
        super().__delattr__(name)


class FactorizedLinear(Factorized):
    """Linear layers whose product is the dense layer's: ``weight`` = last.weight @ ... @ first.weight."""

    CONFIG = LINEAR_CONFIG

    @property
    def weight(self) -> torch.Tensor:
        weight = self[0].weight
        for module in list(self)[1:]:
            weight = module.weight @ weight
        return weight.as_subclass(ComputedWeight)

    @property
    def bias(self) -> torch.Tensor | None:
        return self[-1].bias


class FactorizedConv2d(Factorized):
    """Convolutions whose composition is the dense layer's: along each spatial axis at most one of them
    has a kernel, stride, padding or dilation other than the identity's (the structures of every method
    here), so the composed kernel is each factor's taps laid side by side, contracted over channels."""

    CONFIG = CONV2D_CONFIG

    @property
    def weight(self) -> torch.Tensor:
        kernel = self[0].weight
        for conv in list(self)[1:]:
            out_ch, _, kh, kw = conv.weight.shape
            in_ch, ph, pw = kernel.shape[1], kernel.shape[2], kernel.shape[3]
            # One of kh and ph (and of kw and pw) is 1: the taps multiply out without overlapping.
            kernel = torch.einsum("omby,mipq->oibpyq", conv.weight, kernel).reshape(out_ch, in_ch, kh * ph, kw * pw)
        return kernel.as_subclass(ComputedWeight)

    @property
    def bias(self) -> torch.Tensor | None:
        return self[-1].bias


class SVDLinear(FactorizedLinear):
    """``Linear(in, out)`` as ``Linear(in, r)`` then ``Linear(r, out)``."""

    method = "svd"


class SVDConv2d(FactorizedConv2d):
    """A conv as its kernel to r channels, then a 1x1 conv."""

    method = "svd"


class SpatialConv2d(FactorizedConv2d):
    """A kh x kw conv as a kh x 1 and a 1 x kw conv (either order): AMCT's structure."""

    method = "spatial"


class Tucker2Conv2d(FactorizedConv2d):
    """A conv as 1x1 (in -> r_in), the layer's kernel (r_in -> r_out), 1x1 (r_out -> out): msModelSlim's
    structure (1x1 convs too)."""

    method = "tucker2"


class SVDEmbedding(Factorized):
    """``Embedding(num, dim)`` as ``Embedding(num, r)`` then ``Linear(r, dim)``: msModelSlim's structure;
    ``weight`` is the (num, dim) table."""

    method = "svd"
    CONFIG = EMBEDDING_CONFIG

    @property
    def weight(self) -> torch.Tensor:
        return (self[0].weight @ self[1].weight.T).as_subclass(ComputedWeight)


def replacement_class(layer: nn.Module, method: str) -> type[Factorized]:
    """The class of ``layer``'s replacement by ``method`` (svd, spatial or tucker2)."""
    if isinstance(layer, nn.Embedding):
        return SVDEmbedding
    if isinstance(layer, nn.Linear):
        return SVDLinear
    return {"svd": SVDConv2d, "spatial": SpatialConv2d, "tucker2": Tucker2Conv2d}[method]


def build_replacement(layer: nn.Module, specs: list[dict], method: str, initialise: bool = True) -> Factorized:
    """The replacement (``replacement_class``) of ``specs`` on ``layer``'s device and dtype, in
    its memory format, training mode and requires_grad: default-initialised, or uninitialised for
    weights copied in next (which saves the work and leaves the caller's random state alone)."""
    weight = layer.weight
    device = weight.device if initialise else "meta"
    modules = (build_module(spec, device=device, dtype=weight.dtype) for spec in specs)
    new = replacement_class(layer, method)(*modules, layer=layer)
    if not initialise:
        new.to_empty(device=weight.device)
    if (
        weight.dim() == 4
        and not weight.is_meta
        and weight.is_contiguous(memory_format=torch.channels_last)
        and not weight.is_contiguous()
    ):
        new.to(memory_format=torch.channels_last)
    for module in new:
        module.weight.requires_grad_(weight.requires_grad)
    if getattr(layer, "bias", None) is not None:  # on the last module, as frozen or trainable as it was (BitFit)
        new[-1].bias.requires_grad_(layer.bias.requires_grad)
    for name, value in _own_attributes(layer).items():
        setattr(new, name, value)
    return new.train(layer.training)


# What every layer of these types keeps in its __dict__ besides its configuration.
STANDARD_ATTRIBUTES = frozenset(vars(nn.Module())) | {"_reversed_padding_repeated_twice"}


def _own_attributes(layer: nn.Module) -> dict:
    """The plain attributes set on ``layer`` beyond its type's own (a flag such as Hugging Face's
    ``_is_hf_initialized``), which its replacement carries too, so that code reading them keeps working."""
    config = replacement_class(layer, "svd").CONFIG
    return {
        name: value
        for name, value in vars(layer).items()
        if name not in STANDARD_ATTRIBUTES and name not in config and not isinstance(value, nn.Module)
    }


@torch.no_grad()
def fill(layer: nn.Module, new: nn.Sequential, weights: list[torch.Tensor], bias: torch.Tensor | None = None):
    """``new`` with ``weights`` copied in (cast to its dtype) and on its last module ``bias``, or without
    one ``layer``'s bias; as it is when there are no weights."""
    if weights:  # every parameter of the uninitialised modules is filled in
        for module, value in zip(new, weights, strict=True):
            module.weight.copy_(value)
        if getattr(layer, "bias", None) is not None:  # the only bias, on the last module
            new[-1].bias.copy_(layer.bias if bias is None else bias)
    return new
