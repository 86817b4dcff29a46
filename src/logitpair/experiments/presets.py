"""The paper's tables as presets: what each trains, how it is evaluated, and the paper's numbers.

One frozen :class:`Preset` per table of Kannan, Kurakin, Goodfellow 2018, *Adversarial Logit
Pairing* (https://arxiv.org/abs/1803.06373), plus ``engstrom`` (Engstrom, Ilyas, Athalye 2018,
https://arxiv.org/abs/1807.10272: the long targeted PGD that broke the released ImageNet-64 ALP
model) and ``transfer-vs-ensemble`` (the paper's remark that ALP's adversarial examples cut an
ensemble-adversarially-trained model from 66.6% to 47.1%). ``PRESETS`` is the registry;
variants are ``dataclasses.replace(PRESETS.get("table1"), eps=...)``.

A preset holds the *full-scale* settings: the paper's where ``/work/shared/PAPER.md`` (the
paper and the official TensorFlow code) gives them, ours otherwise, and every setting says
which (:attr:`Preset.settings`; rows add their own in :attr:`Row.ours`). The scales
(``smoke``, ``small``, ``full``) are applied by :mod:`logitpair.experiments.reproduce`.

The numbers are accuracies in % as printed in the paper (Tables 1-9) and PAPER.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from logitpair.errors import ConfigError
from logitpair.evaluation.spec import AttackSpec
from logitpair.registry import Registry

PROTOCOLS = ("untargeted", "targeted", "transfer")
ROLES = ("row", "source", "static")


@dataclass(frozen=True)
class Column:
    """A column of the paper's table: ``key`` names the metric we measure for it."""

    key: str
    label: str


@dataclass(frozen=True)
class Row:
    """One model a preset trains.

    ``role``: ``row`` (a line of the table), ``source`` (crafts black-box examples; an
    independently seeded model) or ``static`` (a frozen source model of ens-adv). ``settings``:
    full-scale config overrides on top of the preset's ``training``; ``small``: overrides on top
    of the demo's settings at ``--scale small``. ``paper``: column key -> the paper's number (%).
    ``source``: the row whose adversarial examples are this row's black-box attack; ``static``:
    rows whose run directories become this row's ``static_models``. ``model`` / ``small_model``:
    the architecture if not the preset's (small: ``lenet5``); a row's image side is its
    ``settings``' ``data.image_size``.
    ``seed``: offset of the training seed (independent copies differ here). ``ours``: this
    row's settings that the paper does not give.
    """

    name: str
    label: str
    method: str
    role: str = "row"
    settings: Mapping[str, Any] = field(default_factory=dict)
    small: Mapping[str, Any] = field(default_factory=dict)
    paper: Mapping[str, float] = field(default_factory=dict)
    source: str = ""
    static: tuple[str, ...] = ()
    model: str = ""
    small_model: str = ""
    seed: int = 0
    ours: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"row {self.name}: role must be one of {', '.join(ROLES)}, got {self.role!r}")


@dataclass(frozen=True)
class PaperAttack:
    """The attack a table reports, at the preset's eps ``eps_ref``.

    ``steps`` sign steps of ``step`` from one uniform random start, last iterate, no restarts
    (Madry et al.'s PGD and the official ``pgd*_EPS_STEP_NITER``), targeted towards the
    protocol's random class if ``targeted``. ``official``: the official notation of the same
    attack, used when the evaluation's eps is ``eps_ref`` (otherwise the step scales with eps).
    ``given``: True when PAPER.md gives this attack, False when it is ours.
    """

    label: str
    steps: int
    step: float
    eps_ref: float
    targeted: bool = False
    official: str = ""
    given: bool = True

    def spec(self, eps: float, steps: int | None = None) -> AttackSpec:
        """The attack at ``eps`` (``steps`` overrides the number of steps, e.g. for smoke runs)."""
        k = self.steps if steps is None else steps
        if self.official and abs(eps - self.eps_ref) < 1e-9:
            kind, e, s, _ = self.official.split("_")
            name = f"{kind}_{e}_{s}_{k}"
            return AttackSpec("official", {"spec": name}, f"{name} ({self.label})")
        step = self.step * eps / self.eps_ref
        params = {"steps": k, "step_size": step, "restarts": 1, "keep_best": False}
        return AttackSpec(
            "pgd", params, f"{'targeted ' if self.targeted else ''}PGD-{k}, step {step:.4g} ({self.label})"
        )


