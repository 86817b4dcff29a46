"""The ``logitpair`` command end to end on tiny generated data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from logitpair.cli import main
from logitpair.methods import METHODS
from logitpair.models import list_models


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "logitpair", *args], check=False, capture_output=True, text=True, timeout=300
    )


TRAIN = ["--epochs", "1", "--batch-size", "100", "--val-size", "100", "--quiet"]


def test_train_evaluate_blackbox(tmp_path, data_dir):
    for method, seed, extra in (("mpgd", "0", ["--attack-steps", "2"]), ("regular", "1", [])):
        rc = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--model", "lenet5",
                   "--method", method, "--eps", "0.1", "--seed", seed, "--out", str(tmp_path / method), *TRAIN,
                   *extra])  # fmt: skip
        assert rc == 0
    adv_file = tmp_path / "adv.safetensors"
    proc = run_cli("evaluate", str(tmp_path / "regular"), "--source", str(tmp_path / "mpgd"), "--n", "60",
                   "--steps", "5", "--restarts", "1", "--attacks", "apgd-ce:steps=10,square:queries=50",
                   "--save-adversarial", str(adv_file), "--json", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ev = json.loads(proc.stdout)
    assert ev["n"] == 60 and ev["eps"] == pytest.approx(0.1)
    assert ev["device"] == "cpu" and ev["precision"] == "float32"
    clean, pgd, wb, bb = ev["clean"], ev["pgd"], ev["white_box"]["robust"], ev["black_box"]["robust"]
    assert wb["value"] <= pgd["value"] <= clean["value"] and bb["value"] <= clean["value"]
    assert [a["name"] for a in ev["white_box"]["attacks"]] == ["pgd", "apgd-ce", "square"]
    assert ev["white_box"]["attacks"][1]["params"] == {"steps": 10}
    from safetensors.torch import load_file

    adv = load_file(str(adv_file))
    assert adv["x_adv"].shape == (60, 1, 28, 28) and adv["robust"].dtype == torch.bool
    assert adv["x_adv"].min() >= 0 and adv["x_adv"].max() <= 1
    assert int(adv["robust"].sum()) == round(wb["value"] * 60)
    assert wb["ci95"][0] <= wb["value"] <= wb["ci95"][1] and wb["n"] == 60
    assert (tmp_path / "regular" / "evaluation.json").is_file()
    md = (tmp_path / "regular" / "evaluation.md").read_text()
    assert "| white-box PGD-5 baseline (ours) |" in md and "paper reports" not in md, "our baseline, labelled ours"
    assert "5 steps of 2.5·ε/5 from one random start, keeping each point's best iterate" in md
    assert "float32 on cpu" in (tmp_path / "regular" / "evaluation.md").read_text()
    if not torch.cuda.is_available():  # an unavailable device: one line, exit 2, nothing new written
        before = (tmp_path / "regular" / "evaluation.json").read_bytes()
        for cmd in ("evaluate", "audit"):
            proc = run_cli(cmd, str(tmp_path / "regular"), "--device", "cuda", "--n", "10", "--quiet")
            assert proc.returncode == 2 and "--device cuda: CUDA is not available" in proc.stderr, proc.stderr
            assert proc.stderr.count("\n") == 1
        proc = run_cli("evaluate", str(tmp_path / "regular"), "--device", "tpu", "--quiet")
        assert proc.returncode == 2 and "expected cpu, cuda or cuda:N, got 'tpu'" in proc.stderr
        assert (tmp_path / "regular" / "evaluation.json").read_bytes() == before


def test_config_file_and_resolved_config(tmp_path, data_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: lsq\nloss:\n  lam: 0.1\n  eps: 8/255\ndata:\n  data_dir: {data_dir}\n  val_size: 100\n"
                   "optim:\n  epochs: 1\n  batch_size: 200\n")  # fmt: skip
    assert main(["train", "--config", str(cfg), "--lam", "0.2", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    resolved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert resolved["method"] == "lsq" and resolved["loss"]["lam"] == 0.2
    assert resolved["loss"]["eps"] == pytest.approx(8 / 255)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "vgg"], "unknown model 'vgg'; valid names: " + ", ".join(list_models())),
        (["--method", "magic"], "unknown method 'magic'; valid names: " + ", ".join(METHODS.names())),
        (["--dataset", "svhn2"], "unknown dataset 'svhn2'; valid names"),
        (["--eps", "-0.1"], "eps: expected 0 <= eps <= 1"),
        (["--attack-steps", "0"], "attack_steps: expected >= 1"),
        (["--lam", "-1"], "lam: expected >= 0"),
        (["--batch-size", "0"], "batch_size: expected >= 1"),
    ],
)
def test_bad_options_one_clear_error(tmp_path, data_dir, args, message, capsys):
    out = tmp_path / "never"
    rc = main(["train", "--data-dir", str(data_dir), "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not out.exists(), "nothing may be written for a bad option"


def test_missing_data_message(tmp_path, capsys):
    rc = main(["train", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  epochs: many\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "optim.epochs: expected an integer" in capsys.readouterr().err
    bad.write_text("optimm: {}\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "unknown config key optimm" in capsys.readouterr().err


def test_list_and_module_entry_point():
    proc = run_cli("list")
    assert proc.returncode == 0 and "lenet5" in proc.stdout and "alp" in proc.stdout


def test_evaluate_missing_run(tmp_path):
    proc = run_cli("evaluate", str(tmp_path / "nothing"), "--quiet")
    assert proc.returncode == 2 and "no such run directory" in proc.stderr


def test_unknown_suite_and_attack(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--suite", "strongest", "--quiet"]) == 2
    assert "unknown suite 'strongest'; valid suites: quick, standard" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--attacks", "cw:steps=3", "--quiet"]) == 2
    assert "unknown attack 'cw'; valid names: apgd-ce" in capsys.readouterr().err


def test_library_errors_name_options_the_command_line_names_flags():
    from logitpair.cli.main import _flags, build_parser, describe
    from logitpair.errors import ConfigError
    from logitpair.evaluation import EvalOptions

    with pytest.raises(ConfigError) as err:
        EvalOptions(batch_size=0)
    assert str(err.value) == "batch_size: expected >= 1, got 0", "the library names the option, not a flag"
    flags = _flags(build_parser())
    assert describe(err.value, flags) == "--batch-size: expected >= 1, got 0"
    prose = ConfigError("`out` runs/x: directory holds files; pass `resume` to continue it or `overwrite` (`lenet`)")
    assert (
        describe(prose, flags)
        == "--out runs/x: directory holds files; pass --resume to continue it or --overwrite (`lenet`)"
    )
