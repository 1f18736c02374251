"""Planning and swapping, shared by the APIs: lowrank's rules plan each layer (which layers, which
ranks, the new weights); the replacements are built without touching the model; then they are
swapped in. An error while planning or building leaves the model whole."""

import dataclasses
import itertools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import latency
from .arguments import check_info_path
from .budget import Option, allocate, relative_errors
from .calibration import Calibration, calibrate
from .eligibility import LAYER_TYPES, scan
from .info import Replacement, new_names, write_info
from .log import logger
from .methods import chain_macs, dense_cost, layer_spec, method_for, output_shape_changes
from .modules import build_replacement, fill
from .observe import Observation, observe
from .policy import RankPolicy
from .sequential import refit
from .stats import count_flops, count_parameters


def decompose(model, policy, method, with_weights, info_path, what) -> tuple[nn.Module, dict[str, list[str]]]:
    """lowrank's rules: plans (``plan``), builds, writes the info file, then swaps."""
    if info_path is not None:
        check_info_path(info_path, "decompose_info_path")
    logger.info("%s start.", what)
    start = time.perf_counter()
    params_before = count_parameters(model)
    planned = plan(model, policy, method, with_weights, what)
    if not planned.replacements:
        logger.info("No layer meets decomposition conditions.")
    built = build(model, planned.replacements)
    if info_path is not None:
        write_plan(info_path, model, planned, policy, method)
    model, changes = swap(model, built)
    log_done(changes, params_before, model, start, what)
    return model, changes


@dataclass
class Plan:
    """Replacements for the layers the policy selects, the reasons the others are left alone, the
    latency rule's measurements per layer, and the calibration the weights were fitted to."""

    replacements: list[Replacement] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    measurements: dict[str, dict] = field(default_factory=dict)
    calibration: Calibration | None = None
    allocation: dict | None = None  # the budget's multiply-adds, for the info file


def plan(model, policy: RankPolicy, conv_method: str, with_weights: bool, what: str) -> Plan:
    """The ``Plan`` of ``policy`` for ``model``, with the new weights when ``with_weights``."""
    candidates, skipped = scan(model)
    for name, reason in skipped.items():
        logger.info("Skip: %r: %s", name, reason)
    # Every name of every layer: the scan names a shared layer once, and a user may name its other ones.
    layers = [name for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, LAYER_TYPES)]
    for unmatched in policy.unmatched(layers):
        example = f", such as {max(layers, key=lambda name: name.count('.'))!r}" if any(layers) else ""
        logger.warning("%s matches no conv or linear layer (expressions match whole names%s)", unmatched, example)
    sequential = with_weights and policy.sequential
    if sequential:  # read once, for the calibration pass and then two passes per layer
        policy = dataclasses.replace(policy, calibration=_batches_in_memory(policy), calibration_batches=None)
    observation = _observe(model, policy, candidates)
    calibrated = with_weights or policy.allocates  # the budget's errors are measured on the data too
    calibration = _calibrate(model, policy, candidates, conv_method, observation) if calibrated else None
    moments = calibration.moments if calibration else {}
    replacements, measurements, budgeted, allocation = [], {}, {}, None
    # Timing builds default-initialised replacements and draws random inputs, as many as the timings
    # decide: the caller's random state is left as it was.
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with logging_redirect_tqdm(loggers=[logger]), torch.random.fork_rng(devices=cuda, enabled=policy.measures_latency):
        for name, layer in tqdm(candidates.items(), desc=what, unit="layer", disable=None, leave=False):
            logger.info("Processing: %r", name)
            reason, replacement = _plan_layer(
                name, layer, policy, conv_method, with_weights, observation, measurements, moments.get(name), budgeted
            )
            if reason:
                skipped[name] = reason
                logger.info("Skip: %r: %s", name, reason)
            elif replacement:
                replacements.append(replacement)
    if policy.allocates:  # also when no layer is left to it: the others alone may exceed it
        allocation = _allocate(model, policy, budgeted, replacements, skipped, observation, moments, with_weights)
        order = list(candidates)
        replacements.sort(key=lambda replacement: order.index(replacement.name))
    if calibration is not None:
        calibration.sequential = policy.sequential
    if sequential:
        refit(model, replacements, policy.calibration, moments)
    return Plan(replacements, skipped, measurements, calibration, allocation)


def _batches_in_memory(policy: RankPolicy) -> list:
    """``sequential``'s calibration batches, as a list: its passes read them two times per layer."""
    batches = policy.calibration
    if batches is None:  # Decompose gives its data to decompose_network, so the rule alone cannot check it
        raise ValueError("sequential=True fits the layers to calibration data, one after another: give calibration=")
    if policy.calibration_batches is None and not isinstance(batches, Sequence):
        raise ValueError(
            "sequential=True keeps the calibration batches in memory and runs the model over them two times per "
            f"layer: give calibration_batches=N (Decompose: max_iter=N) to read the first N of this "
            f"{type(batches).__name__}, or a list"
        )
    return list(itertools.islice(batches, policy.calibration_batches))


