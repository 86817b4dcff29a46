"""Cross-check of our L2 attacks against AutoAttack's own (fra31/auto-attack, the ``pyautoattack`` package).

Optional: skipped unless ``pyautoattack`` is installed; run with ``pytest -m crosscheck``. Both
implementations attack the same trained model on the same 256 points with the same settings
(L2 eps, iterations, target classes, queries): APGD-CE, APGD-T, FAB-T and Square, the attacks of
AutoAttack's standard version. Ours must not be weaker (paired tolerance, as in the ART
cross-check) and the two robust accuracies must agree to within a few points. Our projection
onto ball ∩ box is exact where AutoAttack rescales then clips, and our random starts are uniform
in the ball where AutoAttack's lie on its sphere, so the points differ; the figures must not.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from logitpair.attacks import apgd_ce, apgd_t, fab_t, square
from logitpair.threat import L2

autopgd = pytest.importorskip("pyautoattack.autopgd_base", reason="pyautoattack is not installed")
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack

pytestmark = pytest.mark.crosscheck

N = 256
AGREE = 0.05  # within 5 points on 256 points


def _robust(model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def _check(what: str, model: nn.Module, x: Tensor, y: Tensor, eps: float, ours: Tensor, theirs: Tensor) -> None:
    threat = L2(eps)
    assert threat.contains(x, ours).all(), what
    assert threat.contains(x, theirs, tol=1e-5).all(), what
    a, b = _robust(model, ours, y), _robust(model, theirs, y)
    only_ours = int((a & ~b).sum())  # robust under ours only: AutoAttack broke them, we did not
    only_theirs = int((b & ~a).sum())
    tol = max(0.01, 2 * math.sqrt(only_ours + only_theirs) / N)
    shown = f"{what}: ours {a.float().mean():.3f} vs AutoAttack {b.float().mean():.3f} (b={only_ours}, c={only_theirs})"
    assert (only_ours - only_theirs) / N <= tol, shown
    assert abs(a.float().mean() - b.float().mean()) <= AGREE, shown


@pytest.fixture(scope="module")
def setup(trained_model, tiny_data):
    x, y = tiny_data
    return trained_model, x[:N], y[:N]


def test_apgd_ce_l2(setup):
    model, x, y = setup
    eps = 1.0
    ours = apgd_ce(model, x, y, threat=L2(eps), steps=100, generator=torch.Generator().manual_seed(0))
    theirs = autopgd.APGDAttack(model, n_iter=100, norm="L2", eps=eps, seed=0, device="cpu").perturb(x, y)
    _check("APGD-CE", model, x, y, eps, ours, theirs)


def test_apgd_t_l2(setup):
    model, x, y = setup
    eps = 1.0
    ours = apgd_t(model, x, y, threat=L2(eps), steps=50, n_target_classes=3, generator=torch.Generator().manual_seed(0))
    attack = autopgd.APGDAttack_targeted(model, n_iter=50, norm="L2", eps=eps, seed=0, device="cpu", n_target_classes=3)
    _check("APGD-T", model, x, y, eps, ours, attack.perturb(x, y))


def test_fab_t_l2(setup):
    model, x, y = setup
    eps = 1.0
    ours = fab_t(model, x, y, threat=L2(eps), steps=50, n_target_classes=3, generator=torch.Generator().manual_seed(0))
    attack = FABAttack_PT(model, norm="L2", n_iter=50, eps=eps, seed=0, targeted=True, device="cpu", n_target_classes=3)
    _check("FAB-T", model, x, y, eps, ours, attack.perturb(x, y))


def test_square_l2(setup):
    model, x, y = setup
    eps = 2.5
    ours = square(model, x, y, threat=L2(eps), queries=500, generator=torch.Generator().manual_seed(0))
    theirs = SquareAttack(model, norm="L2", n_queries=500, eps=eps, seed=0, device="cpu").perturb(x, y)
    _check("Square", model, x, y, eps, ours, theirs)
