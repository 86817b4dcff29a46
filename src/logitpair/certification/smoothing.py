"""Randomized smoothing: certified L2 robustness by sampling (Cohen, Rosenfeld and Kolter 2019,
"Certified Adversarial Robustness via Randomized Smoothing", https://arxiv.org/abs/1902.02918).

The smoothed classifier ``g(x) = argmax_c P(f(x + ε) = c)``, ``ε ~ N(0, σ² I)``, of a base
classifier ``f`` (the model's argmax) is robust within the L2 radius ``σ Φ⁻¹(p_A)`` around ``x``
when its top class has probability ``p_A > ½`` (the paper's Theorem 1, with ``p_B = 1 - p_A``).
Both procedures follow the paper's pseudocode (Section 3.2):

* **CERTIFY** (:func:`certify_smoothing`): ``n0`` selection samples guess the top class ``c_A``;
  ``n`` fresh estimation samples count it; ``p_A`` lower = the one-sided ``1 - α``
  Clopper–Pearson lower bound of that count. If it exceeds ½ the point gets ``c_A`` and the
  radius ``σ Φ⁻¹(p_A lower)``, else it abstains. With probability at least ``1 - α`` a point that
  does not abstain is given the smoothed classifier's class, and that class is robust within
  the radius.
* **PREDICT** (:func:`predict_smoothing`): ``n`` samples; the top two counts ``n_A``, ``n_B`` go
  through a two-sided binomial test of ``p = ½``; abstain unless its p-value is ≤ ``α``.

The noise is added in the [0, 1] input space and **not clipped**, as Cohen et al. (clipping
would change the distribution the theorem is about). Noise is drawn on the model's device from
generators keyed by (seed, point index, procedure, block of ``NOISE_BLOCK`` samples), so a
point's outcome depends on the seed and its position among the points, not on the batch size
(of samples or of points) nor on resuming (up to the round-off of the model's batched forward
pass). The binomial statistics (Clopper–Pearson by bisection on the binomial tail, the binomial
test, Φ⁻¹ from :class:`statistics.NormalDist`) are computed here in float64: scipy is not
needed. The per-point record is kept in the evaluation cache (:mod:`logitpair.evaluation.cache`),
saved after every ``points_per_save`` points, keyed by the weights, the points, σ, n0, n, α, the
seed and the device. Example::

    res = certify_smoothing(model.eval(), x, y, sigma=0.5, n=10_000)
    res.certified_accuracy([0.25, 0.5, 1.0])   # [{"radius": 0.25, "value": ..., "n": ..., "ci95": [...]}, ...]

:func:`smoothing_run` backs ``logitpair certify RUN --method smoothing``.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor, nn

from logitpair.attacks.common import model_device
from logitpair.distributed import env_world
from logitpair.environment import environment, parse_device
from logitpair.errors import ConfigError
from logitpair.evaluation.cache import EvalCache, Fingerprint, points_digest, run_batches, weights_digest
from logitpair.evaluation.run import check_points_options, test_points
from logitpair.external import ExternalModel, load_subject
from logitpair.io import write_bytes, write_json, write_text
from logitpair.metrics import summarize
from logitpair.progress import ProgressFactory, null_progress
from logitpair.report import markdown_table, pct_ci, plot_curves

ABSTAIN = -1
NOISE_BLOCK = 100  # samples per keyed noise generator (a constant: part of what determines the noise)
SELECT, ESTIMATE, PREDICT = 0, 1, 2  # independent noise of CERTIFY's two stages and of PREDICT
DEFAULT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
CITATION = "Cohen, Rosenfeld and Kolter 2019 (https://arxiv.org/abs/1902.02918)"


# ---------------------------------------------------------------- statistics (float64, no scipy)


def _log_choose(n: int, k: Tensor) -> Tensor:
    return math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper–Pearson lower bound of a binomial proportion from ``k``
    successes in ``n`` trials: the ``p`` with ``P(X >= k | n, p) = alpha`` (the ``alpha``
    quantile of Beta(k, n - k + 1); 0 for ``k = 0``), by bisection to float64 resolution and
    rounded down (never above the exact bound)."""
    if not 0 <= k <= n or n < 1:
        raise ConfigError(f"expected 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if k == 0:
        return 0.0
    ks = torch.arange(k, n + 1, dtype=torch.float64)
    log_c, target = _log_choose(n, ks), math.log(alpha)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        log_tail = torch.logsumexp(log_c + ks * math.log(mid) + (n - ks) * math.log1p(-mid), 0)
        if float(log_tail) < target:
            lo = mid
        else:
            hi = mid
    return lo


def binomial_test_half(a: int, b: int) -> float:
    """Two-sided p-value of the binomial test of ``p = ½`` for ``a`` successes in ``a + b`` trials
    (scipy's ``binomtest(a, a + b, 0.5).pvalue``: ``2 P(X <= min(a, b))``, at most 1)."""
    n, m = a + b, min(a, b)
    if a == b:
        return 1.0
    ks = torch.arange(0, m + 1, dtype=torch.float64)
    log_cdf = float(torch.logsumexp(_log_choose(n, ks), 0)) - n * math.log(2.0)
    return min(1.0, 2.0 * math.exp(log_cdf))


# ---------------------------------------------------------------- sampling


def _block_seed(seed: int, index: int, phase: int, block: int) -> int:
    digest = hashlib.sha256(f"logitpair-smoothing:{seed}:{index}:{phase}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def gaussian_noise(
    shape: Sequence[int], start: int, stop: int, *, seed: int, index: int, phase: int,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> Tensor:  # fmt: skip
    """N(0, I) noise of samples ``start .. stop - 1`` of point ``index`` (each ``shape``): sample
    ``j`` comes from the generator of block ``j // NOISE_BLOCK``, keyed by (seed, index, phase,
    block), so it is the same whichever batches the samples are drawn in."""
    first, last = start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK
    gen = torch.Generator(device=device)
    parts = []
    for block in range(first, last + 1):
        gen.manual_seed(_block_seed(seed, index, phase, block))
        parts.append(torch.randn((NOISE_BLOCK, *shape), generator=gen, device=device, dtype=dtype))
    off = first * NOISE_BLOCK
    return torch.cat(parts)[start - off : stop - off]


def sample_counts(
    model: nn.Module, x: Tensor, num: int, *, sigma: float, seed: int, index: int, phase: int, batch_size: int
) -> Tensor:  # fmt: skip
    """Per class, how often the model's argmax picks it on ``num`` noisy copies ``x + N(0, σ² I)``
    of one point ``x`` (C×H×W, on the model's device; no clipping), ``batch_size`` at a time.
    int64 on the CPU."""
    counts: Tensor | None = None
    with torch.no_grad():
        for a in range(0, num, batch_size):
            b = min(a + batch_size, num)
            z = gaussian_noise(x.shape, a, b, seed=seed, index=index, phase=phase, device=x.device, dtype=x.dtype)
            logits = model(x.unsqueeze(0) + sigma * z)
            c = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
            counts = c if counts is None else counts + c
    assert counts is not None
    return counts.cpu()


# ---------------------------------------------------------------- CERTIFY and PREDICT


@dataclass(frozen=True)
class SmoothingSettings:
    """What determines a point's outcome (besides the model, the point and its index)."""

    sigma: float
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ConfigError(f"expected > 0, got {self.sigma}", option="sigma")
        if self.n0 < 1:
            raise ConfigError(f"expected >= 1, got {self.n0}", option="n0")
        if self.n < 1:
            raise ConfigError(f"expected >= 1, got {self.n}", option="n_samples")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"expected 0 < alpha < 1, got {self.alpha}", option="alpha")


def certify_point(
    model: nn.Module, x: Tensor, index: int, cfg: SmoothingSettings, batch_size: int
) -> tuple[int, float, float, int]:  # fmt: skip
    """CERTIFY of one point (on the model's device): ``(class or ABSTAIN, radius of that class
    (0 when abstaining), p_A lower bound, count of c_A among the n estimation samples)``."""
    kw = {"sigma": cfg.sigma, "seed": cfg.seed, "index": index, "batch_size": batch_size}
    c_a = int(sample_counts(model, x, cfg.n0, phase=SELECT, **kw).argmax())
    k = int(sample_counts(model, x, cfg.n, phase=ESTIMATE, **kw)[c_a])
    p_lower = clopper_pearson_lower(k, cfg.n, cfg.alpha)
    if p_lower <= 0.5:
        return ABSTAIN, 0.0, p_lower, k
    return c_a, cfg.sigma * NormalDist().inv_cdf(p_lower), p_lower, k


def predict_smoothing(
    model: nn.Module, x: Tensor, *, sigma: float, n: int = 100_000, alpha: float = 0.001,
    batch_size: int = 1000, seed: int = 0,
) -> Tensor:  # fmt: skip
    """PREDICT of every point of ``x`` (N×…, [0, 1]): the smoothed classifier's class, or ABSTAIN
    (-1) when the binomial test between the top two counts of ``n`` samples is not significant at
    level ``alpha``. int64 (N,) on the CPU; point ``i`` uses its own noise (seed, ``i``)."""
    cfg = SmoothingSettings(sigma=sigma, n=n, alpha=alpha, seed=seed)
    device = model_device(model)
    out = torch.full((len(x),), ABSTAIN, dtype=torch.long)
    for i in range(len(x)):
        counts = sample_counts(model, x[i].to(device), cfg.n, sigma=sigma, seed=seed, index=i, phase=PREDICT,
                               batch_size=batch_size)  # fmt: skip
        top = counts.topk(2) if len(counts) > 1 else None
        if top is None:
            out[i] = 0
            continue
        (n_a, n_b), (c_a, _) = top.values.tolist(), top.indices.tolist()
        if binomial_test_half(n_a, n_b) <= alpha:
            out[i] = c_a
    return out


@dataclass
class SmoothingResult:
    """Per-point outcome of :func:`certify_smoothing` (CPU tensors of length N).

    ``prediction``: the certified class or ABSTAIN (-1); ``radius``: the certified L2 radius of
    a correct prediction, 0 for an abstention or a wrong class (``prediction_radius``: that of the
    predicted class, right or wrong); ``p_lower``: the Clopper–Pearson lower bound of p_A;
    ``count``: c_A's count among the n estimation samples; ``seconds``: per point.
    """

    prediction: Tensor  # int64
    radius: Tensor  # float64
    p_lower: Tensor  # float64
    count: Tensor  # int64
    correct: Tensor  # bool: prediction == y (never for an abstention)
    seconds: Tensor  # float64
    settings: SmoothingSettings
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.prediction)

    @property
    def abstained(self) -> Tensor:
        return self.prediction == ABSTAIN

    @property
    def prediction_radius(self) -> Tensor:
        """σ Φ⁻¹(p_A lower) of the predicted class (0 when abstaining), right or wrong."""
        inv = NormalDist().inv_cdf
        return torch.tensor([self.settings.sigma * inv(p) if p > 0.5 else 0.0 for p in self.p_lower.tolist()],
                            dtype=torch.float64)  # fmt: skip

    def certified(self, radius: float) -> Tensor:
        """Per point: correct and certified within L2 ``radius`` (``radius = 0``: correct, not abstaining)."""
        return self.correct & (self.radius >= radius)

    def certified_accuracy(self, radii: Sequence[float]) -> list[dict[str, Any]]:
        """``[{"radius": r, "value": ..., "n": N, "ci95": [...]}]``: the fraction of points correct
        with a certified L2 radius ≥ r (Wilson 95% interval)."""
        return [{"radius": float(r), **summarize(self.certified(float(r)))} for r in radii]

    def summary(self, radii: Sequence[float] = DEFAULT_RADII) -> dict[str, Any]:
        s = self.settings
        return {
            "n": self.n,
            "threat": {"norm": "L2"},
            "method": "smoothing",
            "options": {**asdict(s), **self.options},
            "smoothed_accuracy": summarize(self.certified(0.0)),
            "abstained": int(self.abstained.sum()),
            "abstain": summarize(self.abstained),
            "certified_accuracy": self.certified_accuracy(radii),
            "seconds_per_point": float(self.seconds.sum()) / self.n if self.n else float("nan"),
        }


