"""The rank-zero barrier with real processes: torchrun, 2 gloo workers on CPU."""

import importlib
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from filelock import FileLock

import lowrank
from launch import barrier
from launch.barrier import Artifacts, BarrierError, decompose_once, load_decomposed, parameters_digest, run_token
from launch.distributed import node_name
from launch.entry import Preempted
from lowrank.io import save_state_dict
from tests.conftest import torchrun
from tests.launch.barrier_worker import small_model

pytestmark = pytest.mark.integration
WORKER = Path(__file__).with_name("barrier_worker.py")
ROOT = Path(__file__).parents[2]


def pretrained(path, seed):
    torch.manual_seed(seed)
    save_state_dict(small_model().state_dict(), path)
    return path


def start(out_dir, weights, *extra):
    results = Path(out_dir).parent / f"results-{uuid.uuid4().hex}"
    command = torchrun(WORKER, out_dir, weights, results, *extra)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    process.results = results
    return process


def finish(process, timeout=180):
    process.out, err = process.communicate(timeout=timeout)
    results = {int(path.stem): json.loads(path.read_text()) for path in process.results.glob("*.json")}
    return process.returncode, results, err


def run(out_dir, weights, *extra):
    return finish(start(out_dir, weights, *extra))


def test_rank_zero_decomposes_the_others_load(tmp_path):
    weights = pretrained(tmp_path / "baseline.pth", 0)
    code, results, err = run(tmp_path / "art", weights)
    assert code == 0, err
    assert results[0]["changes"] == results[1]["changes"] == {"0": ["0.0", "0.1"], "3": ["3.0", "3.1"]}
    assert results[0]["digest"] == results[1]["digest"]
    assert not results[0]["reused"]
    # destroy_process_group stopped gloo's threads: none is left to race the interpreter's exit
    assert results[0]["gloo_threads_after_destroy"] == results[1]["gloo_threads_after_destroy"] == 0
    assert err.count("auto_decomposition start.") == 1 and err.count("decompose_network start.") == 1

    # A second run with the same inputs reuses the artifacts: no decomposition at all.
    code, again, err = run(tmp_path / "art", weights)
    assert code == 0, err
    assert again[0]["reused"] and again[1]["reused"]
    assert "auto_decomposition start." not in err
    assert again[0]["digest"] == results[0]["digest"]


def test_a_failure_on_rank_zero_stops_every_rank_with_its_message(tmp_path):
    weights = tmp_path / "baseline.pth"
    weights.write_bytes(b"not a checkpoint")
    code, results, err = run(tmp_path / "art", weights)
    assert code != 0
    assert "cannot read weights file" in results[0]["error"]
    assert "rank 0 failed to decompose the model: ValueError: cannot read weights file" in results[1]["error"]


def test_the_others_time_out_with_a_clear_message(tmp_path):
    weights = pretrained(tmp_path / "baseline.pth", 0)
    code, results, err = run(tmp_path / "art", weights, "--timeout", "2", "--hang", "30")
    assert code != 0
    assert "rank 0 did not finish the decomposition within 2 s" in results[1]["error"]
    assert "a larger model may need a longer --barrier-timeout" in results[1]["error"]


def test_stale_marker_and_lock_do_not_block_or_mislead(tmp_path):
    weights = pretrained(tmp_path / "baseline.pth", 0)
    artifacts = Artifacts(tmp_path / "art" / "decompose_info.json", tmp_path / "art" / "decomposed_weights.pth")
    artifacts.info_path.parent.mkdir()
    artifacts.lock_path.write_text("")  # left by a killed job
    artifacts.write_marker(status="failed", token="old-run", message="old failure")
    code, results, err = run(tmp_path / "art", weights)
    assert code == 0, err
    assert results[0]["digest"] == results[1]["digest"]


def test_artifacts_of_other_pretrained_weights_are_never_reused(tmp_path):
    first = pretrained(tmp_path / "a.pth", 0)
    second = pretrained(tmp_path / "b.pth", 1)
    _, results_a, _ = run(tmp_path / "art", first)
    code, results_b, err = run(tmp_path / "art", second)
    assert code == 0, err
    assert not results_b[0]["reused"] and err.count("auto_decomposition start.") == 1
    assert results_b[0]["digest"] != results_a[0]["digest"]


def test_tampered_weights_are_detected(tmp_path):
    weights = pretrained(tmp_path / "baseline.pth", 0)
    run(tmp_path / "art", weights)
    artifacts = Artifacts(tmp_path / "art" / "decompose_info.json", tmp_path / "art" / "decomposed_weights.pth")
    artifacts.weights_path.write_bytes(artifacts.weights_path.read_bytes()[:100])
    code, results, err = run(tmp_path / "art", weights)
    # rank 0 sees the checksum mismatch, so it decomposes again instead of reusing
    assert code == 0, err
    assert not results[0]["reused"]


