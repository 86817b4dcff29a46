"""Evaluation fixes (issue 17): top-k success, targeted persistence, eval-mode scoring, no silent
defaults for what a figure depends on. Each test here fails on the code before the fix."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import logitpair
from logitpair.attacks import ATTACK_INFO, ATTACKS, AttackInfo
from logitpair.errors import ConfigError
from logitpair.evaluation import AttackSpec, EvalOptions, evaluate_run, get_suite, run_protocol
from logitpair.threat import Linf

EPS = 0.1


class FirstTen(nn.Module):
    """Logits are the first 10 input values (a linear model whose gradients are exact)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]


def _second_place(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Points whose label is ranked 2nd (top-1 wrong, top-5 right) by a small gap.

    Label logit 0.50, one other class at 0.60, four at 0.46, the rest at 0.44: one signed
    gradient step of size EPS on the cross-entropy lowers the label by EPS and raises every
    other class by EPS, so the label falls to the last place -- out of the top 5.
    """
    y = torch.arange(n) % 10
    x = torch.full((n, 1, 1, 10), 0.44)
    for i, label in enumerate(y.tolist()):
        others = [c for c in range(10) if c != label]
        x[i, 0, 0, label] = 0.50
        x[i, 0, 0, others[0]] = 0.60
        x[i, 0, 0, others[1:5]] = 0.46
    return x, y


def _one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-5 accuracy after a single signed gradient step (FGSM) of size EPS."""
    xa = ATTACKS.get("fgsm")(model, x, y, threat=Linf(EPS))
    return (model(xa).topk(5, 1).indices == y[:, None]).any(1)


TOPK_ATTACKS = {
    "pgd": {"steps": 5},
    "apgd-ce": {"steps": 5},
    "apgd-dlr": {"steps": 5},
    "apgd-t": {"steps": 5, "n_target_classes": 2},
    "fab-t": {"steps": 5, "n_target_classes": 2},
    "fab": {"steps": 5},
    "square": {"queries": 200},
    "noise": {"samples": 20},
}


@pytest.mark.parametrize("name", sorted(TOPK_ATTACKS))
def test_each_attack_keeps_attacking_until_the_label_leaves_the_top_k(name):
    model = FirstTen()
    x, y = _second_place()
    fn = ATTACKS.get(name)
    gen = torch.Generator().manual_seed(0)
    same = fn(model, x, y, threat=Linf(EPS), generator=gen, **TOPK_ATTACKS[name])  # k = 1: already successful
    top5 = fn(model, x, y, threat=Linf(EPS), generator=gen, k=5, **TOPK_ATTACKS[name])
    assert Linf(EPS).contains(x, top5).all()
    in_top5 = (model(top5).topk(5, 1).indices == y[:, None]).any(1)
    if name in ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "fab", "square"):  # these skip top-1 successes
        assert torch.equal(same, x), "k = 1: a misclassified point is returned unchanged"
    assert not in_top5.any(), f"{name} with k=5 must push the label out of the top 5"


@pytest.mark.parametrize("suite", ["standard", "fast", "quick"])
def test_untargeted_top5_robust_accuracy_is_not_overstated(suite):
    model = FirstTen()
    x, y = _second_place()
    single_step = _one_step(model, x, y).float().mean().item()
    assert single_step == 0.0
    res = logitpair.evaluate(model, x, y, threat=Linf(EPS), suite=suite, top5=True, batch_size=5)
    s = res.summary()
    assert s["clean"]["value"] == 0.0 and s["clean_top5"]["value"] == 1.0
    assert s["robust_top5"]["value"] <= single_step


def test_top5_tracking_keeps_the_top1_figures_of_the_top1_protocol(trained_model, tiny_data):
    x, y = tiny_data[0][:96], tiny_data[1][:96]
    kw = {"threat": Linf(0.04), "seed": 3, "batch_size": 48}
    alone = run_protocol(trained_model, x, y, get_suite("quick"), **kw)
    both = run_protocol(trained_model, x, y, get_suite("quick"), top5=True, **kw)
    assert torch.equal(alone.robust, both.robust) and torch.equal(alone.broken_by, both.broken_by)
    assert (both.robust <= both.robust_top5).all()
    with pytest.raises(ConfigError, match="top 10"):
        ATTACKS.get("apgd-ce")(trained_model, x, y, threat=Linf(0.04), k=10)


