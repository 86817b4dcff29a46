"""Shared fixtures: tiny generated data in the real IDX format and small trained models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from logitpair.data import write_idx

# One thread: the tests use tiny batches, and two OpenMP threads competing with any other
# process on a 2-core machine can slow small ops down a hundredfold.
torch.set_num_threads(1)


def make_images(n: int, seed: int, num_classes: int = 10, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images: a fixed random prototype per class plus noise, as uint8."""
    protos = np.random.default_rng(1234).uniform(0, 1, (num_classes, size, size))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.uint8)
    imgs = np.clip(0.5 + 0.12 * (2 * protos[labels] - 1) + 0.25 * (2 * rng.uniform(0, 1, (n, size, size)) - 1), 0, 1)
    return (imgs * 255).round().astype(np.uint8), labels


def write_mnist_dir(folder: Path, n_train: int = 600, n_test: int = 200, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        imgs, labels = make_images(n, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", imgs)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mnist_dir(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="session")
def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    imgs, labels = make_images(512, 7)
    x = torch.from_numpy(imgs).float().div(255).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)
    )  # fmt: skip


def train_small_cnn(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> nn.Module:
    """Train ``small_cnn`` for 4 epochs of Adam on (x, y); returns it in eval mode."""
    torch.manual_seed(seed)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        for i in range(0, len(x), 64):
            loss = nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_model(tiny_data: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    """An undefended small CNN trained to high clean accuracy on the tiny data (about 1 s)."""
    x, y = tiny_data
    model = train_small_cnn(x, y, seed=0)
    acc = (model(x).argmax(1) == y).float().mean()
    assert acc > 0.9, f"fixture model failed to train ({acc:.2f})"
    return model


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A run directory: LeNet-5 trained 1 epoch (regular, eps 0.1) on the generated Fashion-MNIST files.
    Tests that change it work on a copy."""
    from logitpair.config import make_config
    from logitpair.training import train

    cfg = make_config(
        overrides={
            "model": "lenet5",
            "method": "regular",
            "seed": 0,
            "val_points": 20,
            "data": {"data_dir": str(data_dir), "val_size": 50},
            "optim": {"epochs": 1, "batch_size": 50},
            "loss": {"eps": 0.1},
        }
    )
    out = tmp_path_factory.mktemp("audit") / "run"
    train(cfg, out)
    return out


@pytest.fixture(scope="module")
def lenet5_points():
    """The registered ``lenet5`` trained on 512 high-contrast prototype images (a class prototype
    plus noise; 100% on held-out points in about 1 s) and 12 held-out points."""
    from logitpair.models import create_model

    g = torch.Generator().manual_seed(0)
    protos = torch.rand(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (524,), generator=g)
    x = (0.5 + 0.4 * (2 * protos[y] - 1) + 0.2 * (2 * torch.rand(524, 1, 28, 28, generator=g) - 1)).clamp(0, 1)
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10, in_channels=1, image_size=28)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(4):
        for i in range(0, 512, 32):
            loss = torch.nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    acc = (model(x[512:]).argmax(1) == y[512:]).float().mean()
    assert acc > 0.9, f"the LeNet-5 failed to train ({acc:.2f})"
    return model, x[512:], y[512:]
