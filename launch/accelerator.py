"""The recipes' Accelerator: TensorBoard logging, the CPU unless asked for GPUs, the recipe's process
group settings (``--backend``, ``--init-method``), ranks that agree with torch.distributed, the
recipe's gradient accumulation, and DeepSpeed's gradients clipped only when its config says so."""

import os
import urllib.parse

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, get_int_from_env

from .distributed import before_process_group, log
from .entry import RunError
from .preemption import preemption


def deepspeed_setting() -> str:
    """Whether this run is under DeepSpeed ("on" or "off"), as ``accelerate launch`` tells Accelerate."""
    return "on" if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" else "off"


def launcher_settings(world_size: int) -> dict:
    """The number of processes, DeepSpeed and its ZeRO stage (when the launcher's config sets it), as
    a checkpoint records them."""
    settings = {"world_size": world_size, "deepspeed": deepspeed_setting()}
    if settings["deepspeed"] == "on" and "ACCELERATE_DEEPSPEED_ZERO_STAGE" in os.environ:
        settings["zero_stage"] = os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"]
    return settings


def create_accelerator(*, use_gpu: bool, output_dir, backend=None, init_method="env://", **kwargs) -> Accelerator:
    """An Accelerator logging to TensorBoard in ``output_dir``, on the CPU unless ``use_gpu`` (and
    there are GPUs).

    A multi-process run's process group uses ``backend`` ("gloo" or "nccl"; None: Accelerate's choice,
    gloo on the CPU and nccl on GPUs) and ``init_method`` (env://, tcp://HOST:PORT or file:///PATH, the
    rank and world size taken from the launcher's RANK and WORLD_SIZE); a single process has none.

    Raises a RunError naming the flag for: nccl without GPUs, a process group that runs another
    backend than the one asked for (DeepSpeed on the CPU picks its own), a setting Accelerate refuses,
    fp16 on the CPU (where Accelerate would train in float32), and a launcher that sets another gradient
    accumulation than the recipe's ``gradient_accumulation_steps`` (default 1), which Accelerate would
    use instead. See docs/design.md for the Accelerate behaviours this works around.
    """
    deepspeed = deepspeed_setting() == "on"
    gpu = _check_device(use_gpu, backend, deepspeed)
    cpu = not gpu and not deepspeed  # cpu=True would turn DeepSpeed off; on a CPU-only machine it runs there
    handler = _process_group_handler(backend, init_method, cpu=cpu, gpu=gpu, deepspeed=deepspeed)
    if handler is not None:
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), handler]
    before_process_group()
    try:
        accelerator = Accelerator(
            cpu=cpu,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir)),
            **kwargs,
        )
    except ValueError as error:  # a setting it refuses (bf16 on a GPU without it, fp8 without its library): named
        raise RunError(f"{error} (from the recipe's flags or the launcher's config)") from None
    _check_accelerator(accelerator, backend, kwargs.get("gradient_accumulation_steps", 1))
    if use_gpu and not gpu:
        log("--use-gpu: torch sees no GPU on this machine, running on the CPU")
    if accelerator.device.type == "cpu" and torch.cuda.is_available():  # said once, by rank 0
        log(f"[Setup] warning: this machine's {torch.cuda.device_count()} GPU(s) are not used: the run is on the CPU")
    grouped = dist.is_available() and dist.is_initialized()
    group = f" ({dist.get_backend()})" if grouped else ""
    plugin = accelerator.state.deepspeed_plugin
    zero = f", DeepSpeed ZeRO-{plugin.zero_stage}" if plugin is not None else ""
    log(
        f"[Setup] {accelerator.num_processes} process(es) on {accelerator.device.type}{group}, "
        f"mixed precision {accelerator.mixed_precision}{zero}"
    )
    preemption.install()
    return accelerator


def _check_device(use_gpu: bool, backend, deepspeed: bool) -> bool:
    """Whether the run uses GPUs (``--use-gpu`` on a machine without any runs on the CPU, as in the
    seed); raises a RunError for a device and backend that do not go together."""
    if deepspeed and not use_gpu and torch.cuda.is_available():
        raise RunError("DeepSpeed runs on this machine's GPUs: pass --use-gpu, or launch without DeepSpeed")
    gpu = use_gpu and torch.cuda.is_available()
    if backend == "nccl" and not gpu:
        raise RunError(
            "--backend nccl runs on GPUs: add --use-gpu, or use --backend gloo on the CPU"
            if not use_gpu
            else "--backend nccl needs GPUs and torch sees none on this machine: use --backend gloo (the CPU)"
        )
    if backend == "nccl" and not dist.is_nccl_available():
        raise RunError("--backend nccl: this torch build has no NCCL: use --backend gloo")
    return gpu