# Engstrom et al. 2018 (their code): targeted PGD, 1000 steps of 0.005, eps 16/255, random target.
ENGSTROM_STEPS = 1000
ENGSTROM_STEP = 0.005
ENGSTROM_EPS = 16 / 255


def long_attack(eps: float, steps: int = ENGSTROM_STEPS) -> AttackSpec:
    """The long targeted PGD of Engstrom et al. 2018 at ``eps``: 1000 steps of 0.005 scaled by
    ``eps / (16/255)`` (ours when eps is not 16/255), one random start; with fewer ``steps`` (smoke
    runs) the step is Madry's ``2.5 eps / steps`` (ours). The per-example best iterate is kept
    (never weaker than the last one)."""
    step = ENGSTROM_STEP * eps / ENGSTROM_EPS if steps == ENGSTROM_STEPS else 2.5 * eps / steps
    label = f"targeted PGD-{steps}, step {step:.4g} (Engstrom et al. 2018: 1000 steps of 0.005 at 16/255)"
    return AttackSpec("pgd", {"steps": steps, "step_size": step, "restarts": 1}, label)


@dataclass(frozen=True)
class Comparison:
    """A paired McNemar test: metric ``metric_a`` of row ``a`` against ``metric_b`` of row ``b``
    on the same points (``metric_b`` defaults to ``metric_a``)."""

    a: str
    b: str
    metric_a: str
    metric_b: str = ""

    @property
    def other_metric(self) -> str:
        return self.metric_b or self.metric_a


def pairs(a: str, b: str, metrics: tuple[str, ...]) -> tuple[Comparison, ...]:
    return tuple(Comparison(a, b, m) for m in metrics)


@dataclass(frozen=True)
class Preset:
    """One table: its models (``rows``), protocol, paper attack, full-scale settings and the paper's numbers.

    ``protocol``: ``untargeted`` (MNIST / SVHN tables: white box, black box, clean), ``targeted``
    (ImageNet tables: random-target attacks, top-1 / top-5) or ``transfer`` (a source x target
    matrix). ``dataset`` is the paper's; ``datasets`` lists others it accepts at full scale
    (substitutes are labelled in the report). ``training``: full-scale config overrides shared
    by every row. ``settings``: (setting, provenance) pairs for the report, provenance one of
    ``paper``, ``official code`` or ``ours (...)``. ``image_size``: side for folder datasets
    (0: the dataset's default); ``smoke_size``: side at ``--scale smoke``. ``full_points``: test
    points at full scale (None: the whole test set).
    """

    name: str
    table: str
    title: str
    dataset: str
    model: str
    eps: float
    protocol: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    attack: PaperAttack
    training: Mapping[str, Any] = field(default_factory=dict)
    settings: tuple[tuple[str, str], ...] = ()
    compare: tuple[Comparison, ...] = ()
    datasets: tuple[str, ...] = ()
    image_size: int = 0
    smoke_size: int = 32
    full_points: int | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"preset {self.name}: protocol must be one of {', '.join(PROTOCOLS)}")
        names = [r.name for r in self.rows]
        if len(set(names)) != len(names):
            raise ConfigError(f"preset {self.name}: two rows share a name")
        for i, r in enumerate(self.rows):
            for dep in r.static:
                if dep not in names[:i]:
                    raise ConfigError(f"preset {self.name}: row {r.name}'s static model {dep} must come before it")
            if r.source and r.source not in names:
                raise ConfigError(f"preset {self.name}: row {r.name}'s source {r.source} is not a row")
        keys = {c.key for c in self.columns}
        for r in self.rows:
            unknown = set(r.paper) - keys
            if unknown:
                raise ConfigError(f"preset {self.name}: row {r.name} has numbers for unknown columns {unknown}")
        for c in self.compare:
            if c.a not in names or c.b not in names:
                raise ConfigError(f"preset {self.name}: comparison {c} names an unknown row")

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def table_rows(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if r.role == "row")

    @property
    def all_datasets(self) -> tuple[str, ...]:
        return (self.dataset, *self.datasets)


