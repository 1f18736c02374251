import errno
import gzip
import os
import re
import shutil

import pytest
import torch

from launch import mnist
from tests.conftest import DATA, idx, idx_dataset, needs_data

SHARED_RAW = DATA / "MNIST" / "raw"


def gz_copy(root):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in mnist.IDX_FILES:
        shutil.copy(SHARED_RAW / f"{name}.gz", raw)
    return raw


@needs_data
def test_a_gzipped_copy_is_unpacked_and_checked(tmp_path):
    raw = gz_copy(tmp_path)
    assert mnist.local_root(tmp_path) == tmp_path
    assert all((raw / name).is_file() for name in mnist.IDX_FILES)
    test_set = mnist.load_mnist(tmp_path, train=False)
    assert len(test_set) == 10000
    image, label = test_set[0]
    assert image.shape == (1, 28, 28) and label == 7


@needs_data
@pytest.mark.parametrize(
    "error",
    [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.EROFS, "Read-only file system")],
    ids=["permissions", "read-only mount"],
)
def test_a_read_only_copy_is_unpacked_into_the_cache(tmp_path, monkeypatch, error):
    gz_copy(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    unpack = mnist._unpack

    def read_only_data(gz_path, target):
        if target.is_relative_to(tmp_path / "data"):
            raise error
        unpack(gz_path, target)

    monkeypatch.setattr(mnist, "_unpack", read_only_data)
    assert mnist.local_root(tmp_path / "data") == tmp_path / "cache" / "lowrank" / "mnist"


@needs_data
def test_a_corrupt_archive_is_named(tmp_path):
    raw = gz_copy(tmp_path)
    name = "t10k-labels-idx1-ubyte"
    (raw / f"{name}.gz").write_bytes(gzip.compress(b"not mnist"))
    with pytest.raises(RuntimeError, match=f"{name}.gz is corrupt"):
        mnist.local_root(tmp_path)
    assert not (raw / name).exists()


@needs_data
def test_a_truncated_archive_is_named(tmp_path):
    raw = gz_copy(tmp_path)
    name = "train-images-idx3-ubyte"
    (raw / f"{name}.gz").write_bytes((SHARED_RAW / f"{name}.gz").read_bytes()[:100_000])
    with pytest.raises(RuntimeError, match=f"{name}.gz is corrupt: Compressed file ended"):
        mnist.local_root(tmp_path)
    assert not (raw / name).exists() and not list(raw.glob(".*.tmp"))


@needs_data
def test_a_truncated_plain_file_is_unpacked_again_or_named(tmp_path):
    raw = gz_copy(tmp_path)
    assert mnist.local_root(tmp_path) == tmp_path
    name = "t10k-labels-idx1-ubyte"
    (raw / name).write_bytes((raw / name).read_bytes()[:5000])
    assert mnist.local_root(tmp_path) == tmp_path  # from its .gz
    assert (raw / name).stat().st_size == 10008
    (raw / name).write_bytes((raw / name).read_bytes()[:5000])
    (raw / f"{name}.gz").unlink()
    with pytest.raises(RuntimeError, match=f"{name} is incomplete \\(5000 bytes, its header says 10008\\) and"):
        mnist.local_root(tmp_path)


@needs_data
def test_a_garbage_plain_file_of_the_right_size_is_unpacked_again_or_named(tmp_path):
    raw = gz_copy(tmp_path)
    assert mnist.local_root(tmp_path) == tmp_path
    name = "train-labels-idx1-ubyte"
    labels = (raw / name).read_bytes()
    (raw / name).write_bytes(labels[:8] + b"\xc8" * (len(labels) - 8))  # torchvision would read labels of 200
    assert mnist.local_root(tmp_path) == tmp_path  # from its .gz
    assert (raw / name).read_bytes() == gzip.decompress((SHARED_RAW / f"{name}.gz").read_bytes())
    (raw / name).write_bytes(b"\xc8" * len(labels))
    (raw / f"{name}.gz").unlink()
    not_idx = f"{name} is not an idx file of unsigned bytes in 1 dimension\\(s\\) \\(its magic number is 0xc8c8c8c8\\)"
    with pytest.raises(RuntimeError, match=not_idx):
        mnist.local_root(tmp_path)
    (raw / name).write_bytes(labels[:8] + b"\xc8" * (len(labels) - 8))
    with pytest.raises(RuntimeError, match=f"{name} holds labels outside 0-9 \\(such as 200\\)"):
        mnist.local_root(tmp_path)


def test_no_copy_and_no_network_is_a_clear_error(tmp_path, monkeypatch):
    def offline(self):
        os.makedirs(self.raw_folder, exist_ok=True)  # as torchvision's download does first
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried mirror 1\nTried mirror 2")

    monkeypatch.setattr(mnist.datasets.MNIST, "download", offline)
    with pytest.raises(RuntimeError) as error:
        mnist.load_mnist(tmp_path / "mistyped", train=True)
    assert re.fullmatch(
        "MNIST is not under .* could not be downloaded \\(RuntimeError: Error downloading train-images-idx3-ubyte.gz: "
        "Tried mirror 1 Tried mirror 2\\)\\. .* pass that folder's parent as --data-path\\.",
        str(error.value),
    )
    assert list(tmp_path.iterdir()) == []  # the folders the download made, empty, are gone


@needs_data
def test_a_missing_file_is_named(tmp_path, monkeypatch):
    raw = gz_copy(tmp_path)
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setattr(mnist.datasets.MNIST, "download", lambda self: None)  # no network
    with pytest.raises(RuntimeError, match=f"MNIST is not under {raw} \\(missing: t10k-labels-idx1-ubyte; plain or"):
        mnist.load_mnist(tmp_path, train=False)


def test_net_shapes():
    assert mnist.Net()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_any_dataset_in_mnists_idx_format_loads(tmp_path):
    idx_dataset(tmp_path)
    train_set = mnist.load_mnist(tmp_path, train=True)
    image, label = train_set[5]
    assert len(train_set) == 96 and len(mnist.load_mnist(tmp_path, train=False)) == 32
    assert image.shape == (1, 28, 28) and 0 <= label < 10


def test_idx_files_that_do_not_fit_the_network_or_each_other_are_named(tmp_path):
    idx_dataset(tmp_path / "small", size=(16, 16))
    with pytest.raises(RuntimeError, match="train-images-idx3-ubyte holds 16x16 images, where the network takes 28x28"):
        mnist.local_root(tmp_path / "small")
    raw = idx_dataset(tmp_path / "uneven")
    idx(raw / "t10k-labels-idx1-ubyte", (31,), bytes(31))
    uneven = "t10k-images-idx3-ubyte holds 32 images and t10k-labels-idx1-ubyte 31 labels"
    with pytest.raises(RuntimeError, match=uneven):
        mnist.local_root(tmp_path / "uneven")
