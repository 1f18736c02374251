"""Trains a tiny batch-norm model with the runner in each process of an ``accelerate launch`` job; each
rank writes RESULTS/<rank>.json.

accelerate launch --config_file CONFIG tests/launch/runner_worker.py OUT_DIR RESULTS [--gradient-accumulation-steps N]
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from launch import checkpoints, loop
from launch.accelerator import create_accelerator
from launch.distributed import global_rank
from launch.entry import run_main


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("results")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    args = parser.parse_args()
    accelerator = create_accelerator(
        use_gpu=False, output_dir=args.output_dir, gradient_accumulation_steps=args.gradient_accumulation_steps
    )
    torch.manual_seed(0)  # the same model and data on every rank; each rank trains on its own shard
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    train_set = torch.utils.data.TensorDataset(100 * torch.randn(16, 4), torch.randint(0, 2, (16,)))
    test_set = torch.utils.data.TensorDataset(torch.randn(6, 4), torch.randint(0, 2, (6,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(train_set, batch_size=2)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=3)
    model, optimizer, loader, test_loader = accelerator.prepare(model, optimizer, loader, test_loader)
    progress = checkpoints.Progress()
    accelerator.register_for_checkpointing(progress)

    def statistics():
        return [buffer.tolist() for buffer in accelerator.unwrap_model(model).buffers()]

    result = {}

    def evaluate():
        result["before_evaluation"] = statistics()  # each rank's own, from its own batches
        loop.evaluate(accelerator, model, test_loader, loss_fn=F.cross_entropy)
        result["evaluated"] = statistics()

    loop.train(
        accelerator, model, optimizer, loader, progress, steps=2, log_steps=1, output_dir=args.output_dir,
        settings=vars(args), loss_fn=F.cross_entropy, eval_steps=1, eval_fn=evaluate,
    )  # fmt: skip
    result["checkpointed"] = statistics()  # train ends with a checkpoint
    weights = accelerator.get_state_dict(model)  # on every rank: under ZeRO-3 it gathers the shards, to rank 0
    if global_rank() == 0:
        result["weights"] = {name: tensor.tolist() for name, tensor in weights.items()}
    result["batches"] = progress.batch
    result["accelerator_gradient_accumulation_steps"] = accelerator.gradient_accumulation_steps
    if hasattr(model, "gradient_clipping"):  # a DeepSpeed engine
        result["deepspeed"] = {
            "gradient_accumulation_steps": model.gradient_accumulation_steps(),
            "gradient_clipping": model.gradient_clipping(),
            "optimizer_steps": model.global_steps,
        }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{global_rank()}.json").write_text(json.dumps(result))
    loop.end_run(accelerator)


if __name__ == "__main__":
    run_main(main)
