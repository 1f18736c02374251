"""The command-line flags every recipe shares (the AMCT sample's decomposition flags, the runner's
outputs, distillation), and their check before any work."""

import argparse
import math
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from lowrank.io import unwritable
from lowrank.policy import DEFAULT_RATIO

from .distributed import node_name
from .entry import RunError

# What a recipe decomposes with when no rank flag is given: its seed's tool, called as the seed calls it.
SEED_RULES = {
    "amct": "AMCT's choice, lowrank.auto_decomposition(model, path)",
    "msmodelslim": "msModelSlim's Decompose(model).from_ratio(0.5)",
}
MSMODELSLIM_RATIO = 0.5  # msModelSlim's sample


def add_decomposition_args(
    parser: argparse.ArgumentParser, run_mode=None, seed="amct", method="spatial", ratio=DEFAULT_RATIO
):
    """``run_mode`` (set by a recipe's online/offline variant) implies ``--tensor-decompose``; ``seed``,
    ``method`` and ``ratio`` are ``add_policy_args``'."""
    group = parser.add_argument_group("decomposition")
    group.add_argument(
        "--pretrained-path", default=None, help="pretrained weights; required in online mode (default: None)"
    )
    group.add_argument(
        "--tensor-decompose",
        action="store_true",
        default=run_mode is not None,
        help=f"decompose the model (default: {run_mode is not None})",
    )
    group.add_argument(
        "--decompose-info-path",
        default=None,
        help="decomposition info file: written online, read offline (default: <output-dir>/decompose_info.json online)",
    )
    group.add_argument(
        "--decomposed-weights-path",
        default=None,
        help="decomposed weights: written online, read offline (default: <output-dir>/decomposed_weights.pth online)",
    )
    group.add_argument(
        "--run-mode",
        choices=("online", "offline"),
        default=run_mode,  # None: not given, for the check that --tensor-decompose comes with it
        help=f"decomposition mode, with --tensor-decompose (default: {run_mode or 'online'})",
    )
    add_policy_args(group, seed, method, ratio)
    group.add_argument(
        "--barrier-timeout",
        type=positive_float,
        default=3600,
        help="seconds the other ranks wait for rank 0's decomposition (default: 3600)",
    )


def add_policy_args(parser, seed="amct", method="spatial", ratio=DEFAULT_RATIO):
    """lowrank's rank flags: ``--method``, the rank rule (``--ratio``, or ``--energy`` or ``--vbmf``) and
    ``--divisor``. Without any of them the recipe decomposes as its ``seed`` does (a key of SEED_RULES);
    with any, by lowrank's rules, ``method`` and ``ratio`` being the defaults of the others.
    ``policy_of`` turns them into the decomposition's keywords."""
    parser.set_defaults(seed_rule=seed, default_method=method, default_ratio=ratio)
    seeded = f"without any of these flags: {SEED_RULES[seed]}"
    parser.add_argument(
        "--method",
        default=None,
        choices=("spatial", "tucker2", "svd"),
        help=f"lowrank's rules: method for k x k convolutions (default: {method}; {seeded})",
    )
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument(
        "--ratio",
        type=fraction,
        default=None,
        help=f"lowrank's rules: fraction of each layer's FLOPs kept (default: {ratio} unless --energy or --vbmf)",
    )
    rule.add_argument(
        "--energy",
        type=fraction,
        default=None,
        help="instead of --ratio: the smallest ranks keeping this fraction of each layer's squared singular "
        "values (default: None)",
    )
    rule.add_argument("--vbmf", action="store_true", help="instead of --ratio: ranks estimated by EVBMF (default: off)")
    rule.add_argument(
        "--budget",
        type=fraction,
        default=None,
        help="instead of --ratio: the model's multiply-adds on the recipe's example input at most this fraction of "
        "the dense model's, ranks allocated across the layers where they cost the least error (default: None)",
    )
    parser.add_argument(
        "--divisor",
        type=positive_int,
        default=1,
        help="lowrank's rules: ranks rounded to a multiple of this, as the rank rule allows; 8 suits GPUs' "
        "bf16/fp16 matrix units (default: 1)",
    )
    parser.add_argument(
        "--calibration-batches",
        type=non_negative_int,
        default=0,
        help="fit the decomposition to the outputs of the first N training batches, read in order with the "
        "evaluation transforms (msModelSlim's datasets=, or lowrank's data-aware rules); 0: to the weights alone "
        "(default: 0)",
    )
    parser.add_argument(
        "--sequential-calibration",
        action="store_true",
        help="with --calibration-batches and lowrank's rules: fit the layers one after another, each correcting the "
        "error of those before it (far more accuracy at small budgets, for two passes over the batches per layer) "
        "(default: off)",
    )


