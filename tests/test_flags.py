"""``logitpair train``'s flags, generated from the config dataclasses: every field settable by
its flag, v1's flags still working, ``--help`` grouped with every default, and a method
registered in this module getting its flags with no other edit."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any

import pytest
from torch import Tensor, nn

from logitpair.cli.flags import config_overrides, method_flags, run_flags
from logitpair.cli.main import build_parser, main
from logitpair.config import RunConfig, build, make_config, to_dict
from logitpair.errors import ConfigError
from logitpair.methods import METHODS, BatchContext, LossSettings
from logitpair.methods.base import accuracy, cross_entropy
from logitpair.settings import Check, accepted_keys, at_least, setting

# --------------------------------------------------------------------------- the command line
OLD_FLAGS = {  # every flag of v1's hand-kept table (7a836c8) -> the config field it sets
    "--dataset": "data.dataset", "--data-dir": "data.data_dir", "--val-size": "data.val_size", "--model": "model",
    "--method": "method", "--epochs": "optim.epochs", "--batch-size": "optim.batch_size",
    "--accum-steps": "optim.accum_steps", "--optimizer": "optim.optimizer", "--lr": "optim.lr",
    "--lr-reference-batch": "optim.lr_reference_batch", "--schedule": "optim.schedule",
    "--warmup-epochs": "optim.warmup_epochs", "--weight-decay": "optim.weight_decay", "--eps": "loss.eps",
    "--lam": "loss.lam", "--attack-steps": "loss.attack_steps", "--attack-step-size": "loss.attack_step_size",
    "--noise-std": "loss.noise_std", "--distance": "loss.distance", "--label-smoothing": "loss.label_smoothing",
    "--adv-fraction": "loss.adv_fraction", "--train-attack": "loss.attack", "--beta": "loss.beta",
    "--smoothing": "loss.label_smoothing", "--mixup-alpha": "loss.alpha", "--vat-eps": "loss.vat_eps",
    "--vat-xi": "loss.vat_xi", "--pair-layer": "loss.pair_layer", "--pair-target": "loss.pair_target",
    "--static-models": "static_models", "--overfit-guard": "overfit_guard", "--noise": "noise", "--device": "device",
    "--amp": "amp", "--amp-attacks": "amp_attacks", "--channels-last": "channels_last", "--compile": "compile",
    "--sync-bn": "sync_bn", "--ema-schedule": "ema_schedule", "--export-weights": "export_weights",
    "--workers": "data.workers", "--image-size": "data.image_size", "--skip-bad": "data.skip_bad",
    "--tensorboard": "tensorboard", "--log-every": "log_every", "--val-points": "val_points",
    "--val-suite": "val_suite", "--seed": "seed", "--checkpoint-every": "checkpoint_every", "--select": "select",
    "--on-nonfinite": "on_nonfinite", "--ema-decay": "ema_decay",
}  # fmt: skip
NAMED = {
    "model": "lenet",
    "method": "regular",
    "dataset": "mnist",
    "pair_layer": "net.3",
    "attack": "fgsm-rs",
    "device": "cuda:1",
}


def _configured(argv: list[str]) -> RunConfig:
    args = build_parser().parse_args(["train", *argv, "--out", "unused"])
    return make_config(None, config_overrides(args))


def _get(cfg: RunConfig, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _changed(cls: type, f: dataclasses.Field) -> tuple[list[str], Any]:
    """A valid value other than the default of field ``f`` of ``cls`` as arguments after its flag."""
    hint, default, check = typing.get_type_hints(cls)[f.name], f.default, f.metadata.get("check")
    if hint is bool:
        return [], not default
    if f.name in NAMED:
        return [NAMED[f.name]], NAMED[f.name]
    if check is not None and check.choices:
        other = next(c for c in check.choices if c != default)
        return [other], other
    if hint in (int, int | None):
        return [str((default or 0) + 1)], (default or 0) + 1
    if hint in (str, str | None):
        return ["x"], "x"
    value = 0.5 if not default else default / 2
    return [str(value)], value


def _cases() -> list[tuple[str, str, type, dataclasses.Field]]:
    """(method, section, class, field) for every field of the run, its sections and every method's settings."""
    cases = []
    for section in ("", "data", "optim"):
        cls = typing.get_type_hints(RunConfig)[section] if section else RunConfig
        cases += [("alp", section, cls, f) for f in dataclasses.fields(cls) if f.name not in ("data", "optim", "loss")]
    for method in METHODS.names():
        cls = METHODS.settings(method)
        cases += [(method, "loss", cls, f) for f in dataclasses.fields(cls)]
    return cases


@pytest.mark.parametrize("method, section, cls, f", _cases(), ids=lambda v: getattr(v, "name", str(v)))
def test_every_field_is_settable_by_its_flag(method, section, cls, f):
    values, expected = _changed(cls, f)
    option = "--" + f.name.replace("_", "-")
    flag = [option, *values] if values or expected else ["--no-" + option[2:]]
    extra = ["--pair-target", "both"] if f.name == "pair_layer" else []
    extra += ["--pair-layer", "net.3"] if f.name == "pair_target" else []
    method_args = [] if f.name == "method" else ["--method", method]
    cfg = _configured([*method_args, *flag, *extra])
    assert _get(cfg, f"{section}.{f.name}" if section else f.name) == expected


