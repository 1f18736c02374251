"""The public API, with the seeds' names: AMCT's ``auto_decomposition``/``decompose_network`` and
msModelSlim's ``Decompose``.

Every call first plans (which layers, which ranks, the new weights) and builds the new modules
without touching the model, then writes the info file, then swaps the layers: an error never leaves a
half-decomposed model or a half-written file.
"""

import ast
import builtins
import copy
import dis
import functools
import inspect
import itertools
import os
import re
import sys
import textwrap
import time
import types
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from torch.ao.nn.intrinsic import _FusedModule
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import amct, latency, msmodelslim
from .info import (
    DecomposeInfoError,
    Replacement,
    is_msmodelslim_config,
    new_names,
    read_document,
    read_info,
    write_info,
)
from .io import unwritable
from .log import logger
from .methods import build_module, dense_cost, layer_spec, method_for, output_shape_changes
from .modules import CONV2D_CONFIG, LINEAR_CONFIG, build_replacement
from .policy import RankPolicy
from .stats import count_parameters

CONV_METHODS = ("spatial", "tucker2", "svd")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Wrappers that hold on to their module's parameters to synchronise or shard them (DDP, FSDP 1 and 2,
# DeepSpeed): the parameters of replacements made under them would be left out.
DISTRIBUTED_WRAPPERS = ("DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine")
# A module's own hooks, which its replacement would not carry.
HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _chain(node: ast.AST) -> tuple[ast.AST, list[str], bool]:
    """Where an attribute and subscript chain starts, the names below it (``["a", "1", "b"]`` for
    ``x.a[1].b``, also through ``getattr(x, "a")``) and whether an index could not be told statically
    (``x.a[i].b``: then the names are those above it, ``["a"]``)."""
    parts, anywhere_below = [], False
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript):
            index = node.slice
            if isinstance(index, ast.Constant) and type(index.value) is int and index.value >= 0:
                parts.append(str(index.value))
            else:
                parts, anywhere_below = [], True
            node = node.value
        elif (
            isinstance(node, ast.Call)
            and _is_name(node.func, "getattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            parts.append(node.args[1].value)
            node = node.args[0]
        else:
            return node, parts[::-1], anywhere_below


def _read_path(node: ast.AST, in_forward: bool, root: str = "self") -> str | None:
    """The submodule, relative to ``self``, that ``node`` designates: ``"a.b"`` for
    ``self.a.b`` (also ``getattr(self, "a").b`` and ``self.a[1].b`` as ``"a.1.b"``); in ``forward``
    only, ``"a.*"`` for any under ``self.a`` (``self.a[i]``, ``self.a[-1]``) and ``"*"`` (any
    submodule) for what cannot be told statically, such as a local variable or a loop over
    submodules. None for ``self`` itself. With another ``root`` (a parameter given a submodule),
    relative to that one, and None for what does not start from it."""
    start, parts, anywhere_below = _chain(node)
    if _is_name(start, root):
        path = ".".join(parts)
        if not anywhere_below:
            return path or None
        path = f"{path}.*" if path else "*"
    elif root == "self":
        path = "*"
    else:
        return None
    return path if in_forward else None


# The configuration of a layer, which its replacement carries too, read-only (lowrank.modules): an
# owner may read it, as timm's ConvNormAct does for its in_channels; setting it raises.
LAYER_CONFIG = CONV2D_CONFIG + LINEAR_CONFIG
# Attributes that the replacement (an nn.Sequential) has too: an owner may read those.
REPLACEMENT_ATTRIBUTES = frozenset(dir(nn.Sequential())) | frozenset(LAYER_CONFIG)
WEIGHT_READ = "reads its weights directly"


def _attribute_use(name: str, store: bool) -> str | None:
    """How reading (or, if ``store``, setting) attribute ``name`` of a layer would not carry over to its
    replacement; None when it would."""
    if store and (name in LAYER_CONFIG or name not in REPLACEMENT_ATTRIBUTES):
        return f"sets its {name!r}"
    return None if name in REPLACEMENT_ATTRIBUTES else f"reads its {name!r}"


def _resolve(node: ast.AST, namespaces: list[dict], local_names: set[str]):
    """The object that a name, a dotted name or a tuple of them (``nn.Identity``, ``(A, nn.Linear)``)
    designates in the first of ``namespaces`` (modules' globals) that holds it, or builtins; None when
    it cannot be told statically, such as a name in ``local_names`` (the function's own)."""
    try:
        if isinstance(node, ast.Tuple):
            items = [_resolve(item, namespaces, local_names) for item in node.elts]
            return None if any(item is None for item in items) else tuple(items)
        if isinstance(node, ast.Attribute):
            owner = _resolve(node.value, namespaces, local_names)
            return None if owner is None else getattr(owner, node.attr, None)
    except Exception:  # a lazy module's __getattr__ may raise anything (a failed import)
        return None
    if isinstance(node, ast.Name) and node.id not in local_names:
        for namespace in [*namespaces, vars(builtins)]:
            if node.id in namespace:
                return namespace[node.id]
    return None


@functools.cache
def _prototypes() -> tuple[nn.Module, ...]:
    """A Conv2d, a Linear and an nn.Sequential (a replacement) to ask ``isinstance`` about: on the meta
    device, which leaves the random state alone."""
    return nn.Conv2d(1, 1, 1, device="meta"), nn.Linear(1, 1, device="meta"), nn.Sequential()


def _same_for_replacement(call: ast.Call, namespaces: list[dict], local_names: set[str]) -> bool:
    """Whether ``call`` is an ``isinstance`` check that a Conv2d or Linear layer and its replacement (an
    nn.Sequential) answer alike, such as timm's ``isinstance(self.conv_head, nn.Identity)``."""
    if not (_is_name(call.func, "isinstance") and len(call.args) == 2 and not call.keywords):
        return False
    classes = _resolve(call.args[1], namespaces, local_names)
    *layers, replacement = _prototypes()
    try:
        return classes is not None and all(
            isinstance(layer, classes) == isinstance(replacement, classes) for layer in layers
        )
    except Exception:  # not a class or a tuple of classes, or an __instancecheck__ that fails
        return False


def _source_uses(
    function: ast.FunctionDef, in_forward: bool, namespaces: list[dict], root: str = "self"
) -> set[tuple[str, str]]:
    """``(path, use)`` for each submodule of ``self`` that ``function`` uses other than by calling it:
    reading an attribute the replacement lacks (``self.a.weight``, even only for its dtype), setting
    its configuration (``self.a.padding = 0``) or passing it to a function (``head(self.a, x)``; not
    an ``isinstance`` check that the replacement answers alike, its classes named in ``namespaces``,
    the globals of the function's module). Paths as in ``_read_path`` (wildcards only ``in_forward``);
    wildcards for weights only (other attributes of that name are read off tensors and configs
    everywhere). With another ``root``, the uses of what that parameter is given, relative to it."""
    parameters = {arg.arg for arg in ast.walk(function.args) if isinstance(arg, ast.arg)}
    assigned = {
        node.id for node in ast.walk(function) if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load)
    }
    uses = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Attribute) and (use := _attribute_use(node.attr, not isinstance(node.ctx, ast.Load))):
            if node.attr not in ("weight", "bias"):
                path = _read_path(node.value, False, root)
            elif isinstance(node.value, ast.Name) and node.value.id in parameters - {root}:
                continue  # a module given to a helper, e.g. an initialiser
            else:
                path, use = _read_path(node.value, in_forward, root), WEIGHT_READ
            if path:
                uses.add((path, use))
        elif isinstance(node, ast.Call) and not _same_for_replacement(node, namespaces, parameters | assigned):
            for argument in [*node.args, *(keyword.value for keyword in node.keywords)]:
                path = _read_path(argument, False, root)
                if path:
                    uses.add((path, f"passes it to {ast.unparse(node.func)}()"))
    return uses