def _fingerprint(model: nn.Module, x: Tensor, y: Tensor, cfg: SmoothingSettings, device: torch.device) -> str:
    fp = Fingerprint("smoothing").text(weights_digest(model))
    fp.json({**asdict(cfg), "noise_block": NOISE_BLOCK, "device": str(device), "dtype": str(x.dtype)})
    return fp.tensors(x, y).hexdigest()


def _fresh(n: int) -> dict[str, Tensor]:
    return {
        "prediction": torch.full((n,), ABSTAIN, dtype=torch.long),
        "radius": torch.zeros(n, dtype=torch.float64),
        "p_lower": torch.zeros(n, dtype=torch.float64),
        "count": torch.zeros(n, dtype=torch.long),
        "seconds": torch.zeros(n, dtype=torch.float64),
    }


def certify_smoothing(
    model: nn.Module, x: Tensor, y: Tensor, *, sigma: float, n0: int = 100, n: int = 100_000,
    alpha: float = 0.001, batch_size: int = 1000, seed: int = 0, points_per_save: int = 1,
    state_path: str | Path | None = None, progress: ProgressFactory = null_progress, desc: str = "smoothing",
) -> SmoothingResult:  # fmt: skip
    """CERTIFY (see the module's docstring) every point of ``x`` ([0, 1] images, N×…; labels
    ``y``) for the smoothed classifier of ``model`` with noise level ``sigma``: ``n0`` selection
    and ``n`` estimation samples per point, level ``alpha``, ``batch_size`` noisy samples per
    forward pass. With ``state_path`` the record is saved every ``points_per_save`` points and a
    rerun with the same settings continues where the last one stopped (the batch sizes may
    differ: they do not change the outcome). The model is used as it is (call ``.eval()`` first)."""
    cfg = SmoothingSettings(sigma=sigma, n0=n0, n=n, alpha=alpha, seed=seed)
    for name, value in (("batch_size", batch_size), ("points_per_save", points_per_save)):
        if value < 1:
            raise ConfigError(f"expected >= 1, got {value}", option=name)
    if len(x) != len(y):
        raise ConfigError(f"{len(x)} points but {len(y)} labels")
    device = model_device(model)
    cache = EvalCache(Path(state_path) if state_path is not None else None, _fingerprint(model, x, y, cfg, device))

    def step(b: int, start: int, stop: int, st: dict[str, Tensor]) -> None:
        for i in range(start, stop):
            t0 = time.perf_counter()
            pred, radius, p_lower, k = certify_point(model, x[i].to(device), i, cfg, batch_size)
            st["prediction"][i], st["p_lower"][i], st["count"][i] = pred, p_lower, k
            st["radius"][i] = radius if pred == int(y[i]) else 0.0
            st["seconds"][i] = time.perf_counter() - t0

    bar = progress(len(x), desc)
    st = run_batches(len(x), points_per_save, cache, fresh=partial(_fresh, len(x)), step=step, bar=bar)
    bar.close()
    correct = st["prediction"] == y.cpu().long()
    return SmoothingResult(
        prediction=st["prediction"], radius=st["radius"], p_lower=st["p_lower"], count=st["count"],
        correct=correct, seconds=st["seconds"], settings=cfg, options={"batch_size": batch_size},
    )  # fmt: skip


