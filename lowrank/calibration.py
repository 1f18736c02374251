"""Calibration for data-aware decomposition: one pass of the model over the user's batches, which
gathers for each layer to decompose the uncentred second moment E[r rᵀ] of the rows its method fits
to (``Method.calibration_rows``: outputs for svd, input patches for spatial, input channels for
tucker2).

The sums are kept in float64 on the layer's device: memory is one d x d matrix per layer, whatever the
number of samples. A call with more than MAX_ROWS rows contributes MAX_ROWS of them, drawn at random
(from a generator seeded for each pass: the result is reproducible) and weighted by the call's number
of rows: the products then cost a bounded time per call, whatever the resolution.

A batch is passed as msModelSlim passes ``datasets`` elements: a dict as keyword arguments, a list or
tuple as positional ones, anything else (a tensor) as the one argument.
"""

import hashlib
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from tqdm import tqdm

from .methods import Method
from .stats import evaluating

MAX_ROWS = 8192
SEED = 0


def sampled(total: int, generator: torch.Generator, device) -> torch.Tensor | slice:
    """The rows kept of a call's ``total``: all, or MAX_ROWS drawn at random (a regular stride would see
    one column of every image); the call's sums are then weighted by ``total`` over the rows kept."""
    if total <= MAX_ROWS:
        return slice(None)
    return torch.randperm(total, generator=generator)[:MAX_ROWS].to(device)


class CalibrationError(ValueError):
    """A layer's statistics could not be gathered (not the model failing on a batch)."""


@dataclass
class Calibration:
    """What the pass gathered: per layer name, E[r rᵀ] (float64), in the order of the layers' first
    calls; the number of batches read and a digest of their values; whether the weights are then
    fitted layer after layer (``lowrank.sequential``)."""

    moments: dict[str, torch.Tensor]
    batches: int
    digest: str
    sequential: bool = False

    def describe(self) -> dict:
        """For the info file: the weights came from these inputs (the structure replays without them)."""
        return {"batches": self.batches, "sha256": self.digest, "sequential": self.sequential}


def batch_arguments(batch) -> tuple[tuple, dict]:
    """A calibration batch as the model's positional and keyword arguments."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (list, tuple)):
        return tuple(batch), {}
    return (batch,), {}


def check_batches(batches, max_batches) -> None:
    """Raises ValueError for calibration input that is not an iterable of batches, and for a bad cap."""
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
        raise ValueError(
            f"calibration: expected an iterable of model inputs (a list of batches, a generator, a DataLoader of "
            f"inputs), got {type(batches).__name__}: wrap a single batch in a list"
        )
    if max_batches is not None and (
        not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1
    ):
        raise ValueError(f"calibration_batches must be a positive int or None (all), got {max_batches!r}")


def update_digest(digest, batch) -> None:
    """Adds a batch's structure (its containers and keys), its tensors (values, shapes and dtypes) and
    its other leaves to ``digest``."""
    leaves, structure = tree_flatten(batch)
    digest.update(str(structure).encode())
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            digest.update(f"{tuple(leaf.shape)} {leaf.dtype}".encode())
            digest.update(leaf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(leaf).encode())


def digest(batches: Iterable) -> str:
    """The sha256 of calibration batches, as ``Calibration.digest`` records it (a launcher's cache key)."""
    hashed = hashlib.sha256()
    for batch in batches:
        update_digest(hashed, batch)
    return hashed.hexdigest()


@torch.no_grad()
def calibrate(
    model: nn.Module, layers: dict[str, tuple[nn.Module, Method]], batches, max_batches: int | None = None
) -> Calibration:
    """Runs ``model`` over ``batches`` (at most ``max_batches``) in eval mode without gradients and
    returns the second moments of ``layers`` (name -> (layer, its method)). The modules' training flags
    come back afterwards. A layer that no batch reaches has no moment."""
    check_batches(batches, max_batches)
    sums, counts = {}, {}
    generator = torch.Generator().manual_seed(SEED)

    def record(name, method):
        def hook(module, args, output):
            if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                return
            try:
                rows = method.calibration_rows(module, args[0].detach(), output.detach())
                total = rows.shape[0]
                rows = rows[sampled(total, generator, rows.device)].double()
                if name not in sums:
                    sums[name] = rows.new_zeros(rows.shape[1], rows.shape[1])
                    counts[name] = 0
                sums[name].addmm_(rows.T, rows, alpha=total / rows.shape[0])
                counts[name] += total
            except Exception as error:
                raise CalibrationError(
                    f"calibration: the statistics of {name!r} could not be gathered ({type(error).__name__}: {error})"
                ) from error

        return hook

    handles = [layer.register_forward_hook(record(name, method)) for name, (layer, method) in layers.items()]
    hashed, read = hashlib.sha256(), 0
    try:
        with evaluating(model):
            selected = itertools.islice(batches, max_batches)
            for index, batch in enumerate(tqdm(selected, desc="Calibration", unit="batch", disable=None, leave=False)):
                update_digest(hashed, batch)
                args, kwargs = batch_arguments(batch)
                try:
                    model(*args, **kwargs)
                except CalibrationError:
                    raise
                except (RuntimeError, TypeError, ValueError, AttributeError, KeyError, IndexError) as error:
                    raise ValueError(
                        f"calibration: the model does not run on batch {index} ({type(error).__name__}: {error}); a "
                        "batch is the model's input (a tuple or list: its positional arguments, a dict: its keyword "
                        "arguments), without the labels"
                    ) from None
                read = index + 1
    finally:
        for handle in handles:
            handle.remove()
    if not read:
        raise ValueError("calibration: no batch was read (the iterable is empty)")
    moments = {name: total / counts[name] for name, total in sums.items() if counts[name]}
    return Calibration(moments, read, hashed.hexdigest())
