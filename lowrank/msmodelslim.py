"""msModelSlim's low-rank decomposition, reproduced: its configuration (which layers, which hidden
channels), its config file, its structures and state_dict keys, and its weights, with and without data.

``lowrank.Decompose`` calls these for msModelSlim's own calls (``from_ratio``, ``from_fixed``,
``from_vbmf``, ``from_dict``, ``from_file``); ``../shared/peers/SPEC.md`` Part B describes the tool.

A configuration maps layer names to hidden channels: an int for ``Linear`` and ``Embedding``, a pair
``(hidden_out, hidden_in)`` for ``Conv2d`` (the core conv's output and input channels).
"""

import json
import re
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import functional_peers as peers
from .eligibility import owner_reason
from .info import DecomposeInfoError
from .io import atomic_write
from .log import logger
from .methods import METHODS, linear_spec
from .modules import build_replacement, fill
from .plan import log_done, swap
from .stats import count_parameters

VBMF = "vbmf"
REPLACED = (nn.Linear, nn.Embedding, nn.Conv2d)  # what the configuration decomposes
CONFIG_FILE_MODE = 0o600  # msModelSlim writes its config file for the owner alone


def valid_value(value) -> bool:
    """msModelSlim's validity of a per-layer value: a pair of positive ints, a positive number or "vbmf"."""
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and all(isinstance(item, int) for item in value) and min(value) > 0
    if isinstance(value, (int, float)):  # as msModelSlim: NumPy's float64 is a float, its int64 is not
        return value > 0
    return isinstance(value, str) and value.lower() == VBMF


def layer_value(name: str, value, excludes) -> object:
    """The value that applies to layer ``name``: none when excluded (exact names), the first matching
    key's (``re.search``) for a dict of compiled patterns, else ``value`` itself."""
    if excludes and name in excludes:
        return None
    if isinstance(value, dict):
        return next((item for pattern, item in value.items() if pattern.search(name)), None)
    return value


def hidden_2d(weight: torch.Tensor, value, divisor) -> int | None:
    """Hidden channels of a Linear or Embedding weight (out, in), or None when they save no parameters."""
    out, inp = weight.shape
    if isinstance(value, str):
        hidden = max(peers.msmodelslim_vbmf_ranks(weight))
    elif isinstance(value, (list, tuple)):
        hidden = max(value)
    elif isinstance(value, float) and value < 1:
        hidden = int(out * inp * value / (out + inp))
    else:
        hidden = value
    hidden = peers.make_divisible(hidden, divisor)
    return hidden if hidden * (inp + out) < out * inp else None


def hidden_4d(weight: torch.Tensor, value, divisor) -> tuple[int, int] | None:
    """``(hidden_out, hidden_in)`` of a Conv2d weight, or None when they save no parameters. A kh x kw
    kernel is costed as kh x kh, as msModelSlim does."""
    out, inp, height = weight.shape[:3]
    patch = height * height
    if isinstance(value, str):
        pair = peers.msmodelslim_vbmf_ranks(weight)
    elif isinstance(value, float) and value < 1:
        # The largest root of patch h^2 + (in + out) h = value * params, by NumPy as msModelSlim finds it.
        root = np.roots([patch, inp + out, -value * out * inp * patch]).max()
        pair = (root, root)
    elif isinstance(value, (list, tuple)):
        pair = tuple(value)
    else:
        pair = (value, value)
    hidden_out, hidden_in = (peers.make_divisible(item, divisor) for item in pair)
    cost = hidden_in * inp + hidden_in * hidden_out * patch + hidden_out * out
    return (hidden_out, hidden_in) if cost < out * inp * patch else None


def choose(model: nn.Module, value, excludes, divisor: int) -> dict:
    """msModelSlim's configuration of ``model`` for ``value`` (a ratio, a fixed number, "vbmf", or a
    dict of compiled patterns to such values): every named module in order, first names only."""
    config = {}
    for name, module in model.named_modules():
        item = layer_value(name, value, excludes)
        if not valid_value(item):
            continue
        if isinstance(item, str) and isinstance(module, REPLACED) and module.weight.is_meta:
            raise ValueError(f"{name!r}: vbmf reads the weights, which are on the meta device: load them first")
        if isinstance(module, (nn.Linear, nn.Embedding)):
            hidden = hidden_2d(module.weight, item, divisor)
        elif isinstance(module, nn.Conv2d):
            hidden = hidden_4d(module.weight, item, divisor)
        else:
            continue
        if hidden is not None:
            config[name] = hidden
    return config