PRESETS: Registry = Registry("preset")


def register(preset: Preset) -> Preset:
    PRESETS.register(preset.name)(preset)
    return preset


# --------------------------------------------------------------------------- shared settings
WB_BB_CLEAN = (Column("white_box", "White box"), Column("black_box", "Black box"), Column("clean", "Clean"))
WB_TOP = (Column("wb_top1", "White box, targeted: top-1"), Column("wb_top5", "White box, targeted: top-5"))
BB_TOP = (Column("bb_top1", "Black box: top-1"), Column("bb_top5", "Black box: top-5"))

# MNIST (Madry et al. 2018, whose network and attack the paper uses)
MNIST_TRAINING: dict[str, Any] = {
    "optim": {"optimizer": "adam", "lr": 1e-4, "schedule": "constant", "batch_size": 50, "epochs": 83},
    "loss": {"eps": 0.3, "attack_steps": 40, "attack_step_size": 0.01},
}
MNIST_SETTINGS = (
    ("LeNet-style network of Madry et al. (`lenet`: conv 5x5x32, pool, conv 5x5x64, pool, fc 1024)", "paper"),
    ("L∞ ε = 0.3; training and white-box attack PGD, 40 steps of 0.01 from a random start", "paper"),
    ("M-PGD: ½ CE clean + ½ CE adversarial; ALP adds λ·mean squared logit difference", "paper"),
    ("ALP λ = 0.5", "ours (inside the paper's range 0.2-1 for MNIST)"),
    ("Adam, lr 1e-4, batch 50, 83 epochs (≈ 100,000 steps), constant schedule", "ours (Madry et al.'s MNIST recipe)"),
    ("black-box source: an independently seeded M-PGD model of the same architecture, PGD-40 crafted on it",
     "ours (PAPER.md: 'a different, independently trained source model')"),
)  # fmt: skip
MNIST_ATTACK = PaperAttack("the paper's MNIST PGD: 40 steps of ε/30, one random start", 40, 0.01, 0.3)

# SVHN (RevNet-9); PAPER.md gives neither the eps nor the attack: ours
SVHN_TRAINING: dict[str, Any] = {
    "optim": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "cosine",
              "batch_size": 128, "epochs": 50},
    "loss": {"eps": 8 / 255, "attack_steps": 7, "attack_step_size": 2 / 255},
}  # fmt: skip
SVHN_SETTINGS = (
    ("RevNet-9 (`revnet9`; our configuration: 3 stages x 3 reversible blocks, widths 32/64/112)", "paper (the widths are ours)"),
    ("L∞ ε = 8/255; training PGD 7 steps of 2/255 from a random start", "ours (PAPER.md gives no SVHN ε or attack)"),
    ("white-box attack PGD-40, step 2.5·ε/40, one random start, last iterate", "ours (Madry-style; PAPER.md gives none)"),
    ("SGD, momentum 0.9, lr 0.01, weight decay 5e-4, batch 128, 50 epochs, cosine", "ours"),
    ("black-box source: an independently seeded M-PGD RevNet-9, the same PGD crafted on it", "ours"),
)  # fmt: skip
SVHN_ATTACK = PaperAttack(
    "PGD-40, step 2.5·ε/40, one random start (ours)", 40, 2.5 * (8 / 255) / 40, 8 / 255, given=False
)