def _loop_paths(function: ast.FunctionDef) -> dict[str, list[str]]:
    """The submodules that the loop variables of ``function`` take, where told statically: ``for b in
    self.a`` gives ``{"b": ["a.*"]}`` and ``for b in (self.x, self.y)`` ``{"b": ["x", "y"]}`` (also in
    comprehensions). Loops over what cannot be told, such as ``self.modules()``, are left out."""
    loops = {}
    for node in ast.walk(function):
        if not (isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name)):
            continue
        if isinstance(node.iter, (ast.Tuple, ast.List)):
            paths = [_read_path(item, in_forward=True) for item in node.iter.elts]
        else:
            path = _read_path(node.iter, in_forward=True)
            paths = [path and f"{path}.*"]
        if all(path and not path.startswith("*") for path in paths):
            loops[node.target.id] = paths
    return loops


def _argument_uses(
    caller: ast.FunctionDef, methods: dict[str, list[ast.FunctionDef]], called: set[str], namespaces: list[dict]
) -> set[tuple[str, str]]:
    """``_source_uses`` of the class's own methods through the submodules that ``caller`` passes them:
    ``self.fuse(self.a)`` with ``def fuse(self, branch): ... branch.conv.weight`` gives
    ``("a.conv", "reads its weights directly (in fuse(), given self.a)")``, as timm's RepVGG and
    MobileOne blocks fuse their branches; ``self.fuse(self.a[i])`` gives ``"a.*.conv"``, and so does a
    loop variable over ``self.a`` (``_loop_paths``). Other submodules that cannot be told statically
    are left out: those are mostly initialisers' (``for m in self.modules(): self._init_weights(m)``).
    (Passing the layer itself is one of ``_source_uses``.)"""
    uses, loops = set(), _loop_paths(caller)
    for call in ast.walk(caller):
        if not (
            isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and _is_name(call.func.value, "self")
        ):
            continue
        positional = list(itertools.takewhile(lambda argument: not isinstance(argument, ast.Starred), call.args))
        for callee in methods.get(call.func.attr, ()):
            static = any(_is_name(decorator, "staticmethod") for decorator in callee.decorator_list)
            parameters = [arg.arg for arg in (*callee.args.posonlyargs, *callee.args.args)][0 if static else 1 :]
            bound = dict(zip(parameters, positional)) | {word.arg: word.value for word in call.keywords if word.arg}
            for parameter, argument in bound.items():
                if isinstance(argument, ast.Name):
                    given = loops.get(argument.id, [])
                else:
                    given = [_read_path(argument, in_forward=True)]  # self.a[i] as "a.*"
                given = [start for start in given if start and not start.startswith("*")]
                if not given:
                    continue
                for path, use in _source_uses(callee, callee.name in called, namespaces, root=parameter):
                    where = f"{use} (in {callee.name}(), given {ast.unparse(argument)})"
                    uses |= {(f"{start}.{path}", where) for start in given}
    return uses


def _bytecode_uses(function) -> set[tuple[str, str]]:
    """``_source_uses`` of a ``forward`` whose source is unavailable, from its bytecode (nested
    functions included), attribute reads and sets only: ``self.a.b.weight`` gives ``("a.b", WEIGHT_READ)``,
    any other weight read ``("*", WEIGHT_READ)``."""
    uses, codes = set(), [function.__code__]
    while codes:
        code = codes.pop()
        chain = None  # the attributes loaded since `self`
        for instruction in dis.get_instructions(code):
            name = instruction.argval
            if instruction.opname in ("LOAD_FAST", "LOAD_DEREF", "LOAD_FAST_CHECK") and name == "self":
                chain = []
            elif instruction.opname.startswith(("LOAD_ATTR", "LOAD_METHOD")):
                weight = name in ("weight", "bias")
                if weight and chain is None:
                    uses.add(("*", WEIGHT_READ))
                elif chain and (use := _attribute_use(name, store=False)):
                    uses.add((".".join(chain), WEIGHT_READ if weight else use))
                chain = None if chain is None or weight else [*chain, name]
            elif instruction.opname in ("STORE_ATTR", "DELETE_ATTR") and chain:
                if use := _attribute_use(name, store=True):
                    uses.add((".".join(chain), use))
                chain = None
            else:
                chain = None
        codes.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
    return uses


def _called_from_forward(functions: list[ast.FunctionDef]) -> set[str]:
    """Names of ``forward`` and of the methods it may call: those it names as ``self.<name>`` (called,
    passed as a callback, aliased), directly or through each other."""
    methods = {function.name for function in functions}
    names, added = set(), {"forward"}
    while added:
        names |= added
        added = {
            node.attr
            for function in functions
            if function.name in added
            for node in ast.walk(function)
            if isinstance(node, ast.Attribute) and _is_name(node.value, "self") and node.attr in methods
        } - names
    return names


