"""Typed runs: ``load_run -> (model, RunInfo)``, one resolver for what a figure depends on."""

from __future__ import annotations

import json
import shutil

import pytest

import logitpair
from logitpair.checkpoint import RunInfo, run_info
from logitpair.errors import ConfigError
from logitpair.evaluation import test_points as points_of  # (not collected as a test)


def test_load_run_resolves_what_a_figure_depends_on(tiny_run):
    model, info = logitpair.load_run(tiny_run)
    assert isinstance(info, RunInfo)
    assert (info.dataset, info.eps, info.model, info.method, info.image_size) == ("fashion-mnist", 0.1, "lenet5",
                                                                                  "regular", 28)  # fmt: skip
    assert info.config["optim"]["epochs"] == 1 and info.data["val_size"] == 50 and info.source == str(tiny_run)
    assert info.normalization is None, "LeNet-5 normalises nothing"
    assert run_info(model, where="x").eps == 0.1 and logitpair.load_run(tiny_run, eps=0.05)[1].eps == 0.05
    x, _, dataset = points_of(info, 16)
    assert x.shape == (16, 1, 28, 28) and dataset == "fashion-mnist"


def test_a_model_from_elsewhere_is_described_explicitly():
    info = RunInfo(dataset="cifar10", eps=8 / 255, model="my-wrn")
    assert info.method is None and info.config == {} and info.normalization is None
    for bad in ({"dataset": ""}, {"eps": 2.0}, {"eps": True}, {"model": ""}):
        with pytest.raises(ConfigError):
            RunInfo(**{"dataset": "cifar10", "eps": 0.1, "model": "m", **bad})


def test_the_resolver_names_what_is_missing(tiny_run, tmp_path):
    meta = json.loads((tiny_run / "model.json").read_text())
    ok = RunInfo.from_meta(meta, where="run")
    assert ok.dataset == "fashion-mnist" and ok.eps == 0.1
    for drop, message in (("dataset", "names no dataset"), ("eps", "names no training eps"), ("model", "architecture")):
        broken = json.loads(json.dumps(meta))
        broken.pop(drop)
        broken["config"]["data"].pop("dataset")
        broken["config"]["loss"].pop("eps")
        if drop != "dataset":
            broken["dataset"] = meta["dataset"]
        if drop != "eps":
            broken["eps"] = meta["eps"]
        with pytest.raises(ConfigError, match=message):
            RunInfo.from_meta(broken, where="run-x")
    run = tmp_path / "ckpt-only"
    shutil.copytree(tiny_run / "checkpoints", run / "checkpoints")  # a run without model.json: from the checkpoint
    _, info = logitpair.load_run(run)
    assert (info.dataset, info.eps, info.model) == ("fashion-mnist", 0.1, "lenet5")


def test_normalization_is_read_from_the_network():
    from torch import nn

    from logitpair.models.layers import input_normalization

    net = nn.Sequential(input_normalization("cifar10", 3), nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    net.meta = {"model": {"name": "preact-resnet18", "kwargs": {"image_size": 32}}, "dataset": "cifar10", "eps": 0.03}
    mean, std = run_info(net).normalization
    assert mean == pytest.approx((0.4914, 0.4822, 0.4465)) and std == pytest.approx((0.2470, 0.2435, 0.2616))
