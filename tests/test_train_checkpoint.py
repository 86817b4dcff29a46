"""Trainer and checkpoints: exact resume, safe loading, divergence handling, run-dir protection."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from logitpair import load_model
from logitpair.checkpoint import latest_checkpoint
from logitpair.config import make_config
from logitpair.data import load_dataset
from logitpair.errors import CheckpointError, ConfigError, TrainingDiverged
from logitpair.training import train


def tiny_cfg(data_dir: Path, **over):
    base = {
        "model": "lenet5", "method": "alp", "seed": 3, "val_points": 20,
        "data": {"data_dir": str(data_dir), "val_size": 50},
        "optim": {"epochs": 2, "batch_size": 50},
        "loss": {"attack_steps": 2, "attack_step_size": 0.05, "noise_std": 0.3},
    }  # fmt: skip
    from logitpair.config import loss_for, merge

    base["loss"] = loss_for(over.get("method", base["method"]), base["loss"])  # the settings the method takes
    return make_config(overrides=merge(base, over))


@pytest.fixture(scope="module")
def splits(data_dir):
    s = load_dataset("fashion-mnist", data_dir, val_size=50, seed=3)
    return type(s)(train=s.train.subset(slice(0, 300)), val=s.val, test=s.test, name=s.name, source=s.source)


@pytest.mark.parametrize("method, ema", [("alp", 0.0), ("clp", 0.9)])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, data_dir, splits, method, ema):
    cfg = tiny_cfg(data_dir, method=method, checkpoint_every=4, ema_decay=ema)
    full = train(cfg, tmp_path / "full", splits=splits)
    # interrupted after 5 steps (mid-epoch: 6 steps per epoch), resumed, interrupted again, resumed
    train(cfg, tmp_path / "cut", splits=splits, stop_after_steps=5)
    ckpt = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    assert json.loads((ckpt / "state.json").read_text())["loop"]["pos"] == 5
    train(cfg, tmp_path / "cut", splits=splits, resume=True, stop_after_steps=3)
    resumed = train(cfg, tmp_path / "cut", splits=splits, resume=True)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in resumed.history]
    a = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(s).items() if k != "train_seconds"} for s in lines]
    assert strip(a) == strip(b)


def test_run_directory_contents_and_load_model(tmp_path, data_dir, splits):
    cfg = tiny_cfg(data_dir, method="regular", optim={"epochs": 1, "batch_size": 50})
    res = train(cfg, tmp_path / "run", splits=splits)
    run = tmp_path / "run"
    for name in ("config.json", "env.json", "metrics.jsonl", "model.safetensors", "model.json", "train.json"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "model.json").read_text())
    assert meta["model"]["name"] == "lenet5" and meta["method"] == "regular" and meta["dataset"] == "fashion-mnist"
    assert meta["config"]["optim"]["batch_size"] == 50 and "version" in meta
    x = splits.test.x[:16]
    for path in (run, run / "model.safetensors", latest_checkpoint(run / "checkpoints")):
        model = load_model(path)
        assert not model.training
        assert torch.equal(model(x), res.model(x))
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(load_model(run)(x).sum(), x)
    assert g.abs().sum() > 0


def test_refuses_pickle_and_never_runs_payload(tmp_path):
    marker = tmp_path / "payload-ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in ("evil.pt", "evil.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(Evil()))
        with pytest.raises(CheckpointError, match="refusing"):
            load_model(path)
    assert not marker.exists()


def test_corrupt_or_mismatched_weights_rejected(tmp_path, data_dir, splits):
    cfg = tiny_cfg(data_dir, method="regular", optim={"epochs": 1, "batch_size": 100})
    train(cfg, tmp_path / "run", splits=splits)
    run = tmp_path / "run"
    meta = json.loads((run / "model.json").read_text())
    meta["model"]["name"] = "lenet"
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatch|do not match"):
        load_model(run)
    meta["model"]["name"] = "resnet-9000"
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown model architecture 'resnet-9000'"):
        load_model(run)
    meta["model"]["name"] = "lenet5"
    (run / "model.json").write_text(json.dumps(meta))
    data = bytearray((run / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (run / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_model(run)


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(tmp_path, data_dir, splits):
    from logitpair.training import epoch_order

    cfg = tiny_cfg(data_dir, method="regular", checkpoint_every=2, optim={"epochs": 1, "batch_size": 50})
    x = splits.train.x.clone()
    x[epoch_order(len(x), cfg.seed, 0)[4 * 50]] = float("nan")  # poison the 5th batch (step 4)
    poisoned = type(splits)(
        train=type(splits.train)(x, splits.train.y, 10),
        val=splits.val,
        test=splits.test,
        name=splits.name,
        source=splits.source,
    )
    with pytest.raises(
        TrainingDiverged, match=r"at step 4 \(epoch 1, batch 4\); last good checkpoint: .*ckpt-000000004"
    ):
        train(cfg, tmp_path / "run", splits=poisoned)
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt.name == "ckpt-000000004"
    model = load_model(ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    skip = tiny_cfg(data_dir, method="regular", on_nonfinite="skip", optim={"epochs": 1, "batch_size": 50})
    res = train(skip, tmp_path / "skip", splits=poisoned)
    assert res.history[-1]["skipped_batches"] == 1
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_out_dir_protection(tmp_path, data_dir, splits):
    cfg = tiny_cfg(data_dir, method="regular", optim={"epochs": 1, "batch_size": 100})
    train(cfg, tmp_path / "run", splits=splits)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="`resume` .* or `overwrite`"):
        train(cfg, tmp_path / "run", splits=splits)
    other = tiny_cfg(data_dir, method="clp", optim={"epochs": 1, "batch_size": 100})
    with pytest.raises(ConfigError, match="config differs.*method"):
        train(other, tmp_path / "run", splits=splits, resume=True)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    train(other, tmp_path / "run", splits=splits, overwrite=True)
    assert json.loads((tmp_path / "run" / "model.json").read_text())["method"] == "clp"


def test_ema_weights_are_exported(tmp_path, data_dir, splits):
    from logitpair.training import update_ema

    plain = train(
        tiny_cfg(data_dir, method="regular", optim={"epochs": 1, "batch_size": 50}),
        tmp_path / "a",
        splits=splits,
    )
    ema = train(tiny_cfg(data_dir, method="regular", ema_decay=0.5, optim={"epochs": 1, "batch_size": 50}),
                tmp_path / "b", splits=splits)  # fmt: skip
    a, b = plain.model.state_dict(), load_model(tmp_path / "b").state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a), "EMA weights must differ from the last iterate"
    assert all(torch.equal(v, ema.model.state_dict()[k]) for k, v in b.items())
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(2.0)
    e = {"weight": torch.zeros(1, 2)}
    update_ema(e, lin, 0.75)
    assert torch.allclose(e["weight"], torch.full((1, 2), 0.5))