# ---------------------------------------------------------------- a run directory (logitpair certify --method smoothing)


@dataclass(frozen=True)
class SmoothingOptions:
    """``logitpair certify RUN --method smoothing``: the smoothing settings and the points."""

    sigma: float
    n0: int = 100
    n_samples: int = 100_000
    alpha: float = 0.001
    radii: tuple[float, ...] = DEFAULT_RADII  # of the table (0 always added); the plot uses a finer grid
    n: int | None = None  # first n test points (None: all)
    noise_batch: int = 1000  # noisy samples per forward pass
    device: str = "cpu"
    data_dir: str | None = None
    resume: bool = True  # keep and reuse the per-point state in RUN/certify-state/
    seed: int = 0

    def __post_init__(self) -> None:
        SmoothingSettings(sigma=self.sigma, n0=self.n0, n=self.n_samples, alpha=self.alpha, seed=self.seed)
        check_points_options(self.n, None)
        if self.noise_batch < 1:
            raise ConfigError(f"expected >= 1, got {self.noise_batch}", option="noise_batch")
        if any(not (r >= 0 and math.isfinite(r)) for r in self.radii):
            raise ConfigError(f"expected radii >= 0, got {list(self.radii)}", option="radii")

    def table_radii(self) -> list[float]:
        return sorted({0.0, *map(float, self.radii)})