def _function_uses(function, in_forward: bool) -> set[tuple[str, str]]:
    """``_source_uses`` of a Python function, from its bytecode when its source is unavailable."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return _bytecode_uses(function)
    definitions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return set().union(*(_source_uses(definition, in_forward, [function.__globals__]) for definition in definitions))


@functools.cache
def _direct_uses(cls: type) -> frozenset[tuple[str, str]]:
    """``_source_uses`` of every method of ``cls`` but ``__init__``: submodules that it uses other than
    by calling them, e.g. ``("out_proj", WEIGHT_READ)`` for ``nn.MultiheadAttention``, which passes
    ``self.out_proj.weight`` to a functional instead of calling ``self.out_proj``. Replacing such a
    submodule would break its owner, so it is left alone. Weight reads that cannot be told statically
    count in ``forward`` and the methods it calls only (elsewhere they are mostly initialisers); a
    method whose source is unavailable (a class defined in ``python -c``, some notebooks) is read from
    its bytecode when it is ``forward``."""
    uses, trees = set(), []
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        try:
            trees.append(ast.parse(textwrap.dedent(inspect.getsource(klass))))
        except (OSError, TypeError, SyntaxError):
            for name, member in vars(klass).items():
                if not inspect.isfunction(member) or name == "__init__":
                    continue
                try:
                    trees.append(ast.parse(textwrap.dedent(inspect.getsource(member))))
                except (OSError, TypeError, SyntaxError):
                    if name == "forward":
                        uses |= _bytecode_uses(member)
    definitions = [
        function
        for tree in trees
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) and function.name != "__init__"
    ]
    called = _called_from_forward(definitions)
    methods = defaultdict(list)
    for function in definitions:
        methods[function.name].append(function)
    # The globals of the classes' modules, where the names in their methods resolve (the module of the
    # class defining a method would be exact; a name that two of them define differently is rare).
    namespaces = [vars(module) for klass in cls.__mro__ if (module := sys.modules.get(klass.__module__))]
    for function in definitions:
        uses |= _source_uses(function, function.name in called, namespaces)
        uses |= _argument_uses(function, methods, called, namespaces)
    return frozenset(uses)


def _instance_uses(module: nn.Module) -> set[tuple[str, str]]:
    """``_source_uses`` of what runs with the module but is not in its class: a ``forward`` set on the
    instance (``model.forward = MethodType(f, model)``) and its forward hooks (a user's weight
    clipping), these from their bytecode, where the module they get is not named ``self``, so that
    any weight they read counts for every layer below."""
    forward = vars(module).get("forward")
    function = getattr(forward, "__func__", forward)
    uses = _function_uses(function, in_forward=True) if inspect.isfunction(function) else set()
    for hook in [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]:
        function = getattr(hook, "__func__", getattr(hook, "func", hook))  # a bound method or a partial
        if not inspect.isfunction(function) and callable(function):  # an object with __call__
            function = getattr(type(function).__call__, "__func__", type(function).__call__)
        if inspect.isfunction(function):
            uses |= {(path, f"{use} (in its hook {function.__qualname__})") for path, use in _bytecode_uses(function)}
    return uses


def _direct_use(owner: nn.Module, path: str) -> str | None:
    """How ``owner`` uses its submodule at ``path`` other than by calling it, if it does (a ``*`` in a
    used path stands for any names: ``a.*`` for any submodule of ``a``, ``a.*.conv`` for ``a.0.conv``)."""
    for used, use in sorted(_direct_uses(type(owner)) | _instance_uses(owner)):
        if re.fullmatch(re.escape(used).replace(r"\*", ".*"), path):
            return use
    return None


def _references(model: nn.Module) -> tuple[dict[int, list[str]], dict[int, list[str]], dict[int, str]]:
    """The other ways a layer is reached, which its replacement would not take over: every name of each
    module and of each parameter, by ``id`` (shared modules and tied parameters have several), and
    ``_held_outside``."""
    names_of = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        names_of[id(module)].append(name)
    owners = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)].append(name)
    return names_of, owners, _held_outside(model)


# What every nn.Module keeps in its __dict__ (parameters, submodules, hooks, flags): the rest is the
# model's own.
MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _held_outside(model: nn.Module) -> dict[int, str]:
    """Modules and tensors (parameters) that a module also holds outside its registered submodules and
    parameters, by ``id``, with where: in a dict, list, tuple or set (``self.heads = {"main": self.fc}``,
    ``self.weights = [self.fc.weight]``) or as a bound method (``self.act = self.fc.forward``). Replacing
    the registered module would leave these on the old one, which the state dict no longer holds."""
    held = {}

    def visit(value, where, depth):
        if isinstance(value, (nn.Module, torch.Tensor)):
            held.setdefault(id(value), where)
        elif isinstance(getattr(value, "__self__", None), nn.Module):
            held.setdefault(id(value.__self__), where)
        elif depth < 3 and isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{where}[{key!r}]", depth + 1)
        elif depth < 3 and isinstance(value, (list, tuple, set, frozenset)):
            for index, item in enumerate(value):
                visit(item, f"{where}[{index}]", depth + 1)

    for owner_name, owner in model.named_modules():
        for attribute, value in vars(owner).items():
            if attribute not in MODULE_INTERNALS:
                visit(value, f"{owner_name}.{attribute}" if owner_name else attribute, 0)
    return held


# What the scan looks at: the layers it can replace (Conv2d, Linear) and those it reports as not supported.
LAYER_TYPES = (_ConvNd, nn.Linear)


def _scan(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Conv2d and Linear layers that can be replaced, and every other conv/linear layer with the reason
    it cannot."""
    references = _references(model)
    candidates, skipped = {}, {}
    for name, module in model.named_modules():
        if not isinstance(module, LAYER_TYPES):
            continue
        reason = _why_not(model, name, module, references)
        if reason:
            skipped[name] = reason
        else:
            candidates[name] = module
    return candidates, skipped


