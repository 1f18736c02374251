"""The rank-zero decompose-and-save barrier (docs/design.md).

In a job of several processes, global rank 0 decomposes the model once and saves the decomposition
info file and the decomposed weights; the other ranks wait for a marker file, polling without any
collective (a long decomposition cannot trip a NCCL/gloo timeout), then rebuild the structure only
and load the weights. A run token broadcast at the start tells this run's marker from an old one;
a fingerprint of the pretrained weights, the model definition and the policy lets a later run with
the same inputs reuse the artifacts instead of decomposing again, and keeps stale or foreign
artifacts from ever being used. A file lock next to the info file serialises jobs that share the
paths, so none ever reads a mixed or half-written artifact.

Rank 0 marks the run as running (with its host) once it holds the lock; the other ranks on its host
check now and then that it still holds it, so that a rank 0 killed midway (out of memory) stops them
within seconds rather than at the timeout, also where no launcher would stop them. Across nodes the
scheduler does (the sbatch scripts' ``srun --kill-on-bad-exit``): some shared filesystems keep locks
local to each node.

The artifact folder need not be shared: at the start rank 0 writes a probe next to the info file, and
a rank that does not see it within seconds (a node-local ``/tmp``, a per-node path) is sent the
artifacts over the process group, checksummed, and writes them into its own folder.
"""

import contextlib
import hashlib
import inspect
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from filelock import FileLock, Timeout
from torch import nn

import lowrank
from lowrank import calibration
from lowrank.info import new_names
from lowrank.io import (
    atomic_write,
    file_digest,
    load_state_dict,
    make_parent_dirs,
    save_state_dict,
    state_dict_mismatch,
)

from .distributed import global_rank, log, node_name

DEFAULT_TIMEOUT = 3600.0  # seconds the other ranks wait for rank 0: decomposing a large model takes minutes
POLL_INTERVAL = 0.2
# Every this many seconds, the waiting ranks on rank 0's host check that it still holds the artifacts'
# lock (the system frees it when a process dies, even killed).
LIVENESS_INTERVAL = 5.0
# Seconds a rank looks for rank 0's probe: a shared filesystem shows a new file at once (a name never
# looked up before is in no cache). One slower than that only costs a transfer of files it then holds.
PROBE_WAIT = 2.0


class BarrierError(RuntimeError):
    """Rank 0 failed, or its artifacts did not arrive or do not check out."""


def run_token() -> str:
    """A fresh token chosen by rank 0 and broadcast to all ranks: one short collective, before any long work."""
    token = [uuid.uuid4().hex]
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.broadcast_object_list(token, src=0, device=torch.device("cuda", torch.cuda.current_device()))
        else:
            dist.broadcast_object_list(token, src=0)
    return token[0]