# ImageNet: the official TensorFlow recipe (tensorflow/models research/adversarial_logit_pairing)
OFFICIAL_TRAINING: dict[str, Any] = {
    "optim": {"optimizer": "rmsprop-tf", "lr": 0.045, "lr_reference_batch": 32, "schedule": "step", "step_every": 2,
              "step_gamma": 0.94, "weight_decay": 1e-4, "rmsprop_decay": 0.9, "rmsprop_eps": 1.0,
              "batch_size": 1600, "epochs": 90},
    "ema_decay": 0.9999,
    "ema_schedule": "tf",
    "loss": {"eps": 16 / 255, "attack": "pgdll_16_2_10", "label_smoothing": 0.1, "lam": 0.5},
}  # fmt: skip
OFFICIAL_SETTINGS = (
    ("L∞ ε = 16/255; M-PGD / ALP trained with `pgdll_16_2_10` (least-likely class, 10 steps of 2/255)", "official code"),
    ("ALP λ = 0.5; label smoothing 0.1; weight decay 1e-4", "official code"),
    ("RMSProp as TensorFlow (`rmsprop-tf`: decay 0.9, ε 1.0), lr 0.045 per 32 images, x0.94 every 2 epochs", "official code"),
    ("EMA of the weights 0.9999 with the official warm-up (`ema_schedule: tf`)", "official code"),
    ("global batch 1600 (32 per replica x 50 aggregated replicas; no backup workers, see README)", "official code"),
    ("90 epochs", "ours (PAPER.md gives none)"),
    (("white-box: targeted PGD towards a random class ≠ label, `pgdrnd_16_2_10` (10 steps of 2/255, one random "
     "start, last iterate); the class is the protocol's shared target instead of pgdrnd's own draw"),
     "ours (PAPER.md gives the targeted protocol, not its step count)"),
    ("evaluation on the first 1,000 validation images", "ours"),
)  # fmt: skip
IMAGENET_ATTACK = PaperAttack(
    "targeted PGD, 10 steps of ε/8, one random start, last iterate", 10, 2 / 255, 16 / 255, targeted=True,
    official="pgdrnd_16_2_10", given=False,
)  # fmt: skip
INCEPTION: dict[str, Any] = {"model": "inceptionv3", "data": {"image_size": 299}}
RESNET101: dict[str, Any] = {"model": "resnet101", "data": {"image_size": 224}}

_SOURCE_SMALL = {"optim": {"epochs": 1}}  # the demo's black-box source trains one epoch


def _mpgd(paper: Mapping[str, float], source: str = "mpgd-source", **kw: Any) -> Row:
    return Row("mpgd", "M-PGD", "mpgd", paper=paper, source=source, settings={"loss": {"lam": 0.0}}, **kw)


def _alp(paper: Mapping[str, float], source: str = "mpgd-source", lam: float = 0.5, **kw: Any) -> Row:
    return Row("alp", "ALP", "alp", paper=paper, source=source, settings={"loss": {"lam": lam}}, **kw)


MPGD_SOURCE = Row("mpgd-source", "M-PGD source (independently seeded)", "mpgd", role="source", seed=1,
                  small=_SOURCE_SMALL)  # fmt: skip


# --------------------------------------------------------------------------- Tables 1, 2, 7, 8
register(
    Preset(
        name="table1", table="Table 1", title="MNIST: M-PGD vs ALP (LeNet, PGD)", dataset="mnist",
        datasets=("fashion-mnist",), model="lenet", eps=0.3, protocol="untargeted", columns=WB_BB_CLEAN,
        rows=(
            _mpgd({"white_box": 93.2, "black_box": 96.0, "clean": 98.5}),
            _alp({"white_box": 96.4, "black_box": 97.5, "clean": 98.8}),
            MPGD_SOURCE,
        ),
        attack=MNIST_ATTACK, training=MNIST_TRAINING, settings=MNIST_SETTINGS,
        compare=pairs("alp", "mpgd", ("white_box", "strong", "black_box")),
    )
)  # fmt: skip

