"""Fine-tuning (``train --init-weights FILE``): the weights a run starts from, its head, its record."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from logitpair import load_model
from logitpair.cli import main
from logitpair.data import load_dataset
from logitpair.errors import CheckpointError, ConfigError
from logitpair.evaluation import EvalOptions, evaluate_run
from logitpair.io import sha256_file
from logitpair.models import create_model
from logitpair.models.layers import NORMALIZATIONS
from logitpair.training import train
from logitpair.training.finetune import start_model
from logitpair.training.loop import config_from_run, model_spec


def _start(cfg, spec):
    lines: list[str] = []
    torch.manual_seed(cfg.seed)  # as the loop does before building the network
    spec, model, record = start_model(cfg, spec, None, lines.append)
    return spec, model.eval(), record, lines


@pytest.fixture
def tiny_cfg(tiny_run):
    cfg = config_from_run(tiny_run)
    return dataclasses.replace(cfg, init_weights=str(tiny_run / "model.safetensors"))


def test_init_weights_from_a_trained_run_reproduce_its_clean_accuracy_before_the_first_step(tiny_run, tiny_cfg):
    splits = load_dataset("fashion-mnist", tiny_cfg.data.data_dir, tiny_cfg.data.val_size, tiny_cfg.seed)
    spec, model, record, lines = _start(tiny_cfg, model_spec(tiny_cfg, splits))
    trained = load_model(tiny_run)
    x, y = splits.test.x, splits.test.y
    with torch.no_grad():
        ours, theirs = model(x), trained(x)
    assert torch.equal(ours, theirs)
    clean = (ours.argmax(1) == y).float().mean().item()
    run_eval = evaluate_run(tiny_run, EvalOptions(suite=None, steps=1, restarts=1, resume=False), write=False)
    assert clean == pytest.approx(run_eval["clean"]["value"]) and run_eval["n"] == len(y), "the run's clean accuracy"
    assert record["sha256"] == sha256_file(tiny_run / "model.safetensors") and record["layout"] == "logitpair"
    assert record["loaded"] == len(trained.state_dict()) and record["reinitialized"] == [] and "head" not in record
    assert spec == model_spec(tiny_cfg, splits), "our own run: its spec is kept"
    assert lines == [(f"init weights: {tiny_run / 'model.safetensors'} (SHA-256 {record['sha256'][:16]}…, "
                      f"logitpair layout): {record['loaded']} tensors loaded")]  # fmt: skip


def test_a_head_for_other_classes_is_reinitialised(tiny_run, tiny_cfg):
    spec = {"name": "lenet5", "kwargs": {"num_classes": 5, "in_channels": 1, "image_size": 28}}
    _, model, record, lines = _start(tiny_cfg, spec)
    torch.manual_seed(tiny_cfg.seed)
    fresh = create_model("lenet5", **spec["kwargs"]).state_dict()
    source = load_model(tiny_run).state_dict()
    for k, v in model.state_dict().items():
        expected = fresh[k] if k.startswith("classifier.2.") else source[k]
        assert torch.equal(v, expected), k
    assert record["reinitialized"] == ["classifier.2.bias", "classifier.2.weight"]
    assert record["head"] == {"file_classes": 10, "run_classes": 5} and record["loaded"] == len(source) - 2
    assert "classifier head re-initialised (classifier.2.bias, classifier.2.weight): the file has 10 classes, " \
           "this run 5" in lines[0]  # fmt: skip
    head_less = tiny_run.parent / "backbone.safetensors"  # a file without the head: re-initialised as well
    save_file({k: v for k, v in source.items() if not k.startswith("classifier.2.")}, str(head_less))
    _, _, record, lines = _start(dataclasses.replace(tiny_cfg, init_weights=str(head_less)), spec)
    assert record["head"]["file_classes"] is None and "the file has no head" in lines[0]


def test_torchvision_inception_weights_fine_tune_with_2x_minus_1(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    tv = create_model("inceptionv3", num_classes=1000, aux_logits=True, normalize="inception")
    torch.save({"module." + k: v for k, v in tv.state_dict().items()}, tmp_path / "inception_v3_google.pth")
    cfg = dataclasses.replace(tiny_cfg, model="inceptionv3", init_weights=str(tmp_path / "inception_v3_google.pth"))
    spec = {"name": "inceptionv3", "kwargs": {"num_classes": 10, "in_channels": 3, "image_size": 75}}
    spec, model, record, lines = _start(cfg, spec)
    assert spec["kwargs"]["normalize"] == "inception", "recorded: the exported model rebuilds with it"
    assert model.normalize.mean.flatten().tolist() == list(NORMALIZATIONS["inception"][0])
    assert record["layout"] == "torchvision" and len(record["dropped"]) == 14 and record["head"]["file_classes"] == 1000
    assert record["reinitialized"] == ["fc.bias", "fc.weight"]
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, tv.Mixed_7c.branch_pool.conv.weight)
    assert "14 dropped (AuxLogits." in lines[0]


class Payload:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_init_weights_are_one_error(tmp_path, tiny_run, tiny_cfg):
    spec = {"name": "lenet5", "kwargs": {"num_classes": 10, "in_channels": 1, "image_size": 28}}
    Payload.marker = str(tmp_path / "payload-ran")
    torch.save({"classifier.2.weight": torch.zeros(10, 128), "hook": Payload()}, tmp_path / "evil.pth")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(Payload()))
    rgb = create_model("lenet5", num_classes=10, in_channels=3).state_dict()
    save_file(rgb, str(tmp_path / "rgb.safetensors"))
    cases = [
        (tiny_cfg, tmp_path / "evil.pth", ConfigError, "init_weights: .*evil.pth: refusing to load it"),
        (tiny_cfg, tmp_path / "raw.pt", ConfigError, "refusing to load it"),
        (tiny_cfg, tmp_path / "absent.pth", ConfigError, "init_weights: .*absent.pth: no such file"),
        (tiny_cfg, tmp_path / "rgb.safetensors", CheckpointError, (r"shape mismatch with lenet5 for this run: "
         r"features.0.weight \(file \(16, 3, 5, 5\), model \(16, 1, 5, 5\)\)")),
        (dataclasses.replace(tiny_cfg, model="lenet"), tiny_run / "model.safetensors", ConfigError,
         "holds a lenet5 run's weights; this run trains lenet"),
    ]  # fmt: skip
    for cfg, path, error, message in cases:
        with pytest.raises(error, match=message) as err:
            _start(dataclasses.replace(cfg, init_weights=str(path)), {**spec, "name": cfg.model})
        assert "\n" not in str(err.value)
    assert not (tmp_path / "payload-ran").exists(), "the pickled payload ran"


def test_train_init_weights_records_the_source_and_survives_resume(tmp_path, tiny_run, data_dir, capsys):
    """The command line: the log says it, model.json records the file and its SHA-256; a run
    interrupted and resumed after the file is gone rebuilds from its checkpoint."""
    source = tmp_path / "pretrained.safetensors"
    save_file(load_model(tiny_run).state_dict(), str(source))  # weights without model.json: from elsewhere
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--model", "lenet5", "--method",
            "alp", "--eps", "0.1", "--attack-steps", "1", "--epochs", "1", "--batch-size", "100", "--val-size", "100",
            "--val-points", "0", "--init-weights", str(source), "--out", str(tmp_path / "ft")]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"init weights: {source} (SHA-256 {sha256_file(source)[:16]}…, logitpair layout): 8 tensors loaded" in err
    meta = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert meta["init_weights"]["sha256"] == sha256_file(source) and meta["config"]["init_weights"] == str(source)
    cfg = config_from_run(tmp_path / "ft")
    train(cfg, tmp_path / "resumed", stop_after_steps=2)
    source.rename(tmp_path / "moved.safetensors")  # resuming never reads it again
    train(cfg, tmp_path / "resumed", resume=True)
    resumed = json.loads((tmp_path / "resumed" / "model.json").read_text())
    assert resumed["init_weights"] == meta["init_weights"]
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "resumed")(x), load_model(tmp_path / "ft")(x)), "exact resume"
    capsys.readouterr()
    assert main([*argv[:-2], "--out", str(tmp_path / "ft2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"logitpair: error: --init-weights: {source}: no such file\n"
