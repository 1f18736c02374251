"""The AMCT sample's MNIST network and data, shared by the MNIST recipes and their tests.

Compute nodes often have no internet: ``--data-path`` may point at a local copy, a folder holding
``MNIST/raw/`` with the four files of the MNIST database, plain or gzipped (as torchvision names
them). Gzipped files are unpacked next to them, or into a cache folder when that one is read-only,
and their content is checked against the known checksums. With neither a local copy nor internet,
loading fails within a minute with an error that says what to do.
"""

import gzip
import os
import socket
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


def _unpack(gz_path: Path, target: Path) -> None:
    def write(file):
        with gzip.open(gz_path, "rb") as source:
            while block := source.read(1 << 20):
                file.write(block)

    atomic_write(target, write)
    if file_digest(target, "md5") != MNIST_FILES[target.name]:
        target.unlink()
        raise RuntimeError(f"{gz_path} is corrupt: its content does not match the MNIST file {target.name}")


def local_root(data_path) -> Path | None:
    """A root folder from which torchvision reads MNIST without downloading, made from a local copy
    under ``data_path`` (unpacking gzipped files where needed), or None when there is no local copy."""
    raw = Path(data_path) / "MNIST" / "raw"
    if all((raw / name).is_file() for name in MNIST_FILES):
        return Path(data_path)
    if not all((raw / name).is_file() or (raw / f"{name}.gz").is_file() for name in MNIST_FILES):
        return None
    for root in (Path(data_path), Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowrank" / "mnist"):
        target = root / "MNIST" / "raw"
        try:
            for name in MNIST_FILES:
                if not (target / name).is_file():
                    _unpack(raw / f"{name}.gz", target / name)
            return root
        except PermissionError:
            continue  # read-only data folder: unpack into the cache instead
    raise RuntimeError(f"cannot unpack the MNIST files of {raw}: neither it nor the cache folder is writable")


def load_mnist(data_path, train: bool) -> datasets.MNIST:
    """The MNIST train or test set, from a local copy under ``data_path`` or downloaded there."""
    transform = transforms.ToTensor()  # no normalisation, as in the AMCT sample
    root = local_root(data_path)
    if root is not None:
        return datasets.MNIST(root, train=train, transform=transform, download=False)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        return datasets.MNIST(data_path, train=train, transform=transform, download=True)
    except Exception as error:
        raise RuntimeError(
            f"MNIST is not under {Path(data_path) / 'MNIST' / 'raw'} "
            f"(the files {', '.join(MNIST_FILES)}, plain or .gz) "
            f"and could not be downloaded ({type(error).__name__}: {error}). On a machine without internet, copy "
            "them there and pass that folder's parent as --data-path."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
