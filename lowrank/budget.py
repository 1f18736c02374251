"""One model-level budget: ranks for many layers at once, so that the model's multiply-adds on the
example input are at most a fraction of the dense model's, where they cost the least error.

Each layer offers options: staying dense, or one of its candidate ranks (``RankPolicy.candidate_ranks``),
each with its multiply-adds on the inputs the layer received and its relative error, the share of the
squared spectrum its ranks drop: of the weights, or, with calibration data, of the weights as the data
sees them, which is the relative output error (``Method.spectra``). The allocation minimises the sum of
the layers' errors: the lower convex hull of each layer's options gives its steps in the order of
increasing error per multiply-add saved; the steps of all layers are taken in that order until the
budget is met, then the slack left by the last step is spent on the upgrades that cut the most error.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Option:
    """One way to build a layer: ``ranks`` (None: dense), its multiply-adds and its relative error."""

    ranks: tuple[int, ...] | None
    macs: int
    error: float


def relative_errors(spectra: list[tuple[torch.Tensor, tuple[int, int]]], ranks: tuple[int, ...]) -> float:
    """The share of the squared spectrum that ``ranks`` drop, summed over the method's ranks (one
    spectrum per rank; for tucker2 the two modes' shares, the HOSVD bound)."""
    error = 0.0
    for (values, _), rank in zip(spectra, ranks, strict=True):
        squares = values.double().square()
        total = squares.sum().item()
        error += squares[rank:].sum().item() / total if total > 0 else 0.0
    return error


def _hull(options: list[Option]) -> list[Option]:
    """The options on the lower convex hull of (multiply-adds, error), from the dense one (most
    multiply-adds) to the cheapest: each step saves multiply-adds at a higher error per multiply-add
    than the one before. Options no better than a cheaper one are dropped."""
    best = {}
    for option in options:
        if option.macs not in best or option.error < best[option.macs].error:
            best[option.macs] = option
    hull = []
    for option in sorted(best.values(), key=lambda option: -option.macs):
        while len(hull) > 1 and option.error <= hull[-1].error:
            hull.pop()
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], option):
            hull.pop()
        hull.append(option)
    return hull


def _slope(richer: Option, cheaper: Option) -> float:
    """Error added per multiply-add saved from ``richer`` to ``cheaper``."""
    return (cheaper.error - richer.error) / (richer.macs - cheaper.macs)


def allocate(options: dict[str, list[Option]], allowed_savings: int) -> dict[str, Option]:
    """The option of each layer (dense first in each list) that saves at least ``allowed_savings``
    multiply-adds in all at the least summed error. Raises ValueError when even the cheapest options
    save less."""
    dense = {name: max(layer_options, key=lambda option: option.macs) for name, layer_options in options.items()}
    cheapest = sum(dense[name].macs - min(o.macs for o in layer_options) for name, layer_options in options.items())
    if cheapest < allowed_savings:
        raise ValueError(f"the candidate layers can save {cheapest} multiply-adds at most, {allowed_savings} needed")
    chosen = dict(dense)
    steps = []
    for name, layer_options in options.items():
        hull = _hull(layer_options)
        steps += [(_slope(richer, cheaper), name, cheaper) for richer, cheaper in zip(hull, hull[1:])]
    saved = 0
    for _, name, option in sorted(steps, key=lambda step: step[0]):
        if saved >= allowed_savings:
            break
        saved += chosen[name].macs - option.macs
        chosen[name] = option
    # The last step may have saved more than needed: take back error where the slack allows.
    while True:
        slack = saved - allowed_savings
        upgrades = [
            (chosen[name].error - option.error, name, option)
            for name, layer_options in options.items()
            for option in layer_options
            if 0 < option.macs - chosen[name].macs <= slack and option.error < chosen[name].error
        ]
        if not upgrades:
            return chosen
        _, name, option = max(upgrades, key=lambda upgrade: (upgrade[0], -upgrade[2].macs))
        saved -= option.macs - chosen[name].macs
        chosen[name] = option
