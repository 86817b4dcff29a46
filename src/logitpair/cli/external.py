"""The flags of a model from elsewhere (``--model``/``--model-factory``, ``--weights``,
``--input-normalization``, ``--dataset``, ``--points``), shared by ``evaluate``, ``audit``,
``certify`` and ``transfer``; see :mod:`logitpair.external`."""

from __future__ import annotations

import argparse

from logitpair.errors import ConfigError
from logitpair.external import ExternalModel
from logitpair.models.layers import NORMALIZATIONS
from logitpair.models.weights import LAYOUTS

FLAGS = ("model", "model_factory", "weights", "input_normalization", "dataset", "points")


def add_external_flags(p: argparse.ArgumentParser, results: str = "RUN is then the folder the results go to") -> None:
    """Add the group of flags that name a model from elsewhere to ``p``."""
    g = p.add_argument_group(
        "a model from elsewhere",
        f"instead of a run of ours: --model NAME --weights FILE, or --model-factory; --eps and --dataset (or "
        f"--points) are required, nothing is recorded for it ({results})",
    )
    g.add_argument("--model", metavar="NAME", help="a registered architecture (logitpair list) for --weights")
    g.add_argument(
        "--model-factory", metavar="PACKAGE.MODULE:FUNCTION",
        help="your own architecture: FUNCTION() returns the torch.nn.Module (imports and runs your code; opt-in)",
    )  # fmt: skip
    g.add_argument(
        "--weights", metavar="FILE",
        help="its state dict: .safetensors, or .pt/.pth read only with torch.load(weights_only=True); "
        f"torchvision's layout for {', '.join(LAYOUTS)} (a module. prefix is removed)",
    )  # fmt: skip
    g.add_argument(
        "--input-normalization", metavar="MEAN,STD",
        help="the normalisation the model expects, replacing its own: MEAN,STD, per-channel M1,..,MC,S1,..,SC, "
        f"{', '.join(NORMALIZATIONS)} or none (default: what the weights' layout expects; attacks stay in [0, 1])",
    )  # fmt: skip
    g.add_argument("--dataset", help="the dataset whose test split it is evaluated on (or --points)")
    g.add_argument(
        "--points", metavar="FILE",
        help="your test points: .safetensors or .npz with x (N, C, H, W) in [0, 1] and integer labels y",
    )  # fmt: skip


def external_from_args(args: argparse.Namespace) -> ExternalModel | None:
    """The model from elsewhere the flags name, or None (then none of its flags may be given)."""
    given = [f for f in FLAGS if getattr(args, f, None) is not None]
    if not given:
        return None
    if args.model is None and args.model_factory is None:
        raise ConfigError("only with `model` or `model_factory` (a model from elsewhere)", option=given[0])
    return ExternalModel(
        eps=args.eps, model=args.model, model_factory=args.model_factory, weights=args.weights, dataset=args.dataset,
        points=args.points, input_normalization=args.input_normalization, data_dir=getattr(args, "data_dir", None),
    )  # fmt: skip