def fingerprint(pretrained_path, model: nn.Module, policy: dict) -> str:
    """Identifies the inputs of a decomposition: the pretrained weights' bytes, the model definition
    (its class source where available, its structure, its parameter shapes and dtypes), the policy
    (its tensors, the example input and calibration batches, by their values) and the lowrank version."""
    digest = hashlib.sha256()
    digest.update(file_digest(pretrained_path).encode())
    with contextlib.suppress(OSError, TypeError):  # classes defined without source files
        digest.update(inspect.getsource(type(model)).encode())
    digest.update(repr(model).encode())
    digest.update(repr([(k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()]).encode())
    digest.update(json.dumps(policy, sort_keys=True, default=_by_value).encode())
    digest.update(lowrank.__version__.encode())
    return digest.hexdigest()


def _by_value(value) -> str:
    """A policy value as the fingerprint reads it: a tensor by its values (its text elides them)."""
    if isinstance(value, torch.Tensor):
        return f"tensor {calibration.digest([value])}"
    return str(value)


def parameters_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
    return digest.hexdigest()


def check_identical_parameters(model: nn.Module) -> None:
    """Raises unless every rank holds bit-identical parameters and buffers."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, parameters_digest(model))
    differing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    if differing:
        raise BarrierError(
            f"ranks {differing} hold different weights from rank 0 once the model is built (is it drawn before the "
            "seed is set, or are the weights files different copies on each node?)"
        )


@dataclass(frozen=True)
class Artifacts:
    """Where rank 0 saves the decomposition: the info file and the decomposed weights; the marker and
    the lock sit next to the info file."""

    info_path: Path
    weights_path: Path

    @property
    def marker_path(self) -> Path:
        return self.info_path.with_name(self.info_path.name + ".marker.json")

    @property
    def lock_path(self) -> Path:
        return self.info_path.with_name(self.info_path.name + ".lock")

    def files(self) -> dict[str, Path]:
        """The two artifacts by kind, as their checksums and markers name them."""
        return {"info": self.info_path, "weights": self.weights_path}

    def lock(self, timeout: float):
        """The acquired lock on these paths (``Timeout`` after ``timeout`` s), saying on stderr when
        another job holds it, so that a wait is never silent."""
        lock = FileLock(self.lock_path)
        try:
            return lock.acquire(timeout=0)
        except Timeout:
            print(f"waiting for {self.lock_path}: another job is writing these artifacts", file=sys.stderr, flush=True)
            return lock.acquire(timeout=timeout)

    def checksums(self) -> dict:
        return {kind: file_digest(path) for kind, path in self.files().items()}

    def write_marker(self, **content) -> None:
        atomic_write(self.marker_path, lambda file: json.dump(content, file), binary=False)

    def read_marker(self) -> dict | None:
        try:
            marker = json.loads(self.marker_path.read_text())
        except (FileNotFoundError, ValueError):  # ValueError: not JSON, or not even text
            return None
        return marker if isinstance(marker, dict) else None  # not one of ours: as good as none


def decompose_once(
    model: nn.Module,
    artifacts: Artifacts,
    load_pretrained: Callable[[nn.Module], None],
    pretrained_path,
    policy: dict,
    token: str,
    timeout: float = DEFAULT_TIMEOUT,
    calibration: Callable[[], list] | None = None,
) -> tuple[nn.Module, dict, bool]:
    """Decomposes ``model`` in place on every rank, the decomposition itself running on rank 0 only.

    Args:
        model: the dense model, same definition on every rank.
        artifacts: where rank 0 saves the info file and the weights.
        load_pretrained: loads the pretrained weights into the dense model (rank 0, on a cache miss).
        pretrained_path: the pretrained weights file, part of the fingerprint.
        policy: what ``decompose`` takes.
        token: this run's token, from ``run_token()``.
        timeout: seconds the other ranks wait for rank 0's marker.
        calibration: reads the calibration batches (rank 0 alone calls it), which become the policy's
            ``calibration`` and so part of the fingerprint; None: the weights alone.

    Returns:
        ``(model, changes, reused)``; ``reused`` tells that rank 0 found the artifacts of an earlier
        run with the same fingerprint and did not decompose again. Every rank then holds the same
        weights (checked).
    """
    artifacts = Artifacts(Path(artifacts.info_path), Path(artifacts.weights_path))
    courier = Courier.for_ranks_without_the_folder(artifacts, token, timeout)
    if global_rank() == 0:
        return _decompose_on_rank_zero(
            model, artifacts, load_pretrained, pretrained_path, policy, token, timeout, courier, calibration
        )
    if courier.delivers_here():
        marker = courier.receive(artifacts, timeout)
    else:
        marker = _wait_for_marker(artifacts, token, timeout)
    model, changes = _load_artifacts(model, artifacts, marker)
    check_identical_parameters(model)
    return model, changes, marker.get("reused", False)


def decompose(model: nn.Module, info_path, policy: dict) -> tuple[nn.Module, dict]:
    """The decomposition of ``model`` with its weights, and its info file at ``info_path``, which
    ``lowrank.decompose_network`` replays: ``lowrank.auto_decomposition(model, info_path, **policy)``
    (AMCT's choice for ``{}``, lowrank's rules for their keywords), or for ``{"from_ratio": r}``
    msModelSlim's ``Decompose(model, config_file=info_path).from_ratio(r)`` (its config file is the
    info file). Returns the decomposed model and ``{name: [new names]}``."""
    if "from_ratio" not in policy:
        return lowrank.auto_decomposition(model, info_path, **policy)
    decomposer = lowrank.Decompose(model, config_file=os.fspath(info_path)).from_ratio(policy["from_ratio"])
    decomposed = decomposer.decompose_network()
    changes = {}
    for name in decomposer.decompose_config:
        new = decomposed.get_submodule(name)
        if isinstance(new, nn.Sequential):  # not one of the layers left alone
            changes[name] = new_names(name, len(new))
    return decomposed, changes


def _decompose_on_rank_zero(
    model, artifacts, load_pretrained, pretrained_path, policy, token, timeout, courier, calibration
):
    make_parent_dirs(artifacts.info_path)
    # The lock is held until every rank has loaded the artifacts and compared weights (the final
    # collective starts only once they have loaded, so it is short): no other job can overwrite the
    # files while this one's ranks read them.
    try:
        held = artifacts.lock(timeout)
    except Timeout:
        message = (
            f"another job has held {artifacts.lock_path} for {timeout:.0f} s: it decomposes into the same "
            "artifact paths; give this job its own (--output-dir or the artifact path flags)"
        )
        with contextlib.suppress(RuntimeError):  # a receiver gone
            courier.send({"status": "failed", "token": token, "message": f"BarrierError: {message}"})
        raise BarrierError(message) from None
    with held:
        try:
            previous = artifacts.read_marker()
            # Watched by the others on this host (_check_rank_zero_alive) until the result replaces it.
            artifacts.write_marker(status="running", token=token, host=socket.gethostname())
            if calibration is not None:
                policy = {**policy, "calibration": calibration()}
            wanted = fingerprint(pretrained_path, model, policy)
            reused = _intact(artifacts, previous, wanted)
            if reused:
                # _intact verified the checksums, and the lock keeps the files as they are: no second hashing.
                model, changes = load_decomposed(model, artifacts.info_path, artifacts.weights_path)
                checksums = previous["checksums"]
            else:
                load_pretrained(model)
                model, changes = decompose(model, artifacts.info_path, policy)
                save_state_dict(model.state_dict(), artifacts.weights_path)
                checksums = artifacts.checksums()
            done = {"status": "done", "token": token, "fingerprint": wanted, "checksums": checksums, "reused": reused}
            artifacts.write_marker(**done)
            courier.send(done, artifacts)
        except BaseException as error:
            message = f"{type(error).__name__}: {error}"
            if not isinstance(error, Exception):  # Preempted (a SystemExit), KeyboardInterrupt
                message = f"it was stopped ({message}) by a signal (a time limit, a preemption) or Ctrl-C: see its log"
            # Told to the receivers first: writing the marker may fail for the same reason (a full disk).
            with contextlib.suppress(RuntimeError):  # a receiver gone, or one already sent the files
                courier.send({"status": "failed", "token": token, "message": message})
            artifacts.write_marker(status="failed", token=token, message=message)
            raise
        check_identical_parameters(model)
    return model, changes, reused


class Courier:
    """Carries rank 0's artifacts to the ranks that do not see its artifact folders, over a gloo group
    of rank 0 and those ranks (gloo moves CPU tensors under any backend), whose timeout is the
    barrier's: they wait in it for rank 0's result, however long the decomposition takes."""

    def __init__(self, receivers: list[int], group=None):
        self.receivers = receivers
        self.group = group

    @classmethod
    def for_ranks_without_the_folder(cls, artifacts: Artifacts, token: str, timeout: float) -> "Courier":
        """Rank 0 writes a probe next to the info file and one next to the weights file, every rank
        looks for them for up to PROBE_WAIT seconds, and the ranks that do not see both get a courier
        (on every rank: creating a group is a collective). A rank 0 that cannot write there stops
        every rank with its error."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls([])
        probes = sorted({path.with_name(f"{path.name}.probe.{token}") for path in artifacts.files().values()})
        error = None
        try:
            if global_rank() == 0:
                for probe in probes:
                    make_parent_dirs(probe)
                    probe.write_text(token)
            seen = all(_sees(probe, token) for probe in probes)
        except OSError as failure:
            error, seen = f"{type(failure).__name__}: {failure}", False
        answers = [None] * dist.get_world_size()
        dist.all_gather_object(answers, (node_name(), seen, error))
        if global_rank() == 0:
            for probe in probes:
                probe.unlink(missing_ok=True)
        if answers[0][2]:
            raise BarrierError(f"rank 0 cannot write next to {artifacts.info_path}: {answers[0][2]}")
        receivers = [rank for rank, (_, seen, _) in enumerate(answers) if not seen]
        if not receivers:
            return cls([])
        nodes = sorted({answers[rank][0] for rank in receivers})
        folders = sorted({str(probe.parent) for probe in probes})
        folders = f"both {folders[0]} and {folders[1]}" if len(folders) == 2 else folders[0]
        log(
            f"[Setup] rank(s) {', '.join(map(str, receivers))} on {', '.join(nodes)} do not see {folders}, where "
            f"rank 0 (on {answers[0][0]}) writes the artifacts: it sends them the files over the process group"
        )
        group = dist.new_group([0, *receivers], timeout=timedelta(seconds=timeout), backend="gloo")
        return cls(receivers, group)

    def delivers_here(self) -> bool:
        return global_rank() in self.receivers

    def send(self, marker: dict, artifacts: Artifacts | None = None) -> None:
        """On rank 0: ``marker`` (done or failed), then for a done one the two files, read before
        anything is sent (a file that cannot be read raises with nothing sent)."""
        if not self.receivers:
            return
        files = [_read_file(path) for path in artifacts.files().values()] if artifacts else []
        dist.broadcast_object_list([marker, [len(file) for file in files]], src=0, group=self.group)
        for file in files:
            dist.broadcast(file, src=0, group=self.group)

    def receive(self, artifacts: Artifacts, timeout: float) -> dict:
        """On a receiving rank: rank 0's marker, with its files written atomically into this rank's
        folders (where they are not there already)."""
        box = [None, None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except RuntimeError as error:  # gloo's timeout, or rank 0 gone
            raise BarrierError(
                f"rank 0 sent no decomposition ({' '.join(str(error).split())[:200]}): it died, took longer "
                f"than --barrier-timeout {timeout:.0f} s, or waits for another job that uses the same artifact paths"
            ) from None
        marker, sizes = box
        if marker["status"] == "failed":
            raise BarrierError(f"rank 0 failed to decompose the model: {marker['message']}")
        files = [torch.empty(size, dtype=torch.uint8) for size in sizes]
        for file in files:
            dist.broadcast(file, src=0, group=self.group)
        for (kind, path), file in zip(artifacts.files().items(), files):
            if hashlib.sha256(file.numpy()).hexdigest() != marker["checksums"][kind]:
                raise BarrierError(f"the {kind} file rank 0 sent for {path} does not match its checksum")
        _write_received(artifacts, marker, files)
        return marker


def _write_received(artifacts: Artifacts, marker: dict, files: list) -> None:
    """Writes each of rank 0's files, checked, into this rank's folder unless it is in place: a folder
    rank 0 shares after all (this rank saw its probe late), this node's copy from an earlier run, or
    what another rank of this node just wrote. No lock: rank 0 holds the one next to a shared info
    file until every rank has loaded, and an atomic replace by bytes of known checksum is safe; a
    reader of other bytes (another job) fails its own checksums rather than mixing them."""
    for (kind, path), file in zip(artifacts.files().items(), files):
        with contextlib.suppress(FileNotFoundError):
            if file_digest(path) == marker["checksums"][kind]:
                continue
        atomic_write(path, lambda handle, file=file: handle.write(memoryview(file.numpy())))


def _sees(probe: Path, token: str) -> bool:
    deadline = time.monotonic() + PROBE_WAIT
    while True:
        with contextlib.suppress(FileNotFoundError):
            if probe.read_text() == token:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_INTERVAL)


