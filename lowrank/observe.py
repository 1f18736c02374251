"""One observed forward pass of the model on the user's example input.

It records the input each candidate layer receives (the latency rule times layers on it), and finds
the layers that must stay dense: those whose weight enters a computation outside their own
``forward`` (an owner's ``F.linear(x, self.fc.weight)``, a hook that clips it), because decomposed,
that weight would be computed from the factors for every such use, which saves nothing; and those
whose configuration (``padding``, ``stride``...) changes while the model runs, which a replacement,
built with the configuration it had, could not follow. Reading a weight's metadata (``dtype``,
``shape``) is no use: only functions that return tensors count.
"""

import functools
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .modules import replacement_class
from .stats import call_arguments, evaluating


@dataclass(frozen=True)
class InputSpec:
    """What a layer receives in one call: enough to make a fresh tensor laid out the same way."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "InputSpec":
        return cls(tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device)

    def sample(self) -> torch.Tensor:
        """A standard normal tensor of this shape, strides, dtype and device (values do not change timings,
        but zeros or NaNs could take a different path). A broadcast input (stride 0, from ``expand``) is
        drawn once along that axis and expanded again: its elements share memory."""
        stored = tuple(1 if stride == 0 else size for size, stride in zip(self.shape, self.stride))
        tensor = torch.empty_strided(stored, self.stride, dtype=self.dtype, device=self.device).normal_()
        return tensor.expand(self.shape)


@dataclass
class Observation:
    """What one forward pass showed, by layer name."""

    inputs: dict[str, list[InputSpec]] = field(default_factory=dict)  # every call's first argument
    keep_dense: dict[str, str] = field(default_factory=dict)  # the layers to leave dense, with why


class _WeightUses(TorchFunctionMode):
    """Records, for each weight of ``weights`` (by ``id``), the first function that computes tensors
    from it while its layer's own ``forward`` is not running (``running``, by layer name)."""

    def __init__(self, weights: dict[int, str], running: Counter):
        super().__init__()
        self.weights, self.running, self.uses = weights, running, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if any(isinstance(value, torch.Tensor) for value in tree_leaves(result)):
            for value in tree_leaves((args, kwargs)):
                name = self.weights.get(id(value)) if isinstance(value, torch.Tensor) else None
                if name is not None and not self.running[name]:
                    self.uses.setdefault(name, _function_name(func))
        return result


def _function_name(func) -> str:
    """``linear``, ``Tensor.t``, ``Tensor.data``: close to how the call was written."""
    if getattr(func, "__name__", "") == "__get__":  # a property
        return f"Tensor.{func.__self__.__name__}"
    owner, _, name = getattr(func, "__qualname__", repr(func)).rpartition(".")
    return f"Tensor.{name}" if owner == "TensorBase" else name


def _configuration(layer: nn.Module) -> dict:
    """The settings the layer's replacement carries (and so could not follow if they changed)."""
    names = replacement_class(layer, "svd").CONFIG
    return {name: getattr(layer, name) for name in names if hasattr(layer, name)}


def _enter(running: Counter, name: str, inputs: list, module: nn.Module, args: tuple) -> None:
    running[name] += 1
    if args and isinstance(args[0], torch.Tensor):
        inputs.append(InputSpec.of(args[0]))


def _leave(running: Counter, name: str, module: nn.Module, args: tuple, output) -> None:
    running[name] -= 1


def observe(model: nn.Module, example_input, layers: dict[str, nn.Module]) -> Observation:
    """Runs ``model`` once on ``example_input`` (a tensor, a tuple of positional arguments or a dict of
    keyword arguments) and observes ``layers`` (see the module docstring). In eval mode under
    ``no_grad`` so that nothing is learnt (batch-norm statistics stay as they are); not
    ``inference_mode``: what the pass leaves on the model (a lazy layer's weights, a cache) must stay
    usable for training. The modules' training flags and hooks are restored afterwards."""
    observation = Observation(inputs={name: [] for name in layers})
    running = Counter()
    before = {name: _configuration(layer) for name, layer in layers.items()}
    handles = []
    for name, layer in layers.items():
        handles.append(
            layer.register_forward_pre_hook(functools.partial(_enter, running, name, observation.inputs[name]))
        )
        handles.append(layer.register_forward_hook(functools.partial(_leave, running, name), always_call=True))
    weights = {id(layer.weight): name for name, layer in layers.items()}
    try:
        args, kwargs = call_arguments(example_input)
        with evaluating(model), torch.no_grad(), _WeightUses(weights, running) as uses:
            model(*args, **kwargs)
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError, IndexError) as error:
        raise ValueError(f"example_input: the model does not run on it: {type(error).__name__}: {error}") from None
    finally:
        for handle in handles:
            handle.remove()
    for name, function in uses.uses.items():
        observation.keep_dense[name] = (
            f"its weight is used outside its own forward ({function}, seen when the model ran on example_input): "
            "decomposed, it would be computed from the factors there, which saves nothing"
        )
    for name, layer in layers.items():
        changed = {key: value for key, value in _configuration(layer).items() if before[name][key] != value}
        for key, value in changed.items():
            observation.keep_dense.setdefault(
                name,
                f"its {key} changes when the model runs on example_input ({before[name][key]!r} -> {value!r}), "
                "which a replacement built with the first could not follow",
            )
    return observation