@pytest.mark.parametrize(
    "tampering,message",
    [
        ("--change-weights-file", r"decomposed_weights.pth changed after rank 0 wrote it \(checksum mismatch\)"),
        ("--change-loaded-weights", r"ranks \[1\] hold different weights from rank 0 once the model is built"),
    ],
    ids=["file-changed", "weights-differ"],
)
def test_the_other_ranks_refuse_artifacts_that_changed_or_weights_that_differ(tmp_path, tampering, message):
    weights = pretrained(tmp_path / "baseline.pth", 0)
    code, results, err = run(tmp_path / "art", weights, tampering)
    assert code != 0
    assert re.search(f"BarrierError: .*{message}", results[1]["error"]), results
    if tampering == "--change-loaded-weights":  # every rank compares: rank 0 stops with the same error
        assert re.search(f"BarrierError: .*{message}", results[0]["error"]), results


def test_concurrent_jobs_on_the_same_paths_never_mix(tmp_path):
    first = pretrained(tmp_path / "a.pth", 0)
    second = pretrained(tmp_path / "b.pth", 1)
    expected = {}
    for name, weights in (("a", first), ("b", second)):
        _, results, _ = run(tmp_path / f"alone_{name}", weights)
        expected[name] = results[0]["digest"]
    jobs = {name: start(tmp_path / "shared", weights) for name, weights in (("a", first), ("b", second))}
    for name, job in jobs.items():
        code, results, err = finish(job)
        assert code == 0, err
        assert results[0]["digest"] == results[1]["digest"] == expected[name]


def test_parameters_digest_sees_any_change():
    model = small_model()
    digest = parameters_digest(model)
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1e-6
    assert parameters_digest(model) != digest


def test_parameters_digest_covers_zero_dim_buffers():
    model = torch.nn.BatchNorm2d(4)  # num_batches_tracked is a 0-dim int64 buffer
    digest = parameters_digest(model)
    model.num_batches_tracked += 1
    assert parameters_digest(model) != digest


def test_weights_that_do_not_fit_the_info_file_are_named(tmp_path):
    model, _ = lowrank.auto_decomposition(small_model(), tmp_path / "info.json", ratio=0.3)
    save_state_dict(small_model().state_dict(), tmp_path / "dense.pth")  # dense weights, not decomposed ones
    with pytest.raises(
        BarrierError,
        match=f"{tmp_path / 'dense.pth'} does not fit the structure of --decompose-info-path {tmp_path / 'info.json'}",
    ):
        load_decomposed(small_model(), tmp_path / "info.json", tmp_path / "dense.pth")
    save_state_dict(model.state_dict(), tmp_path / "decomposed.pth")
    rebuilt, changes = load_decomposed(small_model(), tmp_path / "info.json", tmp_path / "decomposed.pth")
    assert parameters_digest(rebuilt) == parameters_digest(model) and changes


def test_rank_zero_names_another_job_holding_the_lock(tmp_path):
    weights = pretrained(tmp_path / "baseline.pth", 0)
    artifacts = Artifacts(tmp_path / "art" / "decompose_info.json", tmp_path / "art" / "decomposed_weights.pth")
    artifacts.info_path.parent.mkdir()

    def load(model):
        model.load_state_dict(torch.load(weights, weights_only=True))

    busy = "^another job has held .* for 1 s: it decomposes into the same"
    with FileLock(artifacts.lock_path), pytest.raises(BarrierError, match=busy):  # another job on the same paths
        decompose_once(small_model(), artifacts, load, weights, {"ratio": 0.5}, run_token(), timeout=1)
    assert not artifacts.marker_path.exists()  # that job's marker is not this one's to write


def test_a_marker_that_is_not_ours_counts_as_none(tmp_path):
    artifacts = Artifacts(tmp_path / "decompose_info.json", tmp_path / "decomposed_weights.pth")
    for text in ('"old"', "[1, 2]", "{"):
        artifacts.marker_path.write_text(text)
        assert artifacts.read_marker() is None
    artifacts.marker_path.write_bytes(b"\xff\xfe garbage")
    assert artifacts.read_marker() is None


RANK_ZERO_AT_WORK = """
import socket, sys, time
from pathlib import Path
from filelock import FileLock
from launch.barrier import Artifacts
artifacts = Artifacts(Path(sys.argv[1]), Path(sys.argv[2]))
with FileLock(artifacts.lock_path):
    artifacts.write_marker(status="running", token="this-run", host=socket.gethostname())
    print("running", flush=True)
    time.sleep(600)
"""


