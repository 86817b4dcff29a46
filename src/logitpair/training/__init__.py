"""Training: the loop (:func:`train`), optimisers and schedules, EMA, the run directory.

``train(cfg, out_dir)`` trains one model with the loss ``METHODS[cfg.method]``, calling it
as ``loss(model, x, y, cfg.loss, ctx)`` with a :class:`~logitpair.methods.BatchContext` per
step, and writes a crash-safe, resumable run directory.
"""

from logitpair.training.ema import ema_model, update_ema
from logitpair.training.loop import TrainResult, config_from_run, epoch_order, train

__all__ = ["TrainResult", "config_from_run", "ema_model", "epoch_order", "train", "update_ema"]
