"""Latency measurement for the latency-aware rank policy (``latency=`` in ``auto_decomposition``).

The policy needs, for every candidate layer, the input it really sees: ``lowrank.observe`` runs the
model once on the user's example input and records the shape, strides (so channels_last stays
channels_last), dtype and device of every call. ``seconds`` then times a module on fresh tensors of
those shapes with ``torch.utils.benchmark`` (the fastest of several blocks of runs, on torch's
current number of threads, accelerators synchronized), ``largest_within`` bisects a list of rank
candidates for the largest one measured within budget, and ``measure_ranks`` runs the rule for one
layer, recording every timing for the info file.
"""

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .log import logger
from .modules import build_replacement
from .observe import InputSpec
from .stats import call_arguments

if TYPE_CHECKING:
    from torch.utils import benchmark

    from .policy import RankPolicy

# Seconds of timed runs per measurement: several blocks on a layer of a few milliseconds, and still
# a ResNet-50 (53 layers, about 10 timings each) measured in about a minute.
MIN_RUN_TIME = 0.05


def measure(fn: Callable[[], object], min_run_time: float = MIN_RUN_TIME) -> "benchmark.Measurement":
    """``torch.utils.benchmark``'s ``blocked_autorange`` of ``fn()`` after a warm-up call (first-call
    allocations, oneDNN and cuDNN plan selection), under ``inference_mode``, on torch's current
    number of threads (``Timer`` would use 1 thread otherwise)."""
    # Imported here: torch.utils.benchmark pulls in torch.utils.cpp_extension (slow, and it warns about
    # CUDA_HOME on machines without CUDA) into every program that imports lowrank.
    from torch.utils import benchmark

    with torch.inference_mode():
        fn()
        timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time)


def fastest_seconds(fn: Callable[[], object], min_run_time: float = MIN_RUN_TIME) -> float:
    """Seconds of one ``fn()`` call: the mean over the fastest block of runs of ``measure``. The
    fastest, not the median: other processes only ever add time, and on a shared machine they
    disturb most blocks."""
    return min(measure(fn, min_run_time).times)


def seconds(module: nn.Module, inputs: Sequence[InputSpec]) -> float:
    """Seconds for ``module`` to process every recorded call's input once (``fastest_seconds``)."""
    tensors = [spec.sample() for spec in inputs]
    return fastest_seconds(lambda: [module(tensor) for tensor in tensors])


def largest_within(candidates: Sequence, seconds_of: Callable[[object], float], fits: Callable[[float], bool]):
    """Bisects ``candidates`` (ordered by size, so by time) for the largest whose measured time ``fits``.

    Returns ``(index or None, probes)`` with ``probes`` the ``(candidate, seconds)`` measured, in
    order; the chosen candidate is among them. Timings are assumed to grow with the candidate, so
    about log2(len(candidates)) of them are measured.
    """
    low, high = -1, len(candidates) - 1  # candidates[low] fits (or low == -1); none above high does
    probes = []
    while low < high:
        middle = (low + high + 1) // 2
        measured = seconds_of(candidates[middle])
        probes.append((candidates[middle], measured))
        if fits(measured):
            low = middle
        else:
            high = middle - 1
    return (low if low >= 0 else None), probes


def context(example_input) -> dict:
    """Where the timings were taken, for the info file."""
    args, kwargs = call_arguments(example_input)
    tensors = [arg for arg in (*args, *kwargs.values()) if isinstance(arg, torch.Tensor)]
    return {
        "device": str(tensors[0].device) if tensors else "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "example_input_shapes": [list(tensor.shape) for tensor in tensors],
        "min_run_time_s": MIN_RUN_TIME,
    }


def measure_ranks(name, layer, method, policy: "RankPolicy", rule, inputs, measurements):
    """``policy.choose_ranks`` under the latency rule, timing the dense layer and default-initialised
    replacements (weights do not change timings) on ``inputs``; records every timing in ``measurements``."""
    probes = []

    def time_ranks(ranks):
        module = layer if ranks is None else build_replacement(layer, method.specs(layer, ranks), method.name)
        duration = seconds(module, inputs)
        probes.append({"ranks": None if ranks is None else list(ranks), "seconds": duration})
        return duration

    ranks, reason = policy.choose_ranks(method, layer, rule, time_ranks)
    # The last timings of the dense layer and of the chosen ranks are the pair that decided.
    dense = next((probe["seconds"] for probe in reversed(probes) if probe["ranks"] is None), None)
    chosen = next((probe["seconds"] for probe in reversed(probes) if ranks and probe["ranks"] == list(ranks)), None)
    measurements[name] = {
        "target": rule.value,
        "input_shapes": [list(spec.shape) for spec in inputs],
        "dense_seconds": dense,
        "decomposed_seconds": chosen,
        "probes": probes,  # every timing in order; ranks None: the dense layer
    }
    if chosen is not None:
        logger.info(
            "Measured: %r: rank %s %.3f ms against dense %.3f ms (%.2f)",
            name,
            list(ranks),
            1e3 * chosen,
            1e3 * dense,
            chosen / dense,
        )
    return ranks, reason