register(
    Preset(
        name="table2", table="Table 2", title="SVHN: M-PGD vs ALP (RevNet-9, PGD)", dataset="svhn",
        model="revnet9", eps=8 / 255, protocol="untargeted", columns=WB_BB_CLEAN,
        rows=(
            _mpgd({"white_box": 44.4, "black_box": 55.4, "clean": 96.9}),
            _alp({"white_box": 46.9, "black_box": 56.2, "clean": 96.2}, ours=("λ 0.5 (paper: 0.5-1 helped on SVHN)",)),
            MPGD_SOURCE,
        ),
        attack=SVHN_ATTACK, training=SVHN_TRAINING, settings=SVHN_SETTINGS,
        compare=pairs("alp", "mpgd", ("white_box", "strong", "black_box")),
    )
)  # fmt: skip

register(
    Preset(
        name="table7", table="Table 7", title="MNIST logit squeezing: M-PGD vs LSQ (LeNet, PGD)", dataset="mnist",
        datasets=("fashion-mnist",), model="lenet", eps=0.3, protocol="untargeted", columns=WB_BB_CLEAN,
        rows=(
            _mpgd({"white_box": 93.2, "black_box": 96.0, "clean": 98.8}),
            Row("lsq", "Logit squeezing", "lsq", paper={"white_box": 86.4, "black_box": 96.8, "clean": 99.0},
                source="mpgd-source", settings={"loss": {"lam": 0.05, "noise_std": 0.5}},
                small={"loss": {"lam": 0.05}},
                ours=("λ 0.05 and Gaussian noise σ 0.5 (PAPER.md gives neither)",)),
            MPGD_SOURCE,
        ),
        attack=MNIST_ATTACK, training=MNIST_TRAINING, settings=MNIST_SETTINGS,
        compare=pairs("lsq", "mpgd", ("white_box", "strong", "black_box")),
        notes=(("Mosbach et al. 2018 found MNIST LSQ at 70.6% under the baseline PGD but 5.0% under their strongest "
               "attack: compare the white-box column with the worst case and the audit verdict."),),
    )
)  # fmt: skip

register(
    Preset(
        name="table8", table="Table 8", title="SVHN clean logit pairing: M-PGD vs CLP (RevNet-9, PGD)",
        dataset="svhn", model="revnet9", eps=8 / 255, protocol="untargeted", columns=WB_BB_CLEAN,
        rows=(
            _mpgd({"white_box": 44.4, "black_box": 55.4, "clean": 96.9}),
            Row("clp", "Clean logit pairing", "clp", paper={"white_box": 39.1, "black_box": 55.8, "clean": 95.5},
                source="mpgd-source", settings={"loss": {"lam": 0.5, "noise_std": 0.5}},
                small={"loss": {"lam": 0.5}},
                ours=("λ 0.5 and Gaussian noise σ 0.5 (PAPER.md gives neither)",)),
            MPGD_SOURCE,
        ),
        attack=SVHN_ATTACK, training=SVHN_TRAINING, settings=SVHN_SETTINGS,
        compare=pairs("clp", "mpgd", ("white_box", "strong", "black_box")),
        notes=(("Mosbach et al. 2018: CLP distorts the loss surface so that few-step gradient attacks fail; "
               "compare the white-box column with the worst case and the audit verdict."),),
    )
)  # fmt: skip


# --------------------------------------------------------------------------- ImageNet: Tables 3-6 and 9
_STATICS = (
    Row("static-a", "undefended static source A (ens-adv)", "regular", role="static", seed=10,
        ours=(("undefended model of the same architecture, independently seeded (Tramèr et al. used pre-trained "
              "models of other architectures)"),)),
    Row("static-b", "undefended static source B (ens-adv)", "regular", role="static", seed=11,
        ours=("as static source A, another seed",)),
)  # fmt: skip
_TRAMER_OURS = (("ens-adv: step-l.l. on a source rotating over the current model and the two static models, "
                "Kurakin's batch mix (λ 0.3, per-example ε ~ truncated normal on [0, 16/255])"),)  # fmt: skip
_KURAKIN_OURS = (("Kurakin et al. 2017: step-l.l. on half the batch, λ 0.3, per-example ε ~ truncated normal "
                 "on [0, 16/255], the official optimiser"),)  # fmt: skip