def _why_not(model, name, module, references, amct_rules: bool = False) -> str | None:
    """Why ``module`` cannot be replaced safely, or None. ``amct_rules``: as AMCT, Conv2d subclasses that
    keep Conv2d's forward are replaced by plain convs, and tied weights stay tied (see ``_broken_ties``)."""
    names_of, owners, held = references
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        return f"{type(module).__name__} is not supported (Conv2d and Linear are)"
    reason = _why_not_in_owners(model, name) if name else None  # the model itself (name '') has no owners
    if reason:
        return reason
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "its weights are not initialised yet (lazy module)"
    if parametrize.is_parametrized(module):
        tensors = list(module.parametrizations)
        verb = "is" if len(tensors) == 1 else "are"
        return f"its {' and '.join(tensors)} {verb} parametrized (torch.nn.utils.parametrize)"
    inherits_forward = amct_rules and type(module).forward is nn.Conv2d.forward
    if type(module) not in (nn.Conv2d, nn.Linear) and not inherits_forward:
        cls, base = type(module).__name__, "Conv2d" if isinstance(module, nn.Conv2d) else "Linear"
        if cls == base:  # torch.ao.nn.qat's fake-quantized layers: named in full
            cls, base = f"{type(module).__module__}.{cls}", f"torch.nn.{base}"
        return f"{cls} is a subclass of {base} whose forward may differ"
    others = [other for other in names_of[id(module)] if other != name]
    if others:
        return f"the module is shared with {others[0]!r}"
    if id(module) in held:
        where = held[id(module)]
        return f"it is also held as {where}, outside the registered submodules, which would keep the old layer"
    for param_name, param in module.named_parameters(recurse=False):
        tied = [owner for owner in owners[id(param)] if owner.rpartition(".")[0] != name]
        if tied and not amct_rules:
            return f"its parameters are tied with {tied[0]!r}"
        if id(param) in held:
            where = held[id(param)]
            return (
                f"its {param_name} is also held as {where}, outside the registered parameters, which would keep "
                "the old one"
            )
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} convolution (groups={module.groups})"
    reason = _stale_configuration(module)
    if reason:
        return reason
    if any(getattr(module, hooks, None) for hooks in HOOKS):
        return "hooks are registered on it and would be lost"
    if "forward" in vars(module):
        return "its forward is replaced on the instance (e.g. by an accelerate hook) and would be lost"
    if any(param._backward_hooks or param._post_accumulate_grad_hooks for param in module.parameters(recurse=False)):
        return "hooks are registered on its parameters and would be lost"
    if module.weight.dtype not in SUPPORTED_DTYPES:
        return f"unsupported dtype {module.weight.dtype}"
    return None


def _why_not_in_owners(model, name) -> str | None:
    """Why the modules holding the layer ``name`` keep it from being replaced, if they do."""
    parent = model.get_submodule(name.rpartition(".")[0])
    if _compiled(parent):  # the wrapper's forward is bound to the module it was given
        return (
            "it is compiled on its own (torch.compile), whose wrapper would keep calling the old layer: decompose "
            "before compiling"
        )
    if isinstance(parent, _FusedModule):  # e.g. ConvReLU2d, which quantization converts from its [0].weight
        return f"it is part of {type(parent).__name__}, a fused module that quantization converts as a whole"
    parts = name.split(".")
    for depth in range(len(parts)):
        owner = model.get_submodule(".".join(parts[:depth]))
        use = _direct_use(owner, ".".join(parts[depth:]))
        if use:
            return f"{type(owner).__name__} {use} instead of only calling it"
    return None


def _stale_configuration(module: nn.Module) -> str | None:
    """How the configuration of a Conv2d or Linear, which its replacement is built from, fails to
    describe what it computes: settings changed after construction (by a pruning tool, or by code that
    turns strides into dilations) in a form its constructor never gives, or that its forward reads from
    elsewhere (the weight's shape, the padding of a non-zero ``padding_mode``, computed when it was built)."""
    if isinstance(module, nn.Conv2d):
        for name in ("kernel_size", "stride", "dilation", *(() if isinstance(module.padding, str) else ("padding",))):
            value = getattr(module, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                return f"its {name} {value!r} is not a pair, as Conv2d makes it: set it as one"
        expected = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    else:
        expected = (module.out_features, module.in_features)
    for tensor_name, tensor, shape in (("weight", module.weight, expected), ("bias", module.bias, expected[:1])):
        if tensor is not None and tuple(tensor.shape) != shape:
            return f"its {tensor_name} has shape {tuple(tensor.shape)} where its configuration says {shape}"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        padded = tuple(module._reversed_padding_repeated_twice)
        if padded != tuple(build_module(layer_spec(module), device="meta")._reversed_padding_repeated_twice):
            return (
                f"its padding, kernel, stride or dilation changed after construction: padding_mode="
                f"{module.padding_mode!r} still pads by {padded}, as computed when it was built"
            )
    return None


def _plan(model, policy: RankPolicy, conv_method: str, with_weights: bool, what: str):
    """Replacements for the layers the policy selects, the reasons the others are left alone, and the
    latency rule's measurements per layer."""
    candidates, skipped = _scan(model)
    for name, reason in skipped.items():
        logger.info("Skip: %r: %s", name, reason)
    # Every name of every layer: the scan names a shared layer once, and a user may name its other ones.
    layers = [name for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, LAYER_TYPES)]
    for unmatched in policy.unmatched(layers):
        example = f", such as {max(layers, key=lambda name: name.count('.'))!r}" if any(layers) else ""
        logger.warning("%s matches no conv or linear layer (expressions match whole names%s)", unmatched, example)
    inputs = latency.capture_for_policy(model, policy, candidates) if policy.measures_latency else {}
    replacements, measurements = [], {}
    # Timing builds default-initialised replacements and draws random inputs, as many as the timings
    # decide: the caller's random state is left as it was.
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with logging_redirect_tqdm(loggers=[logger]), torch.random.fork_rng(devices=cuda, enabled=policy.measures_latency):
        for name, layer in tqdm(candidates.items(), desc=what, unit="layer", disable=None, leave=False):
            logger.info("Processing: %r", name)
            reason, replacement = _plan_layer(
                name, layer, policy, conv_method, with_weights, inputs.get(name), measurements
            )
            if reason:
                skipped[name] = reason
                logger.info("Skip: %r: %s", name, reason)
            else:
                replacements.append(replacement)
    return replacements, skipped, measurements


def _plan_layer(name, layer, policy, conv_method, with_weights, inputs, measurements):
    rule, reason = policy.rule_for(name)
    if rule is None:
        return reason, None
    method = method_for(layer, rule.method or conv_method)
    reason = method.unsupported(layer)
    if reason:
        return reason, None
    if with_weights and layer.weight.is_meta:
        return "its weights are on the meta device (load them first, or decompose the structure only)", None
    if with_weights and not bool(torch.isfinite(layer.weight).all()):
        raise ValueError(f"{name!r} has weights that are not finite (NaN or inf): nothing was decomposed")
    if rule.kind == "latency":
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


