"""Cross-check of our PGD and APGD-CE against the Adversarial Robustness Toolbox (ART).

Optional: skipped unless ``adversarial-robustness-toolbox`` is installed
(``pip install adversarial-robustness-toolbox``); run with ``pytest -m crosscheck``.
Both implementations attack the same trained model on the same 512 points with the same
settings (L-inf eps, steps, step size, one random start; APGD: initial step 2 eps), at an
eps chosen where the undefended model is about half robust, so a weaker or stronger attack
shows. Our attacks must not be weaker than ART's (paired tolerance, as in the audit), and
the two must agree to within a few points: a larger difference means one of them (or the
way it is called) is wrong.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from logitpair.attacks import apgd_ce, pgd
from logitpair.threat import Linf

art = pytest.importorskip("art", reason="the Adversarial Robustness Toolbox is not installed")
from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier

pytestmark = pytest.mark.crosscheck

STEPS = 40
AGREE = 0.05  # the two implementations agree to within 5 points on 512 points


def _robust(model: nn.Module, x_adv: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def _in_ball(x_adv: Tensor, x: Tensor, eps: float) -> bool:
    return bool((x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1)


def _not_weaker(ours: Tensor, theirs: Tensor) -> tuple[bool, str]:
    """Ours may leave at most max(1 point, 2 paired SE) more points robust than ART."""
    n = len(ours)
    b = int((ours & ~theirs).sum())  # robust under ours only: ART broke them, we did not
    c = int((theirs & ~ours).sum())
    rise = (b - c) / n
    tol = max(0.01, 2 * math.sqrt(b + c) / n)
    return (
        rise <= tol,
        f"ours {ours.float().mean():.3f} vs ART {theirs.float().mean():.3f} (b={b}, c={c}, tol {tol:.3f})",
    )


def _compare(what: str, model: nn.Module, x: Tensor, y: Tensor, eps: float, ours_adv: Tensor, theirs) -> Tensor:
    """Both results in the ball; ours not weaker than ART's and within AGREE of it. Returns our robust flags."""
    theirs_adv = torch.from_numpy(theirs)
    assert _in_ball(ours_adv, x, eps) and _in_ball(theirs_adv, x, eps)
    ours, theirs_robust = _robust(model, ours_adv, y), _robust(model, theirs_adv, y)
    ok, text = _not_weaker(ours, theirs_robust)
    assert ok, f"our {what} is weaker than ART's: {text}"
    assert abs(ours.float().mean() - theirs_robust.float().mean()) <= AGREE, f"{what}: {text}"
    return ours


@pytest.fixture(scope="module")
def setting(trained_model, tiny_data):
    """The model, the points, and an eps at which our PGD leaves about half of them robust."""
    x, y = tiny_data
    best = None
    for eps in (0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12):
        adv = pgd(trained_model, x, y, threat=Linf(eps), steps=10, generator=torch.Generator().manual_seed(0))
        acc = _robust(trained_model, adv, y).float().mean().item()
        if best is None or abs(acc - 0.5) < abs(best[1] - 0.5):
            best = (eps, acc)
    assert 0.2 < best[1] < 0.8, f"no eps gives an intermediate accuracy: {best}"
    clf = PyTorchClassifier(
        model=trained_model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    return trained_model, clf, x, y, best[0]


def test_pgd_matches_art(setting):
    model, clf, x, y, eps = setting
    alpha = 2.5 * eps / STEPS
    ours_adv = pgd(
        model, x, y, threat=Linf(eps), steps=STEPS, step_size=alpha, generator=torch.Generator().manual_seed(1)
    )
    np.random.seed(1)
    torch.manual_seed(1)
    theirs_adv = ProjectedGradientDescent(
        clf, norm=np.inf, eps=eps, eps_step=alpha, max_iter=STEPS, num_random_init=1, batch_size=128, verbose=False
    ).generate(x.numpy(), y=y.numpy())
    ours = _compare("PGD", model, x, y, eps, ours_adv, theirs_adv)
    assert ours.float().mean() < _robust(model, x, y).float().mean() - 0.2  # the attack did work


def test_apgd_ce_matches_art(setting):
    model, clf, x, y, eps = setting
    ours_adv = apgd_ce(model, x, y, threat=Linf(eps), steps=100, generator=torch.Generator().manual_seed(2))
    np.random.seed(2)
    torch.manual_seed(2)
    theirs_adv = AutoProjectedGradientDescent(
        clf,
        norm=np.inf,
        eps=eps,
        eps_step=2 * eps,  # ART's eps_step is APGD's initial step size (2 eps in Croce & Hein 2020)
        max_iter=100,
        nb_random_init=1,
        batch_size=128,
        loss_type="cross_entropy",
        verbose=False,
    ).generate(x.numpy(), y=y.numpy())
    _compare("APGD-CE", model, x, y, eps, ours_adv, theirs_adv)
