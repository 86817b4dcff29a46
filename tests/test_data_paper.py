"""The paper's datasets (SVHN, CIFAR-10, ImageNet, Tiny ImageNet) from generated files in their real formats,
every loader error, the keyed training augmentation and the batch iterator."""

from __future__ import annotations

import builtins
import os
import pickle
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import (
    WNIDS,
    Py2Pickler,
    cifar_batches,
    write_cifar,
    write_image,
    write_imagenet,
    write_svhn_mat,
    write_tiny,
)

from logitpair.data import FolderDataset, ImageDataset, iterate_batches, load_dataset, take
from logitpair.data.cifar import load_cifar_pickle
from logitpair.data.folders import decode_image
from logitpair.data.transforms import (
    RRC_UNIFORMS,
    TRAIN_UNIFORMS,
    hflip,
    random_resized_crop_box,
    resize_center_crop,
    train_augment,
)
from logitpair.errors import ConfigError, DataError

scipy_io = pytest.importorskip("scipy.io")
Image = pytest.importorskip("PIL.Image")


# --------------------------------------------------------------------------- SVHN


@pytest.fixture
def svhn_dir(tmp_path):
    folder = tmp_path / "svhn"
    folder.mkdir()
    write_svhn_mat(folder / "train_32x32.mat", 30, 0)
    write_svhn_mat(folder / "test_32x32.mat", 12, 1)
    write_svhn_mat(folder / "extra_32x32.mat", 7, 2)
    return folder


def test_svhn_loads_real_format(svhn_dir):
    assert (svhn_dir / "train_32x32.mat").read_bytes()[:10] == b"MATLAB 5.0"
    x_raw, y_raw = write_svhn_mat(svhn_dir / "test_32x32.mat", 12, 1)
    s = load_dataset("svhn", svhn_dir, val_size=5, seed=0)
    assert len(s.train) == 25 and len(s.val) == 5 and len(s.test) == 12
    x, y = s.test.x, s.test.y
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and y[0] == 0 and torch.equal(y, torch.from_numpy(y_raw[:, 0] % 10).long())
    assert torch.equal(x[3, 2, 5, 7] * 255, torch.tensor(float(x_raw[5, 7, 2, 3])))
    assert s.train.num_classes == 10 and s.train.classes == tuple("0123456789")
    assert len(load_dataset("svhn", svhn_dir, val_size=5, extra=True).train) == 32


def _mat_case(tmp_path, name, **override):
    folder = tmp_path / name
    folder.mkdir()
    write_svhn_mat(folder / "test_32x32.mat", 4, 1)
    write_svhn_mat(folder / "train_32x32.mat", 10, 0, **override)
    return folder


@pytest.mark.parametrize(
    "override, match",
    [
        ({"X": None}, "expected variables X .* missing X"),
        ({"y": None}, "missing y"),
        ({"X": np.zeros((32, 32, 10), np.uint8)}, "expected X of shape 32x32x3xN and dtype uint8"),
        ({"X": np.zeros((32, 32, 3, 10), np.float64)}, "dtype uint8, got float64"),
        ({"X": np.zeros((28, 28, 3, 10), np.uint8)}, r"32x32x3xN .* \(28, 28, 3, 10\)"),
        ({"y": np.ones((9, 1), np.uint8)}, "expected y of shape 10x1"),
        ({"y": np.zeros((10, 1), np.uint8)}, r"expected labels 1\.\.10"),
        ({"y": np.full((10, 1), 11, np.uint8)}, r"expected labels 1\.\.10"),
    ],
)
def test_svhn_bad_mat_names_file_and_expectation(tmp_path, override, match):
    folder = _mat_case(tmp_path, "d", **override)
    with pytest.raises(DataError, match=match) as info:
        load_dataset("svhn", folder, val_size=2)
    assert str(folder / "train_32x32.mat") in str(info.value)


