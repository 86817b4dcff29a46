"""CIFAR-10 from either distributed version, read without executing anything.

* Binary version, ``cifar-10-batches-bin/``: ``data_batch_{1..5}.bin`` and ``test_batch.bin``,
  each a sequence of 3,073-byte records: one label byte (0..9), then 3,072 pixel bytes
  (1,024 red, 1,024 green, 1,024 blue, each 32 rows of 32).
* Python version, ``cifar-10-batches-py/``: ``data_batch_{1..5}`` and ``test_batch``,
  Python 2 protocol-2 pickles of a dict with str (bytes) keys: ``data`` (an N x 3072 uint8
  numpy array in the same pixel order), ``labels`` (N ints), ``batch_label``, ``filenames``.
  The array is pickled through ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``
  and ``numpy.dtype``. A batch re-saved by Python 3 at protocol 2 writes every bytes object as
  ``_codecs.encode(text, "latin1")``. :class:`CifarUnpickler` allows exactly those four globals
  (numpy's under ``numpy.core`` or ``numpy._core``; ``_codecs.encode`` as a function that only
  encodes a str to latin-1 bytes), maps them to the installed numpy and refuses every other
  global with :class:`DataError` before anything is called: a pickle that would run
  ``os.system`` or ``eval`` fails to load instead.

``--data-dir`` may be the folder holding either sub-folder (the binary one is preferred
when both are there) or the sub-folder itself.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logitpair.data.base import DATASETS, ImageDataset
from logitpair.errors import DataError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
RECORD = 1 + 3 * 32 * 32
TRAIN_BATCHES = 5
HINT = (
    "Pass --data-dir with cifar-10-batches-bin/ (data_batch_1.bin ... test_batch.bin) or "
    "cifar-10-batches-py/ (data_batch_1 ... test_batch), or one of those folders itself."
)


def _latin1_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as Python 3's protocol-2 pickles of bytes call it, ``encode(str, "latin1")``,
    and nothing else: no other codec (bytes-to-bytes codecs such as zlib would be reachable), no
    other argument type."""
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1") and errors == "strict"):
        raise pickle.UnpicklingError(f"_codecs.encode is allowed for (str, 'latin1') only, got {type(text).__name__}, "
                                     f"{encoding!r}")  # fmt: skip
    return text.encode("latin-1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _reconstruct
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


class CifarUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR python batches: numpy arrays and plain containers, nothing else.

    ``find_class`` is the only way a pickle can reach a callable (GLOBAL, STACK_GLOBAL,
    INST, OBJ and extension codes all go through it), so refusing there means no code
    outside the three numpy globals and the latin-1 ``_codecs.encode`` is ever looked up, let
    alone run.
    """

    ALLOWED = _allowed_globals()

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.path}: refusing to unpickle global {module}.{name}: a CIFAR-10 python batch may only "
                "reference numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype and _codecs.encode"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.path}: refusing a persistent id in a CIFAR-10 python batch")


def load_cifar_pickle(path: Path) -> dict[Any, Any]:
    """Unpickle one CIFAR python batch with :class:`CifarUnpickler`; DataError naming the file on any failure."""
    if not path.is_file():
        raise DataError(f"{path}: not found. {HINT}")
    try:
        with open(path, "rb") as f:
            obj = CifarUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt: UnpicklingError, EOFError, ValueError, MemoryError...
        raise DataError(f"{path}: not a valid CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _read_py_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = load_cifar_pickle(path)
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        keys = ", ".join(repr(k) for k in d)
        raise DataError(f"{path}: expected keys b'data' and b'labels', found {keys or 'none'}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != RECORD - 1:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: expected data as an N x 3072 uint8 array, got {got}")
    if not isinstance(labels, list | tuple | np.ndarray) or len(labels) != len(data):
        got = f"{len(labels)} labels" if hasattr(labels, "__len__") else type(labels).__name__
        raise DataError(f"{path}: expected {len(data)} labels (one per image), got {got}")
    if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in labels):
        raise DataError(f"{path}: expected integer labels")
    return data, np.asarray(labels, dtype=np.int64).reshape(-1)


def _read_bin_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: not found. {HINT}")
    raw = np.fromfile(path, dtype=np.uint8)
    if len(raw) == 0 or len(raw) % RECORD:
        raise DataError(
            f"{path}: size {len(raw)} bytes is not a positive multiple of the {RECORD}-byte record "
            "(1 label byte + 3,072 pixel bytes)"
        )
    records = raw.reshape(-1, RECORD)
    return records[:, 1:], records[:, 0].astype(np.int64)


def _find_version(data_dir: Path) -> tuple[Path, str]:
    for sub, version, probe in (
        ("cifar-10-batches-bin", "bin", "data_batch_1.bin"),
        ("cifar-10-batches-py", "py", "data_batch_1"),
    ):
        if (data_dir / sub / probe).is_file():
            return data_dir / sub, version
    if (data_dir / "data_batch_1.bin").is_file():
        return data_dir, "bin"
    if (data_dir / "data_batch_1").is_file():
        return data_dir, "py"
    raise DataError(f"{data_dir}: no CIFAR-10 batches found. {HINT}")


def _dataset(parts: list[tuple[np.ndarray, np.ndarray]], paths: list[Path]) -> ImageDataset:
    for (_, labels), path in zip(parts, paths, strict=True):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
            raise DataError(f"{path}: label {int(labels.max())} out of range for {len(CLASSES)} classes")
    x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    y = np.concatenate([p[1] for p in parts])
    return ImageDataset(torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y), len(CLASSES), CLASSES)


@DATASETS.register("cifar10")
def load_cifar10(data_dir: Path | None) -> tuple[ImageDataset, ImageDataset, str]:
    """CIFAR-10 (10 classes, 32x32 RGB), binary or Python batches as distributed, nothing unpickled but arrays."""
    if data_dir is None:
        raise DataError(f"no data directory given. {HINT}")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found. {HINT}")
    folder, version = _find_version(data_dir)
    suffix, read = (".bin", _read_bin_batch) if version == "bin" else ("", _read_py_batch)
    train_paths = [folder / f"data_batch_{i}{suffix}" for i in range(1, TRAIN_BATCHES + 1)]
    test_paths = [folder / f"test_batch{suffix}"]
    train = _dataset([read(p) for p in train_paths], train_paths)
    test = _dataset([read(p) for p in test_paths], test_paths)
    return train, test, f"{folder} (cifar10, {version} version)"
