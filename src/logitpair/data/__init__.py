"""Datasets: loaders for real on-disk formats, a registry, and the validation split."""

from logitpair.data import mnist  # noqa: F401  (registers fashion-mnist, mnist)
from logitpair.data.base import DATASETS, ImageDataset, Splits, load_dataset, split_validation
from logitpair.data.idx import read_idx, write_idx

__all__ = ["DATASETS", "ImageDataset", "Splits", "load_dataset", "read_idx", "split_validation", "write_idx"]