@torch.no_grad()
def _build(model: nn.Module, replacements: list[Replacement]) -> list[tuple[str, nn.Sequential]]:
    """Each planned layer's nn.Sequential, on the layer's device and dtype, keeping its memory format,
    training mode and requires_grad; with the weights when the plan has them. The model is not changed,
    so that running out of memory here leaves it whole."""
    built, tied = [], {}
    for replacement in replacements:
        layer = model.get_submodule(replacement.name)
        new = _fill(
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
def _fill(layer: nn.Module, new: nn.Sequential, weights: list[torch.Tensor]) -> nn.Sequential:
    """``new`` with ``weights`` copied in (cast to its dtype) and ``layer``'s bias on its last module;
    as it is when there are no weights."""
    if weights:  # every parameter of the uninitialised modules is filled in
        for module, value in zip(new, weights, strict=True):
            module.weight.copy_(value)
        if getattr(layer, "bias", None) is not None:  # the only bias, on the last module
            new[-1].bias.copy_(layer.bias)
    return new


def _swap(model: nn.Module, built: list[tuple[str, nn.Sequential]]) -> tuple[nn.Module, dict[str, list[str]]]:
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


def _make_policy(options: dict, valid_extra: tuple[str, ...] = ("method",)) -> RankPolicy:
    """RankPolicy(**options), an unknown option named with the valid ones (and ``valid_extra``, the
    caller's own keywords)."""
    valid = [name for name in RankPolicy.__dataclass_fields__ if name != "default"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown policy option(s) {', '.join(unknown)}; valid options: {', '.join([*valid_extra, *valid])}"
        )
    return RankPolicy(**options)


def _check_model(model) -> nn.Module:
    """Raises TypeError for a model that cannot be decomposed; returns the module to decompose: the
    model, or the one its ``torch.compile`` wrapper (``OptimizedModule``) runs, whose layers keep their
    own names (not ``_orig_mod.<name>``) so that an info file replays on the model compiled or not.
    Dynamo recompiles the wrapper when the layers change."""
    if isinstance(model, torch.jit.ScriptModule):  # its forward is compiled code that calls the old layers
        raise TypeError("a TorchScript module cannot be decomposed: decompose the Python model, then script it")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        wrapper = next((cls.__name__ for cls in type(module).__mro__ if cls.__name__ in DISTRIBUTED_WRAPPERS), None)
        if wrapper:
            where = f" (at {name!r})" if name else ""
            raise TypeError(
                f"the model is wrapped in {wrapper}{where}, which would keep synchronising or sharding the old "
                "layers' parameters and not the new ones: decompose the unwrapped model (model.module), then wrap "
                "it (with Accelerate: before accelerator.prepare)"
            )
    return _uncompiled(model)


def _uncompiled(model: nn.Module) -> nn.Module:
    """The module that ``model``'s ``torch.compile`` wrappers run, or ``model``."""
    while _compiled(model):
        model = model._orig_mod
    return model


def _returned(model: nn.Module, layers: nn.Module, decomposed: nn.Module) -> nn.Module:
    """What the API returns: ``model`` as given (its ``torch.compile`` wrapper included), whose ``layers``
    were decomposed in place, or the new module when the model itself was the layer (``_swap``)."""
    return model if decomposed is layers else decomposed


def _compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper, which runs its ``_orig_mod`` (told by name: no
    import of torch._dynamo)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(module._modules.get("_orig_mod"), nn.Module)


def _check_method(method: str) -> str:
    if method not in CONV_METHODS:
        raise ValueError(f"unknown method {method!r} for k x k convolutions; valid methods: {', '.join(CONV_METHODS)}")
    return method


def _check_path(path, argument: str) -> None:
    """Raises TypeError naming ``argument`` when ``path`` is not a path (pathlib's own error names neither)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a path (str or os.PathLike), got {path!r}")


def _check_info_path(path, argument: str) -> None:
    """Raises ValueError naming ``argument`` when the info file ``path`` cannot be written: before any work."""
    _check_path(path, argument)
    problem = unwritable(path)
    if problem:
        raise ValueError(f"{argument}: {problem}")


def _write_info(path, model, replacements, skipped, policy: RankPolicy, method: str, measurements) -> None:
    """The info file of a plan, with the policy and, for the latency rule, what it was measured on."""
    described = {"method": method, **policy.describe()}
    if policy.measures_latency:
        described["measured_on"] = latency.context(policy.example_input)
    write_info(path, model, replacements, skipped, described, measurements)
    logger.info("Decomposition information file is saved to: %s", os.path.realpath(path))


def _decompose(model, policy, method, with_weights, info_path, what) -> tuple[nn.Module, dict[str, list[str]]]:
    if info_path is not None:
        _check_info_path(info_path, "decompose_info_path")
    logger.info("%s start.", what)
    start = time.perf_counter()
    params_before = count_parameters(model)
    replacements, skipped, measurements = _plan(model, policy, method, with_weights, what)
    if not replacements:
        logger.info("No layer meets decomposition conditions.")
    built = _build(model, replacements)
    if info_path is not None:
        _write_info(info_path, model, replacements, skipped, policy, method, measurements)
    model, changes = _swap(model, built)
    _log_done(changes, params_before, model, start, what)
    return model, changes


def _broken_ties(model: nn.Module, replacements: list[Replacement], references) -> dict[str, str]:
    """The replacements whose weight or bias is tied to a layer that is not replaced with the same
    structure (the tie could not be kept), by name, with the reason."""
    _, owners, _ = references
    planned = {replacement.name: replacement for replacement in replacements}
    broken = {}
    for replacement in replacements:
        layer = model.get_submodule(replacement.name)
        for param in (layer.weight, layer.bias):
            others = [owner.rpartition(".")[0] for owner in owners[id(param)]] if param is not None else []
            other = next((o for o in others if o not in planned or planned[o].specs != replacement.specs), None)
            if other is not None:
                broken[replacement.name] = f"its parameters are tied with {other!r}, which is not decomposed alike"
    return broken


def _decompose_amct(model: nn.Module, info_path) -> tuple[nn.Module, dict[str, list[str]]]:
    """AMCT's ``auto_decomposition``: its layers, ranks, modes and weights (``lowrank.amct``), its info
    file; layers that cannot be replaced safely (``_why_not``) are left alone too, with the reason."""
    if info_path is not None:
        _check_info_path(info_path, "decompose_info_path")
    logger.info("auto_decomposition start.")
    start, params_before = time.perf_counter(), count_parameters(model)
    references = _references(model)
    replacements = []
    convs = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    with logging_redirect_tqdm(loggers=[logger]):
        for name, layer in tqdm(convs, desc="auto_decomposition", unit="layer", disable=None, leave=False):
            logger.info("Processing: %r", name)
            unsupported = amct.unsupported_dtype(layer)
            if unsupported:
                logger.warning("%s of layer %r, ignored.", unsupported, name)
                continue
            lazy = isinstance(layer.weight, nn.parameter.UninitializedParameter)
            # As AMCT, before its skip rules: any conv with an invalid weight stops the call.
            if not lazy and not layer.weight.is_meta and not bool(torch.isfinite(layer.weight).all()):
                raise ValueError(
                    f"weight tensor contains invalid number(inf or nan): layer {name!r}; nothing was decomposed"
                )
            reason = amct.skip_reason(layer) or _why_not(model, name, layer, references, amct_rules=True)
            if not reason and layer.weight.is_meta:
                reason = "its weights are on the meta device (load them first)"
            if reason:
                logger.info("Skip: %r: %s", name, reason)
                continue
            replacements.append(amct.plan_layer(name, layer))
    broken = _broken_ties(model, replacements, references)
    for name, reason in broken.items():
        logger.info("Skip: %r: %s", name, reason)
    replacements = [replacement for replacement in replacements if replacement.name not in broken]
    if not replacements:
        unsaved = " Decomposition information file is not saved." if info_path is not None else ""
        logger.info("No tensor meets decomposition conditions.%s", unsaved)
    built = _build(model, replacements)
    if info_path is not None and replacements:
        amct.write_info(info_path, [amct.info_record(model.get_submodule(r.name), r) for r in replacements])
    model, changes = _swap(model, built)
    _log_done(changes, params_before, model, start, "auto_decomposition")
    return model, changes


def _log_done(changes, params_before, model, start, what) -> None:
    logger.info(
        "%d layer(s) decomposed, parameters %d -> %d, in %.2f s.",
        len(changes),
        params_before,
        count_parameters(model),
        time.perf_counter() - start,
    )
    logger.info("%s complete.", what)


def auto_decomposition(model: nn.Module, decompose_info_path=None, *, method: str | None = None, **policy):
    """Decomposes ``model``'s layers in place, weights included (AMCT's ``auto_decomposition``).

    Called as AMCT calls it, ``auto_decomposition(model)`` or ``auto_decomposition(model, path)``, it
    makes AMCT's choice (``lowrank.amct``): the k x k convs (k >= 3) AMCT decomposes, at its EVBMF rank
    clamped and rounded to 16, in its four modes, with its weights and its info file (a JSON list of
    records, which AMCT's ``decompose_network`` reads). Unlike AMCT, layers that cannot be replaced
    safely (see below) are left alone, and a string padding (``'same'``, which AMCT refuses) is kept.
    Any of the keywords below selects lowrank's own rules and info file instead.

    Args:
        model: any ``nn.Module``. Conv2d layers with a k x k kernel use ``method``; Linear layers and
            1x1 convolutions use ``svd``. Layers that cannot be replaced safely are left alone, and
            the reason is logged and recorded in the info file.
        decompose_info_path: where to write the decomposition info file (structure only, no
            weights), which ``decompose_network`` replays. None: no file.
        method: ``"spatial"`` (AMCT's structure, the default of lowrank's rules), ``"tucker2"``
            (msModelSlim's) or ``"svd"``.
        **policy: lowrank's rank policy, see ``lowrank.policy``: one of ``rank``, ``ratio``, ``energy``,
            ``vbmf``, ``latency``; and ``layers``, ``exclude``, ``ratio_of``, ``divisor``, ``min_rank``.
            With ``method`` alone: ``ratio=0.3`` of each layer's multiply-adds. ``latency=0.5`` times each candidate
            layer, dense and decomposed, on the model's device and keeps only replacements measured
            to run in at most half the dense layer's time; it needs ``example_input`` (a tensor, a tuple
            of the model's positional arguments or a dict of its keyword arguments, as the model will
            see them in production: batch size, dtype, memory format), on which the model is run once
            to capture each layer's input. The timings go into the info file; ``decompose_network``
            replays without timing.

    Returns:
        ``(model, changes)``: the same model, and ``{"conv2": ["conv2.0", "conv2.1"], ...}`` for
        the replaced layers. A ``Conv2d`` or ``Linear`` given as the model itself is left as it is and
        its replacement returned (``changes`` ``{"": ["0", "1"]}``), as in AMCT.
    """
    layers = _check_model(model)
    if method is None and not policy:
        decomposed, changes = _decompose_amct(layers, decompose_info_path)
        return _returned(model, layers, decomposed), changes
    method = _check_method(method or "spatial")
    decomposed, changes = _decompose(
        layers, _make_policy(policy), method, True, decompose_info_path, "auto_decomposition"
    )
    return _returned(model, layers, decomposed), changes


def decompose_network(model: nn.Module, decompose_info_path):
    """Replays the structure recorded in an info file on ``model``, in place, with default-initialised
    weights (AMCT's ``decompose_network``): load the decomposed weights afterwards.

    Reads lowrank's info files and AMCT's. Every recorded layer is checked against the model first;
    a mismatch raises ``DecomposeInfoError`` naming the file, the layer and the difference, and
    leaves the model untouched.

    Returns:
        ``(model, changes)`` as ``auto_decomposition``.
    """
    layers = _check_model(model)
    _check_path(decompose_info_path, "decompose_info_path")
    document = read_document(decompose_info_path)
    if is_msmodelslim_config(document):  # msModelSlim's structures, as Decompose(...).from_file() builds them
        config = msmodelslim.read_config(decompose_info_path, document)
        unknown = msmodelslim.unmatched(layers, config)
        if unknown:
            raise DecomposeInfoError(
                f"{decompose_info_path}: {unknown[0]!r} is not a Linear, Embedding or Conv2d of the model"
            )
        decomposed, changes = _decompose_msmodelslim(layers, config, False, None, -1)
        return _returned(model, layers, decomposed), changes
    logger.info("decompose_network start.")
    replacements = read_info(decompose_info_path, layers)
    amct_file = isinstance(document, list)  # AMCT's rules: subclasses, ties
    references = _references(layers)
    reasons = {
        r.name: _why_not(layers, r.name, layers.get_submodule(r.name), references, amct_rules=amct_file)
        for r in replacements
    }
    reasons |= _broken_ties(layers, replacements, references)
    for name, reason in reasons.items():
        if reason:
            raise DecomposeInfoError(f"{decompose_info_path}: layer {name!r} cannot be replaced: {reason}")
    if not replacements:
        logger.info("No layer meets decomposition conditions.")
    decomposed, changes = _swap(layers, _build(layers, replacements))
    logger.info("decompose_network complete.")
    return _returned(model, layers, decomposed), changes


class Decompose:
    """msModelSlim's interface: ``Decompose(model).from_ratio(0.5).decompose_network()``.

    msModelSlim's own calls give msModelSlim's result (``lowrank.msmodelslim``): ``from_ratio``,
    ``from_fixed``, ``from_vbmf`` and ``from_dict`` with its ``excludes`` (exact layer names) and
    ``divisor`` (64), ``from_file``, the ``decompose_config`` they set, and
    ``decompose_network(do_decompose_weight=True, datasets=None, max_iter=-1)``: the same layers and
    hidden channels, the same structures and state_dict keys (Linear -> 2 Linear, Embedding -> Embedding
    + Linear, Conv2d -> 1x1, kxk, 1x1), the same weights, data-aware with ``datasets``, and the same
    config file. lowrank's own rules are opt-in: ``method="spatial"`` or ``"svd"``, ``from_energy``,
    ``from_latency``, or any policy option of ``auto_decomposition`` (``ratio_of``, ``min_rank``, ...)
    given to a ``from_*`` method; they choose ranks when ``decompose_network`` runs, and save them in
    ``config_file`` as a lowrank info file.

    Args:
        model: the model to decompose; ``decompose_network`` returns a decomposed copy and leaves
            it untouched.
        config_file: a ``.json`` path where a ``from_*`` method saves the configuration it chose, and
            where ``from_file()`` reads it back: the processes of a multi-card job build the same
            structure from it, whatever their weights.
        method: the method of lowrank's rules for k x k convolutions: ``"tucker2"`` (msModelSlim's,
            default), ``"spatial"`` (AMCT's) or ``"svd"``; any but ``"tucker2"`` selects lowrank's rules.
    """

    def __init__(self, model: nn.Module, config_file=None, method: str = "tucker2"):
        if not isinstance(model, nn.Module):
            raise ValueError(f"Provided network is not a torch.nn.Module, got {type(model).__name__}")
        _check_model(model)
        if config_file is not None and (
            not isinstance(config_file, (str, os.PathLike)) or not os.fspath(config_file).endswith(".json")
        ):
            raise ValueError(
                f"Parameter config_file is not a valid json file name (a path ending in .json), got {config_file!r}"
            )
        self.model = model
        self.config_file = config_file
        self.method = _check_method(method)
        self.decompose_config = None  # msModelSlim's configuration: layer name -> hidden channels
        self.policy = None  # or lowrank's rules

    def _uses_own_rules(self, options: dict) -> bool:
        return bool(options) or self.method != "tucker2"

    def _choose(self, value, excludes, divisor) -> "Decompose":
        """msModelSlim's configuration for ``value``, saved to ``config_file`` when there is one."""
        divisor = msmodelslim.check_excludes_divisor(excludes, divisor)
        if self.config_file is not None:
            _check_info_path(self.config_file, "config_file")
        config = msmodelslim.choose(_uncompiled(self.model), value, excludes, divisor)
        if not config:
            raise ValueError("Generated decompose_config is not valid, check model structure and parameters.")
        if self.config_file is not None:
            msmodelslim.write_config(self.config_file, msmodelslim.config_json(config))
        self.decompose_config, self.policy = config, None
        return self

    def _set(self, excludes, divisor, **options) -> "Decompose":
        """lowrank's rules, with ``excludes`` as regular expressions (``exclude``)."""
        if "method" in options:
            raise ValueError(
                f"Decompose takes the method when it is built: Decompose(model, method={options['method']!r})"
            )
        missing = [
            name
            for name in ("rank", "ratio", "energy", "latency", "layers")
            if name in options and options[name] is None
        ]
        if missing:  # None means "not given" to RankPolicy, which would fall back to its default rule
            raise ValueError(f"{missing[0]} must be given, got None")
        policy = _make_policy({"exclude": excludes or (), "divisor": divisor, **options}, valid_extra=())
        if self.config_file is not None:
            replacements = _save_plan(_uncompiled(self.model), policy, self.method, self.config_file)
            policy = _replay_policy(replacements, self.config_file)
        self.decompose_config, self.policy = None, policy
        return self

    def from_ratio(self, channel_ratio: float, excludes=None, divisor: int = 64, **options) -> "Decompose":
        """Each layer's hidden channels from a parameter budget: ``channel_ratio`` (a float in (0, 1)) of
        its parameters, rounded to ``divisor``. With lowrank's options (``ratio_of="flops"``, ...), the
        largest ranks whose cost is at most that fraction of the layer's."""
        if self._uses_own_rules(options):
            return self._set(excludes, divisor, ratio=channel_ratio, **options)
        return self._choose(msmodelslim.ratio_value(channel_ratio), excludes, divisor)

    def from_fixed(self, channel_fixed: int, excludes=None, divisor: int = 64, **options) -> "Decompose":
        """The same hidden channels for every layer, rounded to ``divisor`` as msModelSlim does. With
        lowrank's options, a fixed rank (or one per rank of the method) used as given."""
        if self._uses_own_rules(options):
            return self._set(excludes, divisor, rank=channel_fixed, **options)
        return self._choose(msmodelslim.fixed_value(channel_fixed), excludes, divisor)

    def from_vbmf(self, excludes=None, divisor: int = 64, **options) -> "Decompose":
        """Hidden channels estimated by msModelSlim's VBMF, rounded to ``divisor``."""
        if self._uses_own_rules(options):
            return self._set(excludes, divisor, vbmf=True, **options)
        return self._choose(msmodelslim.VBMF, excludes, divisor)

    def from_dict(self, channel_dict: dict, excludes=None, divisor: int = 64, **options) -> "Decompose":
        """Per layer, the value of the first key (a regular expression found anywhere in the name, in the
        dict's order) that matches: an int, a ratio, ``"vbmf"`` or ``(hidden_out, hidden_in)``; layers
        that no key matches are left alone. With lowrank's options, ``layers=`` of ``auto_decomposition``
        (whole-name matches, lowrank's rules)."""
        if self._uses_own_rules(options):
            return self._set(excludes, divisor, layers=channel_dict, **options)
        return self._choose(msmodelslim.dict_value(channel_dict), excludes, divisor)

    def from_energy(self, energy: float, excludes=None, divisor: int = 64, **options) -> "Decompose":
        """lowrank's rule: the smallest ranks keeping ``energy`` of each layer's squared singular values."""
        return self._set(excludes, divisor, energy=energy, **options)

    def from_latency(self, latency: float, example_input, excludes=None, divisor: int = 64, **options):
        """lowrank's rule: the largest ranks whose replacement is measured to run in at most ``latency``
        of the dense layer's time (0.5: 2x faster) on the input it receives when the model runs on
        ``example_input``; layers that no rank makes that fast are left alone."""
        return self._set(excludes, divisor, latency=latency, example_input=example_input, **options)

    def from_file(self) -> "Decompose":
        """The configuration a ``from_*`` method saved in ``config_file`` (msModelSlim's, or lowrank's
        info file for lowrank's rules)."""
        if self.config_file is None or not os.path.isfile(self.config_file):
            raise ValueError(
                "Initialized config_file is not valid, or not initialized by other from_xxx functions: "
                f"{self.config_file} is not a file"
            )
        document = read_document(self.config_file)
        if is_msmodelslim_config(document):
            self.decompose_config, self.policy = msmodelslim.read_config(self.config_file, document), None
        else:  # lowrank's info file (lowrank's rules)
            replacements = read_info(self.config_file, _uncompiled(self.model))
            self.decompose_config, self.policy = None, _replay_policy(replacements, self.config_file)
        return self

    def decompose_network(self, do_decompose_weight: bool = True, datasets=None, max_iter: int = -1) -> nn.Module:
        """A decomposed copy of the model. With ``do_decompose_weight=False`` only the structure is
        built (default-initialised), for processes that then load the weights saved by the one that
        decomposed them.

        ``datasets`` (msModelSlim's data-aware decomposition): an iterable of model inputs, a dict
        passed as keyword arguments, a list or tuple as positional ones, a tensor as the one argument
        (msModelSlim skips every statistic on a tensor). The Linear and Conv2d layers decomposed are
        fitted to their inputs' second moment over one pass, in eval mode; ``max_iter`` > 0 reads that
        many elements (-1: all)."""
        if self.decompose_config is None and self.policy is None:
            raise ValueError("decompose_config not initialized, call from_xxx functions first.")
        if not isinstance(do_decompose_weight, bool):  # "False" or None would silently pick one of the two
            raise TypeError(f"parameter do_decompose_weight need to be a boolean value, got {do_decompose_weight!r}")
        msmodelslim.check_max_iter(max_iter)
        if self.policy is not None and datasets is not None:
            raise ValueError(
                "datasets= fits msModelSlim's configurations (from_ratio, from_fixed, from_vbmf, from_dict, from_file "
                "without lowrank's options); lowrank's own rules decompose from the weights alone"
            )
        if self.policy is not None and not do_decompose_weight and self.policy.measures_latency:
            raise ValueError(
                "a latency rule picks ranks from timings, which differ between processes: save the deciding "
                "process's ranks with Decompose(model, config_file=...) and build the others' structure with "
                "from_file(), not with the latency rule and do_decompose_weight=False"
            )
        try:
            model = copy.deepcopy(self.model)
        except (RuntimeError, TypeError) as error:
            raise TypeError(
                f"Decompose decomposes a copy of the model, and this one cannot be copied ({error}): decompose it "
                "in place with lowrank.auto_decomposition"
            ) from None
        layers = _uncompiled(model)
        if self.policy is not None:
            decomposed, _ = _decompose(layers, self.policy, self.method, do_decompose_weight, None, "decompose_network")
        else:
            config = self.decompose_config
            unknown = msmodelslim.unmatched(layers, config)
            if unknown:  # msModelSlim ignores them silently
                logger.warning("decompose_config names what is no Linear, Embedding or Conv2d: %s", ", ".join(unknown))
            decomposed, _ = _decompose_msmodelslim(layers, config, do_decompose_weight, datasets, max_iter)
        return _returned(model, layers, decomposed)


def _decompose_msmodelslim(model: nn.Module, config: dict, with_weights: bool, datasets, max_iter: int):
    """msModelSlim's decomposition of ``model`` in place (``lowrank.msmodelslim``). Layers that its
    structure cannot replace (where msModelSlim fails) or whose owner uses them other than by calling
    them are left alone with a warning."""
    logger.info("decompose_network start.")
    start, params_before = time.perf_counter(), count_parameters(model)
    planned = msmodelslim.plan(model, config)
    for name, (layer, hidden) in list(planned.items()):
        reason = msmodelslim.unbuildable(layer, hidden) or (_why_not_in_owners(model, name) if name else None)
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
        second_moments = msmodelslim.collect_second_moments(model, fitted, datasets, max_iter)
    built = []  # the model changes only once every replacement is built
    for name, (specs, weights) in msmodelslim.decomposed_modules(planned, with_weights, second_moments).items():
        layer = planned[name][0]
        new = build_replacement(layer, specs, msmodelslim.method_of(layer), initialise=not weights)
        built.append((name, _fill(layer, new, weights)))
    model, changes = _swap(model, built)
    _log_done(changes, params_before, model, start, "decompose_network")
    return model, changes


def _save_plan(model, policy, method, path) -> list[Replacement]:
    """The replacements ``policy`` plans for ``model`` (structure only: the model is not changed), saved
    to the info file ``path``."""
    _check_info_path(path, "config_file")
    replacements, skipped, measurements = _plan(model, policy, method, False, "Decompose")
    _write_info(path, model, replacements, skipped, policy, method, measurements)
    return replacements


def _replay_policy(replacements: list[Replacement], config_file) -> RankPolicy:
    """A policy giving exactly these layers, read from ``config_file``, their recorded method and ranks,
    and no other layer."""
    return _ReplayPolicy(
        layers={re.escape(r.name): {"rank": list(r.ranks), "method": r.method} for r in replacements},
        min_rank=1,
        config_file=str(config_file),
    )


@dataclass
class _ReplayPolicy(RankPolicy):
    """``_replay_policy``'s: a layer it leaves alone is said to be absent from the config file, not to
    miss the keys of a ``layers`` dict that the user never gave."""

    config_file: str = ""

    def rule_for(self, name):
        rule, reason = super().rule_for(name)
        return rule, reason if rule else f"not decomposed in config_file {self.config_file}"
