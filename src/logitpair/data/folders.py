"""Image-folder datasets decoded lazily with Pillow: ImageNet and Tiny ImageNet.

Layouts (as distributed, after the usual reorganisation of the ImageNet validation set):

* ``imagenet``: ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``; classes are the sorted
  training folder names (1,000 for ILSVRC-2012; a subset such as ImageNet-100 works too).
* ``tiny-imagenet``: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` and
  ``val/val_annotations.txt`` (tab-separated file name, wnid, bounding box); classes are
  the sorted wnids (the order an image-folder loader over ``train/`` gives). ``--data-dir``
  may also be the folder holding ``tiny-imagenet-200/``.

The official validation set is the test split; ``load_dataset`` holds a validation set
out of the training images. Only file names and labels are held in memory. Every image
is decoded when its batch is built and converted to RGB (greyscale, CMYK, palette and
RGBA included), then transformed: for training, a random-resized crop and a horizontal
flip whose randomness is :func:`logitpair.rng.keyed_uniform` of (``key``, dataset index),
so a sample gets the same crop whichever batch, position or worker it lands in; for
evaluation, resize + centre crop (shorter side to ``image_size / crop_fraction``).

Options: ``image_size`` (224 / 64), ``crop_fraction`` (0.875 / 1.0: Tiny ImageNet's
64-pixel images are used whole) and ``skip_bad``: a corrupt image normally raises
:class:`DataError` with its path when its batch is built; with ``skip_bad=True`` every
image is decoded once at load time (in threads) and unreadable ones are left out and
counted in ``dataset.skipped`` and in the source string.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from logitpair.data.base import DATASETS
from logitpair.data.transforms import TRAIN_UNIFORMS, resize_center_crop, train_augment
from logitpair.errors import ConfigError, DataError
from logitpair.rng import keyed_uniform

PILLOW_HINT = "install Pillow with `pip install 'logitpair[images]'`"
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
AUG_STREAM = 0x1A6  # keyed_uniform stream of the training augmentation
SCAN_THREADS = 8


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"image-folder datasets need Pillow to decode images: {PILLOW_HINT}") from None
    return Image


def decode_image(path: str | os.PathLike, draft: int | None = None) -> Tensor:
    """Decode an image file to a uint8 RGB tensor of shape (3, H, W).

    ``draft`` lets JPEG decoding use DCT scaling down to about that size (a fast validity
    check; pixels differ from a full decode). Raises :class:`DataError` with the path for
    a missing, unreadable or corrupt file.
    """
    Image = _pillow()
    try:
        with Image.open(path) as img:
            if draft is not None:
                img.draft("RGB", (draft, draft))
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            arr = np.array(rgb, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt files
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{path}: decoded to an array of shape {arr.shape}, expected (H, W, 3)")
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass(frozen=True, eq=False)
class FolderDataset:
    """Images decoded from ``root / files[i]`` on demand; labels in memory.

    Same interface as :class:`~logitpair.data.base.ImageDataset` where training and
    evaluation need it: ``len``, ``y``, ``num_classes``, ``classes``, ``image_shape``,
    ``subset`` and ``get_batch``. ``files`` holds the paths relative to ``root`` as a
    numpy bytes array (one buffer, cheap to share with decoding workers).
    """

    root: Path
    files: np.ndarray
    y: Tensor
    num_classes: int
    classes: tuple[str, ...] = ()
    image_size: int = 224
    crop_fraction: float = 0.875
    skipped: int = 0  # unreadable images left out at load time (skip_bad=True)

    def __post_init__(self) -> None:
        if len(self.files) != len(self.y):
            raise ValueError(f"{len(self.files)} files but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(self.files[i])

    def subset(self, index: Tensor | slice) -> FolderDataset:
        if isinstance(index, slice):
            return replace(self, files=self.files[index], y=self.y[index])
        index = torch.as_tensor(index).cpu()
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        return replace(self, files=self.files[index.numpy()], y=self.y[index])

    def get_batch(self, idx: Tensor, *, train: bool = False, key: int = 0) -> tuple[Tensor, Tensor]:
        """Decode and transform the images at ``idx``: float32 (len(idx), 3, S, S) in [0, 1], and labels.

        ``train=True``: random-resized crop + horizontal flip from
        ``keyed_uniform(idx, (TRAIN_UNIFORMS,), seed=key, stream=AUG_STREAM)`` -- deterministic
        per (key, index). ``train=False``: resize + centre crop. Raises :class:`DataError`
        naming the file if an image cannot be decoded.
        """
        idx = torch.as_tensor(idx, dtype=torch.int64).cpu().flatten()
        size = self.image_size
        u = keyed_uniform(idx, (TRAIN_UNIFORMS,), seed=key, stream=AUG_STREAM) if train else None
        out = torch.empty(len(idx), 3, size, size)
        for row, i in enumerate(idx.tolist()):
            img = decode_image(self.path(i))
            if u is not None:
                out[row] = train_augment(img, size, u[row])
            else:
                out[row] = resize_center_crop(img, size, self.crop_fraction)
        return out, self.y[idx]


# --------------------------------------------------------------------------- layouts


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """(sorted sub-folder names, sorted image file names) of ``folder``."""
    dirs, images = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.is_dir():
                dirs.append(e.name)
            elif _is_image(e.name):
                images.append(e.name)
    return sorted(dirs), sorted(images)


def _describe(folder: Path) -> str:
    """What is at ``folder``, in a few words, for layout errors."""
    if not folder.exists():
        return f"no {folder.name}/ folder"
    if not folder.is_dir():
        return f"{folder.name} is a file, not a folder"
    names = sorted(os.listdir(folder))
    if not names:
        return f"{folder.name}/ is empty"
    dirs, images = _entries(folder)
    shown = ", ".join(n + ("/" if n in dirs else "") for n in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return f"{len(dirs)} folders and {len(images)} images in {folder.name}/ ({shown}{more})"


def _check_options(image_size: int, crop_fraction: float, skip_bad: bool) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size: expected a positive integer, got {image_size!r}")
    if not 0 < crop_fraction <= 1:
        raise ConfigError(f"crop_fraction: expected 0 < crop_fraction <= 1, got {crop_fraction!r}")
    if not isinstance(skip_bad, bool):
        raise ConfigError(f"skip_bad: expected true or false, got {skip_bad!r}")


def _make(root: Path, files: list[str], labels: list[int], classes: tuple[str, ...], **kw) -> FolderDataset:
    arr = np.array([os.fsencode(f) for f in files], dtype=bytes) if files else np.zeros(0, dtype="S1")
    return FolderDataset(root, arr, torch.tensor(labels, dtype=torch.int64), len(classes), classes, **kw)


def _drop_unreadable(ds: FolderDataset) -> tuple[FolderDataset, list[Path]]:
    """Decode every image once (quickly, in threads) and leave out those that fail."""

    def bad_in(chunk: range) -> list[int]:
        bad = []
        for i in chunk:
            try:
                decode_image(ds.path(i), draft=ds.image_size)
            except DataError:
                bad.append(i)
        return bad

    chunks = [range(s, min(s + 256, len(ds))) for s in range(0, len(ds), 256)]
    with ThreadPoolExecutor(min(SCAN_THREADS, os.cpu_count() or 1)) as pool:
        bad = [i for found in pool.map(bad_in, chunks) for i in found]
    if not bad:
        return ds, []
    keep = torch.ones(len(ds), dtype=torch.bool)
    keep[bad] = False
    return replace(ds.subset(keep), skipped=ds.skipped + len(bad)), [ds.path(i) for i in bad]


def _finish(
    root: Path, name: str, train: FolderDataset, test: FolderDataset, skip_bad: bool
) -> tuple[FolderDataset, FolderDataset, str]:
    bad: list[Path] = []
    if skip_bad:
        train, bad_train = _drop_unreadable(train)
        test, bad_test = _drop_unreadable(test)
        bad = bad_train + bad_test
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{root}: no readable {name} images left ({len(train)} train, {len(test)} test)")
    source = (
        f"{root} ({name}: {len(train)} train / {len(test)} test images, {train.num_classes} classes, "
        f"{train.image_size}px"
    )
    if bad:
        source += f"; skipped {len(bad)} unreadable images, e.g. {bad[0]}"
    return train, test, source + ")"


def _folder_split(root: Path, split: str, classes: tuple[str, ...] | None) -> tuple[list[str], list[int], list[str]]:
    """Files and labels of ``split/<wnid>/*.JPEG``; the classes are the folders when ``classes`` is None."""
    folder = root / split
    layout = f"expected {split}/<wnid>/*.JPEG under {root}"
    if not folder.is_dir():
        raise DataError(f"{layout}; found {_describe(folder)} (in {root}: {_describe(root)})")
    dirs, loose = _entries(folder)
    if not dirs:
        hint = ""
        if loose and split == "val":
            hint = "; the validation images still need the usual reorganisation into one folder per class"
        raise DataError(f"{layout}; found {_describe(folder)}{hint}")
    names = tuple(dirs) if classes is None else classes
    index = {c: k for k, c in enumerate(names)}
    files, labels = [], []
    for wnid in dirs:
        if wnid not in index:
            raise DataError(f"{layout}: {split}/{wnid}/ is not one of the {len(names)} training classes")
        _, images = _entries(folder / wnid)
        if not images:
            raise DataError(f"{layout}; found no images in {split}/{wnid}/ ({_describe(folder / wnid)})")
        files += [f"{split}/{wnid}/{f}" for f in images]
        labels += [index[wnid]] * len(images)
    return files, labels, list(names)


@DATASETS.register("imagenet")
def load_imagenet(
    data_dir: Path | None, *, image_size: int = 224, skip_bad: bool = False, crop_fraction: float = 0.875
) -> tuple[FolderDataset, FolderDataset, str]:
    """ILSVRC-2012 as ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` under ``data_dir``."""
    _check_options(image_size, crop_fraction, skip_bad)
    _pillow()
    if data_dir is None or not data_dir.is_dir():
        where = "no data directory given" if data_dir is None else f"{data_dir}: data directory not found"
        raise DataError(f"{where}. Pass --data-dir with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    train_files, train_labels, names = _folder_split(data_dir, "train", None)
    classes = tuple(names)
    test_files, test_labels, _ = _folder_split(data_dir, "val", classes)
    kw = {"image_size": image_size, "crop_fraction": crop_fraction}
    train = _make(data_dir, train_files, train_labels, classes, **kw)
    test = _make(data_dir, test_files, test_labels, classes, **kw)
    return _finish(data_dir, "imagenet", train, test, skip_bad)


TINY_LAYOUT = "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"


def _tiny_root(data_dir: Path) -> Path:
    if not (data_dir / "wnids.txt").is_file() and (data_dir / "tiny-imagenet-200" / "wnids.txt").is_file():
        return data_dir / "tiny-imagenet-200"
    return data_dir


def _tiny_val(root: Path, index: dict[str, int]) -> tuple[list[str], list[int]]:
    ann = root / "val" / "val_annotations.txt"
    images = root / "val" / "images"
    if not ann.is_file() or not images.is_dir():
        raise DataError(
            f"expected val/images/*.JPEG and val/val_annotations.txt under {root}; found {_describe(ann.parent)}"
        )
    present = set(_entries(images)[1])
    files, labels, seen = [], [], set()
    for lineno, line in enumerate(ann.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1].strip() not in index:
            raise DataError(
                f"{ann}:{lineno}: expected a tab-separated file name, wnid from wnids.txt and bounding box; "
                f"got {line[:80]!r}"
            )
        name, wnid = fields[0].strip(), fields[1].strip()
        if name not in present:
            raise DataError(f"{ann}:{lineno}: lists {name} but {images / name} is not an image file")
        if name in seen:
            raise DataError(f"{ann}:{lineno}: {name} is annotated twice")
        seen.add(name)
        files.append(f"val/images/{name}")
        labels.append(index[wnid])
    unlisted = sorted(present - seen)
    if unlisted:
        raise DataError(f"{ann}: {len(unlisted)} images in val/images/ have no annotation, e.g. {unlisted[0]}")
    if not files:
        raise DataError(f"{ann}: no annotations")
    return files, labels


@DATASETS.register("tiny-imagenet")
def load_tiny_imagenet(
    data_dir: Path | None, *, image_size: int = 64, skip_bad: bool = False, crop_fraction: float = 1.0
) -> tuple[FolderDataset, FolderDataset, str]:
    """Tiny ImageNet (200 classes, 64x64) as distributed: ``tiny-imagenet-200/``."""
    _check_options(image_size, crop_fraction, skip_bad)
    _pillow()
    if data_dir is None or not data_dir.is_dir():
        where = "no data directory given" if data_dir is None else f"{data_dir}: data directory not found"
        raise DataError(f"{where}. Pass --data-dir with the tiny-imagenet-200 folder ({TINY_LAYOUT})")
    root = _tiny_root(data_dir)
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise DataError(f"expected {TINY_LAYOUT} under {root}; found {_describe(root)}")
    wnids = [w.strip() for w in wnids_file.read_text(encoding="utf-8", errors="replace").splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{wnids_file}: expected one distinct wnid per line, got {len(wnids)} lines")
    classes = tuple(sorted(wnids))
    index = {c: k for k, c in enumerate(classes)}
    train_files, train_labels = [], []
    for wnid in classes:
        folder = root / "train" / wnid / "images"
        if not folder.is_dir():
            raise DataError(f"expected train/<wnid>/images/*.JPEG under {root}; found {_describe(folder.parent)}")
        images = _entries(folder)[1]
        if not images:
            raise DataError(f"expected train/<wnid>/images/*.JPEG under {root}; found {_describe(folder)}")
        train_files += [f"train/{wnid}/images/{f}" for f in images]
        train_labels += [index[wnid]] * len(images)
    test_files, test_labels = _tiny_val(root, index)
    kw = {"image_size": image_size, "crop_fraction": crop_fraction}
    train = _make(root, train_files, train_labels, classes, **kw)
    test = _make(root, test_files, test_labels, classes, **kw)
    return _finish(root, "tiny-imagenet", train, test, skip_bad)