# What msModelSlim's JSON helpers accept in keys and string values.
SAFE_TEXT = re.compile(r"[A-Za-z0-9_\"'><=\[\](),{}: /.~-]*")
MAX_KEY_LENGTH = 512


def _check_text(config: dict, path) -> None:
    for key, value in config.items():
        for text in (key, value):
            if isinstance(text, str) and not SAFE_TEXT.fullmatch(text):
                raise DecomposeInfoError(f"{path}: {text!r} has characters msModelSlim's config files refuse")
        if len(key) > MAX_KEY_LENGTH:
            raise DecomposeInfoError(f"{path}: a layer name longer than {MAX_KEY_LENGTH} characters: {key[:40]}...")


def write_config(path, config: dict) -> None:
    """The config file as msModelSlim writes it (``json.dump``, pairs as lists), atomically, mode 0600."""
    _check_text(config, path)
    atomic_write(path, lambda file: json.dump(config, file), binary=False, mode=CONFIG_FILE_MODE)
    logger.info("Write decompose_config to %s", path)


def read_config(path, document) -> dict:
    """A config file's parsed ``document`` as msModelSlim uses it: the values as written (an int, or a
    ``[hidden_out, hidden_in]`` list for a conv), checked to be ones it can build (DecomposeInfoError,
    a ValueError as msModelSlim raises, naming the file)."""
    if not isinstance(document, dict):
        raise DecomposeInfoError(
            f"{path}: expected a JSON object of layer name -> hidden channels, got {type(document).__name__}"
        )
    _check_text(document, path)
    for name, value in document.items():
        if not valid_value(value) or isinstance(value, (str, bool, float)):
            raise DecomposeInfoError(
                f"{path}: layer {name!r}: hidden channels must be a positive int or a [hidden_out, hidden_in] pair of "
                f"them, got {value!r}"
            )
    return document


def collect_second_moments(model: nn.Module, layers: dict[str, nn.Module], datasets, max_iter: int) -> dict:
    """The uncentred second moment ``E[x xᵀ]`` over input channels of each layer's inputs (rows: a
    Conv2d input's positions, a Linear input flattened to its last axis), from one pass of ``model`` over
    ``datasets`` in eval mode without gradients: an element that is a dict is passed as keyword
    arguments, a list or tuple as positional ones, anything else (a tensor) as the one argument.
    ``max_iter`` > 0 reads that many elements, -1 or 0 all. Kept as msModelSlim keeps it, a running
    average in float32 on the layer's device (the same sums give the same factors); memory is one
    in x in matrix per layer, whatever the number of samples."""
    means, counts = {}, {}

    def record(name, channels_first):
        def hook(module, args):
            inputs = args[0].detach()
            if channels_first and inputs.dim() > 2:
                inputs = inputs.movedim(1, -1)
            rows = inputs.reshape(-1, inputs.shape[-1]).float()
            count = counts.get(name, rows.new_zeros(1))
            mean = means.get(name, rows.new_zeros(rows.shape[1], rows.shape[1]))
            counts[name] = count + rows.shape[0]
            means[name] = (mean * count + rows.T @ rows) / counts[name]

        return hook

    handles = [
        layer.register_forward_pre_hook(record(name, isinstance(layer, nn.Conv2d))) for name, layer in layers.items()
    ]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            for index, element in enumerate(tqdm(datasets, desc="Collecting input statistics", disable=None)):
                if isinstance(element, dict):
                    model(**element)
                elif isinstance(element, (list, tuple)):
                    model(*element)
                else:
                    model(element)
                if 0 < max_iter <= index + 1:
                    break
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    missing = sorted(set(layers) - set(means))
    if missing:
        logger.warning("No input reached %s on datasets: decomposed from the weights alone", ", ".join(missing))
    return means


def method_of(layer: nn.Module) -> str:
    """The method of msModelSlim's structure for ``layer``: Tucker-2 for a conv, a split SVD otherwise."""
    return "tucker2" if isinstance(layer, nn.Conv2d) else "svd"