def _read_file(path: Path) -> torch.Tensor:
    """The bytes of ``path`` as a uint8 tensor, read into it without a second copy."""
    with open(path, "rb") as file:
        data = torch.empty(os.fstat(file.fileno()).st_size, dtype=torch.uint8)
        file.readinto(memoryview(data.numpy()))
    return data


def _intact(artifacts, marker, wanted) -> bool:
    """Whether an earlier run's artifacts have the wanted fingerprint and are byte-for-byte as it left them."""
    if not marker or marker.get("status") != "done" or marker.get("fingerprint") != wanted:
        return False
    try:
        return artifacts.checksums() == marker.get("checksums")
    except FileNotFoundError:
        return False


def _wait_for_marker(artifacts, token, timeout) -> dict:
    deadline = time.monotonic() + timeout
    next_liveness_check = time.monotonic() + LIVENESS_INTERVAL
    while True:
        marker = artifacts.read_marker()
        if marker and marker.get("token") == token:
            if marker.get("status") == "failed":
                raise BarrierError(f"rank 0 failed to decompose the model: {marker.get('message')}")
            if marker.get("status") != "running":
                return marker
            if time.monotonic() > next_liveness_check:
                _check_rank_zero_alive(artifacts, token)
                next_liveness_check = time.monotonic() + LIVENESS_INTERVAL
        if time.monotonic() > deadline:
            raise BarrierError(
                f"rank 0 did not finish the decomposition within {timeout:.0f} s "
                f"(no result for this run at {artifacts.marker_path}): rank 0 may have died, or be waiting for "
                "another job that uses the same artifact paths; a larger model may need a longer "
                "--barrier-timeout."
            )
        time.sleep(POLL_INTERVAL)