def test_svhn_missing_and_corrupt_files(svhn_dir, tmp_path, monkeypatch):
    (svhn_dir / "extra_32x32.mat").unlink()
    with pytest.raises(DataError, match="extra_32x32.mat: not found"):
        load_dataset("svhn", svhn_dir, val_size=2, extra=True)
    (svhn_dir / "test_32x32.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataError, match="test_32x32.mat: cannot read"):
        load_dataset("svhn", svhn_dir, val_size=2)
    with pytest.raises(DataError, match="no data directory given"):
        load_dataset("svhn", None)
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(DataError, match=r"pip install 'logitpair\[svhn\]'"):
        load_dataset("svhn", svhn_dir, val_size=2)


def test_dataset_options_pass_through_or_fail(svhn_dir, data_dir):
    with pytest.raises(ConfigError, match="does not accept option 'image_size'"):
        load_dataset("svhn", svhn_dir, val_size=2, image_size=32)
    with pytest.raises(ConfigError, match="'fashion-mnist' does not accept option 'skip_bad'"):
        load_dataset("fashion-mnist", data_dir, val_size=2, skip_bad=True)
    assert len(load_dataset("fashion-mnist", data_dir, 10, 0, image_size=None).val) == 10  # None = not given


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar_python_pickles_are_in_the_real_format(tmp_path):
    folder = write_cifar(tmp_path, "py")
    raw = (folder / "test_batch").read_bytes()
    assert raw[:2] == b"\x80\x02" and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    assert b"_codecs" not in raw and b"numpy._core" not in raw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy 2 warns about the numpy.core path
        plain = pickle.loads(raw, encoding="bytes")
    assert set(plain) == {b"batch_label", b"labels", b"data", b"filenames"}
    ours = load_cifar_pickle(folder / "test_batch")
    data, labels = cifar_batches(6, 5)
    np.testing.assert_array_equal(ours[b"data"], data)
    np.testing.assert_array_equal(plain[b"data"], data)
    assert ours[b"labels"] == labels and ours[b"filenames"][0] == b"img_5_0.png"


@pytest.mark.parametrize("layout", ["bin", "py", "py-numpy2", "bin-subfolder", "py-subfolder"])
def test_cifar_loads_both_versions(tmp_path, layout):
    version = layout.split("-")[0]
    multiarray = "numpy._core.multiarray" if "numpy2" in layout else "numpy.core.multiarray"
    folder = write_cifar(tmp_path, version, multiarray=multiarray)
    s = load_dataset("cifar10", folder if "subfolder" in layout else tmp_path, val_size=4)
    assert len(s.train) == 26 and len(s.val) == 4 and len(s.test) == 6
    x, y = s.test.x, s.test.y
    data, labels = cifar_batches(6, 5)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, torch.from_numpy(data.reshape(6, 3, 32, 32)).float() / 255)  # CHW record order
    assert y.dtype == torch.int64 and y.tolist() == labels
    assert s.train.num_classes == 10 and s.train.classes[0] == "airplane" and version in s.source


