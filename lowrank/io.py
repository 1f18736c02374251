"""Files written the way AMCT and msModelSlim write them: atomically (a temporary file in the same
folder, then ``os.replace``) with owner/group-only permissions (0640 files, 0750 new folders), so a
reader never sees a half-written file and a crash never leaves one behind."""

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

FILE_MODE = 0o640
DIR_MODE = 0o750


def file_digest(path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_parent_dirs(path: str | os.PathLike) -> None:
    """Creates the missing parent folders of ``path`` with mode 0750."""
    missing = []
    parent = Path(path).resolve().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(folder, DIR_MODE)  # mkdir's mode is filtered by the umask


def unwritable(path: str | os.PathLike, is_folder: bool = False) -> str | None:
    """Why ``path`` cannot be created where it is (a folder where a file is wanted or the reverse, a
    file among its parents, a folder that refuses new files), or None: checked before long work
    rather than when it saves."""
    path = Path(path)
    if path.exists() and path.is_dir() != is_folder:
        return f"{path} is a {'file' if is_folder else 'folder'}"
    folder = path if path.is_dir() else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{path}: {folder} is a file, not a folder"
    try:  # what the atomic writes do there (permissions alone do not tell: root, read-only mounts, /proc)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        return f"{path}: cannot create files in {folder} ({error.strerror or error})"
    return None


def atomic_write(
    path: str | os.PathLike, write: Callable[[object], None], binary: bool = True, mode: int = FILE_MODE
) -> None:
    """Calls ``write(file)`` on a temporary file next to ``path``, then moves it onto ``path`` (with ``mode``)."""
    path = Path(path)
    make_parent_dirs(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state_dict(state_dict: dict, path: str | os.PathLike) -> None:
    """``torch.save`` of a state dict, atomically, mode 0640."""
    atomic_write(path, lambda file: torch.save(state_dict, file))


def load_state_dict(path: str | os.PathLike, map_location="cpu") -> dict:
    """A state dict from a safetensors file or through ``torch.load`` with ``weights_only=True``;
    a missing, truncated or foreign file, one that pickles Python objects (a whole model) and a
    training checkpoint that holds a state dict raise an error that names the file and what it holds."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with open(path, "rb") as file:
            if file.read(9)[8:] == b"{":  # safetensors: the header's length in 8 bytes, then the JSON header
                return safetensors.torch.load_file(path, device=str(map_location))
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        # weights_only's refusal: what it found, amid advice to load with weights_only=False
        found = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)", str(error), re.S)
        detail = found[1] if found else str(error)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", detail)
        if refused:
            raise ValueError(
                f"weights file {path} pickles Python objects ({refused[1]}), which are not loaded because "
                "unpickling runs code: a whole model saved with torch.save(model), or a checkpoint that also holds "
                "other objects? Save the model's state_dict() alone"
            ) from error
        raise ValueError(
            f"cannot read weights file {path} (truncated or not a PyTorch state dict?): {type(error).__name__}: "
            f"{detail}"
        ) from error
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    # A state dict holds tensors (and perhaps a module's dict of extra state); a checkpoint, only its parts.
    nested = [key for key, value in state.items() if isinstance(value, dict)]
    if nested and not any(isinstance(value, torch.Tensor) for value in state.values()):
        keys = ", ".join(map(repr, list(state)[:5])) + (", ..." if len(state) > 5 else "")
        raise ValueError(
            f"weights file {path} holds a training checkpoint ({keys}), not a state dict: save its model's entry "
            f"alone, e.g. torch.save(torch.load(path)[{nested[0]!r}], 'weights.pth')"
        )
    return state


# The key prefixes of a wrapped model's state dict, and the wrapper that adds them.
WRAPPERS = {"module.": "model wrapped in DistributedDataParallel", "_orig_mod.": "torch.compile'd model"}


def load_weights(model, state_dict: dict, path) -> None:
    """Loads ``state_dict``, read from ``path``, into ``model``; one that does not fit (another
    architecture, other class counts, a wrapped model's) raises a ValueError naming the file."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        prefix = next((p for p in WRAPPERS if state_dict and all(key.startswith(p) for key in state_dict)), None)
        wrapped = (
            f" (every key starts with {prefix!r}: saved from a {WRAPPERS[prefix]}? Save the unwrapped model's "
            "state_dict(), or strip the prefix with torch.nn.modules.utils.consume_prefix_in_state_dict_if_present)"
            if prefix
            else ""
        )
        raise ValueError(
            f"{path} does not fit the model{wrapped}: {state_dict_mismatch(model, state_dict) or error}"
        ) from None


def state_dict_mismatch(model, state_dict: dict, shown: int = 3) -> str:
    """What keeps ``state_dict`` from loading into ``model``, in one line: the missing and unexpected
    keys and those of another shape, the first ``shown`` of each (torch's own message lists them all,
    thousands of lines for a ResNet's weights in another model)."""
    expected = model.state_dict()
    kinds = {
        "missing": [key for key in expected if key not in state_dict],
        "unexpected": [key for key in state_dict if key not in expected],
        "of another shape": [
            f"{key} {_shape(value)} (model: {_shape(expected[key])})"
            for key, value in state_dict.items()
            if key in expected and getattr(value, "shape", None) is not None and value.shape != expected[key].shape
        ],
    }
    return "; ".join(
        f"{len(keys)} {'key' if len(keys) == 1 else 'keys'} {kind} ({', '.join(keys[:shown])}"
        f"{', ...' if len(keys) > shown else ''})"
        for kind, keys in kinds.items()
        if keys
    )


def _shape(tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"
