"""Training methods: losses ``loss(model, x, y, cfg, ctx) -> (loss, metrics)`` in a registry.

- ``model``: the network being trained, in the mode the trainer set (train mode); may be
  wrapped by DistributedDataParallel. Attacks run on ``ctx.unwrap(model)``.
- ``x``, ``y``: the batch, images in [0, 1] (N, C, H, W) and int64 labels (N,).
- ``cfg``: :class:`MethodConfig`, the run's ``loss`` section (each method reads its fields).
- ``ctx``: :class:`BatchContext` (``logitpair.methods.context``), built by the trainer per
  step: the batch's dataset ``indices``, the randomness (``ctx.uniform``/``normal``/
  ``integers``, keyed per sample under data-parallel training), ``epoch`` and ``step``,
  ``static_models`` (pre-trained, frozen; for ensemble adversarial training) and ``module``
  (the unwrapped model). Call a loss outside training with ``BatchContext()``: global RNG.
- returns a scalar loss to minimise and a dict of detached scalar tensors (no host sync).

A method never touches the optimizer and leaves the model's mode as it found it. A new
method is one file with ``@METHODS.register("name")`` plus one import line below.
Per-epoch behaviour (e.g. a catastrophic-overfitting guard) is not the loss's business:
the training layer owns it, switched on by configuration (see ``logitpair.training``).
"""

# registration: each module registers its methods in METHODS
from logitpair.methods import clp, fgsm_rs, kurakin, mixup, mpgd, regular, smoothing, trades, vat  # noqa: F401
from logitpair.methods.base import METHODS, MethodConfig
from logitpair.methods.context import DEFAULT_CONTEXT, BatchContext

__all__ = ["DEFAULT_CONTEXT", "METHODS", "BatchContext", "MethodConfig"]