UNDEFENDED_SOURCE = Row("undefended-source", "undefended source (independently seeded)", "regular", role="source",
                        seed=1, small=_SOURCE_SMALL,
                        ours=("black-box source: an independently seeded undefended model (PAPER.md names none)",))  # fmt: skip

register(
    Preset(
        name="table3", table="Table 3", title="ImageNet InceptionV3: white-box targeted attack, top-1 / top-5",
        dataset="imagenet", model="inceptionv3", image_size=299, smoke_size=75, eps=16 / 255, protocol="targeted",
        columns=WB_TOP,
        rows=(
            Row("regular", "Regular training", "regular", paper={"wb_top1": 0.7, "wb_top5": 4.4}),
            *_STATICS,
            Row("ens-adv", "Tramèr et al. ensemble adversarial training", "ens-adv",
                paper={"wb_top1": 1.3, "wb_top5": 6.5}, static=("static-a", "static-b"), ours=_TRAMER_OURS),
            Row("kurakin", "Kurakin et al. adversarial training", "kurakin", paper={"wb_top1": 1.5, "wb_top5": 5.5},
                ours=_KURAKIN_OURS),
            _mpgd({"wb_top1": 3.9, "wb_top5": 10.3}, source=""),
            _alp({"wb_top1": 27.9, "wb_top5": 55.4}, source=""),
        ),
        attack=IMAGENET_ATTACK, training={**OFFICIAL_TRAINING, "data": {"image_size": 299}},
        settings=(("InceptionV3 at 299x299", "paper (the image size is ours)"), *OFFICIAL_SETTINGS),
        compare=pairs("alp", "mpgd", ("wb_top1", "wb_top5", "worst_top1")), full_points=1000,
        notes=(("Engstrom et al. 2018 broke the released ALP model with a much longer targeted PGD: compare the "
               "paper's attack with the long PGD and the worst case."),),
    )
)  # fmt: skip

register(
    Preset(
        name="table4", table="Table 4", title="ImageNet InceptionV3: black-box attack, top-1 / top-5",
        dataset="imagenet", model="inceptionv3", image_size=299, smoke_size=75, eps=16 / 255, protocol="targeted",
        columns=BB_TOP,
        rows=(
            _mpgd({"bb_top1": 36.5, "bb_top5": 62.3}, source="undefended-source"),
            _alp({"bb_top1": 46.7, "bb_top5": 74.0}, source="undefended-source"),
            *_STATICS,
            Row("ens-adv", "Tramèr et al. ensemble adversarial training", "ens-adv",
                paper={"bb_top1": 47.1, "bb_top5": 74.3}, static=("static-a", "static-b"),
                source="undefended-source", ours=_TRAMER_OURS),
            UNDEFENDED_SOURCE,
        ),
        attack=IMAGENET_ATTACK, training={**OFFICIAL_TRAINING, "data": {"image_size": 299}},
        settings=(("InceptionV3 at 299x299", "paper (the image size is ours)"), *OFFICIAL_SETTINGS,
                  (("black box: the paper's targeted attack crafted on an independently seeded undefended "
                   "InceptionV3 with the same targets"), "ours")),
        compare=pairs("alp", "mpgd", ("bb_top1", "bb_top5")), full_points=1000,
    )
)  # fmt: skip

_ALP_BY_ARCH = (
    Row("alp-inceptionv3", "ALP, InceptionV3", "alp", settings={"loss": {"lam": 0.5}, **INCEPTION}),
    Row("alp-resnet101", "ALP, ResNet-101", "alp", small_model="lenet", settings={"loss": {"lam": 0.5}, **RESNET101},
        ours=("ResNet-101 at 224x224; at --scale small Madry's larger `lenet` stands in for it",)),
)  # fmt: skip


def _with(row: Row, **kw: Any) -> Row:
    from dataclasses import replace

    return replace(row, **kw)