def test_the_others_stop_waiting_soon_after_rank_zero_dies(tmp_path, monkeypatch):
    # On several nodes no launcher stops the other ranks when rank 0's process dies: they see that
    # it no longer holds the artifacts' lock.
    monkeypatch.setattr(barrier, "LIVENESS_INTERVAL", 0.2)
    artifacts = Artifacts(tmp_path / "decompose_info.json", tmp_path / "decomposed_weights.pth")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", RANK_ZERO_AT_WORK, str(artifacts.info_path), str(artifacts.weights_path)]
    rank_zero = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert rank_zero.stdout.readline() == "running\n"
        with pytest.raises(BarrierError, match="within 1 s"):  # alive: the others keep waiting
            barrier._wait_for_marker(artifacts, "this-run", timeout=1)
    finally:
        rank_zero.kill()  # as the out-of-memory killer does
        rank_zero.wait()
    # Told from the liveness check, not the timeout, whose message differs.
    with pytest.raises(BarrierError, match="rank 0 stopped while decomposing .* left no result"):
        barrier._wait_for_marker(artifacts, "this-run", timeout=3600)
    # From another node, a free lock proves nothing: some shared filesystems keep locks node-local.
    artifacts.write_marker(status="running", token="this-run", host="another-node")
    with pytest.raises(BarrierError, match="within 1 s"):
        barrier._wait_for_marker(artifacts, "this-run", timeout=1)


def test_the_others_tell_a_stopped_rank_zero_from_a_failed_one(tmp_path):
    artifacts = Artifacts(tmp_path / "decompose_info.json", tmp_path / "decomposed_weights.pth")

    def preempted(model):  # the runner's SIGTERM handler, while rank 0 decomposes
        raise Preempted

    with pytest.raises(Preempted):
        decompose_once(small_model(), artifacts, preempted, pretrained(tmp_path / "p.pth", 0), {}, "this-run")
    with pytest.raises(BarrierError, match=r"it was stopped \(Preempted: 75\) by a signal \(a time limit, a preempt"):
        barrier._wait_for_marker(artifacts, "this-run", timeout=1)
    assert not artifacts.info_path.exists() and not artifacts.weights_path.exists()


MODEL_SOURCE = """
import torch
from tests.launch.barrier_worker import small_model


class Net(torch.nn.Sequential):
    def __init__(self):
        super().__init__(*small_model())

    def forward(self, x):
        return torch.{activation}(super().forward(x))
"""


def edited_model_class(folder, activation):
    """The class ``Net`` of the module ``folder/edited_net.py``, written (again) with ``activation`` in
    its forward: what a user's edit of their model's source gives the next run."""
    (folder / "edited_net.py").write_text(MODEL_SOURCE.format(activation=activation))
    sys.modules.pop("edited_net", None)
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("edited_net")
    finally:
        sys.path.remove(str(folder))  # the module stays imported: inspect finds its source through it
    return module.Net


def decompose_alone(out_dir, weights, policy, model=None):
    """``decompose_once`` in this process (rank 0 of a job of one): whether it reused the artifacts."""
    artifacts = Artifacts(out_dir / "decompose_info.json", out_dir / "decomposed_weights.pth")
    model = model if model is not None else small_model()
    _, _, reused = decompose_once(
        model, artifacts, lambda m: m.load_state_dict(lowrank.io.load_state_dict(weights)), weights, policy, run_token()
    )
    return reused


@pytest.mark.parametrize("change", ["policy", "method", "model structure", "model source", "lowrank version"])
def test_artifacts_of_another_policy_method_model_or_version_are_never_reused(tmp_path, monkeypatch, change):
    weights = pretrained(tmp_path / "baseline.pth", 0)
    policy = {"method": "spatial", "ratio": 0.3}

    def model(activation="relu"):
        if change == "model source":  # the same repr and parameters, another forward
            return edited_model_class(tmp_path, activation)()
        layers = small_model()
        if activation != "relu":
            layers[1] = torch.nn.GELU()  # the same parameters, another model
        return layers

    assert not decompose_alone(tmp_path / "art", weights, policy, model())
    assert decompose_alone(tmp_path / "art", weights, policy, model())  # the same inputs: reused
    if change == "policy":
        policy = {**policy, "ratio": 0.5}
    elif change == "method":
        policy = {**policy, "method": "svd"}
    elif change == "lowrank version":
        monkeypatch.setattr(lowrank, "__version__", lowrank.__version__ + ".post1")
    if change == "model source":
        assert repr(model("sigmoid")) == repr(model())
    changed = model("sigmoid") if change.startswith("model") else model()
    assert not decompose_alone(tmp_path / "art", weights, policy, changed)


