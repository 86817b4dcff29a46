"""The `fast` suite and the protocol's gates (logitpair.evaluation.gates)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from logitpair.attacks import ATTACKS
from logitpair.errors import ConfigError
from logitpair.evaluation import SUITES, AttackSpec, get_suite, run_protocol
from logitpair.evaluation.gates import BatchSignals, Gate, has_gates, margin, split_params
from logitpair.threat import Linf


class Scaled(nn.Module):
    """Logits = the first 4 input values times ``scale`` (the margin is readable from the input)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.flatten(1)[:, :4]


def _points(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 everywhere: logit 0 at 0.6, the others at 0.2 (clean margin 0.4 before scaling)."""
    x = torch.full((n, 1, 1, 5), 0.2)
    x[:, 0, 0, 0] = 0.6
    x[:, 0, 0, 4] = torch.arange(n) / 100  # the point's id
    return x, torch.zeros(n, dtype=torch.long)


def _ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 4] * 100).round().long().tolist()


def _mover(left: dict[int, float]):
    """A 'gradient' attack that moves point i so that a fraction ``left[i]`` of its margin remains."""

    def attack(model, x, y, *, threat, generator=None, **kw):
        out = x.clone()
        for row, pid in enumerate(_ids(x)):
            out[row, 0, 0, 1] = 0.6 - 0.4 * left.get(pid, 1.0)
        return threat.project(x, out)

    return attack


def _spy(calls: list[list[int]]):
    def attack(model, x, y, *, threat, generator=None, **kw):
        calls.append(_ids(x))
        return x.clone()

    return attack


def test_near_gate_runs_the_attack_only_where_the_margin_is_small(monkeypatch):
    left = {0: 0.05, 1: 0.3, 2: 0.49, 3: 0.51, 4: 0.9}  # the others: not moved at all (1.0)
    calls: list[list[int]] = []
    monkeypatch.setitem(ATTACKS._items, "move", _mover(left))
    monkeypatch.setitem(ATTACKS._items, "spy", _spy(calls))
    x, y = _points()
    attacks = [AttackSpec("move"), AttackSpec("spy", {"gate": "near", "max_margin": 0.5})]
    for scale in (1.0, 0.01):  # invariant to the logit scale (logit squeezing)
        calls.clear()
        res = run_protocol(Scaled(scale), x, y, attacks, threat=Linf(0.5), batch_size=5)
        assert sorted(i for c in calls for i in c) == [0, 1, 2]
        assert res.robust.all()


def test_masking_gate_fires_on_each_signal(monkeypatch):
    calls: list[list[int]] = []
    monkeypatch.setitem(ATTACKS._items, "spy", _spy(calls))
    monkeypatch.setitem(ATTACKS._items, "move", _mover({i: 0.5 for i in range(12)}))
    monkeypatch.setitem(ATTACKS._items, "still", _mover({}))  # a gradient attack that never moves: flat
    x, y = _points()
    gated = AttackSpec("spy", {"gate": "masking"}, "gated")
    run_protocol(Scaled(), x, y, [AttackSpec("move"), gated], threat=Linf(0.5))
    assert calls == [], "healthy gradients and no gradient-free success: the gated attack must not run"
    run_protocol(Scaled(), x, y, [AttackSpec("still"), gated], threat=Linf(0.5))
    assert sorted(calls[-1]) == list(range(12)), "flat gradients must fire the signal"
    calls.clear()
    # a gradient-free attack that breaks what the gradient attack left: the signal fires for that batch only
    breaks = {3}

    def square_like(model, x, y, *, threat, generator=None, **kw):
        out = x.clone()
        for row, pid in enumerate(_ids(x)):
            if pid in breaks:
                out[row, 0, 0, 2] = 0.7
        return threat.project(x, out)

    monkeypatch.setitem(ATTACKS._items, "square", square_like)
    res = run_protocol(
        Scaled(), x, y, [AttackSpec("move"), AttackSpec("square", {}, "short"), gated], threat=Linf(0.5), batch_size=6
    )
    assert res.broken_by[3] == 1 and int((res.broken_by >= 0).sum()) == 1
    assert calls == [[0, 1, 2, 4, 5]], "only the batch where Square broke a point escalates"


def test_signals_track_the_best_margin():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 1])
    s = BatchSignals.start(logits, y)
    assert torch.equal(margin(logits, y), torch.tensor([1.0, 2.0]))
    s.update("apgd-ce", torch.tensor([1]), torch.tensor([[0.0, 2.0, 1.5]]), y[1:], torch.tensor([False]))
    assert torch.allclose(s.remaining(), torch.tensor([1.0, 0.25]))
    assert s.masking() == {
        "gradient_free_broke": False, "gradient_free_ahead": False, "flat_gradients": False, "nonfinite": False
    }  # fmt: skip
    s.update("square", torch.tensor([0]), torch.tensor([[float("nan"), 0.0, 0.0]]), y[:1], torch.tensor([False]))
    assert s.masking()["nonfinite"]


def test_one_lucky_square_success_in_a_large_batch_does_not_fire():
    """Signal 1 is AutoAttack's check_square_sr: more than 0.2% of the batch, not any single point."""
    n = 1000
    logits = torch.tensor([[2.0, 0.0]]).repeat(n, 1)
    y = torch.zeros(n, dtype=torch.long)
    s = BatchSignals.start(logits, y)
    moved = torch.tensor([[1.0, 0.5]]).repeat(n, 1)
    s.update("apgd-ce", torch.arange(n), moved, y, torch.zeros(n, dtype=torch.bool))
    broke = torch.zeros(n, dtype=torch.bool)
    broke[:2] = True  # 2 of 1000 = 0.2%: not more than the rate
    s.update("square", torch.arange(n), moved, y, broke)
    assert not s.masking()["gradient_free_broke"]
    s.update("square", torch.arange(n), moved, y, broke[:1].repeat(n) & (torch.arange(n) == 5))
    assert s.masking()["gradient_free_broke"], "3 of 1000 is more than 0.2%"
    assert not s.masking(square_rate=0.01)["gradient_free_broke"]


def test_gate_settings_are_checked():
    assert split_params({"steps": 5}) == ({"steps": 5}, None)
    assert split_params({"steps": 5, "gate": "near", "max_margin": 0.3}) == ({"steps": 5}, Gate("near", max_margin=0.3))
    spec = AttackSpec("apgd-ce", {"steps": 5, "gate": "near", "max_margin": 0.3})  # the --attacks syntax
    assert spec.params == {"steps": 5} and spec.gate == Gate("near", max_margin=0.3), "gate keys leave the params"
    assert spec.to_dict()["gate"] == {"kind": "near", "max_margin": 0.3}
    with pytest.raises(ConfigError, match="twice"):
        AttackSpec("apgd-ce", {"gate": "masking"}, gate=Gate("near", max_margin=0.3))
    for bad in (
        {"gate": "far"},
        {"gate": "near"},
        {"gate": "near", "max_margin": 0},
        {"gate": "masking", "min_flat": 2},
        {"gate": "masking", "square_rate": 1.5},
        {"gate": "masking", "min_ahead": 0},
        {"gate": "escalate", "min_yield": 0},
        {"gate": "escalate", "min_broken": 0},
        {"gate": "near", "max_margin": 0.5, "stalled": -1},
        {"warm": "yes"},
    ):
        with pytest.raises(ConfigError):
            split_params(bad)


def test_only_the_fast_suite_is_gated(monkeypatch):
    assert has_gates(get_suite("fast"))
    assert not any(has_gates(list(specs)) for name, specs in SUITES.items() if name != "fast")
    started = []
    real = BatchSignals.start
    monkeypatch.setattr(BatchSignals, "start", classmethod(lambda cls, *a: started.append(1) or real(*a)))
    x, y = _points(4)
    run_protocol(Scaled(), x, y, get_suite("pgd40"), threat=Linf(0.1))
    assert not started, "suites without gates must not build signals"


def test_fast_is_not_weaker_than_quick(trained_model, tiny_data):
    x, y = tiny_data[0][:200], tiny_data[1][:200]
    kw = {"threat": Linf(0.04), "seed": 0}
    fast = run_protocol(trained_model, x, y, get_suite("fast"), **kw)
    quick = run_protocol(trained_model, x, y, get_suite("quick"), **kw)
    clean = fast.clean_correct.float().mean()
    assert 0.1 < quick.robust.float().mean() < clean - 0.1, "eps should leave an intermediate accuracy"
    assert fast.robust.float().mean() <= quick.robust.float().mean() + 0.02  # 4 of 200 points


def test_fast_escalates_to_long_square_when_gradients_are_masked(trained_model, tiny_data, monkeypatch):
    class Rounded(nn.Module):
        """Inputs rounded to 1/8 steps: zero input gradients everywhere (gradient masking)."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(torch.round(x * 8) / 8)

    queries: list[int] = []
    real = ATTACKS._items["square"]

    def counting_square(*a, **k):
        queries.append(k["queries"])
        return real(*a, **k)

    monkeypatch.setitem(ATTACKS._items, "square", counting_square)
    x, y = tiny_data[0][:100], tiny_data[1][:100]
    specs = get_suite("fast")
    long_q = max(s.params["queries"] for s in specs if s.name == "square")
    res = run_protocol(Rounded(trained_model), x, y, specs, threat=Linf(0.1), seed=0)
    assert long_q in queries, "masked gradients must escalate to the long Square run"
    labels = [a.label for a in res.attacks]
    assert res.summary()["broken_by"][labels[-1]] >= 0
    queries.clear()
    run_protocol(trained_model, x, y, specs, threat=Linf(0.04), seed=0)
    assert long_q not in queries, "a healthy model needs no long Square run"


class Saturated(nn.Module):
    """Logits times 1,000 (defensive distillation at test time): the same decisions, but the
    cross-entropy of a confidently classified point is exactly flat in float32."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1000.0 * self.net(x)


def test_fast_is_not_fooled_by_vanishing_gradients(trained_model, tiny_data):
    """APGD-CE cannot move a saturated model; the old gates then skipped every targeted attack
    (126 of 200 robust against 96 for the same decisions unscaled). A stalled point must be
    attacked on (the scale-invariant targeted DLR loss still works), not declared safe."""
    x, y = tiny_data[0][:200], tiny_data[1][:200]
    kw = {"threat": Linf(0.04), "seed": 0}
    plain = run_protocol(trained_model, x, y, get_suite("fast"), **kw)
    sat = run_protocol(Saturated(trained_model), x, y, get_suite("fast"), **kw)
    assert torch.equal(plain.clean_correct, sat.clean_correct)
    assert 0.2 < plain.robust.float().mean() < plain.clean_correct.float().mean() - 0.2
    assert sat.robust.float().mean() <= plain.robust.float().mean() + 0.02  # 4 of 200 points
    by_apgd_ce = next(iter(sat.summary()["broken_by"].values()))
    assert by_apgd_ce <= 5, "APGD-CE must indeed be stuck on the saturated model"


def test_stalled_points_are_attacked_on(monkeypatch):
    left = {0: 0.05, 1: 0.5, 2: 0.7, 3: 0.95}  # the others: not moved at all (1.0)
    calls: list[list[int]] = []
    monkeypatch.setitem(ATTACKS._items, "move", _mover(left))
    monkeypatch.setitem(ATTACKS._items, "spy", _spy(calls))
    x, y = _points()
    gated = AttackSpec("spy", {"gate": "near", "max_margin": 0.6, "stalled": 0.9})
    run_protocol(Scaled(), x, y, [AttackSpec("move"), gated], threat=Linf(0.5))
    assert sorted(i for c in calls for i in c) == [0, 1, 3, *range(4, 12)], "near (< 0.6) or stalled (>= 0.9)"


def test_escalate_gate_fires_on_a_high_yield_only(monkeypatch):
    calls: list[list[int]] = []
    monkeypatch.setitem(ATTACKS._items, "move", _mover({i: 0.2 for i in range(12)}))
    monkeypatch.setitem(ATTACKS._items, "spy", _spy(calls))
    x, y = _points()

    def breaker(ids: set[int]):
        def attack(model, x, y, *, threat, generator=None, **kw):
            out = x.clone()
            for row, pid in enumerate(_ids(x)):
                if pid in ids:
                    out[row, 0, 0, 1] = 0.7
            return threat.project(x, out)

        return attack

    near = {"gate": "near", "max_margin": 0.5}
    escalate = AttackSpec("spy", {"gate": "escalate", "min_yield": 0.3, "min_broken": 2})
    monkeypatch.setitem(ATTACKS._items, "brk", breaker({0, 1, 2, 3}))  # 4 of 12 near points: 33%
    run_protocol(Scaled(), x, y, [AttackSpec("move"), AttackSpec("brk", near), escalate], threat=Linf(0.5))
    assert sorted(calls[0]) == list(range(4, 12)), "a high yield escalates on every point left"
    calls.clear()
    monkeypatch.setitem(ATTACKS._items, "brk", breaker({0, 1}))  # 2 of 12: 17%
    run_protocol(Scaled(), x, y, [AttackSpec("move"), AttackSpec("brk", near), escalate], threat=Linf(0.5))
    assert calls == [], "a low yield does not"
    s = BatchSignals.start(torch.tensor([[1.0, 0.0]]).repeat(10, 1), torch.zeros(10, dtype=torch.long))
    s.update("apgd-t", torch.arange(10), torch.tensor([[0.0, 1.0]]).repeat(10, 1), torch.zeros(10, dtype=torch.long),
             torch.ones(10, dtype=torch.bool), gate="near")  # fmt: skip
    assert s.escalating() and not s.escalating(min_broken=11)


def test_gradient_free_ahead_of_the_gradients_fires_the_masking_gate():
    n = 100
    y = torch.zeros(n, dtype=torch.long)
    s = BatchSignals.start(torch.tensor([[2.0, 0.0]]).repeat(n, 1), y)
    s.update("apgd-ce", torch.arange(n), torch.tensor([[1.8, 0.0]]).repeat(n, 1), y, torch.zeros(n, dtype=torch.bool))
    further = torch.tensor([[1.8, 0.0]]).repeat(n, 1)
    further[:4, 1] = 0.5  # Square got further than APGD-CE on 4 of 100 points: below 5%
    s.update("square", torch.arange(n), further, y, torch.zeros(n, dtype=torch.bool))
    assert not s.masking()["gradient_free_ahead"]
    further[4, 1] = 0.5
    s.update("square", torch.arange(n), further, y, torch.zeros(n, dtype=torch.bool))
    assert s.masking()["gradient_free_ahead"], "5 of 100 points"
    assert not s.masking()["flat_gradients"]


def test_warm_apgd_t_starts_where_asked_and_targets_the_drift(trained_model, tiny_data):
    from logitpair.attacks import apgd_ce, apgd_t

    x, y = tiny_data[0][:32], tiny_data[1][:32]
    threat = Linf(0.03)
    moved = apgd_ce(trained_model, x, y, threat=threat, steps=5, generator=torch.Generator().manual_seed(0))
    trace: dict = {}
    apgd_t(trained_model, x, y, threat=threat, steps=3, n_target_classes=1, rank_by=moved, init=moved, trace=trace)
    run = trace["runs"][0]
    idx = run["index"]
    with torch.no_grad():
        at_moved = trained_model(moved[idx]).scatter(1, y[idx, None], -float("inf"))
        at_clean = trained_model(x[idx]).scatter(1, y[idx, None], -float("inf"))
    assert torch.equal(run["target"], at_moved.argmax(1)), "targets ranked by the logits at rank_by"
    assert not torch.equal(at_clean.argmax(1), at_moved.argmax(1)), "the drift must change some target here"
    loss0 = run["loss"][0]  # the loss at the start point of the run
    from logitpair.attacks.apgd import dlr_targeted_loss

    with torch.no_grad():
        expected = dlr_targeted_loss(trained_model(moved[idx]), y[idx], run["target"])
    assert torch.allclose(loss0, expected), "the first run starts at init"
    with pytest.raises(ConfigError, match="shape"):
        apgd_t(trained_model, x, y, threat=threat, steps=2, rank_by=moved[:3])
