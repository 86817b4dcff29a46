"""Training methods: losses ``loss(model, x, y, cfg, ctx) -> (loss, metrics)`` in a registry.

- ``model``: the network being trained, in the mode the trainer set (train mode); may be
  wrapped by DistributedDataParallel. Attacks run on ``ctx.unwrap(model)``.
- ``x``, ``y``: the batch, images in [0, 1] (N, C, H, W) and int64 labels (N,).
- ``cfg``: the method's own settings dataclass, the run's ``loss`` section
  (``METHODS.settings(name)``; shared concerns in :mod:`logitpair.methods.settings`).
- ``ctx``: :class:`BatchContext` (``logitpair.methods.context``), built by the trainer per
  step: the batch's dataset ``indices``, the randomness (``ctx.uniform``/``normal``/
  ``integers``, keyed per sample under data-parallel training) and ``step``,
  ``static_models`` (pre-trained, frozen; for ensemble adversarial training) and ``module``
  (the unwrapped model). Call a loss outside training with ``BatchContext()``: global RNG.
- returns a scalar loss to minimise and a dict of detached scalar tensors (no host sync).

A method never touches the optimizer and leaves the model's mode as it found it. A new
method is one file: its settings dataclass and its loss with
``@METHODS.register("name", settings=..., cost=...)``, plus one import line below; the config,
the command line (flags generated from the settings' fields) and the benchmarks (its cost
class) follow from the registration. Per-epoch behaviour (e.g. a catastrophic-overfitting
guard) is not the loss's business: the training layer owns it, switched on by configuration
(see ``logitpair.training``).
"""

# registration: each module registers its methods in METHODS
from logitpair.methods import certified, clp, fgsm_rs, kurakin, mixup, mpgd, regular, smoothing, trades, vat  # noqa: F401
from logitpair.methods.base import METHODS, Method, StepCost
from logitpair.methods.context import BatchContext
from logitpair.methods.settings import LossSettings

__all__ = ["METHODS", "BatchContext", "LossSettings", "Method", "StepCost"]