def _number(convert, accepts, requirement: str):
    """An argparse type: ``convert(text)`` when ``accepts`` it, else an error saying ``requirement``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


# Comparisons are false for NaN, so none of these accepts it.
fraction = _number(float, lambda value: 0 < value <= 1, "a number in (0, 1]")
positive_int = _number(int, lambda value: value >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda value: value >= 0, "an integer >= 0")
positive_float = _number(float, lambda value: 0 < value < math.inf, "a positive number")
non_negative_float = _number(float, lambda value: 0 <= value < math.inf, "a number >= 0")
probability = _number(float, lambda value: 0 <= value < 1, "a number in [0, 1)")
unit_interval = _number(float, lambda value: 0 <= value <= 1, "a number in [0, 1]")


POLICY_FLAGS = ("method", "ratio", "energy", "vbmf", "budget", "divisor")


def policy_given(args) -> list[str]:
    """The names of ``add_policy_args``' rank flags given on the command line (``--divisor 1``, no
    rounding, is as good as not given)."""
    return [
        name
        for name in POLICY_FLAGS
        if getattr(args, name) not in (None, False) and (name, getattr(args, name)) != ("divisor", 1)
    ]


def policy_of(args, example_input=None) -> dict:
    """The decomposition that ``add_policy_args``' flags give (``launch.barrier.decompose``'s policy):
    ``{}`` for AMCT's choice, ``{"from_ratio": 0.5}`` for msModelSlim's, or the keywords of
    ``lowrank.auto_decomposition`` for lowrank's rules; ``--budget`` counts multiply-adds on the recipe's
    ``example_input``."""
    if not policy_given(args):
        return {} if args.seed_rule == "amct" else {"from_ratio": MSMODELSLIM_RATIO}
    # --divisor 1 (no rounding) adds nothing: the policy, and the fingerprint of its artifacts, stay as without it.
    divisor = {"divisor": args.divisor} if args.divisor > 1 else {}
    sequential = {"sequential": True} if args.sequential_calibration else {}
    policy = {"method": args.method or args.default_method} | divisor | sequential
    if args.vbmf:
        return policy | {"vbmf": True}
    if args.energy is not None:
        return policy | {"energy": args.energy}
    if args.budget is not None:
        return policy | {"budget": args.budget, "example_input": example_input}
    return policy | {"ratio": args.ratio or args.default_ratio}


def add_output_args(parser: argparse.ArgumentParser, output_dir: str):
    group = parser.add_argument_group("outputs")
    group.add_argument("--save-path", default=None, help="where to save the trained weights (default: None, not saved)")
    group.add_argument(
        "--output-dir", default=output_dir, help=f"TensorBoard logs and checkpoints (default: {output_dir})"
    )
    group.add_argument(
        "--checkpoint-steps",
        type=non_negative_int,
        default=0,
        help="steps between checkpoints, 0: only at the end and on preemption (default: 0)",
    )
    group.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the latest complete checkpoint in --output-dir, or from CHECKPOINT, a "
        "checkpoints/step_<N> folder (default: off)",
    )
    group.add_argument(
        "--keep-last",
        type=positive_int,
        default=3,
        help="complete checkpoints of this run to keep, the newest; older ones are removed (default: 3)",
    )
    group.add_argument(
        "--keep-runs",
        type=non_negative_int,
        default=2,
        help="earlier runs' checkpoints (checkpoints.<date-time>, set aside by a run without --resume) to keep, "
        "the newest (default: 2)",
    )


# The defaults: the labels and the teacher weigh the same, and a temperature that softens the
# teacher's outputs enough for its ranking of the wrong classes to count.
DISTILL_ALPHA = 0.5
DISTILL_TEMPERATURE = 4.0


def add_distill_args(parser: argparse.ArgumentParser):
    """``--distill`` and its loss's settings (``launch.distill``), which ``check_mode_args`` checks and
    resolves into the RunMode. Their defaults are None, so that a setting given without ``--distill`` is
    told from one not given."""
    group = parser.add_argument_group("distillation")
    group.add_argument(
        "--distill",
        action="store_true",
        help="finetune the decomposed model against the dense model of --pretrained-path as teacher; needs "
        "--tensor-decompose (default: off)",
    )
    group.add_argument(
        "--distill-alpha",
        type=unit_interval,
        default=None,
        help=f"with --distill: the task loss's weight; the distillation term's is 1 - alpha (default: {DISTILL_ALPHA})",
    )
    group.add_argument(
        "--distill-temperature",
        type=positive_float,
        default=None,
        help=f"with --distill: the softmax temperature of the teacher's and the student's outputs "
        f"(default: {DISTILL_TEMPERATURE})",
    )


BACKENDS = ("gloo", "nccl")


def add_distributed_args(parser: argparse.ArgumentParser):
    """The AMCT sample's ``ddp_train.py`` flags for the process group: ``--backend`` and ``--init-method``,
    which ``create_accelerator`` passes on to it, and ``--local-rank``, which ``torch.distributed.launch``
    passes to the script (as ``--local-rank=N``)."""
    group = parser.add_argument_group("distributed (multi-process runs)")
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,  # None: what Accelerate picks, gloo on the CPU and nccl on GPUs
        help="torch.distributed backend; nccl needs --use-gpu and GPUs (default: gloo on the CPU, nccl with --use-gpu)",
    )
    group.add_argument(
        "--init-method",
        "--init_method",
        type=init_method,
        default="env://",
        help="how the processes meet: env:// (the launcher's MASTER_ADDR and MASTER_PORT), tcp://HOST:PORT (rank "
        "0 listens there) or file:///PATH (on a filesystem every node shares); each process's rank and the "
        "number of processes come from the launcher (default: env://)",
    )
    # Accepted, not checked against LOCAL_RANK: torch.distributed.launch --virtual-local-rank passes another
    # value, and the sample's "--local_rank 0" typed after the launcher's --local-rank=N wins the parse.
    group.add_argument(
        "--local-rank",
        "--local_rank",
        type=non_negative_int,
        default=None,
        help="accepted for torch.distributed.launch, which passes it; each process's local rank (its GPU) is the "
        "launcher's LOCAL_RANK environment variable, whatever this says (default: None)",
    )


def init_method(text: str) -> str:
    """An argparse type: a torch.distributed init method without the rank and world size, which the
    launcher gives each process."""
    url = urllib.parse.urlsplit(text)
    try:
        port = url.port
    except ValueError:  # not a number, or out of range
        port = None
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    valid = not url.fragment and (
        (url.scheme == "env" and not (url.netloc or url.path or url.query))
        or (url.scheme == "tcp" and url.hostname and port and url.path in ("", "/"))
        # torch reads the path alone: file://shared/x would be /x
        or (url.scheme == "file" and url.netloc in ("", "localhost") and url.path not in ("", "/"))
    )
    if not valid or "rank" in query or "world_size" in query:
        raise argparse.ArgumentTypeError(
            f"must be env://, tcp://HOST:PORT or file:///PATH, without rank or world_size (the launcher gives "
            f"them), got {text!r}"
        )
    return text


def flag(name: str) -> str:
    """The command-line flag of ``args``' attribute ``name``: ``--decompose-info-path``."""
    return f"--{name.replace('_', '-')}"


