"""The demo's ε-curve (the fast suite, survivors only) and its example grid's captions."""

from __future__ import annotations

import itertools

import pytest
import torch

from logitpair.data.mnist import FASHION_CLASSES
from logitpair.evaluation import get_suite
from logitpair.experiments import demo
from logitpair.experiments.demo import eps_curve
from logitpair.report import grid_captions, plot_image_grid


def test_grid_captions_name_the_true_and_predicted_class():
    y, pred = torch.tensor([0, 9, 3]), torch.tensor([0, 7, 3])
    assert grid_captions(y, pred, FASHION_CLASSES) == [
        ("true T-shirt/top\npred T-shirt/top", True),
        ("true Ankle boot\npred Sneaker", False),
        ("true Dress\npred Dress", True),
    ]
    assert grid_captions(torch.tensor([1]), torch.tensor([12]), ("a", "b")) == [("true b\npred 12", False)]
    assert grid_captions(torch.tensor([4]), torch.tensor([4])) == [("true 4\npred 4", True)], "no names: indices"


def test_grid_with_captions_is_drawn(tmp_path):
    x = torch.rand(3, 1, 8, 8)
    xa = (x + 0.05).clamp(0, 1)
    caps = grid_captions(torch.tensor([0, 1, 2]), torch.tensor([0, 5, 2]), FASHION_CLASSES)
    plot_image_grid(tmp_path / "grid.png", {"m": (x, xa)}, 0.1, n=3, captions={"m": (caps, caps)})
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_eps_curve_runs_the_fast_suite_on_survivors_and_never_rises(monkeypatch, trained_model, tiny_data):
    x, y = tiny_data[0][:24], tiny_data[1][:24]
    calls = []
    real = demo.run_protocol

    def recording(model, xs, ys, attacks, **kw):
        calls.append((len(xs), attacks, kw["threat"].eps))
        return real(model, xs, ys, attacks, **kw)

    monkeypatch.setattr(demo, "run_protocol", recording)
    eps_values = [0.3, 0.0, 0.05, 0.1]
    curve = eps_curve(trained_model, x, y, eps_values)
    assert [r["eps"] for r in curve] == [0.0, 0.05, 0.1, 0.3]
    assert calls and all(attacks == get_suite("fast") for _, attacks, _ in calls), "the fast suite, not PGD-20"
    clean = (trained_model(x).argmax(1) == y).float().mean().item()
    assert curve[0]["value"] == pytest.approx(clean) and curve[0]["n"] == 24
    values = [r["value"] for r in curve]
    assert all(a >= b for a, b in itertools.pairwise(values)), values
    assert curve[-1]["value"] < clean, "the attacks break points at eps 0.3"
    survivors = [round(r["value"] * 24) for r in curve]
    assert [n for n, _, _ in calls] == [k for k in survivors[:-1] if k > 0][: len(calls)], "only survivors attacked"