def _specs(layer: nn.Module, hidden) -> list[dict]:
    """The replacement's modules: Linear -> Linear(in, h) + Linear(h, out); Embedding -> Embedding(num, h)
    + Linear(h, dim); Conv2d -> 1x1 (in -> hidden_in), the layer's kernel (-> hidden_out), 1x1 (-> out)."""
    if isinstance(layer, nn.Linear):
        return [
            linear_spec(layer.in_features, hidden, False),
            linear_spec(hidden, layer.out_features, layer.bias is not None),
        ]
    if isinstance(layer, nn.Embedding):
        args = {
            "num_embeddings": layer.num_embeddings,
            "embedding_dim": hidden,
            "padding_idx": layer.padding_idx,
            "max_norm": layer.max_norm,
            "norm_type": layer.norm_type,
            "scale_grad_by_freq": layer.scale_grad_by_freq,
            "sparse": layer.sparse,
        }
        return [{"type": "Embedding", "args": args}, linear_spec(hidden, layer.embedding_dim, False)]
    hidden_out, hidden_in = hidden
    return METHODS["tucker2"].specs(layer, (hidden_in, hidden_out))  # its structure, 1x1 kernels included


def _weights(layer: nn.Module, hidden, second_moment) -> list[torch.Tensor]:
    """The new modules' weights, msModelSlim's: SVD split for Linear/Embedding, Tucker-2 for Conv2d,
    data-aware when the layer has its inputs' ``second_moment`` (never for Embedding)."""
    if isinstance(layer, nn.Conv2d):
        weight = layer.weight.detach()
        if second_moment is None:
            core, u_out, u_in = peers.signed_tucker2(weight, *hidden)
        else:
            core, u_out, u_in = peers.data_aware_tucker2(weight, second_moment, *hidden)
        return [u_in.T[:, :, None, None], core, u_out[:, :, None, None]]
    weight = layer.weight.detach().float().cpu().numpy()
    if second_moment is None:
        left, right = peers.split_svd(weight, hidden)
    else:
        left, right = peers.data_aware_split(weight, second_moment, hidden)
    if isinstance(layer, nn.Embedding):
        return [torch.from_numpy(left), torch.from_numpy(right.T.copy())]
    return [torch.from_numpy(right), torch.from_numpy(left)]


def unbuildable(layer: nn.Module, hidden) -> str | None:
    """Why msModelSlim's structure cannot replace ``layer`` at ``hidden`` (where msModelSlim itself
    fails), or None."""
    if isinstance(layer, (nn.Linear, nn.Embedding)):
        if not isinstance(hidden, int) or isinstance(hidden, bool):
            return f"hidden channels {hidden!r}: a {type(layer).__name__} takes one int"
        if hidden > min(layer.weight.shape):
            return f"hidden channels {hidden} exceed the weight's smaller side {min(layer.weight.shape)}"
        return None
    if layer.groups > 1:
        return f"grouped convolution (groups={layer.groups}): msModelSlim's 1x1 factors do not apply to it"
    hidden_out, hidden_in = (hidden, hidden) if isinstance(hidden, int) else hidden
    if hidden_out > layer.out_channels or hidden_in > layer.in_channels:
        return (
            f"hidden channels ({hidden_out}, {hidden_in}) exceed the layer's channels "
            f"({layer.out_channels}, {layer.in_channels})"
        )
    return None


def plan(model: nn.Module, config: dict) -> dict[str, tuple[nn.Module, object]]:
    """The layers ``config`` replaces, by name, as msModelSlim walks ``named_children``: a child whose
    name is a key is replaced when it is a Linear, Embedding or Conv2d, and not descended into. Unlike
    msModelSlim, which walks children only, a model that is itself such a layer (name ``""``) is too."""
    if "" in config and isinstance(model, REPLACED):
        return {"": (model, _hidden(config[""]))}
    found = {}

    def walk(module, prefix):
        for child_name, child in module.named_children():
            name = prefix + child_name
            if name not in config:
                walk(child, name + ".")
            elif isinstance(child, REPLACED):
                found[name] = (child, _hidden(config[name]))

    walk(model, "")
    return found


def _hidden(value):
    return tuple(value) if isinstance(value, list) else value


def unmatched(model: nn.Module, config: dict) -> list[str]:
    """The names of ``config`` that ``plan`` finds no Linear, Embedding or Conv2d for."""
    return sorted(set(config) - set(plan(model, config)))