@pytest.mark.parametrize("flag", sorted(OLD_FLAGS))
def test_old_flags_still_work(flag):
    path = OLD_FLAGS[flag]
    section, name = path.split(".") if "." in path else ("", path)
    method = next((m for m in ("alp", "clp", "trades", "ls", "mixup", "vat") if section != "loss"
                   or name in accepted_keys(METHODS.settings(m))), "alp")  # fmt: skip
    cls = METHODS.settings(method) if section == "loss" else RunConfig
    if section in ("data", "optim"):
        cls = typing.get_type_hints(RunConfig)[section]
    values, expected = _changed(cls, {f.name: f for f in dataclasses.fields(cls)}[name])
    extra = ["--pair-target", "both"] if name == "pair_layer" else []
    extra += ["--pair-layer", "net.3"] if name == "pair_target" else []
    method_args = [] if name == "method" else ["--method", method]
    assert _get(_configured([*method_args, flag, *values, *extra]), path) == expected


def test_help_groups_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    flags = run_flags() + method_flags()
    fields = {(s + "." if s else "") + f.name for _, s, _, f in _cases()}
    assert len(flags) == len({f.path() for f in flags}) and {f.path() for f in flags} == fields
    for flag in flags:
        assert "(default: " in flag.help and "--" + flag.key.replace("_", "-") in text, flag.key
    for title in ("Optimiser and schedule:", "Device and speed:", "Method settings: TRADES (Zhang et al. 2019) (trades)",
                  "Method settings: Logit pairing: the distance and what it compares (alp, clp)"):  # fmt: skip
        assert title in text, title
    assert "--label-smoothing LABEL_SMOOTHING, --smoothing LABEL_SMOOTHING" in text
    assert "(default: 0.0; ls: 0.1)" in " ".join(text.split())
    assert "--attack ATTACK, --train-attack ATTACK" in text and "--momentum MOMENTUM" in text


# --------------------------------------------------------------------------- a method from elsewhere
@dataclass(frozen=True, kw_only=True)
class ToySettings(LossSettings):
    """A toy method of this test module."""

    gamma: float = setting(0.25, "weight γ of the toy's logit penalty", check=at_least(0), aliases=("toy_gamma",))
    squash: bool = setting(False, "clip the logits to [-1, 1] first")
    beta: float = setting(2.0, "the toy's β (TRADES has a β too)")
    seed: int = setting(3, "a setting named like a run-level field", check=Check(lambda v: v >= 0, ">= 0"))


def toy_loss(model: nn.Module, x: Tensor, y: Tensor, cfg: ToySettings, ctx: BatchContext) -> tuple[Tensor, dict]:
    logits = model(x)
    logits = logits.clamp(-1, 1) if cfg.squash else logits
    loss = cross_entropy(logits, y, cfg) + cfg.gamma * logits.pow(2).mean() + 0 * cfg.beta
    return loss, {"ce": loss.detach(), "acc": accuracy(logits, y)}


@pytest.fixture
def toy():
    METHODS.register("toy", settings=ToySettings)(toy_loss)
    yield
    METHODS.unregister("toy")


def test_a_method_registered_here_gets_its_flags(toy, tmp_path, data_dir, capsys):
    cfg = _configured(["--method", "toy", "--gamma", "1/2", "--squash", "--beta", "3", "--loss-seed", "5"])
    assert cfg.loss == ToySettings(gamma=0.5, squash=True, beta=3.0, seed=5) and cfg.seed == 0
    assert _configured(["--method", "toy", "--toy-gamma", "0.75"]).loss.gamma == 0.75
    assert _configured(["--method", "trades", "--beta", "3"]).loss.beta == 3.0
    with pytest.raises(ConfigError, match=r"loss.gamma \(a setting of toy\); valid keys for method 'alp'"):
        _configured(["--gamma", "1"])
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_ = " ".join(capsys.readouterr().out.split())
    assert "Method settings: A toy method of this test module (toy): --gamma GAMMA, --toy-gamma GAMMA" in help_
    assert "weight γ of the toy's logit penalty (default: 0.25)" in help_
    assert "--beta BETA toy: the toy's β (TRADES has a β too) (default: 2.0); trades: weight β of the KL" in help_
    assert "--seed SEED random seed (default: 0)" in help_ and "--loss-seed SEED a setting named like" in help_
    out = tmp_path / "run"
    argv = ["train", "--method", "toy", "--gamma", "0.5", "--data-dir", str(data_dir), "--val-size", "100",
            "--epochs", "1", "--batch-size", "100", "--val-points", "20", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "toy" and saved["loss"] == {**to_dict(ToySettings()), "gamma": 0.5}
    assert build(RunConfig, saved).loss == ToySettings(gamma=0.5)
