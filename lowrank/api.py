"""The public API with AMCT's names: ``auto_decomposition`` (decompose, in place) and
``decompose_network`` (replay an info file). msModelSlim's ``Decompose`` is in ``lowrank.decomposer``.

Every call first plans (which layers, which ranks, the new weights) and builds the new modules
without touching the model, then writes the info file, then swaps the layers: an error never leaves a
half-decomposed model or a half-written file.
"""

from torch import nn

from . import amct, msmodelslim, plan
from .arguments import check_method, check_model, check_path, make_policy, returned
from .eligibility import References, broken_ties, why_not
from .info import DecomposeInfoError, is_msmodelslim_config, read_document, read_info
from .log import logger
from .plan import build, swap


def auto_decomposition(model: nn.Module, decompose_info_path=None, *, method: str | None = None, **policy):
    """Decomposes ``model``'s layers in place, weights included (AMCT's ``auto_decomposition``).

    Called as AMCT calls it, ``auto_decomposition(model)`` or ``auto_decomposition(model, path)``, it
    makes AMCT's choice (``lowrank.amct``): the k x k convs (k >= 3) AMCT decomposes, at its EVBMF rank
    clamped and rounded to 16, in its four modes, with its weights and its info file (a JSON list of
    records, which AMCT's ``decompose_network`` reads). Unlike AMCT, layers that cannot be replaced
    safely (see below) are left alone, and a string padding (``'same'``, which AMCT refuses) is kept.
    Any of the keywords below but ``example_input`` selects lowrank's own rules and info file instead.

    Args:
        model: any ``nn.Module``. Conv2d layers with a k x k kernel use ``method``; Linear layers and
            1x1 convolutions use ``svd``. Layers that cannot be replaced safely are left alone, and
            the reason is logged and recorded in the info file. A replaced layer still answers for the
            dense one: its settings read-only, its ``weight`` the product of its factors.
        decompose_info_path: where to write the decomposition info file (structure only, no
            weights), which ``decompose_network`` replays. None: no file.
        method: ``"spatial"`` (AMCT's structure, the default of lowrank's rules), ``"tucker2"``
            (msModelSlim's) or ``"svd"``.
        **policy: lowrank's rank policy, see ``lowrank.policy``: one of ``rank``, ``ratio``, ``energy``,
            ``vbmf``, ``latency``, ``budget``; and ``layers``, ``exclude``, ``ratio_of``, ``divisor``,
            ``min_rank``. ``budget=0.3`` keeps the model's multiply-adds on ``example_input`` at most
            that fraction of the dense model's, allocating ranks where they cost the least error
            (``lowrank.budget``).
            With ``method`` alone: ``ratio=0.3`` of each layer's multiply-adds. ``latency=0.5`` times each
            candidate layer, dense and decomposed, on the model's device and keeps only replacements
            measured to run in at most half the dense layer's time; it needs ``example_input``. The
            timings go into the info file; ``decompose_network`` replays without timing.
        example_input: a tensor, a tuple of the model's positional arguments or a dict of its keyword
            arguments, as the model will see them in production (batch size, dtype, memory format).
            The model runs once on it, with AMCT's choice too: layers whose weights are used outside
            their own ``forward`` stay dense, since decomposing them would save nothing
            (``lowrank.observe``); the latency rule times each layer on the input it receives.
        calibration: an iterable of batches of model inputs (a tensor, a tuple or list of positional
            arguments, a dict of keyword arguments): every method fits the layers' outputs on them
            instead of their weights (``lowrank.calibration``), and a budget weighs the output error.
            ``calibration_batches=N`` reads at most N of them. ``sequential=True`` fits the layers one
            after another, each to the dense model's outputs from the inputs the layers before it,
            already decomposed, give it (``lowrank.sequential``): far more accuracy at small ranks,
            for two passes over the batches per layer.

    Returns:
        ``(model, changes)``: the same model, and ``{"conv2": ["conv2.0", "conv2.1"], ...}`` for
        the replaced layers. A ``Conv2d`` or ``Linear`` given as the model itself is left as it is and
        its replacement returned (``changes`` ``{"": ["0", "1"]}``), as in AMCT.
    """
    layers = check_model(model)
    if method is None and set(policy) <= {"example_input"}:
        decomposed, changes = amct.decompose(layers, decompose_info_path, policy.get("example_input"))
        return returned(model, layers, decomposed), changes
    method = check_method(method or "spatial")
    decomposed, changes = plan.decompose(
        layers, make_policy(policy), method, True, decompose_info_path, "auto_decomposition"
    )
    return returned(model, layers, decomposed), changes


def decompose_network(model: nn.Module, decompose_info_path):
    """Replays the structure recorded in an info file on ``model``, in place, with default-initialised
    weights (AMCT's ``decompose_network``): load the decomposed weights afterwards.

    Reads lowrank's info files and AMCT's. Every recorded layer is checked against the model first;
    a mismatch raises ``DecomposeInfoError`` naming the file, the layer and the difference, and
    leaves the model untouched.

    Returns:
        ``(model, changes)`` as ``auto_decomposition``.
    """
    layers = check_model(model)
    check_path(decompose_info_path, "decompose_info_path")
    document = read_document(decompose_info_path)
    if is_msmodelslim_config(document):  # msModelSlim's structures, as Decompose(...).from_file() builds them
        config = msmodelslim.read_config(decompose_info_path, document)
        unknown = msmodelslim.unmatched(layers, config)
        if unknown:
            raise DecomposeInfoError(
                f"{decompose_info_path}: {unknown[0]!r} is not a Linear, Embedding or Conv2d of the model"
            )
        decomposed, changes = msmodelslim.decompose(layers, config, False, None, -1)
        return returned(model, layers, decomposed), changes
    logger.info("decompose_network start.")
    replacements = read_info(decompose_info_path, layers)
    amct_file = isinstance(document, list)  # AMCT's rules: subclasses, ties
    references = References(layers)
    reasons = {
        r.name: why_not(layers, r.name, layers.get_submodule(r.name), references, amct_rules=amct_file)
        for r in replacements
    }
    reasons |= broken_ties(layers, replacements, references)
    for name, reason in reasons.items():
        if reason:
            raise DecomposeInfoError(f"{decompose_info_path}: layer {name!r} cannot be replaced: {reason}")
    if not replacements:
        logger.info("No layer meets decomposition conditions.")
    decomposed, changes = swap(layers, build(layers, replacements))
    logger.info("decompose_network complete.")
    return returned(model, layers, decomposed), changes
