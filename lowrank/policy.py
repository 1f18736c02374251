"""Rank policies: which layers to decompose and at which ranks.

A rule picks the ranks of one layer:
- ``rank``: a fixed rank (an int, or one int per rank of the method, e.g. ``(in_rank, out_rank)``);
- ``ratio``: the largest ranks whose cost is at most this fraction of the dense layer's
  (``ratio_of="flops"``, multiply-adds, or ``"params"``) and below it in both;
- ``energy``: the smallest ranks that keep this fraction of the squared singular values;
- ``vbmf``: ranks estimated by EVBMF (Nakajima et al. 2013), as in Kim et al. 2016;
- ``latency``: the largest ranks whose replacement is measured to run in at most this fraction of
  the dense layer's time (0.5 asks for 2x faster), on the input the layer receives when the model
  runs on ``example_input``; a layer with no rank measured that fast is left alone. The replaced
  layers together then take at most this fraction of their dense time, on the device, dtype, memory
  format and thread count of the measurement (see ``lowrank.latency``);
- ``budget`` (for the whole model, not in ``layers``): the model's multiply-adds on ``example_input``
  at most this fraction of the dense model's, the ranks of all the layers it covers allocated together
  where they cost the least error (``lowrank.budget``); layers that ``layers`` gives a rule of their own
  count with their own ranks, and a layer no rank makes cheaper stays dense.
``layers`` maps regular expressions (matched against the whole layer name, first match wins) to a
rule for those layers, or to ``None`` to leave them alone; ``exclude`` lists expressions of layers
to leave alone. With no rule and no ``layers``, the default rule is ``ratio=DEFAULT_RATIO``; with
``layers``, the layers that match no key are left alone.

Automatic rules (ratio, energy, vbmf, latency) round ranks to a multiple of ``divisor`` where the
full rank is at least one divisor (down for ratio and latency, to stay within budget, leaving alone a
layer whose budget is below one divisor; up for energy and vbmf, to keep at least what was asked,
unless the multiple passes the full rank) and leave a layer alone when a rank would fall below
``min_rank`` (or its full rank, when smaller): a handful of directions cannot carry a layer such as
the first conv of a network on 1 input channel or a 10-class classifier.

A fixed rank is used as given. Whatever the rule, a layer is replaced only when the replacement has
fewer parameters and fewer multiply-adds than the dense layer. Multiply-adds are counted per output
position (``methods.Cost``), image borders left out: on a map hardly larger than the kernel and
without padding (a classifier written as a 7x7 conv on a 7x7 map), a first factor runs on more
positions than the output has, and ``count_flops`` on a real input may count more than the dense layer.

EVBMF assumes i.i.d. noise: on float16 and bfloat16 weights, whose rounding is not, it gives large ranks.
"""

import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from . import functional as F
from .calibration import check_batches
from .latency import largest_within
from .methods import METHODS, Method, dense_cost

DEFAULT_RATIO = 0.3  # cuts a 3x3 conv about 3x in FLOPs: the seed's MNIST conv2 goes 128->57->128
RULES = ("rank", "ratio", "energy", "vbmf", "latency", "budget")
RATIO_OF = ("flops", "params")


@dataclass(frozen=True)
class Rule:
    """One rule: ``kind`` in RULES with its ``value``, and an optional method for k x k convs."""

    kind: str
    value: object
    method: str | None = None

    def __str__(self):
        return "vbmf" if self.kind == "vbmf" else f"{self.kind}={self.value}"


