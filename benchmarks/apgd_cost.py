"""Cost of APGD-CE relative to plain forward-backward passes.

ratio = time(APGD-CE, n iterations) / (n * time(one forward + backward w.r.t. the input))

on the same batch, model in eval mode with frozen parameters. APGD needs n forward-backward
passes plus one forward for its last iterate and one for the clean check, so a ratio
close to 1 means its bookkeeping is cheap; the target is <= 1.1.

Usage::

    python benchmarks/apgd_cost.py [--out benchmarks/results/apgd_cost.json] [--steps 100]
        [--batch 256] [--repeats 3] [--threads 1] [--device cpu]

Uses ``logitpair.models.create_model("lenet5")`` when it exists, else a LeNet-5-like
network defined here. Inputs are random 1x28x28 images; labels are the model's own clean
predictions, so every example is attacked for the whole run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from logitpair.attacks.apgd import apgd_ce
from logitpair.attacks.common import input_grad
from logitpair.modes import attack_context
from logitpair.threat import Linf


class LocalLeNet(nn.Module):
    """LeNet-5-like: conv(6,5x5) - pool - conv(16,5x5) - pool - fc 120 - fc 84 - fc 10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model() -> tuple[nn.Module, str]:
    try:
        from logitpair.models import create_model  # type: ignore[attr-defined]

        return create_model("lenet5"), "logitpair.models lenet5"
    except (ImportError, AttributeError, KeyError, ValueError):
        return LocalLeNet(), "local LeNet-5-like (logitpair.models.create_model('lenet5') unavailable)"


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/apgd_cost.json"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings of each")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eps", type=float, default=0.3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, model_name = build_model()
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(args.batch, 1, 28, 28, generator=g, device=device)
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct: APGD attacks the whole batch
    threat = Linf(args.eps)

    def forward_backward_n(inputs: torch.Tensor) -> None:
        with attack_context(model):
            for _ in range(args.steps):
                input_grad(model, inputs, y, None)

    def run_apgd() -> torch.Tensor:
        return apgd_ce(model, x, y, threat=threat, steps=args.steps, generator=torch.Generator(device=device))

    for _ in range(3):  # warm-up
        with attack_context(model):
            input_grad(model, x, y, None)
    x_adv = run_apgd()
    fb_times, fb_adv_times, apgd_times = [], [], []
    for _ in range(args.repeats):  # interleaved, so load from other processes hits all three
        fb_times.append(timed(lambda: forward_backward_n(x), device))
        apgd_times.append(timed(run_apgd, device))
        fb_adv_times.append(timed(lambda: forward_backward_n(x_adv), device))
    t_fb = min(fb_times) / args.steps
    t_fb_adv = min(fb_adv_times) / args.steps
    t_apgd = min(apgd_times)
    ratio = t_apgd / (args.steps * t_fb)

    result = {
        "ratio": ratio,
        "target": 1.1,
        "apgd_seconds": t_apgd,
        "forward_backward_seconds": t_fb,
        # the same measured at APGD's output points (CPU kernels can be slightly data-dependent)
        "ratio_vs_forward_backward_at_adv": t_apgd / (args.steps * t_fb_adv),
        "forward_backward_at_adv_seconds": t_fb_adv,
        "steps": args.steps,
        "batch": args.batch,
        "input_shape": [1, 28, 28],
        "eps": args.eps,
        "model": model_name,
        "device": str(device),
        "threads": args.threads,
        "repeats": args.repeats,
        "apgd_seconds_all": apgd_times,
        "forward_backward_n_seconds_all": fb_times,
        "forward_backward_n_at_adv_seconds_all": fb_adv_times,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"APGD-CE {args.steps} steps: {t_apgd:.3f} s; forward+backward: {t_fb * 1e3:.2f} ms; ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