@dataclass(frozen=True)
class RunMode:
    """What the flags ask of the run, once checked (``check_mode_args``): its mode and, when it
    decomposes, its decomposition's files (online: by default in ``--output-dir``), and whether it
    distils, with which settings (their defaults filled in)."""

    mode: str  # baseline, online or offline
    decompose_info_path: str | None = None
    decomposed_weights_path: str | None = None
    distill: bool = False
    distill_alpha: float | None = None
    distill_temperature: float | None = None

    def settings(self) -> dict:
        """Under the flags' names, as a checkpoint records them (``--run-mode`` None for a dense run)."""
        return {
            "run_mode": None if self.mode == "baseline" else self.mode,
            "decompose_info_path": self.decompose_info_path,
            "decomposed_weights_path": self.decomposed_weights_path,
            "distill": self.distill,
            "distill_alpha": self.distill_alpha,
            "distill_temperature": self.distill_temperature,
        }


def check_mode_args(args, pretrained=None) -> RunMode:
    """The run's mode and files, from the flags of ``add_decomposition_args`` and ``add_output_args``,
    and its distillation, from those of ``add_distill_args`` where the parser has them (``args`` is left
    as it is). Missing paths for the mode raise a RunError naming their flag, before any work. Flags the
    mode would ignore are refused: the rank rule (``add_policy_args``') outside online mode, the
    pretrained weights offline unless they are ``--distill``'s teacher. ``pretrained`` names a flag
    other than ``--pretrained-path`` that also provides the weights."""
    rank_flags = policy_given(args) + [
        name for name in ("calibration_batches", "sequential_calibration") if getattr(args, name)
    ]
    if not args.tensor_decompose:
        # The AMCT sample: these flags must be used together with --tensor-decompose.
        given = [name for name in ("run_mode", "decompose_info_path", "decomposed_weights_path") if getattr(args, name)]
        given += rank_flags
        if given:
            flags = ", ".join(map(flag, given))
            raise RunError(f"{flags} need(s) --tensor-decompose; without it the run trains the dense model")
    mode = (args.run_mode or "online") if args.tensor_decompose else "baseline"
    if mode == "online" and not args.pretrained_path and not (pretrained and getattr(args, pretrained)):
        alternative = f" (or {flag(pretrained)})" if pretrained else ""
        raise RunError(f"--pretrained-path{alternative} is required in online mode")
    distill = _check_distill(args, mode, pretrained)
    if mode == "offline":
        for name in ("decompose_info_path", "decomposed_weights_path"):
            if not getattr(args, name):
                raise RunError(f"{flag(name)} is required in offline mode")
        unused = list(rank_flags)
        if not distill:
            unused += [name for name in ("pretrained_path", pretrained) if name and getattr(args, name)]
        if unused:
            raise RunError(
                f"{', '.join(map(flag, unused))}: not used offline, where the structure and the weights come "
                "from --decompose-info-path and --decomposed-weights-path: give them to step 1 (decompose_model.py)"
            )
    check_calibration_args(args)
    for name in ("pretrained_path", "decompose_info_path", "decomposed_weights_path"):
        path = getattr(args, name)
        if path and _read_here(name, mode, bool(distill)) and not Path(path).is_file():
            where = f" on {node_name()}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
            raise RunError(f"{flag(name)} {path} does not exist{where}")
    run = RunMode(mode, args.decompose_info_path, args.decomposed_weights_path, **distill)
    if mode == "online":
        run = RunMode(
            mode,
            args.decompose_info_path or str(Path(args.output_dir) / "decompose_info.json"),
            args.decomposed_weights_path or str(Path(args.output_dir) / "decomposed_weights.pth"),
            **distill,
        )
    _check_run_paths(argparse.Namespace(**{**vars(args), **run.settings()}), mode)
    return run