register(
    Preset(
        name="table5", table="Table 5", title="ALP by architecture, white box: InceptionV3 vs ResNet-101",
        dataset="imagenet", model="inceptionv3", image_size=299, smoke_size=75, eps=16 / 255, protocol="targeted",
        columns=WB_TOP,
        rows=(
            _with(_ALP_BY_ARCH[0], paper={"wb_top1": 27.9, "wb_top5": 55.4}),
            _with(_ALP_BY_ARCH[1], paper={"wb_top1": 30.2, "wb_top5": 55.8}),
        ),
        attack=IMAGENET_ATTACK, training={**OFFICIAL_TRAINING, "data": {"image_size": 299}},
        settings=(("InceptionV3 at 299x299, ResNet-101 at 224x224", "paper (the image sizes are ours)"),
                  *OFFICIAL_SETTINGS),
        compare=pairs("alp-resnet101", "alp-inceptionv3", ("wb_top1", "wb_top5", "worst_top1")), full_points=1000,
    )
)  # fmt: skip

register(
    Preset(
        name="table6", table="Table 6", title="ALP by architecture, black box: InceptionV3 vs ResNet-101",
        dataset="imagenet", model="inceptionv3", image_size=299, smoke_size=75, eps=16 / 255, protocol="targeted",
        columns=BB_TOP,
        rows=(
            _with(_ALP_BY_ARCH[0], paper={"bb_top1": 46.7, "bb_top5": 74.0}, source="source-inceptionv3"),
            _with(_ALP_BY_ARCH[1], paper={"bb_top1": 36.0, "bb_top5": 62.2}, source="source-resnet101"),
            _with(UNDEFENDED_SOURCE, name="source-inceptionv3", label="undefended InceptionV3 source"),
            _with(UNDEFENDED_SOURCE, name="source-resnet101", label="undefended ResNet-101 source",
                  small_model="lenet", settings=RESNET101),
        ),
        attack=IMAGENET_ATTACK, training={**OFFICIAL_TRAINING, "data": {"image_size": 299}},
        settings=(("InceptionV3 at 299x299, ResNet-101 at 224x224", "paper (the image sizes are ours)"),
                  *OFFICIAL_SETTINGS,
                  (("black box: the paper's targeted attack crafted on an independently seeded undefended model of "
                   "the same architecture, same targets"), "ours")),
        compare=pairs("alp-resnet101", "alp-inceptionv3", ("bb_top1", "bb_top5")), full_points=1000,
    )
)  # fmt: skip

register(
    Preset(
        name="table9", table="Table 9", title="ImageNet ResNet-101, white box: mixup and label smoothing vs ALP",
        dataset="imagenet", model="resnet101", image_size=224, smoke_size=32, eps=16 / 255, protocol="targeted",
        columns=WB_TOP,
        rows=(
            Row("mixup", "Mixup", "mixup", paper={"wb_top1": 0.1, "wb_top5": 1.5},
                settings={"loss": {"mixup_alpha": 0.2}}, ours=("mixup α 0.2 (Zhang et al.'s ImageNet value)",)),
            Row("ls", "Label smoothing", "ls", paper={"wb_top1": 1.6, "wb_top5": 10.0},
                settings={"loss": {"smoothing": 0.1}}),
            _alp({"wb_top1": 30.2, "wb_top5": 55.8}, source=""),
        ),
        attack=IMAGENET_ATTACK, training={**OFFICIAL_TRAINING, "data": {"image_size": 224}},
        settings=(("ResNet-101 at 224x224 (the ALP row's numbers equal Table 5's ResNet-101)",
                   "paper (the image size is ours)"),
                  ("label smoothing δ 0.1", "official code (its value for the ALP models)"), *OFFICIAL_SETTINGS),
        compare=(*pairs("alp", "ls", ("wb_top1", "wb_top5")), *pairs("alp", "mixup", ("wb_top1", "wb_top5"))),
        full_points=1000,
    )
)  # fmt: skip