def _observe(model: nn.Module, policy: RankPolicy, candidates: dict[str, nn.Module]) -> Observation:
    """The observed forward pass on the policy's example input, of the layers it selects; none without one."""
    if policy.example_input is None:
        return Observation()
    selected = {name: layer for name, layer in candidates.items() if policy.rule_for(name)[0] is not None}
    for name, layer in selected.items():
        if layer.weight.is_meta:
            raise ValueError(
                f"example_input: {name!r} has its weights on the meta device, where the model cannot run "
                "(load the weights first)"
            )
    return observe(model, policy.example_input, selected)


def _calibrate(model, policy, candidates, conv_method, observation: Observation) -> Calibration | None:
    """The calibration pass over ``policy.calibration``, for the layers the policy selects; None without data."""
    if policy.calibration is None:
        return None
    layers = {}
    for name, layer in candidates.items():
        rule, _ = policy.rule_for(name)
        if rule is None or name in observation.keep_dense:
            continue
        method = method_for(layer, rule.method or conv_method)
        if not method.unsupported(layer) and not layer.weight.is_meta:
            layers[name] = (layer, method)
    calibration = calibrate(model, layers, policy.calibration, policy.calibration_batches)
    missing = sorted(set(layers) - set(calibration.moments))
    if missing:
        logger.warning("No calibration input reached %s: decomposed from the weights alone", ", ".join(missing))
    return calibration


def _plan_layer(
    name, layer, policy, conv_method, with_weights, observation: Observation, measurements, moment, budgeted
):
    """The layer's replacement, or the reason it is left alone; a layer under the budget goes into
    ``budgeted`` (neither, for now)."""
    rule, reason = policy.rule_for(name)
    if rule is None:
        return reason, None
    if name in observation.keep_dense:
        return observation.keep_dense[name], None
    method = method_for(layer, rule.method or conv_method)
    reason = method.unsupported(layer)
    if reason:
        return reason, None
    if with_weights and layer.weight.is_meta:
        return "its weights are on the meta device (load them first, or decompose the structure only)", None
    if with_weights and not bool(torch.isfinite(layer.weight).all()):
        raise ValueError(f"{name!r} has weights that are not finite (NaN or inf): nothing was decomposed")
    if rule.kind == "budget":
        if not observation.inputs.get(name):
            return "not called when the model runs on example_input, so the budget cannot count its cost", None
        reason = output_shape_changes(layer, method.specs(layer, method.full_ranks(layer)))
        if reason:
            return reason, None
        budgeted[name] = (layer, method)
        return None, None
    if rule.kind == "latency":
        inputs = observation.inputs.get(name)
        if not inputs:
            return "not called when the model runs on example_input, so its latency cannot be measured", None
        reason = output_shape_changes(layer, method.specs(layer, method.full_ranks(layer)))
        if reason:
            return reason, None
        ranks, reason = latency.measure_ranks(name, layer, method, policy, rule, inputs, measurements)
    else:
        ranks, reason = policy.choose_ranks(method, layer, rule)
    if ranks is None:
        return reason, None
    specs = method.specs(layer, ranks)
    reason = output_shape_changes(layer, specs)
    if reason:
        return reason, None
    return None, _replacement(name, layer, method, ranks, with_weights and not policy.sequential, moment)


def _replacement(name, layer, method, ranks, with_weights, moment) -> Replacement:
    """The plan of one layer; with its weights when ``with_weights`` (which sequential fits leave to
    ``lowrank.sequential.refit``, once every layer has its ranks)."""
    replacement = Replacement(
        name, method.name, ranks, method.specs(layer, ranks), before=dense_cost(layer), after=method.cost(layer, ranks)
    )
    if with_weights:
        replacement.weights = method.weights(layer, ranks, moment)
        replacement.calibrated = moment is not None
    return replacement


