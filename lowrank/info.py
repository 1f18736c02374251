"""The decomposition info file: versioned JSON that replays a decomposition's structure without weights.

::

    {"format": "lowrank-decompose-info", "version": 2, "lowrank_version": "0.1.0", "policy": {...},
     "layers": [{"name": "conv2", "type": "Conv2d", "args": {<constructor arguments>},
                 "weight_shape": [128, 128, 3, 3], "method": "spatial", "ranks": [57],
                 "modules": [{"name": "conv2.0", "type": "Conv2d", "args": {...}, "weight_shape": [...]},
                             {"name": "conv2.1", ...}],
                 "params": [147456, 43776], "macs_per_position": [147456, 43776],
                 "latency": {...}}],
     "skipped": [{"name": "conv1", "reason": "...", "latency": {...}}]}

Version 2 adds what the latency rule measured, for the layers it timed (replaced or left alone):
``"latency": {"target": 0.5, "input_shapes": [[8, 128, 26, 26]], "dense_seconds": ...,
"decomposed_seconds": ... (None when left alone), "probes": [{"ranks": [...], "seconds": ...}, ...]}``
(every timing in order, ``"ranks": null`` for the dense layer; the two ``*_seconds`` are the last
timings of the dense layer and of the chosen ranks, the pair that decided),
and ``policy["measured_on"]`` (device, threads, torch version, example input shapes). Replaying
never reads these, so version 1 files, which lack them, are read as before; a file without timings
is still written as version 1, which earlier lowrank releases replay.

``read_info`` also reads AMCT's files: a JSON list of ``{"ori_layer_info": {"layer_name": ...},
"mode": "SCFK", "decom_nodes": {"first": {"weight_shape": [...]}, "last": {...}}}`` records, AMCT's
spatial decomposition of one conv each. The two weight shapes say which side comes first
(``(r, Cin, kh, 1)`` then ``(Cout, r, 1, kw)``, or the transposed order); the mode must be one of
AMCT's four. Every record is checked against the model before anything is changed, and an error
names the file, the layer and the mismatch.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from .io import WRAPPERS, atomic_write
from .methods import METHODS, MODULE_TYPES, Cost, build_module, dense_cost, layer_args, output_shape_changes, specs_cost

FORMAT = "lowrank-decompose-info"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 2 added the optional latency records
AMCT_MODES = ("FCFK", "FCSK", "SCFK", "SCSK")
AMCT_NAME_KEYS = ("name", "layer_name", "op_name")  # AMCT reads "name"; the others from older files


class DecomposeInfoError(ValueError):
    """An info file that cannot be read or does not match the model."""


def new_names(name: str, count: int) -> list[str]:
    """The names of the ``count`` modules that replace layer ``name`` (``"0"``... for the model itself)."""
    return [f"{name}.{index}" if name else str(index) for index in range(count)]


@dataclass
class Replacement:
    """The plan for one layer: the new modules' structure, and their costs next to the dense layer's."""

    name: str
    method: str
    ranks: tuple[int, ...]
    specs: list[dict]
    before: Cost
    after: Cost
    weights: list[torch.Tensor] = field(default_factory=list, repr=False)
    calibrated: bool = False  # the weights were fitted to calibration data
    bias: torch.Tensor | None = field(default=None, repr=False)  # a fitted bias; None: the layer's own

    @property
    def new_names(self) -> list[str]:
        return new_names(self.name, len(self.specs))

    def to_json(self, layer: nn.Module) -> dict:
        modules = []
        for name, spec in zip(self.new_names, self.specs):
            shape = list(build_module(spec, device="meta").weight.shape)
            modules.append({"name": name, **spec, "weight_shape": shape})
        return {
            "name": self.name,
            "type": type(layer).__name__,
            "args": layer_args(layer),
            "weight_shape": list(layer.weight.shape),
            "method": self.method,
            "ranks": list(self.ranks),
            "modules": modules,
            "params": [self.before.params, self.after.params],
            "macs_per_position": [self.before.macs, self.after.macs],
            **({"calibrated": True} if self.calibrated else {}),
        }


def write_info(
    path,
    model: nn.Module,
    replacements: list[Replacement],
    skipped: dict[str, str],
    policy: dict,
    measurements: dict[str, dict] | None = None,
) -> None:
    """Writes the info file for ``replacements`` of ``model``'s layers (before they are replaced), with
    the latency rule's ``measurements`` of each layer it timed."""
    from . import __version__

    measurements = measurements or {}

    def measured(name):
        return {"latency": measurements[name]} if name in measurements else {}

    document = {
        "format": FORMAT,
        "version": VERSION if measurements else 1,  # version 1 readers can replay files without timings
        "lowrank_version": __version__,
        "policy": policy,
        "layers": [{**r.to_json(model.get_submodule(r.name)), **measured(r.name)} for r in replacements],
        "skipped": [{"name": name, "reason": reason, **measured(name)} for name, reason in skipped.items()],
    }
    atomic_write(path, lambda file: json.dump(document, file, indent=2), binary=False)