# --------------------------------------------------------------------------- later findings
register(
    Preset(
        name="engstrom", table="Engstrom et al. 2018",
        title="ImageNet-64 ALP (ResNet-v2-50, pgdll_16_2_10): the paper's attack vs a long targeted PGD",
        dataset="imagenet", datasets=("tiny-imagenet",), model="resnet-v2-50", image_size=64, smoke_size=64,
        eps=16 / 255, protocol="targeted",
        columns=(Column("wb_top1", "Paper's attack (claimed): top-1"),
                 Column("long_top1", "Long targeted PGD: top-1"),
                 Column("long_success", "Long targeted PGD: success rate")),
        rows=(
            _alp({"wb_top1": 27.9, "long_top1": 0.6, "long_success": 98.6}, source=""),
        ),
        attack=IMAGENET_ATTACK, training={**OFFICIAL_TRAINING, "data": {"image_size": 64}},
        settings=(("ResNet-v2-50 on 64x64 ImageNet (or Tiny ImageNet), as the official code's released model",
                   "official code"), *OFFICIAL_SETTINGS[:-2],
                  ("paper's attack: `pgdrnd_16_2_10` with the protocol's random target", "ours (see Table 3)"),
                  ("long attack: targeted PGD, 1000 steps of 0.005, random target", "Engstrom et al. 2018"),
                  ("evaluation on the first 1,000 validation images", "ours")),
        compare=(Comparison("alp", "alp", "wb_top1", "long_top1"),),
        full_points=1000,
        notes=(("Engstrom et al. report 0.6% (abstract) and 0.1% accuracy with 98.6% attack success on their "
               "default 100-image run of the released model, against the claimed 27.9%."),),
    )
)  # fmt: skip

_FMNIST_TRAINING: dict[str, Any] = {
    "optim": {"optimizer": "adam", "lr": 1e-3, "schedule": "cosine", "batch_size": 128, "epochs": 20},
    "loss": {"eps": 0.1, "attack_steps": 7, "attack_step_size": 0.025},
}  # fmt: skip
register(
    Preset(
        name="transfer-vs-ensemble", table="Transfer to ensemble adversarial training",
        title="Ensemble adversarial training under transfer from ALP vs from an undefended model (Fashion-MNIST)",
        dataset="fashion-mnist", datasets=("mnist",), model="lenet", eps=0.1, protocol="transfer",
        columns=(Column("from_undefended", "Transfer from an undefended model"),
                 Column("from_alp", "Transfer from the ALP model")),
        rows=(
            *_STATICS,
            Row("ens-adv", "Ensemble adversarial training (Tramèr et al.)", "ens-adv",
                paper={"from_undefended": 66.6, "from_alp": 47.1}, static=("static-a", "static-b"),
                ours=("ens-adv with two undefended static sources; per-example ε ~ truncated normal on [0, ε]",)),
            Row("alp", "ALP (transfer source)", "alp", role="source", settings={"loss": {"lam": 0.5}}),
            Row("undefended", "undefended model (transfer source, held out)", "regular", role="source", seed=1),
        ),
        attack=PaperAttack("PGD-40, step 2.5·ε/40, one random start (ours)", 40, 2.5 * 0.1 / 40, 0.1, given=False),
        training=_FMNIST_TRAINING,
        settings=(("Fashion-MNIST, Madry's LeNet (`lenet`), L∞ ε = 0.1", "ours (the paper's figure is ImageNet)"),
                  ("training PGD 7 steps of 0.025 for ALP (λ 0.5); Adam lr 1e-3, cosine, batch 128, 20 epochs",
                   "ours (the demo's settings, longer)"),
                  ("transfer attack PGD-40, step 2.5·ε/40, crafted on each source (logitpair.evaluation.transfer)",
                   "ours"),
                  ("the undefended source is held out: not one of the ens-adv static models", "ours")),
        compare=(Comparison("ens-adv", "ens-adv", "from_alp", "from_undefended"),),
        notes=(("The paper: adversarial examples from the ALP model cut an ensemble-adversarially-trained ImageNet "
               "model from 66.6% to 47.1% (transfer from other sources vs from ALP)."),),
    )
)  # fmt: skip


def get_preset(name: str) -> Preset:
    return PRESETS.get(name)
