"""The runner's training under real launchers: ``accelerate launch`` of tests/launch/runner_worker.py
with 2 gloo processes, DeepSpeed's ZeRO-2 and ZeRO-3 on the CPU against plain DDP."""

import json
import re
from pathlib import Path

import pytest
import torch

from launch.distributed import node_name
from tests.conftest import accelerate_launch, free_port, needs_deepspeed, run, torchrun

pytestmark = pytest.mark.integration
WORKER = Path(__file__).with_name("runner_worker.py")
RANK_ZERO_FIRST_WORKER = Path(__file__).with_name("rank_zero_first_worker.py")
CONFIGS = {"ddp": "cpu_2proc.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}


def train(tmp_path, name):
    """Results of ``runner_worker.py`` under ``CONFIGS[name]`` with 2 batches per optimizer step, by rank."""
    out, results = tmp_path / name, tmp_path / f"{name}-results"
    command = [WORKER, out, results, "--gradient-accumulation-steps", "2"]
    run(accelerate_launch(*command, port=free_port(), config=CONFIGS[name]), timeout=300)
    return [json.loads((results / f"{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return train(tmp_path_factory.mktemp("ddp"), "ddp")


@needs_deepspeed
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_trains_as_ddp_with_the_same_flags(stage, ddp, tmp_path):
    rank_0, rank_1 = train(tmp_path, stage)
    # --gradient-accumulation-steps is the recipe's, not a config's: 2 steps of 2 batches.
    assert rank_0["deepspeed"]["gradient_accumulation_steps"] == rank_0["accelerator_gradient_accumulation_steps"] == 2
    assert rank_0["deepspeed"]["optimizer_steps"] == 2 and rank_0["batches"] == 4
    # No gradient clipping unless a config asks for it, as without DeepSpeed: the same weights as DDP's.
    assert rank_0["deepspeed"]["gradient_clipping"] == 0
    for name, expected in ddp[0]["weights"].items():
        torch.testing.assert_close(torch.tensor(rank_0["weights"][name]), torch.tensor(expected), msg=name)
    # DeepSpeed does not broadcast buffers as DDP does: each rank's batch-norm statistics are its own...
    assert rank_0["before_evaluation"] != rank_1["before_evaluation"]
    # ...until the runner gives every rank rank 0's, to evaluate and to checkpoint.
    assert rank_0["evaluated"] == rank_1["evaluated"] == rank_0["before_evaluation"]
    assert rank_0["checkpointed"] == rank_1["checkpointed"]


@pytest.mark.parametrize(
    "failing_rank, error, message",
    [
        (
            1,
            "RuntimeError",
            f"error: --data-path X: rank 1 on {node_name()}: no space left",
        ),  # e.g. a path not shared by its node
        (0, "OSError", "error: --data-path X: OSError: no space left"),
        (-1, "OSError", None),
    ],
)
def test_a_failed_load_on_any_rank_stops_every_rank_with_its_message(failing_rank, error, message):
    """rank_zero_first: no rank is left waiting in a collective for one that exited."""
    result = run(torchrun(RANK_ZERO_FIRST_WORKER, failing_rank, error), check=False, timeout=120)
    if message is None:
        # The two processes share one stdout, so their lines may interleave.
        loaded = sorted(re.findall(r"rank \d loaded \d", result.stdout))
        assert result.returncode == 0 and loaded == ["rank 0 loaded 0", "rank 1 loaded 1"], result.stdout
    else:
        assert result.returncode != 0 and result.stderr.count(message) == 2, result.stderr
        assert "loaded" not in result.stdout
