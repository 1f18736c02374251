"""The AMCT sample's MNIST network and data, shared by the MNIST recipes and their tests.

Compute nodes often have no internet: ``--data-path`` may point at a local copy, a folder holding
``MNIST/raw/`` with the four files of the MNIST database, plain or gzipped (as torchvision names
them). Gzipped files are unpacked next to them, or into a cache folder when that one is read-only,
and their content is checked against the known checksums. With neither a local copy nor internet,
loading fails within a minute with an error that says what to do.
"""

import contextlib
import errno
import functools
import gzip
import os
import socket
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import datasets, transforms

from lowrank.io import atomic_write, file_digest

# md5 of the uncompressed idx files
MNIST_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# Their sizes: a truncated copy is found before torchvision reads it.
MNIST_SIZES = {
    "train-images-idx3-ubyte": 47040016,
    "train-labels-idx1-ubyte": 60008,
    "t10k-images-idx3-ubyte": 7840016,
    "t10k-labels-idx1-ubyte": 10008,
}
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


def _complete(path: Path) -> bool:
    """Whether ``path`` is the MNIST file of its name: a copy of the right size may still be garbage,
    which torchvision reads without a check (an assertion, or labels out of range mid-training)."""
    if not path.is_file():
        return False
    stat = path.stat()
    return stat.st_size == MNIST_SIZES[path.name] and _has_mnist_content(path, stat.st_ino, stat.st_mtime_ns)


@functools.cache  # per version of the file: the train and test sets both look for all four
def _has_mnist_content(path: Path, inode: int, mtime_ns: int) -> bool:
    return file_digest(path, "md5") == MNIST_FILES[path.name]


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
    if file_digest(target, "md5") != MNIST_FILES[target.name]:
        target.unlink()
        raise RuntimeError(f"{source} is corrupt: its content does not match the MNIST file {target.name}")


def local_root(data_path) -> Path | None:
    """A root folder from which torchvision reads MNIST without downloading, made from a local copy
    under ``data_path`` (unpacking gzipped files where needed), or None when there is no local copy."""
    raw = Path(data_path) / "MNIST" / "raw"
    if all(_complete(raw / name) for name in MNIST_FILES):
        return Path(data_path)
    sources = {name: raw / name if _complete(raw / name) else raw / f"{name}.gz" for name in MNIST_FILES}
    for name, source in sources.items():
        if not source.is_file() and (raw / name).is_file():
            size = (raw / name).stat().st_size
            damage = (
                f"incomplete ({size} bytes, the MNIST file has {MNIST_SIZES[name]})"
                if size != MNIST_SIZES[name]
                else "corrupt (its content does not match the MNIST file)"
            )
            raise RuntimeError(f"{raw / name} is {damage} and there is no {source.name} to unpack: copy it again")
    if not all(source.is_file() for source in sources.values()):
        return None
    for root in (Path(data_path), Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowrank" / "mnist"):
        target = root / "MNIST" / "raw"
        try:
            for name, source in sources.items():
                if not _complete(target / name):
                    _unpack(source, target / name)
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
        missing = [name for name in MNIST_FILES if not (raw / name).is_file() and not (raw / f"{name}.gz").is_file()]
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