def _allocate(model, policy, budgeted, replacements, skipped, observation, moments, with_weights) -> dict:
    """The budget's ranks for the ``budgeted`` layers (``lowrank.budget``), the other ``replacements``
    counted with their own: adds the replaced layers to ``replacements`` and the others to ``skipped``.
    Returns the model's multiply-adds on example_input, dense and decomposed, for the info file."""

    def macs(name, specs):
        return sum(chain_macs(specs, spec.shape) for spec in observation.inputs.get(name, ()))

    dense_total = count_flops(model, policy.example_input)
    fixed_savings = sum(
        macs(r.name, [layer_spec(model.get_submodule(r.name))]) - macs(r.name, r.specs) for r in replacements
    )
    options = {}
    for name, (layer, method) in budgeted.items():
        spectra = method.spectra(layer, moments.get(name))
        dense = macs(name, [layer_spec(layer)])
        options[name] = [Option(None, dense, 0.0)]
        for ranks in policy.candidate_ranks(method, layer):
            cost = macs(name, method.specs(layer, ranks))
            if cost < dense:  # a chain on a map hardly larger than the kernel can cost more than the layer
                options[name].append(Option(ranks, cost, relative_errors(spectra, ranks)))
    budget = policy.default.value
    needed = math.ceil(dense_total - fixed_savings - budget * dense_total)
    most = sum(option[0].macs - min(o.macs for o in option) for option in options.values())
    if needed > most:
        lowest = (dense_total - fixed_savings - most) / dense_total
        raise ValueError(
            f"budget={budget}: decomposing every layer it covers at its smallest ranks (min_rank {policy.min_rank}, "
            f"divisor {policy.divisor}) leaves {lowest:.3f} of the dense model's multiply-adds on example_input: "
            "give a larger budget, or let it cover more layers"
        )
    chosen = allocate(options, max(needed, 0))
    for name, option in chosen.items():
        layer, method = budgeted[name]
        if option.ranks is None:
            if len(options[name]) == 1:
                skipped[name] = f"no rank of at least min_rank {policy.min_rank} makes it cheaper on example_input"
            else:
                skipped[name] = f"budget={budget} keeps it dense: other layers cost less error per multiply-add saved"
            logger.info("Skip: %r: %s", name, skipped[name])
        else:
            replacements.append(
                _replacement(
                    name, layer, method, option.ranks, with_weights and not policy.sequential, moments.get(name)
                )
            )
    total = dense_total - fixed_savings - sum(options[name][0].macs - option.macs for name, option in chosen.items())
    logger.info(
        "budget=%s: multiply-adds on example_input %d -> %d (%.4f of the dense model's)",
        budget,
        dense_total,
        total,
        total / dense_total,
    )
    return {"budget": budget, "dense_macs": dense_total, "macs": total}


def write_plan(path, model, planned: Plan, policy: RankPolicy, method: str) -> None:
    """The info file of a plan, with the policy and, for the latency rule, what it was measured on; for a
    data-aware one, what the weights were fitted to."""
    described = {"method": method, **policy.describe()}
    if policy.measures_latency:
        described["measured_on"] = latency.context(policy.example_input)
    if planned.calibration is not None:
        described["calibration"] = planned.calibration.describe()
    if planned.allocation is not None:
        described["allocation"] = planned.allocation
    write_info(path, model, planned.replacements, planned.skipped, described, planned.measurements)
    logger.info("Decomposition information file is saved to: %s", os.path.realpath(path))


@torch.no_grad()
def build(model: nn.Module, replacements: list[Replacement]) -> list[tuple[str, nn.Sequential]]:
    """Each planned layer's replacement, on the layer's device and dtype, keeping its memory format,
    training mode and requires_grad; with the weights when the plan has them. The model is not changed,
    so that running out of memory here leaves it whole."""
    built, tied = [], {}
    for replacement in replacements:
        layer = model.get_submodule(replacement.name)
        new = fill(
            layer,
            build_replacement(layer, replacement.specs, replacement.method, initialise=not replacement.weights),
            replacement.weights,
            replacement.bias,
        )
        # Layers that shared a weight (or bias) Parameter share their replacements' (AMCT keeps them tied).
        for original, attribute, news in ((layer.weight, "weight", new), (layer.bias, "bias", new[-1:])):
            if original is None:
                continue
            if id(original) in tied:
                for module, first in zip(news, tied[id(original)]):
                    setattr(module, attribute, getattr(first, attribute))
            else:
                tied[id(original)] = list(news)
        built.append((replacement.name, new))
    return built


def swap(model: nn.Module, built: list[tuple[str, nn.Sequential]]) -> tuple[nn.Module, dict[str, list[str]]]:
    """Puts the built modules in place of the layers of those names; returns the model and the changes.
    A model that is itself the layer (name '') is left as it is and its replacement returned, as AMCT does."""
    changes = {}
    for name, new in built:
        if name:
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, new)
        else:
            model = new
        changes[name] = new_names(name, len(new))
        logger.info("Decompose: %r -> %s", name, changes[name])
    return model, changes


def log_done(changes, params_before, model, start, what) -> None:
    logger.info(
        "%d layer(s) decomposed, parameters %d -> %d, in %.2f s.",
        len(changes),
        params_before,
        count_parameters(model),
        time.perf_counter() - start,
    )
    logger.info("%s complete.", what)