def load_json(path) -> object:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decomposition info file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DecomposeInfoError(
            f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except UnicodeDecodeError as error:
        raise DecomposeInfoError(f"{path}: not a text file: {error}") from None
    except RecursionError:
        raise DecomposeInfoError(f"{path}: JSON nested too deeply to be an info file") from None


def is_msmodelslim_config(document) -> bool:
    """Whether a parsed file is msModelSlim's config file: a JSON object of layer name -> hidden channels
    (a layer may be named "format": only ours has a string there)."""
    return isinstance(document, dict) and not isinstance(document.get("format"), str)


def read_document(path) -> list | dict:
    """The parsed file: AMCT's list of records, msModelSlim's config (``is_msmodelslim_config``), or our
    document after its format and version checks."""
    document = load_json(path)
    if isinstance(document, list) or is_msmodelslim_config(document):
        return document
    if not isinstance(document, dict):
        raise DecomposeInfoError(
            f"{path}: expected a JSON object (lowrank, msModelSlim) or list (AMCT), got {type(document).__name__}"
        )
    if document.get("format") != FORMAT:
        raise DecomposeInfoError(
            f"{path}: not a decomposition info file (format is {document.get('format')!r}, expected {FORMAT!r})"
        )
    version = document.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # true == 1 and 1.0 == 1 in Python
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise DecomposeInfoError(
            f"{path}: unsupported info file version {version!r}; this lowrank reads versions {readable}"
        )
    if not isinstance(document.get("layers"), list):
        raise DecomposeInfoError(f"{path}: 'layers' must be a list")
    return document


def read_info(path: str | os.PathLike, model: nn.Module) -> list[Replacement]:
    """Reads and checks an info file (ours or AMCT's) against ``model``; returns the replacements."""
    document = read_document(path)
    if is_msmodelslim_config(document):
        raise DecomposeInfoError(f"{path}: msModelSlim's config file, which records no structures: not an info file")
    if isinstance(document, list):
        records = [_from_amct(path, model, index, record) for index, record in enumerate(document)]
    else:
        records = [_from_ours(path, model, index, record) for index, record in enumerate(document["layers"])]
    seen = set()
    for record in records:
        if record.name in seen:
            raise DecomposeInfoError(f"{path}: layer {record.name!r} appears twice")
        seen.add(record.name)
    return records


def _model_layer(path, model, name, expected_type, subclasses=False):
    """The layer ``name`` of ``model``, of ``expected_type`` (or, with ``subclasses``, of a subclass of
    that torch.nn class, as AMCT accepts a Conv2d subclass)."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        prefix = next((prefix for prefix in WRAPPERS if name.startswith(prefix)), None)
        hint = (
            f" (the name starts with {prefix!r}: written from a {WRAPPERS[prefix]}? Remove that prefix from the "
            "file's layer names)"
            if prefix
            else ""
        )
        raise DecomposeInfoError(f"{path}: layer {name!r} is not in the model{hint}") from None
    if type(layer).__name__ != expected_type and not (subclasses and isinstance(layer, getattr(nn, expected_type))):
        hint = " (is the model already decomposed?)" if isinstance(layer, nn.Sequential) else ""
        if isinstance(layer, LazyModuleMixin):  # it becomes its cls_to_become when it first runs
            hint = " (a lazy module: run the model once on an example input to initialise it first)"
        raise DecomposeInfoError(
            f"{path}: layer {name!r} is {type(layer).__name__} in the model but {expected_type} in the file{hint}"
        )
    return layer


def _require(path, where, record, key, kind):
    if not isinstance(record, dict) or key not in record:
        raise DecomposeInfoError(f"{path}: {where} has no {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        raise DecomposeInfoError(f"{path}: {where}: {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _from_ours(path, model, index, record) -> Replacement:
    where = f"layers[{index}]"
    name = _require(path, where, record, "name", str)
    where = f"layer {name!r}"
    layer = _model_layer(path, model, name, _require(path, where, record, "type", str))
    recorded = _require(path, where, record, "args", dict)
    for key, value in layer_args(layer).items():
        if not _same(recorded.get(key), value):
            raise DecomposeInfoError(
                f"{path}: {where}: {key} is {value!r} in the model but {recorded.get(key)!r} in the file"
            )
    method = _require(path, where, record, "method", str)
    if method not in METHODS:
        raise DecomposeInfoError(f"{path}: {where}: unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    ranks = _require(path, where, record, "ranks", list)
    modules = _require(path, where, record, "modules", list)
    specs = []
    for position, module in enumerate(modules):
        module_where = f"{where}, module {position}"
        module_type = _require(path, module_where, module, "type", str)
        if module_type not in MODULE_TYPES:
            raise DecomposeInfoError(
                f"{path}: {module_where}: type {module_type!r} is not one of {', '.join(MODULE_TYPES)}"
            )
        spec = {"type": module_type, "args": _require(path, module_where, module, "args", dict)}
        try:
            shape = list(build_module(spec, device="meta").weight.shape)
        except (TypeError, ValueError, RuntimeError) as error:
            raise DecomposeInfoError(f"{path}: {module_where}: invalid arguments {spec['args']}: {error}") from None
        recorded_shape = module.get("weight_shape")
        if recorded_shape is not None and recorded_shape != shape:
            raise DecomposeInfoError(
                f"{path}: {module_where}: weight shape {recorded_shape} does not match its arguments ({shape})"
            )
        specs.append(spec)
    ranks = _check_ranks(path, where, layer, method, ranks)
    variant, problem = _built_variant(layer, method, ranks, specs)
    if problem:
        raise DecomposeInfoError(
            f"{path}: {where}: the recorded modules are not the {method} decomposition of the layer at ranks "
            f"{list(ranks)}: {problem}"
        )
    full = METHODS[method].full_ranks(layer, **variant)
    if any(rank > bound for rank, bound in zip(ranks, full)):
        raise DecomposeInfoError(f"{path}: {where}: ranks {list(ranks)} exceed the layer's full ranks {list(full)}")
    return _replacement(path, name, layer, method, ranks, specs)


def _same(recorded, expected) -> bool:
    """Equal as JSON: ``true`` is not ``1`` and ``1.0`` is not ``1`` (Python's ``==`` says they are)."""
    return json.dumps(recorded, sort_keys=True) == json.dumps(expected, sort_keys=True)


def _variants(method: str) -> list[dict]:
    """The keyword arguments of each structure ``method`` can build: both orders of the spatial factors."""
    return [{}] if method != "spatial" else [{"vertical_first": True}, {"vertical_first": False}]


def _check_ranks(path, where, layer, method, ranks) -> tuple[int, ...]:
    try:
        full = METHODS[method].full_ranks(layer)
    except (AttributeError, TypeError, ValueError):
        raise DecomposeInfoError(f"{path}: {where}: method {method} does not apply to {type(layer).__name__}") from None
    if len(ranks) != len(full) or not all(type(rank) is int and rank >= 1 for rank in ranks):
        names = ", ".join(METHODS[method].rank_names)
        raise DecomposeInfoError(
            f"{path}: {where}: {method} needs {len(full)} positive integer ranks ({names}), got {ranks}"
        )
    return tuple(ranks)


def _built_variant(layer, method, ranks, specs) -> tuple[dict | None, str | None]:
    """Which structure of ``method`` (either order of the spatial factors) the recorded ``specs`` are
    for ``layer`` at ``ranks``, or how they differ from it."""
    variants = _variants(method)
    built = [METHODS[method].specs(layer, ranks, **variant) for variant in variants]
    candidates = [json.loads(json.dumps(candidate)) for candidate in built]  # tuples as lists, as recorded
    for variant, candidate in zip(variants, candidates):
        if _same(specs, candidate):
            return variant, None
    return None, _difference(specs, candidates)


def _difference(specs, candidates) -> str:
    """The first difference between ``specs`` and the candidate of the same first module (the one that
    matters)."""
    expected = next(
        (
            c
            for c in candidates
            if c[:1] and specs[:1] and c[0]["args"].get("kernel_size") == specs[0]["args"].get("kernel_size")
        ),
        candidates[0],
    )
    if len(specs) != len(expected):
        return f"{len(specs)} modules recorded, the method builds {len(expected)}"
    for position, (got, want) in enumerate(zip(specs, expected)):
        if got["type"] != want["type"]:
            return f"module {position} is {got['type']}, the method builds {want['type']}"
        for key in sorted(set(got["args"]) | set(want["args"])):
            if not _same(got["args"].get(key), want["args"].get(key)):
                return (
                    f"module {position}: {key} is {got['args'].get(key)!r}, the method builds {want['args'].get(key)!r}"
                )
    return "the modules differ"  # unreachable: the candidates were compared whole


def _from_amct(path, model, index, record) -> Replacement:
    where = f"record {index}"
    info = _require(path, where, record, "ori_layer_info", dict)
    name = next((info[key] for key in AMCT_NAME_KEYS if isinstance(info.get(key), str)), None)
    if name is None:
        raise DecomposeInfoError(f"{path}: {where}: ori_layer_info has none of {', '.join(AMCT_NAME_KEYS)}")
    where = f"layer {name!r}"
    mode = _require(path, where, record, "mode", str)
    if mode not in AMCT_MODES:
        raise DecomposeInfoError(f"{path}: {where}: unknown mode {mode!r}; AMCT modes: {', '.join(AMCT_MODES)}")
    layer = _model_layer(path, model, name, "Conv2d", subclasses=True)
    if layer.groups != 1:
        raise DecomposeInfoError(
            f"{path}: {where}: AMCT decomposes ungrouped convolutions; the model's has groups={layer.groups}"
        )
    args = layer_args(layer)
    for key in set(info) & set(args):
        value = list(info[key]) if isinstance(info[key], (list, tuple)) else info[key]
        if value != args[key] and [value, value] != args[key]:
            raise DecomposeInfoError(
                f"{path}: {where}: {key} is {args[key]!r} in the model but {info[key]!r} in the file"
            )
    nodes = _require(path, where, record, "decom_nodes", dict)
    first = _require(path, f"{where}, decom_nodes", nodes, "first", dict).get("weight_shape")
    last = _require(path, f"{where}, decom_nodes", nodes, "last", dict).get("weight_shape")
    if not (isinstance(first, list) and isinstance(last, list) and len(first) == 4 and len(last) == 4):
        raise DecomposeInfoError(f"{path}: {where}: decom_nodes need 4-d weight_shape lists, got {first} and {last}")
    rank = first[0]
    (kh, kw), cin, cout = layer.kernel_size, layer.in_channels, layer.out_channels
    orders = {True: ([rank, cin, kh, 1], [cout, rank, 1, kw]), False: ([rank, cin, 1, kw], [cout, rank, kh, 1])}
    vertical = next((order for order, shapes in orders.items() if _same([first, last], list(shapes))), None)
    if vertical is None or type(rank) is not int or rank < 1:
        raise DecomposeInfoError(
            f"{path}: {where}: weight shapes {first} and {last} are not a spatial decomposition of the model's "
            f"{cout}x{cin}x{kh}x{kw} kernel (expected {orders[True][0]} then {orders[True][1]}, "
            "or the transposed order)"
        )
    (full,) = METHODS["spatial"].full_ranks(layer, vertical_first=vertical)
    if rank > full:
        raise DecomposeInfoError(f"{path}: {where}: rank {rank} exceeds the layer's full rank {full}")
    return _replacement(
        path, name, layer, "spatial", (rank,), METHODS["spatial"].specs(layer, (rank,), vertical_first=vertical)
    )


def _replacement(path, name, layer, method, ranks, specs) -> Replacement:
    problem = output_shape_changes(layer, specs)
    if problem:
        raise DecomposeInfoError(
            f"{path}: layer {name!r}: the recorded structure does not replace the layer: {problem}"
        )
    return Replacement(name, method, ranks, specs, before=dense_cost(layer), after=specs_cost(specs))
