"""Writers of the paper's datasets in their real on-disk formats, shared by the tests.

SVHN ``*_32x32.mat`` (MATLAB v5), CIFAR-10 (binary records or Python 2 pickles), ImageNet
folders (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``) and Tiny ImageNet (``wnids.txt``,
``val_annotations.txt``). scipy and Pillow are imported when a writer needs them; a test that
uses one skips with ``pytest.importorskip`` first. MNIST-format IDX files: ``conftest.write_mnist_dir``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def write_svhn_mat(path: Path, n: int, seed: int, **override) -> tuple[np.ndarray, np.ndarray]:
    """A ``*_32x32.mat`` as distributed: MATLAB v5, X 32x32x3xN uint8, y Nx1 uint8 with 10 for digit 0."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
    y[0, 0] = 10
    mat = {"X": x, "y": y, **override}
    import scipy.io as scipy_io

    scipy_io.savemat(path, {k: v for k, v in mat.items() if v is not None}, format="5")
    return x, y


class _Global:
    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class Py2Pickler:
    """What Python 2's ``cPickle.dump(obj, f, 2)`` wrote for the CIFAR-10 batches.

    Python 2 ``str`` is SHORT_BINSTRING / BINSTRING (bytes when loaded with ``encoding='bytes'``),
    and a numpy array is ``numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), 'b')`` + BUILD
    with ``(1, shape, dtype('u1'), False, raw)``. Python 3's own pickler cannot write this: it
    encodes bytes through ``_codecs.encode`` and, on numpy 2, names ``numpy._core``.
    """

    def __init__(self, multiarray: str = "numpy.core.multiarray") -> None:
        self.multiarray = multiarray
        self.out = bytearray(b"\x80\x02")
        self.memo = 0

    def dumps(self, obj) -> bytes:
        self.save(obj)
        return bytes(self.out + b".")

    def put(self) -> None:
        self.memo += 1
        self.out += b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo)

    def save(self, obj) -> None:
        out = self.out
        if obj is None:
            out += b"N"
        elif isinstance(obj, bool):
            out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, int):
            out += b"K" + bytes([obj]) if 0 <= obj < 256 else b"J" + struct.pack("<i", obj)
        elif isinstance(obj, bytes | str):
            data = obj.encode("latin1") if isinstance(obj, str) else obj
            out += b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<I", len(data))
            out += data
            self.put()
        elif isinstance(obj, _Global):
            out += b"c" + f"{obj.module}\n{obj.name}\n".encode()
            self.put()
        elif isinstance(obj, tuple):
            if not obj:
                out += b")"
            elif len(obj) <= 3:
                for item in obj:
                    self.save(item)
                out += b"\x85\x86\x87"[len(obj) - 1 : len(obj)]
            else:
                out += b"("
                for item in obj:
                    self.save(item)
                out += b"t"
        elif isinstance(obj, list):
            out += b"]"
            self.put()
            if obj:
                out += b"("
                for item in obj:
                    self.save(item)
                out += b"e"
        elif isinstance(obj, dict):
            out += b"}"
            self.put()
            out += b"("
            for k, v in obj.items():
                self.save(k)
                self.save(v)
            out += b"u"
        elif isinstance(obj, np.ndarray):
            assert obj.dtype == np.uint8
            self.save(_Global(self.multiarray, "_reconstruct"))
            self.save((_Global("numpy", "ndarray"), (0,), "b"))
            out += b"R"
            self.put()
            self.save((1, obj.shape, obj.dtype, False, np.ascontiguousarray(obj).tobytes()))
            out += b"b"
        elif isinstance(obj, np.dtype):
            self.save(_Global("numpy", "dtype"))
            self.save((obj.str[1:], 0, 1))
            out += b"R"
            self.put()
            self.save((3, "|", None, None, None, -1, -1, 0))
            out += b"b"
        else:
            raise TypeError(type(obj))


def cifar_batches(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, n)]