def check_calibration_args(args) -> None:
    """Raises a RunError for ``--calibration-batches`` with AMCT's choice, which has no data-aware form, and
    for ``--sequential-calibration`` without calibration batches or without lowrank's rules."""
    if args.sequential_calibration and not (args.calibration_batches and policy_given(args)):
        raise RunError(
            "--sequential-calibration fits lowrank's rules to the calibration data layer after layer: give it with "
            "--calibration-batches N and one of lowrank's rank flags (--ratio, --energy, --vbmf, --budget, --method)"
        )
    if args.calibration_batches and not policy_given(args) and args.seed_rule == "amct":
        raise RunError(
            "--calibration-batches: AMCT's choice, this recipe's decomposition without rank flags, fits the weights "
            "alone; add one of lowrank's rank flags (--ratio, --energy, --vbmf, --budget, --method), whose rules fit "
            "the calibration data"
        )


def _check_distill(args, mode: str, pretrained=None) -> dict:
    """RunMode's distillation fields from the flags of ``add_distill_args`` (none where the parser lacks
    them), or a RunError: ``--distill-alpha`` and ``--distill-temperature`` need ``--distill``, which
    needs a decomposed student and the dense pretrained weights as its teacher, and a training run."""
    if not getattr(args, "distill", False):
        given = [name for name in ("distill_alpha", "distill_temperature") if getattr(args, name, None) is not None]
        if given:
            raise RunError(
                f"{', '.join(map(flag, given))} need(s) --distill; without it the run trains on the task loss alone"
            )
        return {}
    if mode == "baseline":
        raise RunError(
            "--distill needs --tensor-decompose: the student is the decomposed model, the teacher the dense one"
        )
    if not args.pretrained_path and not (pretrained and getattr(args, pretrained)):
        alternative = f" (or {flag(pretrained)})" if pretrained else ""
        raise RunError(f"--distill needs --pretrained-path{alternative}: the dense pretrained model is the teacher")
    if getattr(args, "test_only", False):
        raise RunError("--distill: not used with --test-only, which does not train")
    alpha, temperature = args.distill_alpha, args.distill_temperature
    return {
        "distill": True,
        "distill_alpha": DISTILL_ALPHA if alpha is None else alpha,
        "distill_temperature": DISTILL_TEMPERATURE if temperature is None else temperature,
    }


