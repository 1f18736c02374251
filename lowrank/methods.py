"""Decomposition methods: how one dense layer becomes an ``nn.Sequential`` of smaller standard layers.

A method knows, for a layer it supports: the largest meaningful ranks, the cost of the replacement
at given ranks, the constructor arguments of the new modules (the structure, which an info file
replays without weights), the spectra its rank policies read, and the new weights.

Ranks are tuples in data-flow order: ``(r,)`` for ``svd`` and ``spatial``, ``(in_rank, out_rank)``
for ``tucker2``.

Data-aware decomposition (``lowrank.calibration``) fits the new weights to the output error on
calibration inputs instead of the weight error. Each method names the rows whose uncentred second
moment it needs from a layer's call (``calibration_rows``): ``svd`` the layer's outputs without the
bias, or the inputs of a Linear or 1x1 conv with fewer inputs than outputs, which give the exact
optimum; ``spatial`` its first factor's input windows; ``tucker2`` the input channels (both taking a
kernel's window positions as uncorrelated). Every fit adds ``functional.DAMPING`` to the input moment.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import nn

from . import functional as F

# What the replacements are built from (Embedding: msModelSlim's embedding factor).
MODULE_TYPES = {"Conv2d": nn.Conv2d, "Linear": nn.Linear, "Embedding": nn.Embedding}


@dataclass(frozen=True)
class Cost:
    """Parameters (weights only; the bias is the same before and after) and multiply-adds per output
    position (per output pixel for a convolution, per output row for a linear layer). Image borders
    are ignored, so a strided spatial decomposition is costed as on a large image."""

    params: int
    macs: int

    def cheaper_than(self, other: "Cost") -> bool:
        """Fewer parameters and fewer multiply-adds: what a replacement must have."""
        return self.params < other.params and self.macs < other.macs


def layer_args(layer: nn.Module) -> dict:
    """Constructor arguments of a ``Conv2d`` or ``Linear``, JSON-ready."""
    if isinstance(layer, nn.Linear):
        return {"in_features": layer.in_features, "out_features": layer.out_features, "bias": layer.bias is not None}
    return {
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels,
        "kernel_size": list(layer.kernel_size),
        "stride": list(layer.stride),
        "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding),
        "dilation": list(layer.dilation),
        "groups": layer.groups,
        "bias": layer.bias is not None,
        "padding_mode": layer.padding_mode,
    }


def build_module(spec: dict, device=None, dtype=None) -> nn.Module:
    """A new ``Conv2d``/``Linear`` from ``{"type": ..., "args": {...}}``, default-initialised."""
    return MODULE_TYPES[spec["type"]](**spec["args"], device=device, dtype=dtype)


def conv_spec(
    in_ch, out_ch, kernel, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), bias=False, padding_mode="zeros"
):
    args = {
        "in_channels": in_ch,
        "out_channels": out_ch,
        "kernel_size": list(kernel),
        "stride": list(stride),
        "padding": padding if isinstance(padding, str) else list(padding),
        "dilation": list(dilation),
        "groups": 1,
        "bias": bias,
        "padding_mode": padding_mode,
    }
    return {"type": "Conv2d", "args": args}


def linear_spec(in_features, out_features, bias):
    return {"type": "Linear", "args": {"in_features": in_features, "out_features": out_features, "bias": bias}}


def _weight_size(spec: dict) -> int:
    args = spec["args"]
    if spec["type"] == "Linear":
        return args["in_features"] * args["out_features"]
    return args["out_channels"] * args["in_channels"] // args["groups"] * math.prod(args["kernel_size"])


def specs_cost(specs: list[dict]) -> Cost:
    """Cost of a chain of modules. A module runs once per position of its own output, and each
    later strided conv keeps one position in ``stride_h * stride_w``: so each module's weight size is
    scaled by the product of the strides after it."""
    params = macs = 0
    positions = 1
    for spec in reversed(specs):
        size = _weight_size(spec)
        params += size
        macs += size * positions
        if spec["type"] == "Conv2d":
            positions *= math.prod(spec["args"]["stride"])
    return Cost(params, macs)


def _conv_output_size(size: int, kernel: int, stride: int, padding, dilation: int) -> int:
    """A conv's output length along one axis (``padding`` an int, or ``"valid"``/``"same"``)."""
    if padding == "same":
        return size
    padding = 0 if padding == "valid" else padding
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def chain_macs(specs: list[dict], shape: tuple[int, ...]) -> int:
    """Multiply-adds of a chain of modules on an input of ``shape`` (the batch included), borders and
    all, as PyTorch's FLOP counter (``count_flops``) counts them."""
    total = 0
    for spec in specs:
        args = spec["args"]
        if spec["type"] == "Linear":
            total += math.prod(shape[:-1]) * args["in_features"] * args["out_features"]
            shape = (*shape[:-1], args["out_features"])
            continue
        padding = args["padding"] if isinstance(args["padding"], str) else None
        size = [
            _conv_output_size(
                shape[-2 + axis],
                args["kernel_size"][axis],
                args["stride"][axis],
                padding or args["padding"][axis],
                args["dilation"][axis],
            )
            for axis in (0, 1)
        ]
        shape = (*shape[:-3], args["out_channels"], *size)
        total += math.prod(shape) * _weight_size(spec) // args["out_channels"]
    return total


