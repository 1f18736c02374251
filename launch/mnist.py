"""The AMCT sample's MNIST network and data, shared by the MNIST recipes and their tests.

Compute nodes often have no internet: ``--data-path`` may point at a local copy, a folder holding
``MNIST/raw/`` with the four files of the MNIST database, plain or gzipped (as torchvision names
them), or of any dataset in its idx format (28x28 images, labels 0-9). Gzipped files are unpacked
next to them, or into a cache folder when that one is read-only. Every file is checked by its idx
header, its length and its labels, so that a truncated or damaged copy is named before training,
not met midway. With neither a local copy nor internet, loading fails within a minute with an error
that says what to do.
"""

import contextlib
import errno
import gzip
import math
import os
import socket
import struct
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import datasets, transforms

from lowrank.io import atomic_write

# The four files, by torchvision's names, with their number of dimensions: images (count, rows,
# columns) and labels (count).
IDX_FILES = {
    "train-images-idx3-ubyte": 3,
    "train-labels-idx1-ubyte": 1,
    "t10k-images-idx3-ubyte": 3,
    "t10k-labels-idx1-ubyte": 1,
}
IMAGE_SIZE, CLASSES = (28, 28), 10  # what the AMCT sample's network takes
DOWNLOAD_TIMEOUT = 20  # seconds per connection attempt: no network must fail fast, not hang


class Net(nn.Module):
    """The AMCT sample's network and initialisation: conv1 1->128 3x3, conv2 128->128 3x3 (no
    padding, no pooling), fc (24*24*128 -> 10), log_softmax. The initialisation matters: with
    PyTorch's default one the same training reaches several points less accuracy."""

    def __init__(self, in_channels=1, height=28, width=28, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 128, 3)
        self.conv2 = nn.Conv2d(128, 128, 3)
        self.fc = nn.Linear((height - 4) * (width - 4) * 128, classes)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out")
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.fc.weight, 0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.log_softmax(self.fc(torch.flatten(x, 1)), dim=1)


def idx_problem(path: Path) -> str | None:
    """What is wrong with the idx file ``path``, said after its name, or None. An idx file is a
    big-endian header (the magic number 0x0800 + dimensions for unsigned bytes, then each dimension's
    size) followed by the data; torchvision reads one without a check (an assertion, or labels out of
    range mid-training)."""
    dims = IDX_FILES[path.name]
    size = path.stat().st_size
    with open(path, "rb") as file:
        header = file.read(4 * (dims + 1))
        magic, *shape = struct.unpack(f">{dims + 1}I", header) if len(header) == 4 * (dims + 1) else (None,)
        if magic != 0x0800 + dims:
            found = f"its magic number is {magic:#010x}" if magic is not None else f"it has {size} bytes"
            return f"is not an idx file of unsigned bytes in {dims} dimension(s) ({found})"
        expected = len(header) + math.prod(shape)
        if size != expected:
            return f"is incomplete ({size} bytes, its header says {expected})"
        if dims == 3 and tuple(shape[1:]) != IMAGE_SIZE:
            return f"holds {shape[1]}x{shape[2]} images, where the network takes {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}"
        if dims == 1 and (largest := max(file.read(), default=0)) >= CLASSES:
            return f"holds labels outside 0-{CLASSES - 1} (such as {largest})"
    return None


def _count(path: Path) -> int:
    with open(path, "rb") as file:
        return struct.unpack(">4xI", file.read(8))[0]


def _check_pairs(raw: Path) -> None:
    """Raises when a split's images and labels are not as many."""
    for split in ("train", "t10k"):
        images, labels = raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte"
        if _count(images) != _count(labels):
            raise RuntimeError(f"{images} holds {_count(images)} images and {labels.name} {_count(labels)} labels")


def _complete(path: Path) -> bool:
    return path.is_file() and idx_problem(path) is None


def _unpack(source: Path, target: Path) -> None:
    """Writes the MNIST file ``target`` from ``source``, gzipped (``.gz``) or plain, checking its content."""
    opener = gzip.open if source.suffix == ".gz" else open

    def write(file):
        with opener(source, "rb") as data:
            while block := data.read(1 << 20):
                file.write(block)

    try:
        atomic_write(target, write)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise RuntimeError(f"{source} is corrupt: {error}") from None
    problem = idx_problem(target)
    if problem:
        target.unlink()
        raise RuntimeError(f"{source} is corrupt: unpacked, it {problem}")


def local_root(data_path) -> Path | None:
    """A root folder from which torchvision reads MNIST without downloading, made from a local copy
    under ``data_path`` (unpacking gzipped files where needed), or None when there is no local copy."""
    raw = Path(data_path) / "MNIST" / "raw"
    if all(_complete(raw / name) for name in IDX_FILES):
        _check_pairs(raw)
        return Path(data_path)
    sources = {name: raw / name if _complete(raw / name) else raw / f"{name}.gz" for name in IDX_FILES}
    for name, source in sources.items():
        if not source.is_file() and (raw / name).is_file():
            problem = idx_problem(raw / name)
            raise RuntimeError(f"{raw / name} {problem} and there is no {source.name} to unpack: copy it again")
    if not all(source.is_file() for source in sources.values()):
        return None
    for root in (Path(data_path), Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowrank" / "mnist"):
        target = root / "MNIST" / "raw"
        try:
            for name, source in sources.items():
                if not _complete(target / name):
                    _unpack(source, target / name)
            _check_pairs(target)
            return root
        except OSError as error:  # a read-only data folder (permissions or mount): unpack into the cache instead
            if not isinstance(error, PermissionError) and error.errno != errno.EROFS:
                raise
    raise RuntimeError(f"cannot unpack the MNIST files of {raw}: neither it nor the cache folder is writable")


def load_mnist(data_path, train: bool) -> datasets.MNIST:
    """The MNIST train or test set, from a local copy under ``data_path`` or downloaded there."""
    transform = transforms.ToTensor()  # no normalisation, as in the AMCT sample
    root = local_root(data_path)
    raw = Path(data_path) / "MNIST" / "raw"
    if root is not None:
        return datasets.MNIST(root, train=train, transform=transform, download=False)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    created = [folder for folder in (raw, raw.parent, Path(data_path)) if not folder.exists()]  # deepest first
    try:
        return datasets.MNIST(data_path, train=train, transform=transform, download=True)
    except Exception as error:
        missing = [name for name in IDX_FILES if not (raw / name).is_file() and not (raw / f"{name}.gz").is_file()]
        for folder in created:  # the download's, left empty: a mistyped --data-path leaves nothing behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        reason = " ".join(str(error).split())  # torchvision's lists every mirror it tried, one per line
        raise RuntimeError(
            f"MNIST is not under {raw} (missing: {', '.join(missing)}; plain or .gz) "
            f"and could not be downloaded ({type(error).__name__}: {reason}). On a machine without internet, copy "
            "them there and pass that folder's parent as --data-path."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