def decomposed_modules(layers: dict, with_weights: bool, second_moments: dict) -> dict[str, tuple[list[dict], list]]:
    """Per layer: the replacement's module specs and, ``with_weights``, its weights (float64 or float32)."""
    result = {}
    for name, (layer, hidden) in tqdm(layers.items(), desc="decompose_network", unit="layer", disable=None):
        hidden_pair = (hidden, hidden) if isinstance(layer, nn.Conv2d) and isinstance(hidden, int) else hidden
        weights = _weights(layer, hidden_pair, second_moments.get(name)) if with_weights else []
        result[name] = (_specs(layer, hidden_pair), weights)
        logger.debug("[%s] Layer name: %s -> %s", type(layer).__name__, name, hidden_pair)
    return result


def config_json(config: dict) -> dict:
    """The configuration as JSON values (pairs as lists)."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in config.items()}


def ratio_value(value) -> float:
    """A from_ratio value, validated as msModelSlim does: a float in (0, 1)."""
    if not isinstance(value, float) or not 0 < value < 1:
        raise ValueError(
            f"Parameter channel_ratio is not a valid float value: expected a float in (0, 1), got {value!r}"
        )
    return value


def fixed_value(value) -> int:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"Parameter channel_fixed is not a valid int value: expected an int > 0, got {value!r}")
    return value


def dict_value(value) -> dict:
    """A from_dict value: a non-empty dict whose keys compile as regular expressions."""
    if not isinstance(value, dict) or not value:
        raise ValueError(f"Parameter channel_dict is not a valid dict value: expected a non-empty dict, got {value!r}")
    try:
        return {re.compile(key): item for key, item in value.items()}
    except re.error as error:  # a key that is no string: re.compile's TypeError, as msModelSlim
        raise ValueError(f"Parameter channel_dict contains invalid key: {error}") from error


def check_excludes_divisor(excludes, divisor) -> int:
    """msModelSlim's checks of ``excludes`` and ``divisor``; returns the divisor as an int (a float one
    must be whole: msModelSlim would build layers of float channels and fail)."""
    if excludes is not None and not isinstance(excludes, (list, tuple)):
        raise ValueError(f"Parameter excludes is not a valid list or tuple value, got {excludes!r}")
    if not isinstance(divisor, (int, float)) or divisor <= 0:
        raise ValueError(f"Parameter divisor is not a valid int or float value: expected a number > 0, got {divisor!r}")
    if excludes is not None and not all(isinstance(item, str) for item in excludes):
        raise ValueError("Element in excludes is invalid. Should be all str.")
    if not float(divisor).is_integer():
        raise ValueError(f"Parameter divisor must be a whole number (channels are counted in ints), got {divisor!r}")
    return int(divisor)


def check_max_iter(max_iter) -> None:
    if not isinstance(max_iter, int) or isinstance(max_iter, bool):
        raise TypeError(f"parameter max_iter need to be an int value, got {max_iter!r}")
    if max_iter < -1:
        raise ValueError(f"parameter max_iter must be -1 (all of datasets) or more, got {max_iter}")


def decompose(model: nn.Module, config: dict, with_weights: bool, datasets, max_iter: int):
    """msModelSlim's decomposition of ``model`` in place. Layers that its structure cannot replace (where
    msModelSlim fails) or whose owner keeps them (``eligibility.owner_reason``) are left alone with a
    warning."""
    logger.info("decompose_network start.")
    start, params_before = time.perf_counter(), count_parameters(model)
    planned = plan(model, config)
    for name, (layer, hidden) in list(planned.items()):
        reason = unbuildable(layer, hidden) or (owner_reason(model, name) if name else None)
        if not reason and with_weights and layer.weight.is_meta:
            reason = "its weights are on the meta device (load them first, or decompose the structure only)"
        if reason:
            logger.warning("Skip: %r: %s", name, reason)
            del planned[name]
        elif with_weights and not bool(torch.isfinite(layer.weight).all()):
            raise ValueError(f"{name!r} has weights that are not finite (NaN or inf): nothing was decomposed")
    second_moments = {}
    if datasets is not None and with_weights:
        fitted = {name: layer for name, (layer, _) in planned.items() if isinstance(layer, (nn.Linear, nn.Conv2d))}
        second_moments = collect_second_moments(model, fitted, datasets, max_iter)
    built = []  # the model changes only once every replacement is built
    for name, (specs, weights) in decomposed_modules(planned, with_weights, second_moments).items():
        layer = planned[name][0]
        new = build_replacement(layer, specs, method_of(layer), initialise=not weights)
        built.append((name, fill(layer, new, weights)))
    model, changes = swap(model, built)
    log_done(changes, params_before, model, start, "decompose_network")
    return model, changes