def layer_spec(layer: nn.Module) -> dict:
    """The spec of a plain ``Conv2d`` or ``Linear`` configured as ``layer`` (a subclass's too)."""
    kind = "Linear" if isinstance(layer, nn.Linear) else "Conv2d"
    return {"type": kind, "args": layer_args(layer)}


def dense_cost(layer: nn.Module) -> Cost:
    return specs_cost([layer_spec(layer)])


def output_shape_changes(layer: nn.Module, specs: list[dict]) -> str | None:
    """Runs the dense layer and the replacement on the meta device (no memory, no compute) and says
    how their output shapes differ, or returns None when they agree."""
    if isinstance(layer, nn.Linear):
        sample = torch.empty(2, layer.in_features, device="meta")
    else:
        size = [d * (k - 1) + 3 * s + 2 for k, s, d in zip(layer.kernel_size, layer.stride, layer.dilation)]
        sample = torch.empty(1, layer.in_channels, *size, device="meta")
    dense = build_module(layer_spec(layer), device="meta")
    replacement = nn.Sequential(*(build_module(spec, device="meta") for spec in specs))
    try:
        expected, got = dense(sample).shape, replacement(sample).shape
    except RuntimeError as error:
        return f"the replacement does not run on the layer's input: {error}"
    return None if expected == got else f"output shape {tuple(got)} instead of {tuple(expected)}"


