"""The training loop's parts: its typed state (and the checkpoints written before it was typed),
the end-of-epoch policies, the attack-autocast switch, the run directory's messages and the
automatic validation split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _fixtures import tiny_train_config
from torch import nn

from logitpair.cli import main
from logitpair.data.base import default_val_size
from logitpair.errors import CheckpointError, ConfigError, TrainingDiverged
from logitpair.modes import ATTACK_AUTOCAST, attack_autocast
from logitpair.training import loop, train
from logitpair.training.policies import BestWeights, EpochEnd, OverfitGuard, epoch_policies
from logitpair.training.state import LoopState, Snapshots

DATA = Path(__file__).parent / "data"


def cfg_for(data_dir, **kw):
    return tiny_train_config(data_dir, epochs=1, **kw)


# --------------------------------------------------------------------------- the loop's state
def test_loop_state_of_checkpoints_written_before_it_was_typed_round_trips():
    """The ``loop`` entries of checkpoints written by the untyped loop (mid-epoch sums; a guard
    stop with a best epoch; best-robust with EMA) read and write back identically, key order too."""
    for saved in json.loads((DATA / "loop_state_v0.json").read_text())["states"]:
        state = LoopState.from_dict(saved)
        assert json.dumps(state.to_dict()) == json.dumps(saved)
    collapsed = LoopState.from_dict(json.loads((DATA / "loop_state_v0.json").read_text())["states"][1])
    assert collapsed.stopped == 2 and collapsed.best == (2, 0.7) and collapsed.epoch == 4


def test_loop_state_rejects_an_unknown_entry():
    with pytest.raises(CheckpointError, match="unknown entry 'nope'"):
        LoopState.from_dict({"epoch": 0, "nope": 1})


def test_snapshots_are_saved_as_the_files_they_name():
    w = {"w": torch.zeros(1)}
    assert list(Snapshots(ema=w, best=w, prev=w).files()) == ["best", "prev", "ema"]
    assert list(Snapshots(ema=w).files()) == ["ema"]


# --------------------------------------------------------------------------- end-of-epoch policies
def _end(epoch: int, record: dict, history: list, snaps: Snapshots | None = None) -> EpochEnd:
    model = nn.Linear(2, 1)
    nn.init.constant_(model.weight, float(epoch))
    return EpochEnd(epoch, record, model, LoopState(epoch=epoch, history=history), snaps or Snapshots(), lambda _: None)


def test_overfit_guard_stops_and_keeps_the_previous_epoch():
    guard, snaps = OverfitGuard(20.0), Snapshots()
    first = _end(0, {"val_pgd": 0.6}, [], snaps)
    guard.end_epoch(first)
    assert not first.stop and snaps.prev is not None and float(snaps.prev["weight"][0, 0]) == 0.0
    small = _end(1, {"val_pgd": 0.45}, [{"val_pgd": 0.6}], snaps)  # 15 points < 20: goes on
    guard.end_epoch(small)
    assert not small.stop and float(snaps.prev["weight"][0, 0]) == 1.0
    fall = _end(2, {"val_pgd": 0.2}, [{"val_pgd": 0.45}], snaps)
    guard.end_epoch(fall)
    assert fall.stop and fall.state.stopped == 2 and "fell 25.0 points" in fall.record["overfit_guard"]
    assert float(snaps.prev["weight"][0, 0]) == 1.0  # the collapsed epoch's weights are not kept


def test_best_weights_keep_the_best_epoch_but_never_a_stopped_one():
    best, snaps = BestWeights("val_clean"), Snapshots()
    for epoch, value in enumerate([0.5, 0.7, 0.6]):
        end = _end(epoch, {"val_clean": value}, [], snaps)
        end.state.best = None if epoch == 0 else (2, 0.7) if epoch == 2 else (1, 0.5)
        best.end_epoch(end)
    assert float(snaps.best["weight"][0, 0]) == 1.0
    stopped = _end(3, {"val_clean": 0.9}, [], snaps)
    stopped.stop = True
    best.end_epoch(stopped)
    assert stopped.state.best is None and float(snaps.best["weight"][0, 0]) == 1.0


def test_policies_follow_the_config(data_dir):
    assert epoch_policies(cfg_for(data_dir)) == []
    assert epoch_policies(cfg_for(data_dir, method="fgsm-rs", select="best-robust")) == [
        OverfitGuard(20.0),
        BestWeights("val_pgd"),
    ]
    assert epoch_policies(cfg_for(data_dir, select="best-robust", val_suite="fast")) == [BestWeights("val_robust")]


# --------------------------------------------------------------------------- attack autocast
def test_attack_autocast_is_reset_on_exit_and_on_error():
    assert ATTACK_AUTOCAST.get() is False
    with attack_autocast(True):
        assert ATTACK_AUTOCAST.get() is True
        with attack_autocast(False):
            assert ATTACK_AUTOCAST.get() is False
        assert ATTACK_AUTOCAST.get() is True
    assert ATTACK_AUTOCAST.get() is False
    with pytest.raises(RuntimeError), attack_autocast(True):
        raise RuntimeError
    assert ATTACK_AUTOCAST.get() is False


def test_training_sets_attack_autocast_only_while_it_runs(tmp_path, data_dir, monkeypatch):
    seen: list[bool] = []
    validate = loop.validate

    def spy(*args, **kwargs):
        seen.append(ATTACK_AUTOCAST.get())
        return validate(*args, **kwargs)

    monkeypatch.setattr(loop, "validate", spy)
    train(cfg_for(data_dir, amp="bf16", amp_attacks=True), tmp_path / "run")
    assert seen == [True] and ATTACK_AUTOCAST.get() is False

    def fail(*args, **kwargs):
        assert ATTACK_AUTOCAST.get() is True
        raise TrainingDiverged("validation failed")

    monkeypatch.setattr(loop, "validate", fail)
    with pytest.raises(TrainingDiverged):
        train(cfg_for(data_dir, amp="bf16", amp_attacks=True), tmp_path / "run2")
    assert ATTACK_AUTOCAST.get() is False


# --------------------------------------------------------------------------- the run directory
TRAIN = ["train", "--dataset", "mnist", "--model", "lenet5", "--method", "alp", "--epochs", "1",
         "--batch-size", "100", "--val-size", "50", "--val-points", "20", "--attack-steps", "1", "--quiet"]  # fmt: skip


def test_rerun_after_a_failure_before_the_first_checkpoint(tmp_path, data_dir, monkeypatch, capsys):
    """The same command again says the run is unfinished and how to go on; another config is a
    different run; --resume then trains it."""
    out = tmp_path / "run"
    argv = [*TRAIN, "--data-dir", str(data_dir), "--out", str(out)]

    def diverge(*args, **kwargs):
        raise TrainingDiverged("non-finite loss at step 0")

    monkeypatch.setattr(loop, "train_step", diverge)
    assert main(argv) == 2
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"logitpair: error: --out {out}: directory holds an unfinished run of the same config "
        "(no checkpoint yet); pass --resume to continue it or --overwrite to start again\n"
    )
    assert main([*argv, "--seed", "2"]) == 2
    assert "directory holds a different run" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    assert (out / "train.json").is_file()
    assert main(argv) == 2
    assert "holds a finished run of the same config; pass --resume" in capsys.readouterr().err


def test_unfinished_run_names_its_last_checkpoint(tmp_path, data_dir):
    cfg = cfg_for(data_dir, checkpoint_every=2)
    train(cfg, tmp_path / "run", stop_after_steps=3)
    with pytest.raises(ConfigError, match=r"unfinished run of the same config \(last checkpoint ckpt-000000003\)"):
        train(cfg, tmp_path / "run")


# --------------------------------------------------------------------------- validation split
def test_default_val_size_rule():
    assert [default_val_size(n) for n in (60_000, 50_000, 73_257, 49_990, 600, 9)] == [5000, 5000, 5000, 4999, 60, 0]


def test_small_training_set_trains_without_val_size(tmp_path, data_dir, capsys):
    """600 generated images and no --val-size: 60 held out (10%), recorded in the run's config,
    so the same command resumes; an explicit size too large is one clear error."""
    argv = [a for a in TRAIN if a not in ("--val-size", "50")]
    out = tmp_path / "run"
    assert main([*argv, "--data-dir", str(data_dir), "--out", str(out)]) == 0
    stored = json.loads((out / "config.json").read_text())
    assert stored["data"]["val_size"] == 60
    assert json.loads((out / "model.json").read_text())["config"]["data"]["val_size"] == 60
    assert "val_clean" in json.loads((out / "train.json").read_text())["history"][0]
    assert main([*argv, "--data-dir", str(data_dir), "--out", str(out), "--resume"]) == 0
    assert main([*argv, "--data-dir", str(data_dir), "--out", str(out), "--resume", "--val-size", "60"]) == 0
    capsys.readouterr()
    assert main([*argv, "--data-dir", str(data_dir), "--out", str(tmp_path / "big"), "--val-size", "600"]) == 2
    err = capsys.readouterr().err
    assert err == "logitpair: error: --val-size: expected 0 <= val_size < 600 (the training set's size), got 600\n"