def write_cifar(root: Path, version: str, n: int = 6, multiarray: str = "numpy.core.multiarray") -> Path:
    """cifar-10-batches-{bin,py}/ with 5 training batches and a test batch of ``n`` images each."""
    folder = root / f"cifar-10-batches-{version}"
    folder.mkdir(parents=True)
    for seed, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data, labels = cifar_batches(n, seed)
        if version == "bin":
            records = np.concatenate([np.array(labels, np.uint8)[:, None], data], axis=1)
            (folder / f"{name}.bin").write_bytes(records.tobytes())
        else:
            batch = {
                "batch_label": f"training batch {seed + 1} of 5",
                "labels": labels,
                "data": data,
                "filenames": [f"img_{seed}_{i}.png" for i in range(n)],
            }
            (folder / name).write_bytes(Py2Pickler(multiarray).dumps(batch))
    return folder


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> None:
    """A small image as ImageNet ships them: JPEG (RGB, greyscale or CMYK), or a PNG behind a .JPEG name."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    channels = {"RGB": 3, "L": 1, "CMYK": 4, "P": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    if mode == "L":
        img = Image.fromarray(arr[..., 0], "L")
    elif mode == "P":
        img = Image.fromarray(arr, "RGB").convert("P")
    else:
        img = Image.fromarray(arr, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG" if mode in ("P", "RGBA") else "JPEG", quality=90)


WNIDS = ("n01440764", "n01443537", "n01484850")
SPECIAL = {1: "L", 2: "CMYK", 3: "P", 5: "RGBA"}  # training image number -> mode


def write_tiny(parent: Path, n_train: int = 3, n_val: int = 5) -> Path:
    root = parent / "tiny-imagenet-200"
    wnids = ("n02124075", "n01443537", "n04067472")
    (root / "wnids.txt").parent.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    k = 0
    for wnid in wnids:
        boxes = []
        for i in range(n_train):
            k += 1
            write_image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", k, (64, 64), "L" if k == 2 else "RGB")
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    lines = []
    for i in range(n_val):
        write_image(root / "val" / "images" / f"val_{i}.JPEG", 50 + i, (64, 64), "CMYK" if i == 1 else "RGB")
        lines.append(f"val_{i}.JPEG\t{wnids[i % 3]}\t{i}\t2\t60\t61")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write_image(root / "test" / "images" / "test_0.JPEG", 99, (64, 64))
    return root


def write_imagenet(
    root: Path, wnids: tuple[str, ...] = WNIDS, n_train: int = 4, n_val: int = 2, special: dict[int, str] | None = None
) -> Path:
    """ImageNet as distributed after the usual val reorganisation: ``train/<wnid>/<wnid>_<i>.JPEG`` and
    ``val/<wnid>/ILSVRC2012_val_<k>.JPEG`` (images of varied sizes; the training images numbered in
    ``special`` in other modes, default :data:`SPECIAL`: greyscale, CMYK, palette and RGBA), plus
    a stray file in ``train/`` that the loader must ignore."""
    special = SPECIAL if special is None else special
    k = 0
    for c, wnid in enumerate(wnids):
        for i in range(n_train):
            k += 1
            size = (40 + 7 * i, 30 + 5 * c) if i % 2 else (28 + 3 * c, 44 + 4 * i)
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", k, size, special.get(k, "RGB"))
        for i in range(n_val):
            write_image(root / "val" / wnid / f"ILSVRC2012_val_{c * n_val + i:08d}.JPEG", 100 + k + i, (50, 37))
    (root / "train" / "LOC_synset_mapping.txt").write_text("ignored\n")
    return root


def tiny_train_config(data_dir: Path, epochs: int, **overrides):
    """A LeNet-5 training config on the generated MNIST files of ``data_dir`` (the ``data_dir``
    fixture) with 1-step attacks and 20 validation points; ``overrides`` replace top-level keys
    (dicts are merged into their section); the ``loss`` section holds what the method takes."""
    from logitpair.config import loss_for, make_config

    base = {
        "model": "lenet5",
        "seed": 1,
        "val_points": 20,
        "val_attack_steps": 1,
        "data": {"dataset": "mnist", "data_dir": str(data_dir), "val_size": 50},
        "optim": {"epochs": epochs, "batch_size": 100},
        "loss": {"attack_steps": 1},
    }
    base["loss"] = loss_for(overrides.get("method", "alp"), base["loss"])
    for k, v in overrides.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
    return make_config(None, base)
