#!/usr/bin/env bash
# The offline flow on Slurm: step 1 decomposes once (slurm/decompose.sbatch, one task), step 2
# finetunes the decomposed model on several nodes (slurm/mnist_cpu.sbatch with RUN_MODE=offline)
# and starts only once step 1 has succeeded (--dependency=afterok). Both use the same artifacts,
# under OUTPUT_DIR, which must be on a filesystem every node sees.
#
#   source .venv/bin/activate
#   PRETRAINED_PATH=runs/baseline/baseline.pth DATA_PATH=../shared/data slurm/submit_offline.sh --nodes=2
#
# Arguments are sbatch options for step 2. The variables of both scripts pass through the
# environment, except EXTRA_ARGS: step 2's recipe flags; DECOMPOSE_ARGS holds step 1's (--method,
# --ratio). SBATCH_PARTITION, SBATCH_ACCOUNT, ... apply to both jobs.
# Prints the two job ids, step 1's first. Logs go to the current directory.
set -euo pipefail

# The sbatch scripts find the recipes here, wherever this is run from.
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
OUTPUT_DIR=${OUTPUT_DIR:-$REPO_DIR/runs/slurm/mnist_offline-$(date +%Y%m%d-%H%M%S)}
DECOMPOSE_INFO_PATH=${DECOMPOSE_INFO_PATH:-$OUTPUT_DIR/decompose_info.json}
DECOMPOSED_WEIGHTS_PATH=${DECOMPOSED_WEIGHTS_PATH:-$OUTPUT_DIR/decomposed_weights.pth}
export REPO_DIR OUTPUT_DIR DECOMPOSE_INFO_PATH DECOMPOSED_WEIGHTS_PATH

# --parsable prints "<id>" or "<id>;<cluster>".
step1=$(EXTRA_ARGS=${DECOMPOSE_ARGS:-} sbatch --parsable "$REPO_DIR/slurm/decompose.sbatch")
step1=${step1%%;*}
# If step 1 fails, Slurm cancels step 2 (Reason=DependencyNeverSatisfied) instead of leaving it
# pending forever, which is the default of clusters without kill_invalid_depend.
step2=$(RUN_MODE=offline sbatch --parsable --dependency="afterok:$step1" --kill-on-invalid-dep=yes "$@" \
    "$REPO_DIR/slurm/mnist_cpu.sbatch")
step2=${step2%%;*}
echo "$step1 $step2"
