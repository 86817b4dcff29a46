"""``logitpair train``: train one model into a run directory."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from logitpair.cli.common import fraction, logger, quiet
from logitpair.config import make_config
from logitpair.progress import make_progress

# (flag, config path, type, help)
TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--dataset", "data.dataset", str, "dataset name (see `logitpair list`)"),
    ("--data-dir", "data.data_dir", str, "folder with the dataset's files (default: its standard location)"),
    ("--val-size", "data.val_size", int, "validation images held out of the training set (default 5000)"),
    ("--model", "model", str, "model name (see `logitpair list`)"),
    ("--method", "method", str, "training method (see `logitpair list`)"),
    ("--epochs", "optim.epochs", int, "training epochs"),
    ("--batch-size", "optim.batch_size", int, "global minibatch size (split over processes and accumulation steps)"),
    ("--accum-steps", "optim.accum_steps", int, "gradient accumulation: micro-batches per step and process"),
    ("--optimizer", "optim.optimizer", str, "sgd, adam, rmsprop (torch's) or rmsprop-tf (the official ALP optimiser)"),
    ("--lr", "optim.lr", fraction, "learning rate"),
    ("--lr-reference-batch", "optim.lr_reference_batch", int, "scale lr by batch-size / this (official: 0.045 per 32)"),
    ("--schedule", "optim.schedule", str, "constant, cosine or step"),
    ("--warmup-epochs", "optim.warmup_epochs", fraction, "linear learning-rate warm-up (ours)"),
    ("--weight-decay", "optim.weight_decay", fraction, "L2 weight decay"),
    ("--eps", "loss.eps", fraction, "L-inf radius for training attacks (e.g. 0.1 or 8/255)"),
    ("--lam", "loss.lam", fraction, "weight of the pairing / squeezing term"),
    ("--attack-steps", "loss.attack_steps", int, "PGD steps while training"),
    ("--attack-step-size", "loss.attack_step_size", fraction, "PGD step size while training"),
    ("--noise-std", "loss.noise_std", fraction, "Gaussian input noise for clp / lsq"),
    ("--distance", "loss.distance", str, "logit distance for alp / clp: l2sq, l2, l1, cosine"),
    ("--label-smoothing", "loss.label_smoothing", fraction, "label smoothing of the cross-entropy"),
    ("--adv-fraction", "loss.adv_fraction", fraction, "mpgd / alp: share of adversarial examples (1 = Madry)"),
    (
        "--train-attack",
        "loss.attack",
        str,
        "mpgd / alp training attack: pgd, fgsm-rs or pgd|pgdll|pgdrnd_EPS_STEP_NITER",
    ),
    ("--beta", "loss.beta", fraction, "trades: weight of the KL term"),
    ("--smoothing", "loss.smoothing", fraction, "ls: label-smoothing delta"),
    ("--mixup-alpha", "loss.mixup_alpha", fraction, "mixup: Beta(alpha, alpha)"),
    ("--vat-eps", "loss.vat_eps", fraction, "vat: L2 radius of the virtual adversarial perturbation"),
    ("--vat-xi", "loss.vat_xi", fraction, "vat: power-iteration radius (default 1e-3, ours; Miyato et al.: 1e-6)"),
    ("--pair-layer", "loss.pair_layer", str, "alp / clp: pair this layer's activations (feature pairing)"),
    ("--pair-target", "loss.pair_target", str, "alp / clp: logits, features or both"),
    ("--static-models", "static_models", str, "ens-adv: comma-separated run directories of frozen source models"),
    ("--overfit-guard", "overfit_guard", fraction, "stop when val PGD accuracy drops by more than this (points)"),
    ("--noise", "noise", str, "randomness of the losses: per-sample (default) or global"),
    ("--device", "device", str, "cpu, cuda or cuda:N"),
    ("--amp", "amp", str, "none or bf16 (training forward only; attacks stay float32)"),
    ("--amp-attacks", "amp_attacks", bool, "also run the training attacks under --amp (weaker gradients)"),
    ("--channels-last", "channels_last", bool, "NHWC memory format"),
    ("--compile", "compile", bool, "torch.compile the training forward"),
    ("--sync-bn", "sync_bn", bool, "SyncBatchNorm across processes (CUDA)"),
    ("--ema-schedule", "ema_schedule", str, "constant or tf (min(decay, (1+t)/(10+t)))"),
    ("--export-weights", "export_weights", str, "with EMA: ema (default) or raw weights in model.safetensors"),
    ("--workers", "data.workers", int, "decoding processes for image-folder datasets"),
    ("--image-size", "data.image_size", int, "image-folder datasets: side in pixels (0 = default)"),
    ("--skip-bad", "data.skip_bad", bool, "image-folder datasets: skip unreadable images"),
    ("--tensorboard", "tensorboard", bool, "also write TensorBoard event logs"),
    ("--log-every", "log_every", int, "steps between progress updates (host syncs)"),
    ("--val-points", "val_points", int, "validation points attacked with PGD each epoch (0 = none)"),
    ("--val-suite", "val_suite", str, "also this attack suite on the validation points each epoch (e.g. fast)"),
    ("--seed", "seed", int, "random seed"),
    ("--checkpoint-every", "checkpoint_every", int, "also checkpoint every N steps"),
    ("--select", "select", str, "exported weights: last, best-robust or best-clean"),
    ("--on-nonfinite", "on_nonfinite", str, "stop or skip on a NaN/inf loss"),
    ("--ema-decay", "ema_decay", fraction, "EMA of the weights for validation and export (0 = off)"),
]


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag, path, _, _ in TRAIN_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def run(args: argparse.Namespace) -> int:
    from logitpair.training import train

    cfg = make_config(args.config, overrides(args))
    result = train(
        cfg,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=make_progress(quiet(args)),
        log=logger(args),
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    last = result.history[-1] if result.history else {}
    print(json.dumps({"run_dir": str(result.run_dir), "train_seconds": round(result.train_seconds, 2), **last}))
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train one model into a run directory")
    p.add_argument("--config", help="YAML, TOML or JSON config file (CLI flags override it)")
    for flag, _, typ, help_ in TRAIN_FLAGS:
        if typ is bool:
            p.add_argument(flag, action="store_const", const=True, default=None, help=help_)
        else:
            p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint if there is one, else start it (torchrun restarts)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    p.set_defaults(func=run)
    return p