def _process_group_handler(backend, init_method: str, *, cpu: bool, gpu: bool, deepspeed: bool):
    """Accelerate's process-group settings for ``backend`` and ``init_method``, or None to leave them
    to Accelerate (a single process, or the defaults)."""
    # When Accelerate creates a process group (its own test): given to a single process, a backend
    # makes it ask torch.distributed for a world size that does not exist.
    world_size = get_int_from_env(["PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "WORLD_SIZE"], 1)
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 or (cpu and world_size > 1)
    if not launched or (backend is None and init_method == "env://"):
        return None
    url = urllib.parse.urlsplit(init_method)
    if url.scheme == "tcp" and (url.hostname, str(url.port)) == (
        os.environ.get("MASTER_ADDR"),
        os.environ.get("MASTER_PORT"),
    ):
        raise RunError(
            f"--init-method {init_method}: the launcher already listens there (its MASTER_ADDR and "
            "MASTER_PORT, from --master_addr/--master_port): give another port, or use env://"
        )
    if url.scheme != "env" and not cpu:
        # Accelerate gives init_process_group the rank and world size on the CPU only; tcp:// and
        # file:// need them, in the URL where Accelerate leaves them out.
        separator = "&" if "?" in init_method else "?"
        rank, size = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None or size is None:
            raise RunError(f"--init-method {init_method} needs the launcher's RANK and WORLD_SIZE: use env://")
        init_method = f"{init_method}{separator}rank={rank}&world_size={size}"
    # DeepSpeed without GPUs picks its own backend (gloo, or ccl with oneCCL; _check_accelerator compares it
    # with --backend); otherwise the one Accelerate would pick by default.
    chosen = None if deepspeed and not gpu else backend or ("nccl" if gpu else "gloo")
    return InitProcessGroupKwargs(backend=chosen, init_method=init_method)


def _check_accelerator(accelerator, backend, gradient_accumulation_steps: int) -> None:
    """Checks what Accelerate made of the settings, and sets its state from torch.distributed: under
    ``accelerate launch --use_deepspeed`` without GPUs, Accelerate reports one process of index 0 on
    every rank while DeepSpeed's process group holds them all."""
    # Accelerate autocasts to fp16 on GPUs only: on the CPU it would train in float32 without a word.
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise RunError(
            "mixed precision fp16 (from the recipe's flags or the launcher's config) runs on GPUs only, and "
            "this run is on the CPU: use bf16 or no"
        )
    grouped = dist.is_available() and dist.is_initialized()  # a process group, which Accelerator() may create
    if backend is not None and grouped and dist.get_backend() != backend:
        raise RunError(
            f"--backend {backend}: the process group runs {dist.get_backend()} (under DeepSpeed, DeepSpeed "
            "picks it): drop --backend"
        )
    if grouped and accelerator.num_processes != dist.get_world_size():
        for state in (PartialState(), accelerator.state):
            state.num_processes, state.process_index = dist.get_world_size(), dist.get_rank()
    _check_gradient_accumulation(accelerator, gradient_accumulation_steps)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.is_auto("gradient_clipping"):
        # Accelerate fills an unset gradient_clipping with 1.0 when it prepares the model: DeepSpeed runs
        # would clip the gradients, and the same flags without DeepSpeed not. A value set in the config stays.
        plugin.deepspeed_config["gradient_clipping"] = 0.0


def _check_gradient_accumulation(accelerator, requested: int) -> None:
    """Raises a RunError when the launcher's gradient accumulation overrides the recipe's: Accelerate
    takes ACCELERATE_GRADIENT_ACCUMULATION_STEPS (which ``accelerate launch`` sets from the config's
    ``gradient_accumulation_steps``) over its keyword, and a DeepSpeed config file's value over both."""
    plugin = accelerator.state.deepspeed_plugin
    configured = [accelerator.gradient_accumulation_steps, plugin and plugin.get_value("gradient_accumulation_steps")]
    other = next((steps for steps in configured if steps not in (None, "auto", requested)), None)
    if other is not None:
        raise RunError(
            f"the launcher sets gradient accumulation to {other} step(s), which Accelerate would use instead "
            f"of the recipe's {requested} (--gradient-accumulation-steps where the recipe has it): remove "
            'gradient_accumulation_steps from the Accelerate config file (set it to "auto" in a DeepSpeed config '
            "file), and drop accelerate launch --gradient_accumulation_steps and ACCELERATE_GRADIENT_ACCUMULATION_STEPS"
        )
