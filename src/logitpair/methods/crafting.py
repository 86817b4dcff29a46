"""The training attacks of the adversarial-batch methods (mpgd, alp): one dispatch, :func:`craft`.

``cfg.attack`` selects how the adversarial half of the batch is made:

- ``"pgd"`` (default): Madry et al. 2018 (https://arxiv.org/abs/1706.06083), ``cfg.attack_steps``
  sign steps of ``cfg.attack_step_size`` in ``Linf(cfg.eps)`` from a uniform random start,
  last iterate (the official ALP ``train.py``).
- ``"fgsm-rs"``: Wong, Rice, Kolter 2020, "Fast is better than free"
  (https://arxiv.org/abs/2001.03994): :func:`fgsm_rs`.
- the official ALP notation ``pgd|pgdll|pgdrnd_EPS_STEP_NITER`` (e.g. ``pgdll_16_2_10``, with
  which the official models were trained): :func:`~logitpair.attacks.official.official_attack`;
  eps and step come from the spec (0-255 units), ``cfg.eps``/``attack_steps`` are not used.

Every attack runs on ``ctx.unwrap(model)`` in eval mode with frozen parameters (the attack
functions enter :func:`~logitpair.modes.attack_context` themselves) and returns detached
inputs in the eps-ball and in [0, 1]. To add an attack: one branch in :func:`craft` and its
name in ``logitpair.methods.settings.TRAINING_ATTACKS``.
"""

from __future__ import annotations

from torch import Tensor, nn

from logitpair.attacks.common import attack_objective
from logitpair.attacks.iterative import perturb_iterative, start_point
from logitpair.attacks.official import official_attack, official_threat, parse_official
from logitpair.attacks.pgd import pgd
from logitpair.methods.base import random_start
from logitpair.methods.context import START, BatchContext
from logitpair.methods.settings import FGSMRSSettings, TrainingAttackSettings
from logitpair.modes import attack_context
from logitpair.threat import Linf, Threat


def craft(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainingAttackSettings, ctx: BatchContext) -> Tensor:
    """Adversarial examples for the batch ``(x, y)`` with the training attack ``cfg.attack``."""
    if cfg.attack == "pgd":
        return pgd(
            ctx.unwrap(model),
            x,
            y,
            threat=cfg.threat,
            steps=cfg.attack_steps,
            step_size=cfg.attack_step_size,
            random_start=cfg.attack_random_start,
            keep_best=False,
            generator=ctx.generator,
            init=random_start(x, cfg, ctx),
        )
    if cfg.attack == "fgsm-rs":
        return craft_fgsm_rs(model, x, y, cfg, ctx)
    spec = parse_official(cfg.attack)
    if spec is not None:
        threat = official_threat(spec)
        init = None
        if ctx.keyed:
            init = threat.project(x, x + (2.0 * ctx.uniform(x, START) - 1.0) * threat.eps)
        return official_attack(ctx.unwrap(model), x, y, spec=spec, generator=ctx.generator, init=init)
    raise ValueError(f"unknown training attack {cfg.attack!r}")  # TrainingAttackSettings validates the name


def craft_fgsm_rs(model: nn.Module, x: Tensor, y: Tensor, cfg: FGSMRSSettings, ctx: BatchContext) -> Tensor:
    """:func:`fgsm_rs` with step ``cfg.fgsm_rs_alpha_ratio * cfg.eps`` in ``Linf(cfg.eps)``, from
    :func:`fgsm_rs_start` (from ``x`` itself when ``cfg.attack_random_start`` is off)."""
    init = fgsm_rs_start(x, cfg.threat, ctx) if cfg.attack_random_start else x
    return fgsm_rs(ctx.unwrap(model), x, y, threat=cfg.threat, alpha=cfg.fgsm_rs_alpha_ratio * cfg.eps, init=init)


def fgsm_rs_start(x: Tensor, threat: Linf, ctx: BatchContext) -> Tensor:
    """FGSM-RS's start ``x + delta0``, ``delta0 ~ U(-eps, eps)`` per pixel (``ctx.uniform``, stream
    START), clipped to the input bounds as in Wong et al.'s code (so it stays in the eps-ball)."""
    return threat.project(x, x + (2.0 * ctx.uniform(x, START) - 1.0) * threat.eps)


def fgsm_rs(model: nn.Module, x: Tensor, y: Tensor, *, threat: Threat, alpha: float, init: Tensor) -> Tensor:
    """One FGSM step from a random start (Wong et al. 2020, https://arxiv.org/abs/2001.03994).

    ``x_adv = clip_[0,1](Pi_eps(init + alpha * sign(grad_x CE(f(init), y))))`` with ``alpha``
    usually ``1.25 * eps`` (their MNIST setting: eps 0.3, alpha 0.375). L-infinity, inputs in
    [0, 1], shape (N, C, H, W). Difference to the reference code: the gradient is taken in eval
    mode with frozen parameters (:func:`~logitpair.modes.attack_context`, this project's
    convention), whereas Wong et al. take it in train mode during the training forward.

    Example::

        x_adv = fgsm_rs(model, x, y, threat=Linf(0.1), alpha=0.125, init=fgsm_rs_start(x, Linf(0.1), ctx))
    """
    x = x.detach()
    start = start_point(x, threat, init=init)
    with attack_context(model):
        x_adv = perturb_iterative(
            model, x, start, threat=threat, steps=1, step_size=alpha, loss_fn=attack_objective(y, None)
        )
    return x_adv.detach()
