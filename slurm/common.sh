# shellcheck shell=bash disable=SC2034,SC2153,SC2154 # variables the sourcing scripts set or read
# Sourced by the sbatch scripts once they know REPO_DIR: the checks of their settings, and what a
# preemption does. Each script sets its USR1 trap before anything else (a shell without it would die
# of USR1, and the job with it):
#
#   trap 'preempted=1; [[ -z $srun_pid ]] || signal_step' USR1

# Mistakes in the settings end the job here, with their cause, rather than on every node with a
# launcher's traceback around the cause.
fail() {
    echo "[slurm] error: $*"
    exit 2
}

# check_python MODULE...: the job runs the submitting shell's Python, $PYTHON. Checked from /, where
# the repository is not on sys.path.
check_python() {
    if ! (cd / && "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' \
        "$@") 2>/dev/null; then
        fail "PYTHON=$PYTHON ($(command -v "$PYTHON" || echo 'not found')) cannot import $*:" \
            "submit from the shell whose Python has this project installed (source .venv/bin/activate) or set PYTHON"
    fi
}

# split_extra_args: EXTRA_ARGS into the array extra_args, split into words as the shell would (quotes
# keep a value with spaces in one word) but without expanding anything: it holds flags for the recipe.
split_extra_args() {
    xargs -r printf '%s\0' <<<"$EXTRA_ARGS" >/dev/null 2>&1 || fail "EXTRA_ARGS: unbalanced quotes in: $EXTRA_ARGS"
    mapfile -d '' -t extra_args < <(xargs -r printf '%s\0' <<<"$EXTRA_ARGS")
}

# default_port: MAIN_PROCESS_PORT, unless set, derived from the job id: two jobs sharing a node do not
# collide, and a requeued run reuses its port. Another program listening there (this shell runs on
# the head node) moves it out of the range of the other jobs' ports.
default_port() {
    [[ -z $MAIN_PROCESS_PORT ]] || return 0
    MAIN_PROCESS_PORT=$((29500 + SLURM_JOB_ID % 1000))
    # shellcheck disable=SC2016 # expanded by that bash, which fails if nothing listens there
    while timeout 1 bash -c ': </dev/tcp/"$0"/"$1"' "$MAIN_PROCESS_IP" "$MAIN_PROCESS_PORT" 2>/dev/null &&
        ((MAIN_PROCESS_PORT < 64000)); do
        MAIN_PROCESS_PORT=$((MAIN_PROCESS_PORT + 1000))
    done
}

# job_ref: this job as scontrol and scancel name it. An array task is <array job id>_<task id>: given
# its own SLURM_JOB_ID, which for the first task is the array job's id, they would act on every task.
job_ref() {
    if [[ -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
        echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "$SLURM_JOB_ID"
    fi
}

# USR1 (from --signal, before the time limit) comes to the batch shell only: signal_step passes it on
# to the job step as SIGTERM, which the launchers forward to their workers, and the runner turns into
# a checkpoint and exit code 75.
signal_step() {
    signalled=1
    echo "[slurm] USR1: asking the workers to save a checkpoint"
    # A job step that srun is still creating would miss the signal, and run on until the time limit.
    for _ in $(seq 30); do
        if squeue -h -s -j "$(job_ref)" -o %i | grep -q '\.[0-9]'; then
            scancel --signal=TERM "$(job_ref)"
            return
        fi
        kill -0 "$srun_pid" 2>/dev/null || return
        sleep 1
    done
}

requeue() {
    echo "[slurm] requeueing; the next run resumes from $OUTPUT_DIR/checkpoints"
    if ! scontrol requeue "$(job_ref)"; then
        echo "[slurm] requeue refused: resubmit with OUTPUT_DIR=$OUTPUT_DIR to resume"
        exit 75 # the run is not finished: EX_TEMPFAIL, as the workers'
    fi
    exit 0
}

# requeue_if_preempted: before srun starts there is nothing to signal: the job requeues without it.
requeue_if_preempted() {
    [[ -z $preempted ]] && return 0
    echo "[slurm] USR1 before the launch"
    requeue
}

# wait_and_exit: waits for the job step that srun runs in the background ($srun_pid), then requeues a
# preempted run or exits with the step's status.
wait_and_exit() {
    local status=0
    # A USR1 that came after srun started but before $srun_pid was set found nothing to signal.
    [[ -z $preempted || -n $signalled ]] || signal_step
    wait "$srun_pid" || status=$?
    # The trap interrupts wait: wait again until the job step has really ended.
    while kill -0 "$srun_pid" 2>/dev/null; do
        status=0
        wait "$srun_pid" || status=$?
    done
    # A step that succeeded has finished the run, even if USR1 came (too late to stop it, or while the
    # step was starting and could not be signalled yet): nothing to requeue.
    if [[ -n $preempted && $status -ne 0 ]]; then
        # The workers exit with 75 once their checkpoint is saved; the launchers stop on SIGTERM with a
        # SignalException traceback and the step with an error status: neither is a failure of the job.
        echo "[slurm] preempted (job step exit status $status, expected)"
        requeue
    fi
    if [[ $status -ne 0 ]]; then
        echo "[slurm] failed with exit status $status: the first error above (its node's number first) tells why"
    else
        echo "[slurm] done with exit status $status; artifacts in $OUTPUT_DIR"
    fi
    exit "$status"
}