def _is_int(value) -> bool:
    """Python and NumPy integers, not bools (NumPy's are not Integral)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _fraction(name, value, hint="") -> float:
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value <= 1):
        raise ValueError(f"{name} must be a number in (0, 1]{hint}, got {value!r}")
    return float(value)


def _ranks(value, where):
    """A positive int or a tuple of them (Python ints, for the info file)."""
    ranks = value if isinstance(value, (list, tuple)) else (value,)
    if not ranks or any(not _is_int(r) or r < 1 for r in ranks):
        raise ValueError(f"{where}rank must be a positive int or a sequence of positive ints, got {value!r}")
    return tuple(int(r) for r in ranks) if isinstance(value, (list, tuple)) else int(value)


def make_rule(spec, where: str) -> Rule | None:
    """A Rule from a user value: None (leave alone), an int or a sequence of ints (rank), a float in
    (0, 1) (ratio), ``"vbmf"`` (msModelSlim's from_dict values), or a dict with one of RULES and
    optionally ``method``. ``where`` names the value in errors."""
    if spec is None:
        return None
    if spec == "vbmf":
        spec = {"vbmf": True}
    if isinstance(spec, bool) or not isinstance(spec, (numbers.Real, Mapping, list, tuple)):
        raise ValueError(f'{where}: expected a rank, a ratio, "vbmf", a dict or None, got {spec!r}')
    if _is_int(spec) or isinstance(spec, (list, tuple)):
        spec = {"rank": spec}
    elif isinstance(spec, numbers.Real):
        spec = {"ratio": spec}
    unknown = set(spec) - set(RULES) - {"method"}
    given = [kind for kind in RULES if kind in spec and _given(spec[kind])]
    if unknown or len(given) != 1:
        raise ValueError(
            f"{where}: expected exactly one of {', '.join(RULES)} (and optionally method), got {dict(spec)!r}"
        )
    kind = given[0]
    value = spec[kind]
    if kind == "rank":
        value = _ranks(value, f"{where}: ")
    elif kind in ("ratio", "energy"):
        value = _fraction(f"{where}: {kind}", value)
    elif kind == "latency":
        value = _fraction(
            f"{where}: latency", value, " (the fraction of the dense layer's time: 0.5 asks for 2x faster)"
        )
    elif kind == "budget":
        if where != "policy":
            raise ValueError(f"{where}: budget is for the whole model: give it as budget=, not for some layers")
        value = _fraction("budget", value, " (the fraction of the dense model's multiply-adds)")
    elif value is not True:
        raise ValueError(f"{where}: vbmf must be True, got {value!r}")
    method = spec.get("method")
    if method is not None and method not in METHODS:
        raise ValueError(f"{where}: unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return Rule(kind, value, method)


@dataclass
class RankPolicy:
    """Options of ``auto_decomposition`` and ``Decompose``; see the module docstring."""

    rank: int | Sequence[int] | None = None
    ratio: float | None = None
    energy: float | None = None
    vbmf: bool = False
    layers: Mapping[str, object] | None = None
    exclude: Sequence[str] = ()
    ratio_of: str = "flops"
    divisor: int = 1
    min_rank: int = 8
    latency: float | None = None
    budget: float | None = None
    # What the model runs on: model(x), model(*x) for a tuple, model(**x) for a dict. Not recorded. With
    # any rule, the observed forward pass (lowrank.observe) leaves dense the layers it shows to be kept.
    example_input: object = field(default=None, repr=False)
    # Batches of model inputs (lowrank.calibration): the weights fit each layer's output on them. Not
    # recorded; the info file records how many were read and their digest.
    calibration: object = field(default=None, repr=False)
    calibration_batches: int | None = None
    # With calibration: the layers fitted one after another, each correcting the error of those before it
    # (lowrank.sequential); the info file's calibration record says so.
    sequential: bool = False
    default: Rule | None = field(init=False, default=None)

    def __post_init__(self):
        given = {kind: getattr(self, kind) for kind in RULES if _given(getattr(self, kind))}
        if len(given) > 1:
            raise ValueError(f"give at most one of {', '.join(RULES)}; got {', '.join(given)}")
        if self.ratio_of not in RATIO_OF:
            raise ValueError(f"ratio_of must be one of {', '.join(RATIO_OF)}, got {self.ratio_of!r}")
        for name in ("divisor", "min_rank"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            setattr(self, name, int(value))
        if self.exclude is None or isinstance(self.exclude, str):
            self.exclude = [self.exclude] if self.exclude else []
        if not isinstance(self.exclude, (list, tuple)):
            raise ValueError(f"exclude must be a regular expression or a list of them, got {self.exclude!r}")
        self._exclude = [_compile(pattern, "exclude") for pattern in self.exclude]
        if self.layers is not None and not isinstance(self.layers, Mapping):
            raise ValueError(f"layers must be a dict of regular expression -> rule, got {self.layers!r}")
        self._layers = [
            (_compile(key, "layers"), make_rule(value, f"layers[{key!r}]"))
            for key, value in (self.layers or {}).items()
        ]
        if given:
            self.default = make_rule(given, "policy")
        elif self.layers is None:
            self.default = Rule("ratio", DEFAULT_RATIO)
        if self.calibration is not None:
            check_batches(self.calibration, self.calibration_batches)
        elif self.calibration_batches is not None:
            raise ValueError("calibration_batches caps the batches read from calibration=, which was not given")
        if not isinstance(self.sequential, bool):
            raise ValueError(f"sequential must be True or False, got {self.sequential!r}")
        if self.allocates and self.example_input is None:
            raise ValueError(
                "budget needs example_input=<a tensor, a tuple of the model's positional arguments or a dict of its "
                "keyword arguments>: the multiply-adds are counted on the inputs the layers receive from it"
            )
        if self.measures_latency and self.example_input is None:
            raise ValueError(
                "latency needs example_input=<a tensor, a tuple of the model's positional arguments or a dict of "
                "its keyword arguments>: "
                "the layers are timed on the inputs they receive from it"
            )

    @property
    def allocates(self) -> bool:
        """Whether a model-level budget allocates ranks (``lowrank.budget``)."""
        return self.default is not None and self.default.kind == "budget"

    @property
    def measures_latency(self) -> bool:
        """Whether some rule times layers (and so needs ``example_input``)."""
        rules = [self.default, *(rule for _, rule in self._layers)]
        return any(rule is not None and rule.kind == "latency" for rule in rules)

    def rule_for(self, name: str) -> tuple[Rule | None, str]:
        """The rule for layer ``name``, or None with the reason it is left alone."""
        for pattern in self._exclude:
            if pattern.fullmatch(name):
                return None, f"excluded by {pattern.pattern!r}"
        for pattern, rule in self._layers:
            if pattern.fullmatch(name):
                return rule, "" if rule else f"left alone by layers[{pattern.pattern!r}]"
        return self.default, "" if self.default else "not matched by any key of layers"

    def unmatched(self, names) -> list[str]:
        """The ``layers`` keys and ``exclude`` expressions that match none of ``names`` (a typo would
        otherwise select or exclude nothing, silently), each as ``layers key 'x'`` or ``exclude 'x'``."""
        patterns = [("layers key", pattern) for pattern, _ in self._layers] + [("exclude", p) for p in self._exclude]
        return [
            f"{where} {pattern.pattern!r}"
            for where, pattern in patterns
            if not any(pattern.fullmatch(name) for name in names)
        ]

    def describe(self) -> dict:
        """The policy as JSON-ready options, for the info file."""
        return {
            "rule": str(self.default) if self.default else None,
            "layers": {key: _describe(value) for key, value in (self.layers or {}).items()},
            "exclude": list(self.exclude),
            "ratio_of": self.ratio_of,
            "divisor": self.divisor,
            "min_rank": self.min_rank,
        }

    def choose_ranks(
        self, method: Method, layer: nn.Module, rule: Rule, time_ranks: Callable | None = None
    ) -> tuple[tuple[int, ...] | None, str]:
        """Ranks for ``layer`` under ``rule``, or None with the reason the layer is left alone.

        The latency rule needs ``time_ranks(ranks)``: the measured seconds of the replacement at
        ``ranks``, or of the dense layer for ``None``.
        """
        full = method.full_ranks(layer)
        if rule.kind == "budget":
            raise ValueError("the budget allocates ranks for the whole model (lowrank.budget), not layer by layer")
        if rule.kind == "latency":
            if time_ranks is None:
                raise ValueError("the latency rule needs time_ranks, the layer's timings")
            return self._latency_ranks(method, layer, rule, time_ranks)
        if rule.kind == "rank":
            wanted = rule.value if isinstance(rule.value, tuple) else (rule.value,) * len(full)
            if len(wanted) != len(full):
                needs = f"{method.name} needs {len(full)} ({', '.join(method.rank_names)})"
                return None, f"rank {rule.value} gives {len(wanted)} ranks, {needs}"
            ranks = tuple(min(r, f) for r, f in zip(wanted, full))
        else:
            if rule.kind == "ratio":
                ranks = self._ratio_ranks(method, layer, rule.value)
                if ranks is None:
                    return None, f"no rank fits {rule}"
                rounded = self._round(ranks, full)
                if 0 in rounded:
                    return None, f"{rule} gives rank {_show(ranks)}, below divisor {self.divisor}"
                ranks = rounded
            else:
                if layer.weight.is_meta:
                    raise ValueError(
                        f"{rule} reads the weights, which are on the meta device: load them first (every process the "
                        "same), or replay an info file with decompose_network"
                    )
                spectra = method.spectra(layer)
                if rule.kind == "energy":
                    ranks = tuple(F.energy_rank(values, rule.value) for values, _ in spectra)
                else:
                    ranks = tuple(F.evbmf_rank(values, shape) for values, shape in spectra)
                ranks = self._round(ranks, full, up=True)
            ranks = tuple(min(r, f) for r, f in zip(ranks, full))
            if any(r < min(self.min_rank, f) for r, f in zip(ranks, full)):
                return None, f"{rule} gives rank {_show(ranks)}, below min_rank {self.min_rank}"
        dense, cost = dense_cost(layer), method.cost(layer, ranks)
        if not cost.cheaper_than(dense):
            return None, (
                f"rank {_show(ranks)} is not cheaper (params {dense.params} -> {cost.params}, "
                f"MACs per position {dense.macs} -> {cost.macs})"
            )
        return ranks, ""

    def candidate_ranks(self, method: Method, layer: nn.Module) -> list[tuple[int, ...]]:
        """Every ranks the latency rule may pick for ``layer``, smallest first: the full ranks scaled
        together (as for ``ratio``), rounded down to ``divisor``, none below ``min_rank`` (or the full
        rank, when smaller), and cheaper than the dense layer in parameters and multiply-adds."""
        full = method.full_ranks(layer)
        dense = dense_cost(layer)
        candidates = []
        for step in range(1, max(full) + 1):
            ranks = self._round(_scaled(full, step), full)
            if (candidates and ranks == candidates[-1]) or any(r < min(self.min_rank, f) for r, f in zip(ranks, full)):
                continue
            if not method.cost(layer, ranks).cheaper_than(dense):
                break  # costs grow with the step: no later one is cheaper
            candidates.append(ranks)
        return candidates

    def _latency_ranks(self, method, layer, rule, time_ranks):
        """The largest candidate ranks measured faster than the dense layer and within ``rule.value`` of
        its time, twice: by bisection, then again next to a fresh timing of the dense layer, so that one
        lucky timing on a busy machine does not replace a layer by a slower one."""
        candidates = self.candidate_ranks(method, layer)
        if not candidates:
            return None, f"no rank of at least min_rank {self.min_rank} is cheaper"

        def fits(seconds, dense):
            return seconds < dense and seconds <= rule.value * dense

        dense = time_ranks(None)
        index, probes = largest_within(candidates, time_ranks, lambda seconds: fits(seconds, dense))
        if index is None:
            ranks, seconds = probes[-1]  # the smallest candidate: bisection ends on it when nothing fits
            return None, (
                f"no rank is measured within {rule} of the dense layer's time: dense {1e3 * dense:.3f} ms, "
                f"rank {_show(ranks)} {1e3 * seconds:.3f} ms ({seconds / dense:.2f})"
            )
        ranks = candidates[index]
        dense, seconds = time_ranks(None), time_ranks(ranks)
        if not fits(seconds, dense):
            return None, (
                f"rank {_show(ranks)} was measured within {rule} of the dense layer's time, but not when timed "
                f"again: dense {1e3 * dense:.3f} ms, rank {_show(ranks)} {1e3 * seconds:.3f} ms "
                f"({seconds / dense:.2f}); the machine is too busy for stable timings"
            )
        return ranks, ""

    def _round(self, ranks, full, up=False):
        """``ranks`` rounded to a multiple of ``divisor`` where the full rank is at least one divisor:
        down (0 below one divisor: rounding up would break the budget), or ``up`` unless the multiple
        passes the full rank (a full-rank factor would only add cost)."""
        rounding = math.ceil if up else math.floor
        multiples = (rounding(r / self.divisor) * self.divisor for r in ranks)
        return tuple(m if self.divisor <= f and m <= f else r for r, m, f in zip(ranks, multiples, full))

    def _ratio_ranks(self, method, layer, ratio):
        """Largest ranks, scaled together with the full ranks, whose cost fits ``ratio`` of the dense one
        and is below it in parameters and multiply-adds alike."""
        full = method.full_ranks(layer)
        field_name = "macs" if self.ratio_of == "flops" else "params"
        dense = dense_cost(layer)
        budget = ratio * getattr(dense, field_name)

        def fits(cost):  # a budget in parameters alone may allow more multiply-adds than the dense layer's
            return getattr(cost, field_name) <= budget and cost.cheaper_than(dense)

        low, high = 0, max(full)  # invariant: _scaled(full, low) fits (or low == 0), _scaled(full, high + 1) does not
        while low < high:
            mid = (low + high + 1) // 2
            if fits(method.cost(layer, _scaled(full, mid))):
                low = mid
            else:
                high = mid - 1
        return _scaled(full, low) if low else None


def _scaled(full, step):
    """The full ranks scaled together so that the largest becomes ``step``."""
    largest = max(full)
    return tuple(max(1, round(step * f / largest)) for f in full)


def _given(value) -> bool:
    """Whether a rule option is set: None and False (vbmf's default) mean not set; 0 is set (and invalid)."""
    return value is not None and value is not False


def _compile(pattern, where):
    if not isinstance(pattern, str):  # also a compiled one: the info file records the policy as text
        raise ValueError(f"{where}: expected a regular expression as a string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as error:
        raise ValueError(f"{where}: invalid regular expression {pattern!r}: {error}") from None


def _describe(value):
    """A user's rule as JSON: NumPy numbers as Python ones, tuples as lists."""
    if isinstance(value, Mapping):
        return {key: _describe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(item) for item in value]
    if _is_int(value):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value


def _show(ranks):
    return ranks[0] if len(ranks) == 1 else list(ranks)