def test_a_rank_that_does_not_see_the_artifact_folder_is_sent_the_artifacts(tmp_path):
    # Each rank its own folder, as on nodes whose artifact folder is node-local.
    weights = pretrained(tmp_path / "baseline.pth", 0)
    process = start(tmp_path / "art", weights, "--per-rank-folder")
    code, results, err = finish(process)
    assert code == 0, err
    said = f"[Setup] rank(s) 1 on {node_name()} do not see {tmp_path / 'art/rank0'}, where rank 0 (on {node_name()})"
    assert process.out.count(said) == 1, process.out
    assert results[0]["digest"] == results[1]["digest"] and not results[1]["reused"]
    for name in ("decompose_info.json", "decomposed_weights.pth"):
        assert (tmp_path / "art/rank1" / name).read_bytes() == (tmp_path / "art/rank0" / name).read_bytes()
    assert err.count("auto_decomposition start.") == 1 and err.count("decompose_network start.") == 1
    assert not list((tmp_path / "art/rank0").glob("*.probe.*"))  # rank 0 removed its probe

    # A second run: rank 0 reuses its artifacts, rank 1 finds the copy it was sent intact.
    sent = (tmp_path / "art/rank1/decomposed_weights.pth").stat().st_mtime_ns
    code, again, err = run(tmp_path / "art", weights, "--per-rank-folder")
    assert code == 0, err
    assert again[0]["reused"] and again[1]["reused"] and again[1]["digest"] == results[0]["digest"]
    assert (tmp_path / "art/rank1/decomposed_weights.pth").stat().st_mtime_ns == sent

    # Offline, a rank whose node lacks a file stops every rank at once, naming its node and the path.
    missing = tmp_path / "art/rank1/decompose_info.json"
    missing.unlink()
    code, results, err = run(tmp_path / "art", weights, "--per-rank-folder", "--offline")
    assert code != 0
    for rank in (0, 1):
        error = results[rank]["error"]
        assert f"rank 1 on {node_name()}: --decompose-info-path" in error and str(missing) in error, error


def test_a_failure_on_rank_zero_reaches_a_rank_without_the_folder(tmp_path):
    weights = tmp_path / "baseline.pth"
    weights.write_bytes(b"not a checkpoint")
    code, results, err = run(tmp_path / "art", weights, "--per-rank-folder")
    assert code != 0
    assert "rank 0 failed to decompose the model: ValueError: cannot read weights file" in results[1]["error"]
    assert not (tmp_path / "art/rank1/decompose_info.json").exists()


def test_a_rank_that_misses_the_probe_of_a_shared_folder_loads_the_files_in_place(tmp_path):
    # Rank 0 holds the folder's lock until every rank has loaded: rank 1 must not wait for it.
    weights = pretrained(tmp_path / "baseline.pth", 0)
    code, results, err = run(tmp_path / "art", weights, "--slow-probe")
    assert code == 0, err
    assert results[0]["digest"] == results[1]["digest"]
    assert err.count("auto_decomposition start.") == 1 and err.count("decompose_network start.") == 1


def test_a_rank_that_sees_the_info_folder_but_not_the_weights_folder_is_sent_the_weights(tmp_path):
    weights = pretrained(tmp_path / "baseline.pth", 0)
    process = start(tmp_path / "art", weights, "--per-rank-weights")
    code, results, err = finish(process)
    assert code == 0, err
    assert f"do not see both {tmp_path / 'art'} and {tmp_path / 'art/rank0'}, where" in process.out, process.out
    assert results[0]["digest"] == results[1]["digest"]
    name = "decomposed_weights.pth"
    assert (tmp_path / "art/rank1" / name).read_bytes() == (tmp_path / "art/rank0" / name).read_bytes()


def test_the_fingerprint_reads_the_policys_tensors_by_value(tmp_path):
    """Calibration batches and the budget's example input are fingerprinted by their values, which a
    tensor's text elides: a rerun on other data decomposes again."""
    pretrained = tmp_path / "dense.pth"
    pretrained.write_bytes(b"weights")
    model = small_model()
    batches = [torch.zeros(64, 64)]
    other = [torch.zeros(64, 64).index_fill_(0, torch.tensor([31]), 1.0)]
    assert str(batches) == str(other)
    policy = {"method": "spatial", "ratio": 0.3}
    first = barrier.fingerprint(pretrained, model, {**policy, "calibration": batches})
    assert first == barrier.fingerprint(pretrained, model, {**policy, "calibration": [torch.zeros(64, 64)]})
    assert first != barrier.fingerprint(pretrained, model, {**policy, "calibration": other})
    assert first != barrier.fingerprint(pretrained, model, policy)