class Method:
    """Base class; see the module docstring."""

    name = ""
    rank_names: tuple[str, ...] = ("rank",)

    def unsupported(self, layer: nn.Module) -> str | None:
        return None

    def full_ranks(self, layer: nn.Module) -> tuple[int, ...]:
        raise NotImplementedError

    def cost(self, layer: nn.Module, ranks: tuple[int, ...]) -> Cost:
        return specs_cost(self.specs(layer, ranks))

    def specs(self, layer: nn.Module, ranks: tuple[int, ...]) -> list[dict]:
        raise NotImplementedError

    def spectra(
        self, layer: nn.Module, moment: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Per rank: all singular values of the matrix that rank truncates, and that matrix's shape; with
        the layer's calibration ``moment``, of that matrix weighted by the data, whose truncated squares
        are the output error."""
        return [(F.singular_values(matrix), tuple(matrix.shape)) for matrix in self._matrices(layer, moment)]

    def _matrices(self, layer: nn.Module, moment: torch.Tensor | None = None) -> list[torch.Tensor]:
        raise NotImplementedError

    def calibration_rows(self, layer: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """From one call of ``layer``: the rows (n, d) whose second moment the data-aware weights need."""
        raise NotImplementedError

    def fits_outputs(self, layer: nn.Module) -> bool:
        """Whether ``calibration_rows`` are the layer's outputs (else they come from its inputs alone)."""
        return False

    def weights(
        self, layer: nn.Module, ranks: tuple[int, ...], moment: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The new modules' weights, in order, float64; fitted to the calibration data when given the
        second ``moment`` of the layer's ``calibration_rows``."""
        raise NotImplementedError


def _channels_last_rows(tensor: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """A tensor's values as rows of its ``channel_axis``: (positions, channels)."""
    return tensor.movedim(channel_axis, -1).reshape(-1, tensor.shape[channel_axis])


def _patch_rows(layer: nn.Conv2d, inputs: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """The windows of ``inputs`` that a conv reads with ``layer``'s kernel, stride, padding and dilation
    along ``axes`` (0: height, 1: width) and none along the others, as rows (channels x window),
    channels first as a kernel flattens. Padded as the conv pads: its padding mode, and "same"'s larger
    half after the input for an even kernel."""

    def along(values, fill):
        return tuple(values[axis] if axis in axes else fill for axis in (0, 1))

    # F.pad's order, as the conv keeps it: width's two sides, then height's
    sides = list(layer._reversed_padding_repeated_twice)
    for axis, first in ((1, 0), (0, 2)):
        if axis not in axes:
            sides[first : first + 2] = (0, 0)
    batched = inputs if inputs.dim() == 4 else inputs.unsqueeze(0)
    if any(sides):
        batched = TF.pad(batched, sides, mode="constant" if layer.padding_mode == "zeros" else layer.padding_mode)
    patches = TF.unfold(
        batched, along(layer.kernel_size, 1), dilation=along(layer.dilation, 1), stride=along(layer.stride, 1)
    )
    return _channels_last_rows(patches, 1)


def kernel_rows(layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The input values that a Linear layer's or a conv's kernel reads, as rows (``_patch_rows``)."""
    return inputs.reshape(-1, layer.in_features) if isinstance(layer, nn.Linear) else _patch_rows(layer, inputs, (0, 1))


class SVD(Method):
    """``Linear`` -> Linear(in, r) -> Linear(r, out); ``Conv2d`` -> the layer's kernel to r channels, then
    a 1x1 conv (stride, padding and dilation stay on the first)."""

    name = "svd"

    @staticmethod
    def fits_inputs(layer) -> bool:
        """Whether the data-aware weights read the inputs' second moment (a Linear or 1x1 conv with fewer
        inputs than outputs) rather than the outputs': the smaller of the two, and a k x k conv's
        outputs, which are fewer than its input windows' values."""
        weight = layer.weight
        return weight[0].numel() < weight.shape[0] and (isinstance(layer, nn.Linear) or weight[0, 0].numel() == 1)

    def _matrices(self, layer, moment=None):
        matrix = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        if moment is None:
            return [matrix]
        if self.fits_inputs(layer):  # W L, L Lᵀ the dampened input moment
            return [matrix.double() @ F.square_root(F.dampened(moment))]
        return [F.square_root(F.dampened_output(moment, matrix))]  # its Gram matrix is W L Lᵀ Wᵀ

    def fits_outputs(self, layer):
        return not self.fits_inputs(layer)

    def calibration_rows(self, layer, inputs, output):
        if self.fits_inputs(layer):
            return kernel_rows(layer, inputs)
        bias = layer.bias
        if bias is not None:
            output = output - (bias if isinstance(layer, nn.Linear) else bias[:, None, None])
        return _channels_last_rows(output, -1 if isinstance(layer, nn.Linear) else -3)

    def full_ranks(self, layer):
        return (min(layer.weight.shape[0], layer.weight[0].numel()),)

    def specs(self, layer, ranks):
        (rank,) = ranks
        if isinstance(layer, nn.Linear):
            return [
                linear_spec(layer.in_features, rank, False),
                linear_spec(rank, layer.out_features, layer.bias is not None),
            ]
        first = conv_spec(
            layer.in_channels,
            rank,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            padding_mode=layer.padding_mode,
        )
        last = conv_spec(rank, layer.out_channels, (1, 1), bias=layer.bias is not None)
        return [first, last]

    def weights(self, layer, ranks, moment=None):
        (rank,) = ranks
        matrix = self._matrices(layer)[0]
        if moment is None:
            left, right = F.low_rank_factors(matrix, rank)
        elif self.fits_inputs(layer):
            left, right = F.weighted_factors(matrix, rank, input_moment=F.dampened(moment))
        else:
            left, right = F.weighted_factors(matrix, rank, output_moment=F.dampened_output(moment, matrix))
        shape = layer.weight.shape
        if isinstance(layer, nn.Linear):
            return [right, left]
        return [right.reshape(rank, *shape[1:]), left.reshape(shape[0], rank, 1, 1)]


class Spatial(Method):
    """AMCT's method: a kh x kw conv -> a (kh x 1) conv with r outputs, then a (1 x kw) conv (or the
    transposed order when it is cheaper). Each keeps the stride, padding and dilation of its own axis;
    the bias goes on the last."""

    name = "spatial"

    def unsupported(self, layer):
        if not isinstance(layer, nn.Conv2d):
            return "spatial decomposes Conv2d only"
        if tuple(layer.kernel_size) == (1, 1):
            return "a 1x1 kernel has no spatial extent"
        return None

    def vertical_first(self, layer: nn.Conv2d) -> bool:
        """Vertical-first (AMCT's order) unless horizontal-first costs fewer multiply-adds, then params.
        Both costs are linear in the rank, so rank 1 decides."""
        vertical, horizontal = (specs_cost(self.specs(layer, (1,), vertical_first=order)) for order in (True, False))
        return (vertical.macs, vertical.params) <= (horizontal.macs, horizontal.params)

    def _matrices(self, layer, moment=None):
        matrix = F.spatial_unfold(layer.weight.detach(), self.vertical_first(layer))
        if moment is not None:  # Lᵀ M, with L Lᵀ the first factor's dampened input patches' moment
            return [F.square_root(F.dampened(moment)).T @ matrix.double()]
        return [matrix]

    def calibration_rows(self, layer, inputs, output):
        """The first factor's input windows, along its axis of the kernel: rows (Cin x kh) or (Cin x kw),
        ordered as the rows of ``functional.spatial_unfold``."""
        return _patch_rows(layer, inputs, (0 if self.vertical_first(layer) else 1,))

    def full_ranks(self, layer, vertical_first: bool | None = None):
        vertical = self.vertical_first(layer) if vertical_first is None else vertical_first
        first_k, last_k = layer.kernel_size if vertical else reversed(layer.kernel_size)
        return (min(layer.in_channels * first_k, layer.out_channels * last_k),)

    def specs(self, layer, ranks, vertical_first: bool | None = None):
        (rank,) = ranks
        if vertical_first is None:
            vertical_first = self.vertical_first(layer)
        first_axis = 0 if vertical_first else 1
        return [
            self._axis_spec(layer, layer.in_channels, rank, first_axis, bias=False),
            self._axis_spec(layer, rank, layer.out_channels, 1 - first_axis, bias=layer.bias is not None),
        ]

    @staticmethod
    def _axis_spec(layer, in_ch, out_ch, axis, bias):
        """A conv covering only ``axis`` (0: height, 1: width) of ``layer``'s kernel, stride, padding and
        dilation; the other axis gets kernel 1, stride 1, padding 0."""

        def keep(values, fill):
            return [values[0], fill] if axis == 0 else [fill, values[1]]

        padding = layer.padding if isinstance(layer.padding, str) else keep(layer.padding, 0)
        return conv_spec(
            in_ch,
            out_ch,
            keep(layer.kernel_size, 1),
            stride=keep(layer.stride, 1),
            padding=padding,
            dilation=keep(layer.dilation, 1),
            bias=bias,
            padding_mode=layer.padding_mode,
        )

    def weights(self, layer, ranks, moment=None):
        (rank,) = ranks
        return list(F.spatial_factors(layer.weight.detach(), rank, self.vertical_first(layer), moment))


class Tucker2(Method):
    """msModelSlim's method: a k x k conv -> 1x1 (Cin -> r_in), k x k (r_in -> r_out, the layer's stride,
    padding and dilation), 1x1 (r_out -> Cout, with the bias). HOOI started from HOSVD."""

    name = "tucker2"
    rank_names = ("in_rank", "out_rank")

    def unsupported(self, layer):
        if not isinstance(layer, nn.Conv2d):
            return "tucker2 decomposes Conv2d only"
        if tuple(layer.kernel_size) == (1, 1):
            return "a 1x1 kernel has no spatial extent"
        return None

    def _matrices(self, layer, moment=None):
        weight = layer.weight.detach()
        if moment is not None:  # the kernel's input mode multiplied by L, L Lᵀ = E[x xᵀ] of its input channels
            weight = torch.einsum("oi...,ij->oj...", weight.double(), F.square_root(F.dampened(moment)))
        return [F.unfold(weight, 1), F.unfold(weight, 0)]

    def calibration_rows(self, layer, inputs, output):
        return _channels_last_rows(inputs, -3)

    def full_ranks(self, layer):
        return (layer.in_channels, layer.out_channels)

    def specs(self, layer, ranks):
        in_rank, out_rank = ranks
        return [
            conv_spec(layer.in_channels, in_rank, (1, 1)),
            conv_spec(
                in_rank,
                out_rank,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                padding_mode=layer.padding_mode,
            ),
            conv_spec(out_rank, layer.out_channels, (1, 1), bias=layer.bias is not None),
        ]

    def weights(self, layer, ranks, moment=None):
        in_rank, out_rank = ranks
        if moment is None:
            core, u_out, u_in = F.tucker2(layer.weight.detach(), in_rank, out_rank)
        else:
            core, u_out, u_in = F.whitened_tucker2(layer.weight.detach(), moment, in_rank, out_rank)
        return [u_in.T[:, :, None, None], core, u_out[:, :, None, None]]


METHODS = {method.name: method for method in (SVD(), Spatial(), Tucker2())}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown decomposition method {name!r}; valid methods: {', '.join(METHODS)}") from None


def method_for(layer: nn.Module, conv_method: str) -> Method:
    """``svd`` for Linear layers and 1x1 convolutions, ``conv_method`` for larger kernels."""
    if isinstance(layer, nn.Linear) or tuple(layer.kernel_size) == (1, 1):
        return METHODS["svd"]
    return get_method(conv_method)
