"""Datasets: loaders for real on-disk formats, a registry, the validation split and batching."""

from logitpair.data import cifar, folders, mnist, svhn  # noqa: F401  (register the datasets)
from logitpair.data.base import DATASETS, Dataset, ImageDataset, Splits, load_dataset, split_validation
from logitpair.data.folders import FolderDataset
from logitpair.data.idx import read_idx, write_idx
from logitpair.data.loader import iterate_batches, take

__all__ = [
    "DATASETS",
    "Dataset",
    "FolderDataset",
    "ImageDataset",
    "Splits",
    "iterate_batches",
    "load_dataset",
    "read_idx",
    "split_validation",
    "take",
    "write_idx",
]