def _read_here(name: str, mode: str, distill: bool) -> bool:
    """Whether this process reads the file of flag ``name``: every rank reads the offline files, a
    baseline's pretrained weights and ``--distill``'s teacher; otherwise online only rank 0 reads the
    pretrained weights (RANK, set by the launchers before any process group: the other ranks' nodes
    need not hold them)."""
    if name == "pretrained_path":
        return mode != "online" or distill or os.environ.get("RANK", "0") == "0"
    return mode == "offline"


def _check_run_paths(paths, mode: str) -> None:
    """The path checks of ``check_mode_args``, on the flags with the run's files (``paths``)."""
    check_outside_output_dir(paths, ["pretrained_path", "decompose_info_path", "decomposed_weights_path", "save_path"])
    folders = ["output_dir"]
    files = ["save_path", *(["decompose_info_path", "decomposed_weights_path"] if mode == "online" else [])]
    check_writable(paths, files, folders)
    # One written over another would be lost: the pretrained weights (which a baseline run may train in
    # place; offline they are --distill's teacher), step 1's files, the trained weights.
    inputs = [] if mode == "baseline" else ["pretrained_path"]
    check_distinct(paths, *inputs, "decompose_info_path", "decomposed_weights_path", "save_path")
    problem = unwritable(Path(paths.output_dir, "checkpoints"), is_folder=True)
    if problem:
        raise RunError(f"--output-dir: {problem}")


def _given_paths(args, names) -> dict:
    """The absolute paths of the path flags ``names`` (attribute names of ``args``) that are set, by name."""
    return {name: Path(getattr(args, name)).resolve() for name in names if getattr(args, name, None)}


def check_distinct(args, *names) -> None:
    """Raises a RunError when two of the path flags ``names`` (attribute names of ``args``; unset ones
    are skipped) name the same file, where one would overwrite the other, or one lies inside the other,
    which would have to be a folder."""
    paths = {}
    for name, path in _given_paths(args, names).items():
        for other, other_name in paths.items():
            first, second = flag(other_name), flag(name)
            if path == other:
                raise RunError(f"{first} and {second} are the same file {path}: give each its own")
            if path in other.parents or other in path.parents:
                raise RunError(f"{first} {other} and {second} {path}: one lies inside the other: give each its own")
        paths[path] = name


def check_outside_output_dir(args, files) -> None:
    """Raises a RunError when one of the ``files`` flags (attribute names of ``args``; unset ones are
    skipped) names ``--output-dir`` itself, a folder holding it, or a path the run writes there
    (``checkpoints/``, ``results.json``): found at the start, not when the run saves at its end."""
    output_dir = Path(args.output_dir).resolve()
    taken = {output_dir / "checkpoints": "its checkpoints", output_dir / "results.json": "its results"}
    for name, path in _given_paths(args, files).items():
        if path == output_dir or path in output_dir.parents:
            raise RunError(f"{flag(name)} {path} is --output-dir or holds it: give it a file name of its own")
        for place, what in taken.items():
            if path == place or place in path.parents:
                raise RunError(f"{flag(name)} {path} is where --output-dir keeps {what}: give it another path")


def check_writable(args, files, folders=()) -> None:
    """Raises a RunError naming the flag when one of the ``files`` or ``folders`` flags (attribute
    names of ``args``; unset ones are skipped) gives a path that cannot be created: found at the
    start, not when the run saves."""
    for name, is_folder in [*((name, True) for name in folders), *((name, False) for name in files)]:
        path = getattr(args, name, None)
        problem = path and unwritable(path, is_folder)
        if problem:
            raise RunError(f"{flag(name)} {problem}")
