"""IDX reader/writer, dataset loading and the validation split, including every corrupt-file error."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from conftest import write_mnist_dir

from logitpair.data import load_dataset, read_idx, split_validation, write_idx
from logitpair.errors import DataError


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
    arr = (np.random.default_rng(0).normal(size=(3, 4, 5)) * 50).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, arr)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def _header(code: int, shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"", "not an IDX file"),
        (b"\x01\x02\x08\x03" + b"\x00" * 12, "bad IDX magic"),
        (b"\x00\x00\x07\x01" + b"\x00" * 4, "bad IDX magic"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (_header(0x08, (2, 28, 28)) + b"\x00" * 100, r"needs 1584 bytes, file has 116"),
        (_header(0x08, (2, 2)) + b"\x00" * 5, r"needs 16 bytes, file has 17"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (_header(0x08, (4294967295, 4294967295, 4294967295)), "needs|impossible"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_corrupt_idx_errors_name_the_file(tmp_path, payload, match, gz):
    path = tmp_path / ("bad.idx" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(DataError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_gzip_bomb_and_broken_gzip(tmp_path):
    bomb = tmp_path / "bomb.gz"
    bomb.write_bytes(gzip.compress(_header(0x08, (60000, 28, 28)) + b"\x00" * 1000))
    with pytest.raises(DataError, match="impossible for a 40-byte gzip file"):
        read_idx(bomb)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(_header(0x08, (10, 28, 28)) + b"\x01" * 7840)[:-30])
    with pytest.raises(DataError, match="broken.gz"):
        read_idx(broken)
    liar = tmp_path / "liar.gz"
    liar.write_bytes(gzip.compress(_header(0x08, (1 << 10, 1 << 10)) + bytes((1 << 20) + 5)))
    with pytest.raises(DataError, match=r"needs 1048588 bytes, file has 1048589 or more"):
        read_idx(liar)


def test_dataset_loads_generated_files(tmp_path):
    folder = write_mnist_dir(tmp_path / "d", n_train=300, n_test=50, gz=False)
    s = load_dataset("fashion-mnist", folder, val_size=100, seed=0)
    assert s.train.x.shape == (200, 1, 28, 28) and s.val.x.shape == (100, 1, 28, 28) and len(s.test) == 50
    assert s.train.x.dtype == torch.float32 and 0 <= s.train.x.min() and s.train.x.max() <= 1
    assert s.train.num_classes == 10 and s.train.classes[0] == "T-shirt/top"
    assert load_dataset("mnist", folder, val_size=10).train.classes[0] == "0"


def test_validation_split_is_seeded_and_disjoint(data_dir):
    a = load_dataset("fashion-mnist", data_dir, val_size=100, seed=0)
    b = load_dataset("fashion-mnist", data_dir, val_size=100, seed=0)
    c = load_dataset("fashion-mnist", data_dir, val_size=100, seed=1)
    assert torch.equal(a.val.x, b.val.x) and not torch.equal(a.val.x, c.val.x)
    full = torch.cat([a.train.x, a.val.x]).flatten(1)
    assert len(torch.unique(full, dim=0)) == len(full), "validation overlaps training"
    with pytest.raises(ValueError, match="val_size"):
        split_validation(a.train, 10**6, 0)


def test_label_image_count_mismatch(tmp_path):
    folder = write_mnist_dir(tmp_path / "d", n_train=100, n_test=20)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(99, np.uint8))
    with pytest.raises(DataError, match="100 images but train-labels-idx1-ubyte.gz has 99 labels"):
        load_dataset("fashion-mnist", folder, val_size=10)


def test_wrong_array_kind(tmp_path):
    folder = write_mnist_dir(tmp_path / "d", n_train=100, n_test=20)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((20, 784), np.uint8))
    with pytest.raises(DataError, match="expected a 3-D uint8"):
        load_dataset("fashion-mnist", folder, val_size=10)


def test_missing_data_explains_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", tmp_path / "empty")


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid names: (.+, )?fashion-mnist, (.+, )?mnist\b"):
        load_dataset("cifar-100")