def smoothing_run(
    run_dir: str | Path, opts: SmoothingOptions, *, external: ExternalModel | None = None,
    progress: ProgressFactory = null_progress, write: bool,
) -> dict[str, Any]:  # fmt: skip
    """Certify the run's first ``opts.n`` test points with randomized smoothing; with ``write``
    write ``certify.json``, ``certify.md`` and ``certify.png`` (certified accuracy against the L2
    radius) into the run. The state is kept in ``RUN/certify-state/`` unless ``opts.resume`` is False.
    ``external``: certify this model from elsewhere instead; ``run_dir`` is then where the results go.
    It runs in one process (not sharded under torchrun: one clear error there)."""
    if env_world().active:
        raise ConfigError(
            "`method` smoothing under torchrun: randomized smoothing is not sharded; run it in one process"
        )
    run_dir = Path(run_dir)
    model, info = load_subject(run_dir, external, device=parse_device(opts.device), write=write)
    x, y, dataset = test_points(info, opts.n, opts.data_dir)
    state = None
    if opts.resume and run_dir.is_dir():
        (run_dir / "certify-state").mkdir(exist_ok=True)
        state = run_dir / "certify-state" / f"smoothing-sigma{opts.sigma:.6g}.safetensors"
    t0 = time.perf_counter()
    res = certify_smoothing(model.eval(), x, y, sigma=opts.sigma, n0=opts.n0, n=opts.n_samples, alpha=opts.alpha,
                            batch_size=opts.noise_batch, seed=opts.seed, state_path=state, progress=progress)  # fmt: skip
    d = math.prod(x.shape[1:])
    top = max([float(res.radius.max()) if res.n else 0.0, *opts.table_radii()])
    doc: dict[str, Any] = {
        "run": str(run_dir), "dataset": dataset, "model": info.model, "training_method": info.method,
        "settings": {**asdict(opts), "method": "smoothing", "n": len(y)},
        "environment": environment(),
        "certify": res.summary(opts.table_radii()),
        # an L2 certificate of radius r covers the L∞ ball of radius r / √d: a reading, not an L∞ certificate
        "linf_reading": {"d": d, "eps": info.eps, "l2_radius": info.eps * math.sqrt(d),
                         **summarize(res.certified(info.eps * math.sqrt(d)))},
        "curve": res.certified_accuracy([top * i / 40 for i in range(41)]),
        "points": {"digest": points_digest(x, y), "prediction": res.prediction.tolist(),
                   "radius": res.radius.tolist(), "p_lower": res.p_lower.tolist()},
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    if write:
        buf = io.BytesIO()
        plot_curves(buf, {f"smoothing σ = {opts.sigma:g}": doc["curve"]}, "radius", "L2 radius",
                    f"certified accuracy (randomized smoothing): {doc['run']}")  # fmt: skip
        write_bytes(run_dir / "certify.png", buf.getvalue())
        write_json(run_dir / "certify.json", doc)
        write_text(run_dir / "certify.md", smoothing_markdown(doc))
    return doc


def smoothing_markdown(doc: dict[str, Any]) -> str:
    s, c, li = doc["settings"], doc["certify"], doc["linf_reading"]
    text = f"# Randomized smoothing of `{doc['run']}`\n\n"
    text += (f"Dataset {doc['dataset']}, model {doc['model']}, trained with {doc['training_method']}; "
             f"CERTIFY of {CITATION}: σ = {s['sigma']:g}, n0 = {s['n0']}, n = {s['n_samples']} noise samples, "
             f"α = {s['alpha']:g} (each certificate holds with probability ≥ 1 − α), Gaussian noise not clipped "
             f"to [0, 1]; first {s['n']} test points, {c['seconds_per_point']:.3g} s per point on {s['device']}.\n\n")  # fmt: skip
    rows = [[f"{r['radius']:g}", pct_ci(r), str(r["n"])] for r in c["certified_accuracy"]]
    text += markdown_table(["L2 radius", "certified accuracy % [95% CI]", "N"], rows)
    text += (f"\nAbstained: {c['abstained']} of {c['n']} points. Radius 0: the smoothed classifier's accuracy "
             f"(correct, not abstaining).\n\n"
             f"L∞ reading (not an L∞ certificate of the model): an L2 radius r covers the L∞ ball of radius "
             f"r/√d (d = {li['d']}); at the run's L∞ ε = {li['eps']:g} (L2 radius {li['l2_radius']:.3g}): "
             f"{pct_ci(li)}.\n\n![certified accuracy against the L2 radius](certify.png)\n")  # fmt: skip
    return text
