"""Planning and swapping, shared by the APIs: lowrank's rules plan each layer (which layers, which
ranks, the new weights); the replacements are built without touching the model; then they are
swapped in. An error while planning or building leaves the model whole."""

import os
import time

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import latency
from .arguments import check_info_path
from .eligibility import LAYER_TYPES, scan
from .info import Replacement, new_names, write_info
from .log import logger
from .methods import dense_cost, method_for, output_shape_changes
from .modules import build_replacement
from .observe import Observation, observe
from .policy import RankPolicy
from .stats import count_parameters


def decompose(model, policy, method, with_weights, info_path, what) -> tuple[nn.Module, dict[str, list[str]]]:
    """lowrank's rules: plans (``plan``), builds, writes the info file, then swaps."""
    if info_path is not None:
        check_info_path(info_path, "decompose_info_path")
    logger.info("%s start.", what)
    start = time.perf_counter()
    params_before = count_parameters(model)
    replacements, skipped, measurements = plan(model, policy, method, with_weights, what)
    if not replacements:
        logger.info("No layer meets decomposition conditions.")
    built = build(model, replacements)
    if info_path is not None:
        write_plan(info_path, model, replacements, skipped, policy, method, measurements)
    model, changes = swap(model, built)
    log_done(changes, params_before, model, start, what)
    return model, changes


def plan(model, policy: RankPolicy, conv_method: str, with_weights: bool, what: str):
    """Replacements for the layers the policy selects, the reasons the others are left alone, and the
    latency rule's measurements per layer."""
    candidates, skipped = scan(model)
    for name, reason in skipped.items():
        logger.info("Skip: %r: %s", name, reason)
    # Every name of every layer: the scan names a shared layer once, and a user may name its other ones.
    layers = [name for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, LAYER_TYPES)]
    for unmatched in policy.unmatched(layers):
        example = f", such as {max(layers, key=lambda name: name.count('.'))!r}" if any(layers) else ""
        logger.warning("%s matches no conv or linear layer (expressions match whole names%s)", unmatched, example)
    observation = _observe(model, policy, candidates)
    replacements, measurements = [], {}
    # Timing builds default-initialised replacements and draws random inputs, as many as the timings
    # decide: the caller's random state is left as it was.
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with logging_redirect_tqdm(loggers=[logger]), torch.random.fork_rng(devices=cuda, enabled=policy.measures_latency):
        for name, layer in tqdm(candidates.items(), desc=what, unit="layer", disable=None, leave=False):
            logger.info("Processing: %r", name)
            reason, replacement = _plan_layer(name, layer, policy, conv_method, with_weights, observation, measurements)
            if reason:
                skipped[name] = reason
                logger.info("Skip: %r: %s", name, reason)
            else:
                replacements.append(replacement)
    return replacements, skipped, measurements


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


def _plan_layer(name, layer, policy, conv_method, with_weights, observation: Observation, measurements):
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
    replacement = Replacement(
        name, method.name, ranks, specs, before=dense_cost(layer), after=method.cost(layer, ranks)
    )
    if with_weights:
        replacement.weights = method.weights(layer, ranks)
    return None, replacement


def write_plan(path, model, replacements, skipped, policy: RankPolicy, method: str, measurements) -> None:
    """The info file of a plan, with the policy and, for the latency rule, what it was measured on."""
    described = {"method": method, **policy.describe()}
    if policy.measures_latency:
        described["measured_on"] = latency.context(policy.example_input)
    write_info(path, model, replacements, skipped, described, measurements)
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


@torch.no_grad()
def fill(layer: nn.Module, new: nn.Sequential, weights: list[torch.Tensor]) -> nn.Sequential:
    """``new`` with ``weights`` copied in (cast to its dtype) and ``layer``'s bias on its last module;
    as it is when there are no weights."""
    if weights:  # every parameter of the uninitialised modules is filled in
        for module, value in zip(new, weights, strict=True):
            module.weight.copy_(value)
        if getattr(layer, "bias", None) is not None:  # the only bias, on the last module
            new[-1].bias.copy_(layer.bias)
    return new


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