def _check_rank_zero_alive(artifacts, token) -> None:
    """Raises BarrierError when rank 0, which said it was running on this host, no longer holds the
    artifacts' lock and left no result: it died (killed, out of memory). Only on rank 0's host: some
    shared filesystems keep locks local to each node (BeeGFS by default, NFS with local_lock), where
    the lock would look free from the others."""
    marker = artifacts.read_marker()
    if not marker or marker.get("host") != socket.gethostname():
        return
    try:
        with FileLock(artifacts.lock_path).acquire(timeout=0):
            marker = artifacts.read_marker()  # under the lock: rank 0 writes its result before releasing it
    except Timeout:
        return  # held: rank 0 is at work
    if marker and marker.get("token") == token and marker.get("status") == "running":
        raise BarrierError(
            f"rank 0 stopped while decomposing (it no longer holds {artifacts.lock_path} "
            "and left no result): it was killed or ran out of memory; see its log"
        )


def load_decomposed(model: nn.Module, info_path, weights_path) -> tuple[nn.Module, dict]:
    """Structure-only decomposition from the info file, then the decomposed weights; a file that cannot
    be read or does not fit raises a BarrierError naming it and its flag."""
    try:
        model, changes = lowrank.decompose_network(model, info_path)
    except (lowrank.DecomposeInfoError, FileNotFoundError) as error:
        raise BarrierError(f"--decompose-info-path: {error}") from None
    try:
        state_dict = load_state_dict(weights_path)
        model.load_state_dict(state_dict)
    except (FileNotFoundError, ValueError) as error:  # lowrank.io's: they name the file and what it holds
        raise BarrierError(f"--decomposed-weights-path: {error}") from None
    except RuntimeError as error:
        raise BarrierError(
            f"--decomposed-weights-path {weights_path} does not fit the structure of --decompose-info-path "
            f"{info_path}: {state_dict_mismatch(model, state_dict) or error}"
        ) from None
    return model, changes


def _load_artifacts(model, artifacts, marker):
    """``load_decomposed`` of rank 0's artifacts, their checksums verified first."""
    try:
        actual = artifacts.checksums()
    except FileNotFoundError as error:
        raise BarrierError(
            f"{error.filename} is missing on this node, although rank 0 wrote it and this rank saw its folder"
        ) from None
    for kind, path in artifacts.files().items():
        if actual[kind] != marker.get("checksums", {}).get(kind):
            raise BarrierError(
                f"{path} changed after rank 0 wrote it (checksum mismatch): another job may be using the same paths"
            )
    return load_decomposed(model, artifacts.info_path, artifacts.weights_path)
