"""Sequential data-aware fitting (``sequential=True`` with ``calibration=``): the layers are fitted in the
order the model first calls them, each to the dense model's outputs from the inputs that the layers
fitted before it give it (the asymmetric reconstruction of Zhang et al. 2015, "Accelerating Very Deep
Convolutional Networks for Classification and Detection"). Each layer then also corrects the error
that reaches it, so that at small ranks the errors of a deep model's layers no longer add up.

Layer l sees x in the dense model and x̂ in the model whose earlier layers are replaced, both taken as
the rows its kernel reads (with a constant 1 for its bias). The fit is min E||W x - W' x̂||² over the
replacement's W'. With W* = W E[x x̂ᵀ] E[x̂ x̂ᵀ]⁻¹, the least-squares map from x̂ to W x, that error is
E||W x - W* x̂||² + E||(W* - W') x̂||². So it is the method's usual data-aware fit (``lowrank.methods``)
of a layer with weights and bias W*, on the moments of x̂. W* is dampened towards W; for the first
layer, where x̂ = x, it is W.

What it costs:
- Per layer, two passes over the batches: the dense model's, then the partly decomposed one's. The
  batches are read once into a list.
- Per layer, two (d+1) x (d+1) float64 matrices on the layer's device, where d is the number of input
  values its kernel reads (Cin x kh x kw). A layer with d above MAX_WIDTH is fitted to x̂ alone,
  without the correction.
"""

import copy
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

from .calibration import SEED, batch_arguments, sampled
from .log import logger
from .methods import METHODS, kernel_rows
from .modules import build_replacement, fill
from .stats import evaluating

MAX_WIDTH = 8192  # two 8193 x 8193 float64 matrices take 1 GiB
# The methods' fits read x̂ through coarser moments than the kernel rows' (spatial: one axis's windows;
# tucker2: channels), which can over-count directions where a sharp W* puts large, cancelling weights:
# 5% of the mean eigenvalue, not functional.DAMPING's 1%, kept it better than one pass in every case tried.
COMPENSATION_DAMPING = 0.05