def _resave_py3_protocol2(path: Path) -> bytes:
    """What ``pickle.dump(pickle.load(f, encoding="bytes"), g, protocol=2)`` writes under Python 3."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy 2 warns about the numpy.core path
        batch = pickle.loads(path.read_bytes(), encoding="bytes")
    return pickle.dumps(batch, protocol=2)


def test_cifar_batch_resaved_by_python3_at_protocol_2_loads(tmp_path):
    folder = write_cifar(tmp_path, "py")
    for path in folder.iterdir():
        raw = _resave_py3_protocol2(path)
        assert raw[:2] == b"\x80\x02" and b"c_codecs\nencode\n" in raw, "bytes go through _codecs.encode"
        path.write_bytes(raw)
    ours = load_cifar_pickle(folder / "test_batch")
    data, labels = cifar_batches(6, 5)
    np.testing.assert_array_equal(ours[b"data"], data)
    assert ours[b"labels"] == labels and ours[b"filenames"][0] == b"img_5_0.png"
    s = load_dataset("cifar10", tmp_path, val_size=4)
    assert torch.equal(s.test.x, torch.from_numpy(data.reshape(6, 3, 32, 32)).float() / 255)


@pytest.mark.parametrize(
    ("args", "why"),
    [(("eJwrzs9NVVBKSizPM4lyBgAiSwRv", "base64"), "'base64'"), ((b"x", "latin1"), "bytes"), (("x", "zlib"), "'zlib'")],
)
def test_codecs_encode_only_encodes_str_to_latin1(tmp_path, args, why):
    """``_codecs.encode`` is let through as a latin-1 encoder of str only, never as a gate to other codecs."""

    class Encode:
        def __reduce__(self):
            import _codecs

            return _codecs.encode, args

    folder = write_cifar(tmp_path, "py")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Encode(), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match=f"test_batch: not a valid CIFAR-10 python batch .*_codecs.encode.*{why}"):
        load_cifar_pickle(folder / "test_batch")


class Evil:
    def __init__(self, func, arg) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.eval", "nested", "protocol-5", "after-codecs"])
def test_malicious_cifar_pickle_is_refused_without_running(tmp_path, how):
    marker = tmp_path / "pwned"
    if how == "builtins.eval":
        payload = Evil(builtins.eval, f"open({str(marker)!r}, 'w').close()")
    else:
        payload = Evil(os.system, f"touch '{marker}'")
    obj = {"data": payload, "labels": [0]} if how == "nested" else payload
    if how == "after-codecs":  # as a Python 3 re-save writes it: bytes keys (the allowed _codecs.encode) first
        obj = {b"labels": [0], b"data": Evil(os.system, f"touch '{marker}'".encode())}
    raw = pickle.dumps(obj, protocol=5 if how == "protocol-5" else 2)
    if how == "after-codecs":
        assert 0 < raw.index(b"c_codecs\nencode") < raw.index(b"system")
    folder = write_cifar(tmp_path, "py")
    (folder / "data_batch_3").write_bytes(raw)
    with pytest.raises(
        DataError, match=r"data_batch_3: refusing to unpickle global (posix|builtins|__builtin__)\.(system|eval)"
    ):
        load_dataset("cifar10", tmp_path, val_size=2)
    assert not marker.exists()
    if how == "builtins.eval":  # the payload is live: a plain unpickler runs it
        pickle.loads(raw)
        assert marker.exists()


def test_cifar_corrupt_files(tmp_path):
    folder = write_cifar(tmp_path / "b", "bin")
    (folder / "data_batch_2.bin").write_bytes((folder / "data_batch_2.bin").read_bytes()[:-1])
    with pytest.raises(DataError, match=r"data_batch_2.bin: size 18437 bytes is not a positive multiple of the 3073"):
        load_dataset("cifar10", folder, val_size=2)
    folder = write_cifar(tmp_path / "c", "bin")
    records = bytearray((folder / "test_batch.bin").read_bytes())
    records[3073] = 10
    (folder / "test_batch.bin").write_bytes(bytes(records))
    with pytest.raises(DataError, match="test_batch.bin: label 10 out of range"):
        load_dataset("cifar10", folder, val_size=2)
    folder = write_cifar(tmp_path / "p", "py")
    (folder / "data_batch_1").write_bytes((folder / "data_batch_1").read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_1: not a valid CIFAR-10 python batch"):
        load_dataset("cifar10", folder, val_size=2)
    (folder / "data_batch_1").write_bytes(Py2Pickler().dumps({"labels": [1]}))
    with pytest.raises(DataError, match="data_batch_1: expected keys b'data' and b'labels'"):
        load_dataset("cifar10", folder, val_size=2)
    (folder / "data_batch_1").write_bytes(Py2Pickler().dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}))
    with pytest.raises(DataError, match="expected 2 labels"):
        load_dataset("cifar10", folder, val_size=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no CIFAR-10 batches found.*cifar-10-batches-bin"):
        load_dataset("cifar10", tmp_path / "empty")
    with pytest.raises(ConfigError, match="'cifar10' does not accept option 'skip_bad'; its options: none"):
        load_dataset("cifar10", folder, skip_bad=True)


# --------------------------------------------------------------------------- image folders


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory) -> Path:
    return write_imagenet(tmp_path_factory.mktemp("imagenet"))


def test_decode_converts_every_mode_to_rgb(tmp_path):
    for mode in ("RGB", "L", "CMYK", "P", "RGBA"):
        write_image(tmp_path / f"{mode}.JPEG", 0, (20, 10), mode)
        img = decode_image(tmp_path / f"{mode}.JPEG")
        assert img.shape == (3, 10, 20) and img.dtype == torch.uint8, mode
    grey = decode_image(tmp_path / "L.JPEG")
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert Image.open(tmp_path / "CMYK.JPEG").mode == "CMYK"


def test_imagenet_loads_lazily(imagenet_dir):
    s = load_dataset("imagenet", imagenet_dir, val_size=2, seed=0, image_size=32)
    assert isinstance(s.train, FolderDataset) and isinstance(s.test, FolderDataset)
    assert len(s.train) == 10 and len(s.val) == 2 and len(s.test) == 6
    assert s.train.classes == WNIDS and s.train.num_classes == 3 and s.train.image_shape == (3, 32, 32)
    assert s.test.y.tolist() == [0, 0, 1, 1, 2, 2] and s.train.skipped == 0
    x, y = take(s.test, 4)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [0, 0, 1, 1]
    full = load_dataset("imagenet", imagenet_dir, val_size=0)
    xs, ys = full.train.get_batch(torch.arange(12))  # every mode, default 224 pixels
    assert xs.shape == (12, 3, 224, 224) and ys.bincount().tolist() == [4, 4, 4]
    assert torch.equal(xs[0, 0], xs[0, 1]), "the greyscale image is grey"


def test_tiny_imagenet_loads_lazily(tmp_path):
    root = write_tiny(tmp_path)
    for where in (tmp_path, root):
        s = load_dataset("tiny-imagenet", where, val_size=1)
        assert len(s.train) == 8 and len(s.test) == 5 and s.train.image_shape == (3, 64, 64)
        assert s.train.classes == ("n01443537", "n02124075", "n04067472")
    assert s.test.y.tolist() == [1, 0, 2, 1, 0]  # val_annotations.txt order, sorted-wnid labels
    x, y = take(s.test, 10)
    assert x.shape == (5, 3, 64, 64) and y.tolist() == [1, 0, 2, 1, 0]
    raw = decode_image(root / "val" / "images" / "val_0.JPEG").float() / 255
    assert torch.allclose(x[0], raw), "64-pixel images are used whole for evaluation"
    assert load_dataset("tiny-imagenet", root, val_size=1, image_size=32).test.get_batch([0])[0].shape == (1, 3, 32, 32)


def test_folder_layout_errors(tmp_path, imagenet_dir):
    bad = tmp_path / "flat"
    write_image(bad / "train" / "n1" / "a.JPEG", 0)
    for i in range(3):
        write_image(bad / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", i)
    with pytest.raises(DataError, match=r"expected val/<wnid>/\*.JPEG under .*flat; found 0 folders and 3 images"):
        load_dataset("imagenet", bad)
    with pytest.raises(DataError, match=r"expected train/<wnid>/\*.JPEG under .*; found no train/ folder"):
        load_dataset("imagenet", bad / "val")
    write_image(bad / "val" / "n9" / "b.JPEG", 0)
    with pytest.raises(DataError, match="val/n9/ is not one of the 1 training classes"):
        load_dataset("imagenet", bad)
    (bad / "train" / "n2").mkdir()
    with pytest.raises(DataError, match=r"found no images in train/n2/ \(n2/ is empty\)"):
        load_dataset("imagenet", bad)
    with pytest.raises(DataError, match=r"expected wnids.txt, train/<wnid>/images/\*.JPEG.* under .*; found 2 folders"):
        load_dataset("tiny-imagenet", imagenet_dir)
    root = write_tiny(tmp_path / "t")
    (root / "val" / "images" / "val_2.JPEG").unlink()
    with pytest.raises(DataError, match="val_annotations.txt:3: lists val_2.JPEG but .* is not an image file"):
        load_dataset("tiny-imagenet", root)
    (root / "train" / "n02124075" / "images").rename(root / "train" / "n02124075" / "imgs")
    with pytest.raises(DataError, match=r"expected train/<wnid>/images/\*.JPEG under .*; found .* \(imgs/, n02124075"):
        load_dataset("tiny-imagenet", root)


def test_pillow_missing_is_explained(imagenet_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match=r"pip install 'logitpair\[images\]'"):
        load_dataset("imagenet", imagenet_dir, val_size=1)


def test_unreadable_images_name_the_path_or_are_skipped(tmp_path):
    root = write_tiny(tmp_path, n_train=4)
    garbage = root / "train" / "n01443537" / "images" / "n01443537_1.JPEG"
    garbage.write_bytes(b"\xff\xd8 not really a jpeg")
    truncated = root / "val" / "images" / "val_3.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:300])
    s = load_dataset("tiny-imagenet", root, val_size=0)
    bad = [i for i in range(len(s.train)) if s.train.path(i) == garbage]
    with pytest.raises(DataError, match=re.escape(f"{garbage}: cannot decode image")):
        s.train.get_batch(torch.tensor(bad), train=True)
    with pytest.raises(DataError, match=re.escape(f"{truncated}: cannot decode image")) as info:
        take(s.test, 5, workers=2)
    assert "Traceback" not in str(info.value)
    s = load_dataset("tiny-imagenet", root, val_size=0, skip_bad=True)
    assert (len(s.train), len(s.test), s.train.skipped, s.test.skipped) == (11, 4, 1, 1)
    assert "skipped 2 unreadable images" in s.source
    assert take(s.test, 5)[1].tolist() == [1, 0, 2, 0]


# --------------------------------------------------------------------------- augmentation and batches


def test_train_augmentation_is_keyed_per_sample(imagenet_dir):
    ds = load_dataset("imagenet", imagenet_dir, val_size=0, image_size=24).train
    x, y = ds.get_batch(torch.tensor([0, 4, 7, 9]), train=True, key=5)
    x2, y2 = ds.get_batch(torch.tensor([9, 4]), train=True, key=5)
    assert torch.equal(x2[0], x[3]) and torch.equal(x2[1], x[1]) and y2.tolist() == [y[3], y[1]]
    assert x.shape == (4, 3, 24, 24) and 0 <= x.min() and x.max() <= 1
    assert not torch.equal(ds.get_batch(torch.tensor([0]), train=True, key=6)[0][0], x[0])
    ev, _ = ds.get_batch(torch.tensor([0, 0]))
    assert torch.equal(ev[0], ev[1]) and not torch.equal(ev[0], x[0])


def test_iterate_batches_workers_match_and_resume(imagenet_dir):
    ds = load_dataset("imagenet", imagenet_dir, val_size=0, image_size=16).train
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    serial = list(iterate_batches(ds, order, 5, start=1, train=True, key=3))
    parallel = list(iterate_batches(ds, order, 5, start=1, train=True, key=3, workers=2, pin_memory=True))
    assert [len(b[0]) for b in serial] == [5, 2] and len(parallel) == 2
    for (i0, x0, y0), (i1, x1, y1) in zip(serial, parallel, strict=True):
        assert torch.equal(i0, i1) and torch.equal(x0, x1) and torch.equal(y0, y1)
    assert torch.equal(serial[0][0], order[5:10]) and torch.equal(serial[0][2], ds.y[order[5:10]])


def test_iterate_batches_in_memory():
    ds = ImageDataset(torch.rand(10, 1, 4, 4), torch.arange(10) % 3, 3)
    order = torch.arange(9, -1, -1)
    out = list(iterate_batches(ds, order, 4, start=1, train=True, key=1, workers=2))
    assert [b[0].tolist() for b in out] == [[5, 4, 3, 2], [1, 0]]
    assert torch.equal(out[0][1], ds.x[[5, 4, 3, 2]]) and torch.equal(out[1][2], ds.y[[1, 0]])
    assert torch.equal(take(ds, 3)[0], ds.x[:3]) and len(take(ds, 99)[1]) == 10
    assert torch.equal(ds.get_batch(torch.tensor([2]))[0], ds.x[[2]])
    with pytest.raises(ConfigError, match="batch_size"):
        next(iterate_batches(ds, order, 0))


def test_transforms():
    g = torch.Generator().manual_seed(0)
    for h, w in [(30, 40), (100, 10), (10, 100), (1, 1)]:
        for _ in range(50):
            top, left, bh, bw = random_resized_crop_box(h, w, torch.rand(RRC_UNIFORMS, generator=g))
            assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w and bh > 0 and bw > 0
    # every attempt asks for the whole area at ratio 4/3 of a tall image: none fits, centre fallback
    u = torch.full((RRC_UNIFORMS,), 0.999999)
    assert random_resized_crop_box(100, 10, u) == (43, 0, 13, 10)
    img = torch.arange(2 * 3 * 5, dtype=torch.uint8).view(2, 3, 5).expand(3, 2, 3, 5)[:, 0]
    assert torch.equal(hflip(img)[..., 0], img[..., -1])
    flat = torch.full((3, 300, 400), 77, dtype=torch.uint8)
    out = resize_center_crop(flat, 224)
    assert out.shape == (3, 224, 224) and torch.allclose(out, torch.full_like(out, 77 / 255))
    u = torch.rand(TRAIN_UNIFORMS, generator=g)
    assert train_augment(flat, 32, u).shape == (3, 32, 32)
