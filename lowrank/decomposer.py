"""msModelSlim's interface, ``Decompose(model).from_ratio(0.5).decompose_network()``: msModelSlim's own
calls give msModelSlim's result (``lowrank.msmodelslim``); lowrank's rules are opt-in."""

import copy
import dataclasses
import itertools
import os
import re

from torch import nn

from . import msmodelslim, plan
from .arguments import check_info_path, check_method, check_model, make_policy, returned, uncompiled
from .info import Replacement, is_msmodelslim_config, read_document, read_info
from .log import logger
from .policy import RankPolicy


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
        check_model(model)
        if config_file is not None and (
            not isinstance(config_file, (str, os.PathLike)) or not os.fspath(config_file).endswith(".json")
        ):
            raise ValueError(
                f"Parameter config_file is not a valid json file name (a path ending in .json), got {config_file!r}"
            )
        self.model = model
        self.config_file = config_file
        self.method = check_method(method)
        self.decompose_config = None  # msModelSlim's configuration: layer name -> hidden channels
        self.policy = None  # or lowrank's rules

    def _uses_own_rules(self, options: dict) -> bool:
        return bool(options) or self.method != "tucker2"

    def _choose(self, value, excludes, divisor) -> "Decompose":
        """msModelSlim's configuration for ``value``, saved to ``config_file`` when there is one."""
        divisor = msmodelslim.check_excludes_divisor(excludes, divisor)
        if self.config_file is not None:
            check_info_path(self.config_file, "config_file")
        config = msmodelslim.choose(uncompiled(self.model), value, excludes, divisor)
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
        policy = make_policy({"exclude": excludes or (), "divisor": divisor, **options}, valid_extra=())
        if self.config_file is not None:
            if policy.calibration is not None and iter(policy.calibration) is policy.calibration:
                # An iterator is read once: a budget's plan reads it now, the weights when decompose_network runs.
                batches = list(itertools.islice(policy.calibration, policy.calibration_batches))
                policy = dataclasses.replace(policy, calibration=batches, calibration_batches=None)
            replacements = _save_plan(uncompiled(self.model), policy, self.method, self.config_file)
            policy = _replay_policy(replacements, self.config_file, policy)
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
            replacements = read_info(self.config_file, uncompiled(self.model))
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
        many elements (-1: all). Under lowrank's rules every method is fitted to the layers' output
        error on them instead (``lowrank.calibration``), a tensor element included."""
        if self.decompose_config is None and self.policy is None:
            raise ValueError("decompose_config not initialized, call from_xxx functions first.")
        if not isinstance(do_decompose_weight, bool):  # "False" or None would silently pick one of the two
            raise TypeError(f"parameter do_decompose_weight need to be a boolean value, got {do_decompose_weight!r}")
        msmodelslim.check_max_iter(max_iter)
        policy = self.policy
        # lowrank's rules fit every method to the data (lowrank.calibration), in one pass as msModelSlim's; a
        # budget weighs the data's errors, so that a process building the structure alone builds the same.
        if policy is not None and datasets is not None and (do_decompose_weight or policy.allocates):
            policy = dataclasses.replace(
                policy, calibration=datasets, calibration_batches=max_iter if max_iter > 0 else None
            )
        if policy is not None and not do_decompose_weight and policy.measures_latency:
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
        layers = uncompiled(model)
        if policy is not None:
            decomposed, _ = plan.decompose(layers, policy, self.method, do_decompose_weight, None, "decompose_network")
        else:
            config = self.decompose_config
            unknown = msmodelslim.unmatched(layers, config)
            if unknown:  # msModelSlim ignores them silently
                logger.warning("decompose_config names what is no Linear, Embedding or Conv2d: %s", ", ".join(unknown))
            decomposed, _ = msmodelslim.decompose(layers, config, do_decompose_weight, datasets, max_iter)
        return returned(model, layers, decomposed)


def _save_plan(model, policy, method, path) -> list[Replacement]:
    """The replacements ``policy`` plans for ``model`` (structure only: the model is not changed), saved
    to the info file ``path``."""
    check_info_path(path, "config_file")
    planned = plan.plan(model, policy, method, False, "Decompose")
    plan.write_plan(path, model, planned, policy, method)
    return planned.replacements


def _replay_policy(replacements: list[Replacement], config_file, chosen_by: RankPolicy | None = None) -> RankPolicy:
    """A policy giving exactly these layers, read from ``config_file``, their recorded method and ranks,
    and no other layer; fitted to the calibration data of the policy that chose them (``chosen_by``), if any."""
    return _ReplayPolicy(
        layers={re.escape(r.name): {"rank": list(r.ranks), "method": r.method} for r in replacements},
        min_rank=1,
        calibration=chosen_by.calibration if chosen_by else None,
        calibration_batches=chosen_by.calibration_batches if chosen_by else None,
        sequential=chosen_by.sequential if chosen_by else False,
        config_file=str(config_file),
    )


@dataclasses.dataclass
class _ReplayPolicy(RankPolicy):
    """``_replay_policy``'s: a layer it leaves alone is said to be absent from the config file, not to
    miss the keys of a ``layers`` dict that the user never gave."""

    config_file: str = ""

    def rule_for(self, name):
        rule, reason = super().rule_for(name)
        return rule, reason if rule else f"not decomposed in config_file {self.config_file}"
