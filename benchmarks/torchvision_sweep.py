"""Every torchvision classification model decomposed, replayed and compared: the structure check of
lowrank on models it was not written for.

    .venv/bin/python benchmarks/torchvision_sweep.py           # every model of list_models (about an hour, 2 cores)
    .venv/bin/python benchmarks/torchvision_sweep.py --quick   # 3 small models, the smoke test (a minute)

Per model (random weights, seed 0, eval mode) and per rule (``amct``: ``auto_decomposition(model, path)``
as AMCT calls it; ``ratio``: lowrank's ``ratio=0.3``): decompose with an info file, then rebuild the
structure on a fresh model with ``decompose_network`` and load the decomposed state dict strictly, as
the other ranks of a job do. Targets: every model decomposes, and each replayed model's output equals
the decomposed one's bit for bit. Prints a table and saves JSON under benchmarks/results/.
"""

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from common import add_output_argument, command_line, machine_info, machine_line, output_path, save_json, table

import lowrank

QUICK_MODELS = ("resnet18", "mobilenet_v3_small", "squeezenet1_1")
# Input sizes the model needs (fixed by its architecture); 224 otherwise.
INPUT_SIZES = {"inception_v3": 299, "swin_v2_t": 256, "swin_v2_s": 256, "swin_v2_b": 256}
# Keyword arguments that build a model without pretrained-only parts.
BUILD_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": False}, "inception_v3": {"aux_logits": False}}
RULES = {"amct": {}, "ratio": {"ratio": 0.3}}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **BUILD_KWARGS.get(name, {})).eval()


@torch.no_grad()
def sweep_one(name: str, rule: str, folder: Path) -> dict:
    """Decomposes ``name`` under ``rule``, replays it on a fresh model, and compares the two."""
    size = INPUT_SIZES.get(name, 224)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    model = build(name)
    params = lowrank.count_parameters(model)
    info = folder / f"{name}_{rule}.json"
    start = time.perf_counter()
    model, changes = lowrank.auto_decomposition(model, info, **RULES[rule])
    seconds = time.perf_counter() - start
    output = model(x)
    replayed = build(name)
    if info.exists():  # AMCT writes no file when it decomposes nothing
        lowrank.decompose_network(replayed, info)
    replayed.load_state_dict(model.state_dict(), strict=True)
    return {
        "model": name,
        "rule": rule,
        "layers": len(changes),
        "params_before": params,
        "params_after": lowrank.count_parameters(model),
        "decompose_s": seconds,
        "identical": bool(torch.equal(replayed(x), output)),
    }


def main(args) -> int:
    names = list(args.models or (QUICK_MODELS if args.quick else torchvision.models.list_models(torchvision.models)))
    results = {"machine": machine_info(), "command": command_line(), "models": []}
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            for rule in args.rules:
                try:
                    record = sweep_one(name, rule, Path(folder))
                except Exception as error:  # a model that fails is a finding, recorded; the sweep goes on
                    record = {"model": name, "rule": rule, "error": f"{type(error).__name__}: {error}"}
                results["models"].append(record)
                print(record, flush=True)
    rows = [
        [
            r["model"],
            r["rule"],
            r.get("layers", "-"),
            f"{r['params_before'] / 1e6:.1f}M -> {r['params_after'] / 1e6:.1f}M" if "layers" in r else "-",
            f"{r['decompose_s']:.1f}" if "layers" in r else "-",
            r.get("identical", r.get("error")),
        ]
        for r in results["models"]
    ]
    print(table(["model", "rule", "layers", "parameters", "seconds", "replay identical"], rows))
    failed = [r for r in results["models"] if not r.get("identical")]
    decomposed = {r["model"] for r in results["models"] if r.get("layers")}
    results["targets"] = {
        "every model decomposes and replays": not failed,
        "models with a decomposed layer": f"{len(decomposed)} of {len(names)}",
    }
    print(f"\n{len(results['models']) - len(failed)} of {len(results['models'])} runs replay bit-identically")
    print(machine_line(results["machine"]))
    path = output_path(args, "torchvision_sweep")
    save_json(results, path)
    print(f"saved {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_MODELS)} (default: False)")
    parser.add_argument("--models", nargs="+", default=None, help="these models only (default: every one)")
    parser.add_argument(
        "--rules", nargs="+", choices=list(RULES), default=list(RULES), help="rules to run (default: amct ratio)"
    )
    add_output_argument(parser, "torchvision_sweep")
    lowrank.set_logger_level("warning")
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(parser.parse_args()))