def test_targeted_attacks_keep_attacking_until_the_target_is_hit(monkeypatch):
    """Attack 1 moves the label out of the top 1 towards a class that is not the target; the
    protocol must still hand the point to attack 2, which reaches the target."""
    model = FirstTen()
    n = 10
    y = torch.zeros(n, dtype=torch.long)
    x = torch.full((n, 1, 1, 10), 0.2)
    x[:, 0, 0, 0] = 0.6
    calls: list[int] = []

    def wander(model, x, y, *, threat, targeted=False, target=None, generator=None):
        out = x.clone()
        wrong = torch.where(target == 1, 2, 1)  # a class other than the label and the target
        out[torch.arange(len(x)), 0, 0, wrong] = 0.7
        return threat.project(x, out)

    def reach(model, x, y, *, threat, targeted=False, target=None, generator=None):
        calls.append(len(x))
        out = x.clone()
        out[torch.arange(len(x)), 0, 0, target] = 0.8
        return threat.project(x, out)

    for name, fn in (("wander", wander), ("reach", reach)):
        monkeypatch.setitem(ATTACKS._items, name, fn)
        monkeypatch.setitem(ATTACK_INFO, name, AttackInfo(targeted=True))
    res = run_protocol(model, x, y, [AttackSpec("wander"), AttackSpec("reach")], threat=Linf(0.6), targeted=True)
    assert calls == [n], "every point not at its target goes to the next attack"
    assert res.target_hit.all() and not res.robust.any()
    assert (res.broken_by == 0).all(), "accuracy: the first attack broke every point"
    top5 = run_protocol(model, x, y, [AttackSpec("wander"), AttackSpec("reach")], threat=Linf(0.6), targeted=True,
                        top5=True)  # fmt: skip
    assert top5.target_hit.all() and top5.robust_top5.all(), "top-5 accuracy as before: the label stays in the top 5"


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(4 * 28 * 28, 10))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_evaluate_scores_in_eval_mode_and_leaves_the_model_as_it_was(trained_model, tiny_data):
    x, y = tiny_data[0][:64], tiny_data[1][:64]
    net = BNNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(30):  # train a little so that running and batch statistics differ
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.body[1].momentum = 0.5  # a forward in train mode would move the running statistics visibly
    kw = {"threat": Linf(0.02), "suite": "quick", "seed": 1, "batch_size": 32, "top5": True}
    net.eval()
    in_eval = logitpair.evaluate(net, x, y, **kw).summary()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    in_train = logitpair.evaluate(net, x, y, **kw).summary()
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "running statistics must not change"
    assert net.training and all(m.training for m in net.modules()), "the caller's modes are restored"
    for key in ("clean", "robust", "clean_top5", "robust_top5"):
        assert in_train[key] == in_eval[key], key


def _strip(run_dir, *keys):
    meta = json.loads((run_dir / "model.json").read_text())
    for key in keys:
        meta.pop(key, None)
        (meta.get("config") or {}).get("loss" if key == "eps" else "data", {}).pop(key, None)
    (run_dir / "model.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("missing", ["eps", "dataset"])
def test_a_run_without_eps_or_dataset_is_one_clear_error(missing, tiny_run, tmp_path):
    import shutil

    from logitpair.audit.run import audit_run
    from logitpair.evaluation import TransferOptions, transfer_runs

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _strip(run, missing)
    with pytest.raises(ConfigError, match=f"names no (training )?{missing}"):
        evaluate_run(run, EvalOptions(n=8, suite=None, steps=1, restarts=1), write=False)
    with pytest.raises(ConfigError, match=f"names no (training )?{missing}"):
        audit_run(run, quick=True, n=8, write=False)
    with pytest.raises(ConfigError, match=f"names no (training )?{missing}"):
        transfer_runs([run, tiny_run], TransferOptions(n=8), out=tmp_path / "t", write=False)
    assert not (run / "evaluation.json").exists()
    if missing == "eps":  # an explicit eps is all it needs
        out = evaluate_run(run, EvalOptions(n=8, eps=0.05, suite=None, steps=1, restarts=1), write=False)
        assert out["eps"] == 0.05
