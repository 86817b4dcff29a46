"""Training-layer features of the comparison methods: the catastrophic-overfitting guard and
static source models (ensemble adversarial training); accumulation and the official recipe's
settings through the real loop."""

from __future__ import annotations

import json

import pytest
import torch
from _fixtures import tiny_train_config
from safetensors.torch import load_file

from logitpair.checkpoint import latest_checkpoint, load_checkpoint
from logitpair.training import loop, train


def cfg_for(data_dir, **kw):
    return tiny_train_config(data_dir, epochs=3, **kw)


def test_guard_restores_previous_epoch_on_forced_collapse(tmp_path, data_dir, monkeypatch):
    """val_pgd scripted 0.60, 0.30: a 30-point drop > 20 stops training after epoch 2 and the
    weights of epoch 1 are exported, with a line in the log."""
    seen: list[dict[str, torch.Tensor]] = []
    scripted = iter([0.60, 0.30, 0.30])

    def fake_validate(model, splits, cfg, device=None):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"val_clean": 0.9, "val_pgd": next(scripted)}

    monkeypatch.setattr(loop, "validate", fake_validate)
    logs: list[str] = []
    cfg = cfg_for(data_dir, method="fgsm-rs")
    assert cfg.guard_points() == 20.0  # on by default for FGSM-RS
    res = train(cfg, tmp_path / "run", log=logs.append)
    assert len(res.history) == 2 and "overfit_guard" in res.history[-1]
    assert any("catastrophic overfitting guard" in line for line in logs)
    exported = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(exported[k], seen[0][k]) for k in exported), "epoch 1's weights must be kept"
    assert not all(torch.equal(exported[k], seen[1][k]) for k in exported)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["selected"]["epoch"] == 1


def test_guard_off_and_small_drops_keep_training(tmp_path, data_dir, monkeypatch):
    scripted = iter([0.60, 0.45, 0.44])
    monkeypatch.setattr(loop, "validate", lambda *a, **k: {"val_pgd": next(scripted)})
    res = train(cfg_for(data_dir, method="fgsm-rs"), tmp_path / "run")  # 15-point drop < 20
    assert len(res.history) == 3 and all("overfit_guard" not in r for r in res.history)


def test_static_models_are_frozen_and_not_saved(tmp_path, data_dir):
    src = tmp_path / "src"
    train(cfg_for(data_dir, method="regular", optim={"epochs": 1}), src)
    before = (src / "model.safetensors").read_bytes()
    cfg = cfg_for(data_dir, method="ens-adv", static_models=str(src), checkpoint_every=2, optim={"epochs": 1})
    train(cfg, tmp_path / "ens")
    assert (src / "model.safetensors").read_bytes() == before
    meta = json.loads((tmp_path / "ens" / "model.json").read_text())
    assert [s["path"] for s in meta["static_models"]] == [str(src)] and meta["static_models"][0]["sha256"]
    files, _ = load_checkpoint(latest_checkpoint(tmp_path / "ens" / "checkpoints"))
    assert set(files) <= {"model", "train_state", "best", "prev", "ema"}
    own = load_file(str(tmp_path / "ens" / "model.safetensors"))
    assert set(own) == set(load_file(str(src / "model.safetensors")))  # its own weights only


def test_bad_static_model_is_one_clear_error(tmp_path, data_dir):
    from logitpair.errors import LogitpairError

    cfg = cfg_for(data_dir, method="ens-adv", static_models=str(tmp_path / "missing"))
    with pytest.raises(LogitpairError, match="missing"):
        train(cfg, tmp_path / "run")


def test_official_recipe_runs_through_the_loop(tmp_path, data_dir):
    """rmsprop-tf with lr per 32 images, step schedule, EMA with the tf schedule, official
    training attack notation: trains, exports the EMA weights and says so."""
    cfg = cfg_for(
        data_dir,
        method="alp",
        ema_decay=0.9999,
        ema_schedule="tf",
        optim={
            "optimizer": "rmsprop-tf",
            "lr": 0.045,
            "lr_reference_batch": 32,
            "schedule": "step",
            "weight_decay": 1e-4,
            "epochs": 1,
        },
        loss={"attack": "pgdll_16_2_2"},
    )
    res = train(cfg, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["weights"] == "ema"
    assert res.history[0]["lr"] == pytest.approx(0.045 * 100 / 32)
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_bf16_training_keeps_attacks_in_float32(tmp_path, data_dir, monkeypatch):
    """--amp bf16: the training forward runs under autocast, the attack inside the loss does not."""
    from logitpair.attacks import common, iterative

    dtypes: list[torch.dtype] = []
    orig = common.loss_grad

    def spy(model, x, loss_fn):
        loss, logits, grad = orig(model, x, loss_fn)
        dtypes.append(logits.dtype)
        return loss, logits, grad

    monkeypatch.setattr(common, "loss_grad", spy)
    monkeypatch.setattr(iterative, "loss_grad", spy)  # the training PGD's loop
    res = train(cfg_for(data_dir, method="alp", amp="bf16", optim={"epochs": 1}), tmp_path / "run")
    assert dtypes and set(dtypes) == {torch.float32}
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_val_suite_adds_robust_accuracy_under_the_suite_and_drives_selection(tmp_path, data_dir):
    """val_suite=fast: every epoch records val_robust (the protocol's rule: clean-correct and
    robust to every attack of the suite), and select=best-robust picks its best epoch."""
    cfg = cfg_for(data_dir, method="mpgd", val_suite="fast", select="best-robust", optim={"epochs": 2})
    res = train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "val_robust" in r]
    assert len(epochs) == 2 and len(res.history) == 2
    for r in epochs:
        assert 0.0 <= r["val_robust"] <= 1.0
    best = max(range(2), key=lambda i: (epochs[i]["val_robust"], -i))
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["selected"]["epoch"] == best + 1


def test_unknown_val_suite_fails_before_anything_is_written(tmp_path, data_dir):
    from logitpair.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown suite"):
        train(cfg_for(data_dir, method="regular", val_suite="nope"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
