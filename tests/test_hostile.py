"""Hostile inputs through the CLI: each gives one ``logitpair: error:`` line on stderr, exit
status 2, and leaves every file and directory as it was (snapshots compared before/after).

Complements tests/test_cli.py (bad CLI flags) and tests/test_train_checkpoint.py (the same
faults at the library level)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_mnist_dir

from logitpair.cli import main
from logitpair.config import make_config, to_dict
from logitpair.data import write_idx
from logitpair.models import list_models

TRAIN_ANY = ["train", "--val-size", "100", "--epochs", "1", "--batch-size", "100", "--quiet"]
TRAIN = [*TRAIN_ANY, "--attack-steps", "1"]  # the default method, alp


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size, mtime and (for files) SHA-256."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(root))] = (
            p.is_dir(),
            st.st_size if p.is_file() else None,
            st.st_mtime_ns,
            digest,
        )
    return out


def fails_cleanly(root: Path, argv: list[str], capsys, *expected: str) -> str:
    """Run the CLI; assert exit 2, one error line containing ``expected``, nothing changed under root."""
    before = snapshot(root)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert err.startswith("logitpair: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    assert snapshot(root) == before, "files were written or changed"
    return err


# --------------------------------------------------------------------------- data files
def _corrupt_truncated(folder: Path) -> None:
    p = folder / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])


def _corrupt_magic(folder: Path) -> None:
    p = folder / "train-labels-idx1-ubyte"
    p.write_bytes(b"\x08\x01\x00\x00" + p.read_bytes()[4:])


def _corrupt_count(folder: Path) -> None:
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(49, np.uint8))


def _corrupt_header(folder: Path) -> None:  # 4 GiB announced by a 16-byte header
    p = folder / "train-images-idx3-ubyte"
    p.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 1 << 16, 256, 256))


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (
            _corrupt_truncated,
            ["train-images-idx3-ubyte: size mismatch", "needs 470416 bytes, file has 470316"],
        ),
        (_corrupt_magic, ["train-labels-idx1-ubyte: bad IDX magic number 08010000"]),
        (_corrupt_count, ["t10k-images-idx3-ubyte: 50 images but t10k-labels-idx1-ubyte has 49 labels"]),
        (_corrupt_header, ["train-images-idx3-ubyte: size mismatch", "needs 4294967312 bytes, file has 16"]),
    ],
    ids=["truncated", "bad-magic", "count-mismatch", "huge-header"],
)
def test_corrupt_data_files(tmp_path, capsys, corrupt, expected):
    data = write_mnist_dir(tmp_path / "data", n_train=600, n_test=50, gz=False)
    corrupt(data)
    fails_cleanly(tmp_path, [*TRAIN, "--data-dir", str(data), "--out", str(tmp_path / "run")], capsys, *expected)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- config files
@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "loss:\n  epss: 0.1\n",
            "unknown config key loss.epss; valid keys for method 'alp': adv_fraction, attack, attack_random_start,",
        ),
        ("loss:\n  eps: [0.1]\n", "loss.eps: expected a number, got [0.1]"),
        ("optim:\n  epochs: true\n", "optim.epochs: expected an integer, got True"),
        ("seed: 1.5\n", "seed: expected an integer, got 1.5"),
        ("optim: 3\n", "optim: expected a section (mapping), got int"),
        ("loss:\n  eps: 1.5\n", "eps: expected 0 <= eps <= 1, got 1.5"),
        ("loss:\n  eps: -1/255\n", "eps: expected 0 <= eps <= 1, got -0.0039"),
        ("loss:\n  eps: .nan\n", "loss.eps: expected a finite number, got nan"),
        ("optim:\n  lr: .inf\n", "optim.lr: expected a finite number, got inf"),
        ("loss:\n  eps: 1e400\n", "loss.eps: number too large: '1e400'"),
        ("seed: 99999999999999999999999\n", "seed: integer out of range"),
        ("seed: 4294967296\n", "seed: expected 0 <= seed < 2**32"),
        ("loss:\n  attack_steps: 0\n", "attack_steps: expected >= 1, got 0"),
        ("loss:\n  lam: -0.5\n", "lam: expected >= 0, got -0.5"),
        ("optim:\n  batch_size: 0\n", "batch_size: expected >= 1, got 0"),
        ("- 1\n- 2\n", "expected a mapping at the top level, got list"),
        ("a: [\n", "cannot parse config file"),
    ],
)
def test_bad_config_file(tmp_path, data_dir, capsys, text, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    argv = [
        "train",
        "--quiet",
        "--config",
        str(cfg),
        "--data-dir",
        str(data_dir),
        "--out",
        str(tmp_path / "run"),
    ]
    fails_cleanly(tmp_path, argv, capsys, expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("eps", ["1.5", "2"])
def test_eps_above_one_flag(tmp_path, data_dir, capsys, eps):
    argv = [*TRAIN, "--eps", eps, "--data-dir", str(data_dir), "--out", str(tmp_path / "run")]
    fails_cleanly(tmp_path, argv, capsys, "eps: expected 0 <= eps <= 1")


# --------------------------------------------------------------------------- run directories
def test_out_holds_a_different_run(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    same = {
        "data": {"data_dir": str(data_dir), "val_size": 100},
        "optim": {"epochs": 1, "batch_size": 100},
    }  # what TRAIN + --data-dir set, but for the method (clp takes no attack_steps)
    other = make_config(overrides={**same, "method": "clp"})
    (run / "config.json").write_text(json.dumps(to_dict(other)))
    (run / "notes.txt").write_text("mine")
    argv = [*TRAIN, "--data-dir", str(data_dir), "--out", str(run)]
    fails_cleanly(tmp_path, argv, capsys, f"--out {run}: directory holds a different run; pass --resume", "--overwrite")
    fails_cleanly(
        tmp_path,
        [*argv, "--resume"],
        capsys,
        "--resume: the config differs",
        "method: stored 'clp', now 'alp'",
    )
    (run / "config.json").unlink()
    fails_cleanly(tmp_path, argv, capsys, "directory holds files")
    fails_cleanly(tmp_path, [*argv, "--resume"], capsys, f"--resume: {run} holds no run (no config.json)")


# --------------------------------------------------------------------------- models and checkpoints
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir) -> Path:
    run = tmp_path_factory.mktemp("hostile") / "run"
    assert main(_train_argv(run, data_dir)) == 0
    return run


def _train_argv(run: Path, data_dir: Path, *extra: str) -> list[str]:
    """``logitpair train`` of the small regular run used by the model/checkpoint tests."""
    return [
        *TRAIN_ANY,
        "--method",
        "regular",
        "--checkpoint-every",
        "2",
        "--data-dir",
        str(data_dir),
        "--out",
        str(run),
        *extra,
    ]


class Payload:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pickle(marker: Path) -> bytes:
    Payload.marker = str(marker)
    return pickle.dumps(Payload())


def test_pickle_given_to_evaluate_never_runs(tmp_path, trained_run, capsys):
    marker = tmp_path / "payload-ran"
    evil = _evil_pickle(marker)
    (tmp_path / "evil.pt").write_bytes(evil)
    fails_cleanly(
        tmp_path,
        ["evaluate", str(tmp_path / "evil.pt"), "--quiet"],
        capsys,
        "refusing to load a pickle-based file",
    )
    zipped = tmp_path / "zipped.safetensors"  # torch.save's zip format behind a safetensors name
    torch.save({"w": torch.zeros(2)}, zipped)
    fails_cleanly(tmp_path, ["evaluate", str(zipped), "--quiet"], capsys, "looks like a pickle or zip archive")
    run = tmp_path / "run"  # a run directory whose weights were replaced by a pickle
    shutil.copytree(trained_run, run)
    (run / "model.safetensors").write_bytes(evil)
    fails_cleanly(tmp_path, ["evaluate", str(run), "--quiet"], capsys, "model.safetensors: checksum mismatch")
    meta = json.loads((run / "model.json").read_text())
    meta.pop("sha256")
    (run / "model.json").write_text(json.dumps(meta))
    fails_cleanly(tmp_path, ["evaluate", str(run), "--quiet"], capsys, "not a valid safetensors file")
    assert not marker.exists(), "the pickle payload ran"


def test_flipped_checkpoint_bytes(tmp_path, trained_run, data_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    fails_cleanly(tmp_path, ["evaluate", str(ckpt), "--quiet"], capsys, f"{weights}: checksum mismatch")
    (run / "model.json").unlink()  # evaluate RUN then falls back to the (corrupt) latest checkpoint
    fails_cleanly(tmp_path, ["evaluate", str(run), "--quiet"], capsys, "checksum mismatch")
    fails_cleanly(tmp_path, _train_argv(run, data_dir, "--resume"), capsys, f"{weights}: checksum mismatch")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("lenet", "shape mismatch for"),
        ("resnet-9000", "unknown model architecture 'resnet-9000'; known: " + ", ".join(list_models())),
    ],
)
def test_model_json_wrong_architecture(tmp_path, trained_run, capsys, name, expected):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    meta = json.loads((run / "model.json").read_text())
    meta["model"]["name"] = name
    (run / "model.json").write_text(json.dumps(meta))
    err = fails_cleanly(tmp_path, ["evaluate", str(run), "--quiet"], capsys, expected)
    if name == "lenet":
        assert "checkpoint (" in err and "model (" in err  # both shapes named