def compensated(weight: torch.Tensor, cross: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """W*, the least-squares map from inputs x̂ to the outputs W x of ``weight`` W (out x d), given
    ``cross`` = E[x x̂ᵀ] and ``moment`` = E[x̂ x̂ᵀ], dampened towards W:
    (W C + λ W)(Ĝ + λ I)⁻¹ with λ = COMPENSATION_DAMPING x the mean eigenvalue of Ĝ. Float64; W itself when x̂ = x."""
    weight, cross, moment = weight.double(), cross.double(), moment.double()
    scale = moment.diagonal().mean()
    if scale <= 0:  # inputs that are all zeros: nothing to fit
        return weight
    damping = COMPENSATION_DAMPING * scale
    system = moment + damping * torch.eye(len(moment), dtype=moment.dtype, device=moment.device)
    return torch.linalg.solve(system, (weight @ cross + damping * weight).T).T


@torch.no_grad()
def refit(model: nn.Module, replacements: list, batches: list, moments: dict[str, torch.Tensor]) -> None:
    """Sets the weights (and bias) of each of ``replacements`` by the sequential fit on ``batches``, the
    layers taken in the order of ``moments``, the calibration pass's (first calls). The first layer,
    whose inputs nothing changes yet, is fitted as without ``sequential``, on its moment; a layer no
    batch reaches, to its weights alone. ``model`` comes back as it was."""
    by_name = {replacement.name: replacement for replacement in replacements}
    names = [name for name in moments if name in by_name]
    names += [name for name in by_name if name not in names]
    fitted = {}  # name -> its replacement, in place for the passes of the layers after it
    with evaluating(model):
        for name in tqdm(names, desc="Sequential calibration", unit="layer", disable=None, leave=False):
            replacement = by_name[name]
            layer, method = model.get_submodule(name), METHODS[replacement.method]
            gathered = None
            if fitted and name in moments:  # else the first layer, or one that no batch reaches
                corrects = layer.weight[0].numel() + 1 <= MAX_WIDTH
                if not corrects:
                    logger.info(
                        "%r is fitted to its inputs without correcting for the layers before it (too wide)", name
                    )
                try:
                    gathered = _moments(model, layer, method, batches, fitted, corrects)
                except _Unpaired as unpaired:
                    logger.warning(
                        "%r is fitted to its inputs without correcting for the layers before it: %s", name, unpaired
                    )
                    corrects = False
                    gathered = _moments(model, layer, method, batches, fitted, corrects)
            if gathered is None:  # as in one pass (plan.plan has warned of a layer that no batch reaches)
                replacement.weights = method.weights(layer, replacement.ranks, moments.get(name))
                replacement.calibrated = name in moments
            else:
                corrected, replacement.bias = layer, None
                if corrects:
                    corrected, replacement.bias = _corrected(layer, gathered["cross"], gathered["inputs"])
                moment = gathered.get("method")
                if moment is None:  # the corrected layer's outputs, without the bias: W* E[x̂ x̂ᵀ] W*ᵀ
                    matrix = corrected.weight.reshape(len(corrected.weight), -1)
                    width = matrix.shape[1]
                    moment = matrix @ gathered["inputs"][:width, :width] @ matrix.T
                replacement.weights = method.weights(corrected, replacement.ranks, moment)
                replacement.calibrated = True
            new = build_replacement(layer, replacement.specs, replacement.method, initialise=False)
            fitted[name] = fill(layer, new, replacement.weights, replacement.bias)


def _corrected(layer: nn.Module, cross: torch.Tensor, moment: torch.Tensor) -> tuple[nn.Module, torch.Tensor | None]:
    """A copy of ``layer`` with the ``compensated`` weights (float64), and its compensated bias (None
    without one)."""
    matrix = layer.weight.detach().reshape(len(layer.weight), -1)
    if layer.bias is not None:
        matrix = torch.cat([matrix, layer.bias.detach()[:, None]], dim=1)
    weight = compensated(matrix, cross, moment)
    corrected = copy.deepcopy(layer)
    corrected.weight = nn.Parameter(weight[:, : layer.weight[0].numel()].reshape(layer.weight.shape))
    return corrected, (weight[:, -1] if layer.bias is not None else None)


def _with_ones(layer: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """``layer``'s kernel rows with a last column of ones when it has a bias."""
    return torch.cat([rows, rows.new_ones(len(rows), 1)], dim=1) if layer.bias is not None else rows


@contextmanager
def _installed(model: nn.Module, modules: dict[str, nn.Module]):
    """``model`` with ``modules`` in place of the layers of those names inside the block."""
    originals = {name: model.get_submodule(name) for name in modules}
    try:
        for name, module in modules.items():
            _set(model, name, module)
        yield
    finally:
        for name, module in originals.items():
            _set(model, name, module)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


class _Unpaired(ValueError):
    """The partly decomposed model called the layer otherwise than the dense one (a data-dependent forward)."""


@torch.no_grad()
def _moments(model, layer, method, batches, fitted, corrects: bool) -> dict | None:
    """Over ``batches``, from x in the dense model and x̂ in the model with the ``fitted`` layers in
    place: with ``corrects``, ``cross`` E[x x̂ᵀ] and ``inputs`` E[x̂ x̂ᵀ] of ``layer``'s kernel rows
    (``_with_ones``); and ``method``'s moment of x̂ (``calibration_rows``), unless those rows are the outputs
    of the layer to correct, whose moment follows from ``inputs``. None when no batch reaches ``layer``;
    _Unpaired, with ``corrects``, when the two models call it a different number of times or shapes."""
    calls = []  # copies: the rest of the forward pass may change its inputs in place (x += f(x))
    handle = layer.register_forward_pre_hook(
        lambda module, args: (
            calls.append(args[0].detach().clone()) if args and isinstance(args[0], torch.Tensor) else None
        )
    )
    gathers_method = not (corrects and method.fits_outputs(layer))
    sums, counts = {}, {"kernel": 0, "method": 0}
    generator = torch.Generator().manual_seed(SEED)

    def add(key, left, right, total):  # products in float32 (2x faster than float64 here), sums in float64
        product = left.float().T @ right.float()
        if key not in sums:
            sums[key] = torch.zeros(product.shape, dtype=torch.float64, device=product.device)
        sums[key].add_(product, alpha=total / len(left))

    try:
        for batch in batches:
            args, kwargs = batch_arguments(batch)
            dense = []
            if corrects:
                model(*args, **kwargs)
                dense, calls[:] = list(calls), []
            with _installed(model, fitted):
                model(*args, **kwargs)
            current, calls[:] = list(calls), []
            if corrects and [x.shape for x in dense] != [x.shape for x in current]:
                raise _Unpaired(f"its calls differ between the two models ({len(dense)} and {len(current)} calls)")
            for index, x_hat in enumerate(current):
                if corrects:
                    rows, rows_hat = kernel_rows(layer, dense[index]), kernel_rows(layer, x_hat)
                    total = len(rows)
                    chosen = sampled(total, generator, rows.device)  # the same rows of both
                    rows, rows_hat = _with_ones(layer, rows[chosen]), _with_ones(layer, rows_hat[chosen])
                    add("cross", rows, rows_hat, total)
                    add("inputs", rows_hat, rows_hat, total)
                    counts["kernel"] += total
                if gathers_method:
                    # Only rows of the outputs read the output, which is then the uncorrected layer's.
                    rows = method.calibration_rows(layer, x_hat, layer(x_hat) if method.fits_outputs(layer) else None)
                    total = len(rows)
                    rows = rows[sampled(total, generator, rows.device)]
                    add("method", rows, rows, total)
                    counts["method"] += total
    finally:
        handle.remove()
    if not sums:
        return None
    return {key: total / counts["method" if key == "method" else "kernel"] for key, total in sums.items()}
