"""The evaluation protocol: exact per-example worst case, ordering, resumability, the public API."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import logitpair
from logitpair.attacks import ATTACKS
from logitpair.evaluation import SUITES, AttackSpec, get_suite, parse_attacks, run_protocol
from logitpair.threat import Linf


class FirstTen(nn.Module):
    """Logits are the first 10 input values; input value 10 carries the point's id."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]


def _points(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % 10
    x = torch.full((n, 1, 1, 11), 0.2)
    x[torch.arange(n), 0, 0, y] = 0.6
    x[:, 0, 0, 10] = torch.arange(n) / 100
    wrong = torch.tensor([3, 17])  # misclassified clean
    x[wrong, 0, 0, (y[wrong] + 1) % 10] = 0.9
    return x, y


def _breaker(ids: set[int], calls: list[list[int]]):
    def attack(model, x, y, *, threat, generator=None):
        pid = (x[:, 0, 0, 10] * 100).round().long()
        calls.append(pid.tolist())
        out = x.clone()
        hit = torch.tensor([int(p) in ids for p in pid])
        out[hit, 0, 0, y[hit]] = 0.2
        out[hit, 0, 0, (y[hit] + 2) % 10] = 0.65
        return threat.project(x, out)

    return attack


def test_worst_case_aggregation_is_exact(monkeypatch):
    calls_a: list[list[int]] = []
    calls_b: list[list[int]] = []
    monkeypatch.setitem(ATTACKS._items, "break-a", _breaker({0, 1, 2, 3, 20}, calls_a))
    monkeypatch.setitem(ATTACKS._items, "break-b", _breaker({2, 5, 6, 17, 21}, calls_b))
    x, y = _points()
    res = run_protocol(
        FirstTen(), x, y, [AttackSpec("break-a"), AttackSpec("break-b")], threat=Linf(0.5), batch_size=16
    )
    clean = torch.ones(40, dtype=torch.bool)
    clean[[3, 17]] = False
    assert torch.equal(res.clean_correct, clean)
    expected_robust = clean.clone()
    expected_robust[[0, 1, 2, 20, 5, 6, 21]] = False
    assert torch.equal(res.robust, expected_robust)
    broken = torch.full((40,), -1)
    broken[[0, 1, 2, 20]] = 0
    broken[[5, 6, 21]] = 1
    assert torch.equal(res.broken_by, broken)
    assert sorted(i for c in calls_a for i in c) == [i for i in range(40) if i not in (3, 17)]
    assert sorted(i for c in calls_b for i in c) == [i for i in range(40) if i not in (3, 17, 0, 1, 2, 20)]
    s = res.summary()
    assert s["robust"]["value"] == pytest.approx(31 / 40) and s["broken_by"] == {"break-a": 4, "break-b": 3}
    assert s["attacked"] == {"break-a": 38, "break-b": 34}, "points each attack ran on"


def test_interrupted_protocol_resumes_to_the_same_result(tmp_path, trained_model, tiny_data, monkeypatch):
    x, y = tiny_data[0][:120], tiny_data[1][:120]
    attacks = get_suite("pgd40")[:1] + [AttackSpec("square", {"queries": 30})]
    kw = {"threat": Linf(0.03), "batch_size": 40, "seed": 4, "keep_adversarial": True}
    full = run_protocol(trained_model, x, y, attacks, **kw)
    state = tmp_path / "state.safetensors"
    real = ATTACKS._items["square"]
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setitem(ATTACKS._items, "square", dying)
    with pytest.raises(KeyboardInterrupt):
        run_protocol(trained_model, x, y, attacks, state_path=state, **kw)
    monkeypatch.setitem(ATTACKS._items, "square", real)
    counted = {"n": 0}

    def counting(*a, **k):
        counted["n"] += 1
        return real(*a, **k)

    monkeypatch.setitem(ATTACKS._items, "square", counting)
    resumed = run_protocol(trained_model, x, y, attacks, state_path=state, **kw)
    assert counted["n"] <= 2, "the finished batch must not be attacked again"
    for field in ("clean_correct", "robust", "broken_by", "adversarial"):
        assert torch.equal(getattr(full, field), getattr(resumed, field)), field
    other = run_protocol(trained_model, x, y, attacks, state_path=state, **{**kw, "seed": 5})
    assert counted["n"] >= 3, "state from other settings must not be reused"
    del other


def test_public_evaluate_api(trained_model, tiny_data):
    x, y = tiny_data[0][:32], tiny_data[1][:32]
    res = logitpair.evaluate(trained_model, x, y, threat=Linf(0.05), suite="quick", baseline=True)
    s = res.summary()
    assert [a["name"] for a in s["attacks"]] == ["pgd", "apgd-ce", "apgd-t", "square"]
    assert s["robust"]["value"] <= s["clean"]["value"] and s["n"] == 32
    survived_pgd = res.clean_correct & (res.broken_by != 0)
    assert not (res.robust & ~survived_pgd).any()
    pgd_only = logitpair.evaluate(trained_model, x, y, threat=Linf(0.05), suite="pgd40")
    assert torch.equal(pgd_only.robust, survived_pgd), "the baseline runs first with the same seeds"


def test_suites_are_valid_and_ordered():
    for name, attacks in SUITES.items():
        assert attacks and all(a.name in ATTACKS for a in attacks), name
    # AutoAttack's standard version: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries)
    assert [a.name for a in get_suite("standard")] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert get_suite("standard")[1].params["n_target_classes"] == 9
    assert get_suite("standard")[2].params["n_target_classes"] == 9
    assert get_suite("standard")[3].params["queries"] == 5000
    specs = parse_attacks("apgd-ce:steps=50;restarts=2, square:queries=2000;p_init=0.8,fgsm")
    assert [(s.name, s.params) for s in specs] == [
        ("apgd-ce", {"steps": 50, "restarts": 2}), ("square", {"queries": 2000, "p_init": 0.8}), ("fgsm", {})
    ]  # fmt: skip
    with pytest.raises(ValueError, match="key=value"):
        parse_attacks("pgd:steps")


def test_targeted_protocol_reports_success_rate(trained_model, tiny_data):
    x, y = tiny_data[0][:64], tiny_data[1][:64]
    res = run_protocol(trained_model, x, y, get_suite("targeted")[:1], threat=Linf(0.2), targeted=True, top5=True)
    s = res.summary()
    assert (res.target != y).all()
    assert s["target_success"]["value"] > 0.8
    assert s["robust_top5"]["value"] >= s["robust"]["value"]
    with pytest.raises(ValueError, match="no targeted mode"):
        run_protocol(trained_model, x, y, get_suite("standard"), threat=Linf(0.2), targeted=True)


def test_wilson_interval_ends_are_exact_and_match_the_formula():
    """k = 0 gives a lower end of exactly 0 and k = n an upper end of exactly 1 (round-off used to
    leave ~1e-18); inside, the interval is Wilson's: centre ± half-width, which contains k / n."""
    from logitpair.metrics import wilson_interval

    assert wilson_interval(0, 200)[0] == 0.0 and wilson_interval(200, 200)[1] == 1.0
    z, n, k = 1.959963984540054, 100, 30
    centre = (k / n + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (k / n * (1 - k / n) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(centre - half) and high == pytest.approx(centre + half)
    assert low < k / n < high and (round(low, 3), round(high, 3)) == (0.219, 0.396)
