"""The gradient-masking audit: every check fails on a deliberately masked model and passes on
a plain trained one.

The masked models wrap the session's small trained CNN (conftest ``trained_model``):

- ``Quantised``: ``round(4x) / 4`` in front, with a zero gradient (a non-differentiable
  front end): gradient attacks are stuck at their random start, while random noise,
  Square and transfer from another model still break it.
- ``Scaled``: logits x 1e4, so the float32 softmax saturates and CE gradients are exactly 0.
- ``RandomFlip``: each forward answers a random class with a huge logit for 5% of the
  examples (a randomised model, seeded for reproducible tests).
- ``NoisyInput``: Gaussian noise added to the input at every call.
- ``Rugged``: ``x + a sin(w x)``: a tiny change of the input whose gradient sign flips
  within every period (shattered gradients): small PGD steps stall, one big FGSM step works.
- ``Memoriser``: once the input is further than tau (L-inf) from the evaluated points it
  answers the nearest point's label with a constant (zero-gradient) output: accuracy rises
  with eps.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_images, train_small_cnn
from torch import Tensor, nn

from logitpair.audit import CHECK_DOCS, CHECK_NAMES, AuditSettings, audit, audit_run, paired_rise
from logitpair.audit.checks import CHECKS, RUN_ORDER
from logitpair.audit.store import AttackCrashed, RunStore
from logitpair.errors import ConfigError
from logitpair.evaluation import AttackSpec
from logitpair.evaluation.spec import pgd_spec
from logitpair.progress import Bar, null_progress
from logitpair.threat import Linf

SMALL = AuditSettings(
    suite=(
        AttackSpec("apgd-ce", {"steps": 20}, "APGD-CE"),
        AttackSpec("apgd-t", {"steps": 20, "n_target_classes": 2}, "APGD-T"),
        AttackSpec("square", {"queries": 300}, "Square"),
    ),
    eps_factors=(0.5, 1.0, 2.0),
    sweep_steps=10,
    steps_series=(10, 40, 100),
    restarts_series=(1, 4),
    restarts_steps=10,
    noise_samples=10,
    surface_points=2,
    surface_grid=7,
)


@pytest.fixture(scope="module")
def points() -> tuple[Tensor, Tensor]:
    """100 held-out points of the tiny synthetic task."""
    imgs, labels = make_images(100, 99)
    return torch.from_numpy(imgs).float().div(255).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


@pytest.fixture(scope="module")
def source_model(tiny_data: tuple[Tensor, Tensor]) -> nn.Module:
    """A second, independently initialised CNN (the transfer source)."""
    return train_small_cnn(*tiny_data, seed=1)


# --------------------------------------------------------------------------- masked models
class _ZeroGradRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, levels: int) -> Tensor:
        return torch.round(x * levels) / levels

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return torch.zeros_like(grad), None


class Quantised(nn.Module):
    def __init__(self, base: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.base, self.levels = base, levels

    def forward(self, x: Tensor) -> Tensor:
        return self.base(_ZeroGradRound.apply(x, self.levels))


class Scaled(nn.Module):
    def __init__(self, base: nn.Module, scale: float = 1e4) -> None:
        super().__init__()
        self.base, self.scale = base, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) * self.scale


class RandomFlip(nn.Module):
    def __init__(self, base: nn.Module, p: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        self.base, self.p, self.gen = base, p, torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        z = self.base(x)
        flip = torch.rand(len(x), generator=self.gen) < self.p
        fake = F.one_hot(torch.randint(0, z.shape[1], (len(x),), generator=self.gen), z.shape[1]).to(z.dtype) * 50
        return torch.where(flip[:, None], fake, z)


class NoisyInput(nn.Module):
    def __init__(self, base: nn.Module, std: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.base, self.std, self.gen = base, std, torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        return self.base((x + self.std * torch.randn(x.shape, generator=self.gen)).clamp(0, 1))


class Rugged(nn.Module):
    def __init__(self, base: nn.Module, period: float, ratio: float = 1.2) -> None:
        super().__init__()
        self.base, self.w = base, 2 * math.pi / period
        self.a = ratio / self.w  # amplitude: a * w > 1, so x + a sin(w x) is not monotone

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x + self.a * torch.sin(self.w * x))


class Memoriser(nn.Module):
    def __init__(self, base: nn.Module, xs: Tensor, ys: Tensor, tau: float) -> None:
        super().__init__()
        self.base, self.tau = base, tau
        self.register_buffer("xs", xs.flatten(1).clone())
        self.register_buffer("ys", ys.clone())

    def forward(self, x: Tensor) -> Tensor:
        z = self.base(x)
        with torch.no_grad():
            flat = x.detach().flatten(1)
            j = torch.cdist(flat, self.xs).argmin(1)
            far = (flat - self.xs[j]).abs().amax(1) > self.tau
            memo = F.one_hot(self.ys[j], z.shape[1]).to(z.dtype) * 10
        return torch.where(far[:, None], memo, z)


# (name, eps, wrap(base, x, y), checks that must fail, give a source model)
MASKED = [
    (
        "quantised",
        0.3,
        lambda m, x, y: Quantised(m),
        {
            "gradient_health",
            "large_eps_zero",
            "noise_not_stronger",
            "transfer_not_stronger",
            "square_not_stronger",
            "baseline_gap",
        },
        True,
    ),
    (
        "logit-scale-1e4",
        0.025,
        lambda m, x, y: Scaled(m),
        {"gradient_health", "large_eps_zero", "baseline_gap"},
        False,
    ),
    (
        "random-flip",
        0.05,
        lambda m, x, y: RandomFlip(m),
        {"deterministic_forward", "more_restarts_no_better", "more_steps_no_better", "fgsm_not_stronger"},
        False,
    ),
    ("noisy-input", 0.05, lambda m, x, y: NoisyInput(m), {"deterministic_forward"}, False),
    (
        "rugged",
        0.1,
        lambda m, x, y: Rugged(m, 0.1 / 5.5),
        {"more_steps_no_better", "fgsm_not_stronger"},
        False,
    ),
    ("memoriser", 0.05, lambda m, x, y: Memoriser(m, x, y, 0.075), {"eps_monotone", "large_eps_zero"}, False),
]


def test_every_check_has_a_doc_and_a_masked_model_that_fails_it():
    assert set(CHECK_DOCS) == set(CHECK_NAMES)
    assert set().union(*(m[3] for m in MASKED)) == set(CHECK_NAMES)


def test_plain_model_passes_and_modes_are_restored(trained_model, points, source_model):
    x, y = points
    model = nn.Sequential(trained_model).train()  # no BatchNorm or dropout: same function, train flag set
    rep = audit(model, x, y, threat=Linf(0.02), source=source_model, settings=SMALL)
    assert rep.verdict == "pass", rep.reasons
    assert [c.name for c in rep.checks] == list(CHECK_NAMES)
    assert all(c.passed is True for c in rep.checks), [(c.name, c.detail) for c in rep.checks if c.passed is not True]
    assert rep.reasons == []
    assert model.training and not source_model.training
    assert all(not p.grad_fn and p.requires_grad for p in model.parameters())
    assert [r["eps"] for r in rep.curves["eps"]] == pytest.approx([0, 0.01, 0.02, 0.04, 0.5])
    assert [r["steps"] for r in rep.curves["steps"]] == [10, 40, 100]
    assert len(rep.surfaces) == 2 and len(rep.surfaces[0]["loss"]) == 7
    sm = rep.summary
    assert sm["worst_case_all"]["value"] <= sm["suite_worst_case"]["value"] <= sm["baseline"]["value"]
    assert sm["baseline"]["value"] <= sm["clean"]["value"]


@pytest.mark.parametrize("name,eps,wrap,must_fail,with_source", MASKED, ids=[m[0] for m in MASKED])
def test_masked_model_is_suspect(trained_model, points, source_model, name, eps, wrap, must_fail, with_source):
    x, y = points
    masked = wrap(trained_model, x, y).eval()
    rep = audit(masked, x, y, threat=Linf(eps), source=source_model if with_source else None, settings=SMALL)
    failed = {c.name for c in rep.checks if c.passed is False}
    assert must_fail <= failed, {c.name: c.detail for c in rep.checks}
    assert rep.verdict == "suspect"
    assert len(rep.reasons) == len(failed) and all(r.split(":")[0] in failed for r in rep.reasons)
    if not with_source:
        transfer = rep.check("transfer_not_stronger")
        assert transfer.passed is None and transfer.status == "skipped" and "source" in transfer.detail


def test_paired_tolerance_rule():
    ref = torch.tensor([True] * 50 + [False] * 50)
    same = paired_rise(ref, ref.clone())
    assert same["rise"] == 0 and not same["exceeded"] and same["tolerance"] == pytest.approx(0.01)
    new = ref.clone()
    new[50:54] = True  # 4 extra robust points: 4% rise but 2 * sqrt(4) / 100 = 4% tolerance
    assert not paired_rise(ref, new)["exceeded"]
    new[54] = True  # 5 extra: 5% > 2 * sqrt(5) / 100 = 4.47%
    r = paired_rise(ref, new)
    assert r["exceeded"] and r["only_new"] == 5 and r["only_ref"] == 0
    swapped = ref.clone()
    swapped[:10] = False
    swapped[50:60] = True  # 10 changed each way: no net rise
    assert paired_rise(ref, swapped)["rise"] == 0 and not paired_rise(ref, swapped)["exceeded"]


# --------------------------------------------------------------------------- order and the keyed store
# A weak baseline (PGD-2) and a suite of Square only: the PGD runs of the series then break
# points the baseline missed, so the reference of noise/transfer/square ("the gradient attacks")
# changed with the order of the checks when they read whatever earlier checks had cached.
WEAK = replace(SMALL, baseline=pgd_spec(2, 1), suite=(AttackSpec("square", {"queries": 300}, "Square"),))


@pytest.mark.parametrize("name,eps,wrap", [("plain", 0.05, lambda m: m), ("quantised", 0.3, Quantised)])
def test_check_order_does_not_change_the_report(trained_model, points, source_model, name, eps, wrap):
    """The reversed order and five seeded random permutations give the same checks JSON, summary,
    curves and attack runs as the default order."""
    x, y = points
    model = wrap(trained_model).eval()

    def report(order: tuple[str, ...]) -> tuple:
        rep = audit(model, x, y, threat=Linf(eps), source=source_model, settings=WEAK, order=order).to_dict()
        return rep["checks"], rep["summary"], rep["curves"], sorted(rep["settings"]["timings"])

    assert set(CHECKS) == set(RUN_ORDER) == set(CHECK_NAMES)
    ref = report(RUN_ORDER)
    noise = next(c for c in ref[0] if c["name"] == "noise_not_stronger")
    assert noise["data"]["reference_accuracy"] < ref[1]["baseline"]["value"]  # the series' PGD runs count
    orders = [RUN_ORDER[::-1], *(tuple(random.Random(seed).sample(RUN_ORDER, len(RUN_ORDER))) for seed in range(5))]
    for order in orders:
        assert report(order) == ref, order


def test_audit_rejects_an_order_that_is_not_a_permutation(trained_model, points):
    x, y = points
    with pytest.raises(ConfigError, match="order"):
        audit(trained_model, x, y, threat=Linf(0.02), settings=SMALL, order=RUN_ORDER[1:])


class _Fails(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("boom")


def test_run_store_computes_each_key_once_and_keeps_crashes(trained_model, points):
    x, y = points[0][:20], points[1][:20]
    calls: list[str] = []

    def progress(total: int, desc: str) -> Bar:  # counts the runs: run_protocol opens one bar per run
        calls.append(desc)
        return null_progress(total, desc)

    runs = RunStore(trained_model, x, y, threat=Linf(0.05), progress=progress)
    fgsm = [AttackSpec("fgsm", {}, "FGSM")]
    first = runs.get(fgsm, 0.05, 0, "a")
    assert runs.get(fgsm, 0.05, 0, "b") is first and calls == ["a"]
    assert runs.key(fgsm, 0.05, 0) != runs.key(fgsm, 0.05, 1) != runs.key(fgsm, 0.1, 0)
    assert runs.key(fgsm, 0.05, 0) != RunStore(trained_model, x[:10], y[:10], threat=Linf(0.05)).key(fgsm, 0.05, 0)
    runs.get(fgsm, 0.1, 0, "c")
    assert calls == ["a", "c"] and len(runs.keys()) == 2
    broken = RunStore(_Fails(), x, y, threat=Linf(0.05))
    for _ in range(2):
        with pytest.raises(AttackCrashed, match="boom"):
            broken.get(fgsm, 0.05, 0, "crash")
    assert len(broken.keys()) == 1


# --------------------------------------------------------------------------- run directory + CLI
def test_audit_run_writes_json_markdown_and_plots(tiny_run):
    doc = audit_run(tiny_run, n=30, settings=SMALL, write=True)
    assert doc["verdict"] in ("pass", "suspect") and doc["n"] == 30 and doc["eps"] == pytest.approx(0.1)
    assert [c["name"] for c in doc["checks"]] == list(CHECK_NAMES)
    assert all(c["passed"] in (True, False, None) for c in doc["checks"])
    assert doc["method"] == "regular" and doc["settings"]["n"] == 30
    on_disk = json.loads((tiny_run / "audit.json").read_text())
    assert on_disk["verdict"] == doc["verdict"] and on_disk["checks"] == doc["checks"]
    md = (tiny_run / "audit.md").read_text()
    assert "Verdict" in md and "eps_monotone" in md and "## Tolerance" in md
    assert "### `transfer_not_stronger`" in md  # skipped (no source): its doc section explains it
    for name in ("audit_eps.png", "audit_steps.png", "audit_restarts.png", "audit_surface.png"):
        assert (tiny_run / name).read_bytes()[:4] == b"\x89PNG", name
    assert sorted(doc["plots"]) == sorted(
        ["audit_eps.png", "audit_steps.png", "audit_restarts.png", "audit_surface.png"]
    )


def test_cli_audit_json(tiny_run, capsys):
    from logitpair.cli import main

    rc = main(["audit", str(tiny_run), "--quick", "--n", "12", "--seed", "1", "--json", "--quiet"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] in ("pass", "suspect") and doc["n"] == 12 and doc["settings"]["seed"] == 1
    assert doc["settings"]["suite"] == "quick" and doc["settings"]["quick"] is True
    by_name = {c["name"]: c for c in doc["checks"]}
    assert set(by_name) == set(CHECK_NAMES)
    assert by_name["transfer_not_stronger"]["passed"] is None
    assert (doc["verdict"] == "suspect") == any(c["passed"] is False for c in doc["checks"])


def test_cli_audit_errors(tiny_run, tmp_path, capsys):
    from logitpair.cli import main

    assert main(["audit", str(tmp_path / "missing"), "--quiet"]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["audit", str(tiny_run), "--n", "0", "--quiet"]) == 2
    assert "--n" in capsys.readouterr().err
    assert main(["audit", str(tiny_run), "--quick", "--suite", "bogus", "--quiet"]) == 2
    assert "unknown suite 'bogus'; valid suites: quick, standard" in capsys.readouterr().err
    assert main(["audit", str(tiny_run), "--quick", "--restarts", "0", "--quiet"]) == 2
    assert "--restarts: expected >= 1, got 0" in capsys.readouterr().err


def test_cli_audit_eps_suite_and_baseline_flags(tiny_run, capsys):
    """--eps, --suite and the baseline flags reach the checks (the paper's PGD-40: one start, step eps/30)."""
    from logitpair.cli import main

    argv = ["audit", str(tiny_run), "--quick", "--n", "10", "--eps", "3/100", "--suite", "pgd40"]
    rc = main([*argv, "--steps", "40", "--restarts", "1", "--step-size", "0.001", "--json", "--quiet"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["eps"] == pytest.approx(0.03) and doc["settings"]["suite"] == "pgd40"
    assert doc["settings"]["baseline"]["params"] == {"steps": 40, "restarts": 1, "step_size": 0.001}
    gap = next(c for c in doc["checks"] if c["name"] == "baseline_gap")
    assert gap["detail"].startswith("PGD-40 ")  # one start: no "x2" in the label
