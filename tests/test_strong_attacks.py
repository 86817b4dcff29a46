"""APGD (CE, DLR, targeted DLR), Square and the random-noise baseline.

Everything runs on a tiny MLP trained for a fraction of a second on separable synthetic
8x8 images with 5 classes, so the whole file takes a few seconds on one CPU core.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from logitpair.attacks import ATTACKS, apgd, apgd_ce, apgd_t, fgsm, random_noise, square
from logitpair.attacks.apgd import apgd_checkpoints, dlr_loss, dlr_targeted_loss, halving_condition
from logitpair.attacks.square import square_p_schedule
from logitpair.threat import Linf

NUM_CLASSES = 5
STRONG = ["apgd-ce", "apgd-dlr", "apgd-t", "square", "noise"]
SMALL_BUDGET = {
    "apgd-ce": {"steps": 10},
    "apgd-dlr": {"steps": 10},
    "apgd-t": {"steps": 5, "n_target_classes": 2},
    "square": {"queries": 50},
    "noise": {"samples": 3},
}


def _data(n: int, g: torch.Generator, protos: Tensor) -> tuple[Tensor, Tensor]:
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = (0.5 + 0.15 * protos[y] + 0.15 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, Tensor, Tensor]:
    """A trained, undefended MLP (with BatchNorm, to catch train-mode leaks) and 128 test points."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randint(0, 2, (NUM_CLASSES, 1, 8, 8), generator=g).float() * 2 - 1
    x_train, y_train = _data(512, g, protos)
    x_test, y_test = _data(128, g, protos)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(x_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, x_test, y_test


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- invariants over every new attack ---------------------------------------------------


@pytest.mark.parametrize("name", STRONG)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_invariants(setup, name: str, dtype: torch.dtype) -> None:
    model, x, y = setup
    model = copy.deepcopy(model).to(dtype)
    x = x[:32].to(dtype)
    y = y[:32]
    model.train()
    model[2].eval()  # a submodule with its own flag, which must survive too
    model[1].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    requires = [p.requires_grad for p in model.parameters()]
    threat = Linf(0.1)

    x_adv = ATTACKS.get(name)(model, x, y, threat=threat, generator=gen(), **SMALL_BUDGET[name])

    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert threat.contains(x, x_adv).all()
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == requires
    for k, v in model.state_dict().items():  # parameters and BatchNorm buffers
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", STRONG)
def test_seeded_runs_are_deterministic(setup, name: str) -> None:
    model, x, y = setup
    x, y = x[:32], y[:32]
    run = lambda seed: ATTACKS.get(name)(model, x, y, threat=Linf(0.1), generator=gen(seed), **SMALL_BUDGET[name])
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


@pytest.mark.parametrize("name", STRONG)
def test_adversarial_accuracy_at_most_clean(setup, name: str) -> None:
    model, x, y = setup
    x_adv = ATTACKS.get(name)(model, x, y, threat=Linf(0.12), generator=gen(), **SMALL_BUDGET[name])
    assert accuracy(model, x_adv, y) <= accuracy(model, x, y)


def test_misclassified_clean_points_are_returned_unchanged(setup) -> None:
    model, x, y = setup
    y_wrong = (y + 1) % NUM_CLASSES
    for attack in (apgd_ce, apgd_t, square):
        assert torch.equal(attack(model, x[:16], y_wrong[:16], threat=Linf(0.1), generator=gen()), x[:16])


# --- APGD: checkpoints, halving rule, losses ---------------------------------------------


def test_checkpoints_follow_the_paper() -> None:
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (next 1.05 > 1); w_j = ceil(p_j * N)
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1000) == [0, 220, 410, 570, 700, 800, 870, 930, 990]
    assert apgd_checkpoints(10) == [0, 3, 5, 6, 7, 8, 9, 10]  # 2.2, 4.1, 5.7, 7, 8, 8.7, 9.3, 9.9
    for n in (1, 2, 5, 17, 250):
        w = apgd_checkpoints(n)
        assert w[0] == 0 and w[-1] <= n and all(a < b for a, b in itertools.pairwise(w))


def test_halving_condition_on_constructed_histories() -> None:
    # Five examples (columns), windows of 4 steps, rho = 0.75: condition 1 needs < 3 increases.
    up = [0.0, 1.0, 2.0, 3.0, 4.0]  # 4 increases
    three = [0.0, 1.0, 2.0, 3.0, 2.5]  # 3 increases: not < 3
    two = [0.0, 1.0, 0.5, 2.0, 1.5]  # 2 increases: < 3
    losses = torch.tensor([up, three, two, up, three]).T
    halved_last = torch.tensor([False, True, True, True, False])
    best_last = torch.tensor([4.0, 3.0, 9.0, 5.0, 3.0])
    best_now = torch.tensor([4.0, 3.0, 9.0, 5.0, 3.5])
    got = halving_condition(losses, rho=0.75, halved_last=halved_last, best_last=best_last, best_now=best_now)
    # 0: cond 1 false, cond 2 true (not halved last time, best unchanged)
    # 1: cond 1 false (3 is not < 3), cond 2 false (halved last time)
    # 2: cond 1 true
    # 3: cond 1 false, cond 2 false (halved last time although best unchanged)
    # 4: cond 1 false, cond 2 false (best improved)
    assert got.tolist() == [True, False, True, False, False]
    # A flat history never "increases": condition 1 holds.
    flat = torch.zeros(5, 1)
    no = torch.tensor([True])
    best_last, best_now = torch.ones(1), torch.full((1,), 2.0)
    assert halving_condition(flat, rho=0.75, halved_last=no, best_last=best_last, best_now=best_now)


def test_step_size_is_halved_exactly_where_the_conditions_hold(setup) -> None:
    model, x, y = setup
    threat = Linf(0.1)
    trace: dict = {}
    for loss in ("ce", "dlr"):
        apgd(model, x, y, threat=threat, steps=40, loss=loss, generator=gen(), trace=trace)
    halved_any = kept_any = False
    for run in trace["runs"]:
        eta, losses, best, halved = run["step_size"], run["loss"], run["best_loss"], run["halved"]
        w = run["checkpoints"]
        assert w == [c for c in apgd_checkpoints(40) if 0 < c < 40]
        assert torch.allclose(eta[0], torch.full_like(eta[0], 2 * threat.eps))
        for k in range(1, len(eta)):  # the step size only changes right after a checkpoint
            if k not in w:
                assert torch.equal(eta[k], eta[k - 1])
        halved_last = torch.zeros(eta.shape[1], dtype=torch.bool)
        starts = [0, *w]
        for j, wj in enumerate(w):
            window = losses[starts[j] : wj + 1].clone()
            if j > 0:  # after a halving the iterate at the previous checkpoint became x_max
                window[0] = torch.where(halved_last, best[starts[j]], window[0])
            expect = halving_condition(
                window, rho=0.75, halved_last=halved_last, best_last=best[starts[j]], best_now=best[wj]
            )
            assert torch.equal(halved[j], expect)
            assert torch.equal(eta[wj], torch.where(expect, eta[wj - 1] / 2, eta[wj - 1]))
            halved_last = expect
            halved_any |= bool(expect.any())
            kept_any |= bool((~expect).any())
    assert halved_any and kept_any  # both branches were exercised


class Recorder(nn.Module):
    """Records every batch the model is queried on: for APGD, the clean batch then each iterate."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        return self.model(x)


def test_apgd_iterates_follow_the_update_rule(setup) -> None:
    """Replay Algorithm 1 on the recorded iterates: momentum step, and restart from x_max."""
    model, x, y = setup
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    x, y = x[keep][:16], y[keep][:16]
    threat, steps, alpha = Linf(0.1), 30, 0.75
    recorder, trace = Recorder(model), {}
    apgd_ce(recorder, x, y, threat=threat, steps=steps, generator=gen(), trace=trace)
    run = trace["runs"][0]
    iterates = recorder.inputs[1:]  # x^(0) .. x^(N)
    assert len(iterates) == steps + 1
    halved_at = dict(zip(run["checkpoints"], run["halved"]))
    assert 27 in halved_at and 28 in halved_at  # two consecutive checkpoints are exercised

    def loss_and_grad(point: Tensor) -> tuple[Tensor, Tensor]:
        point = point.clone().requires_grad_(True)
        loss = F.cross_entropy(model(point), y, reduction="none")
        return loss.detach(), torch.autograd.grad(loss.sum(), point)[0]

    view = (-1, 1, 1, 1)
    x_max, f_max = iterates[0], loss_and_grad(iterates[0])[0]
    base_prev = None
    restarted = 0
    for k in range(steps):
        f_k = loss_and_grad(iterates[k])[0]
        if k > 0:
            better = f_k > f_max
            x_max = torch.where(better.view(view), iterates[k], x_max)
            f_max = torch.where(better, f_k, f_max)
        base = iterates[k]
        if k in halved_at:
            base = torch.where(halved_at[k].view(view), x_max, base)
            restarted += int(halved_at[k].sum())
        eta = run["step_size"][k].view(view)
        z = threat.project(x, base + eta * loss_and_grad(base)[1].sign())
        if base_prev is not None:
            z = threat.project(x, base + alpha * (z - base) + (1 - alpha) * (base - base_prev))
        assert torch.allclose(z, iterates[k + 1], atol=1e-6), f"step {k}"
        base_prev = base
    assert restarted > 0


def test_best_loss_is_the_running_maximum(setup) -> None:
    model, x, y = setup
    trace: dict = {}
    apgd_ce(model, x, y, threat=Linf(0.1), steps=30, generator=gen(), trace=trace)
    best = trace["runs"][0]["best_loss"]
    assert (best[1:] >= best[:-1]).all()
    assert torch.equal(best[-1], trace["runs"][0]["loss"].max(0).values)


def test_dlr_losses_by_hand() -> None:
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [3.0, 1.0, 0.0, -1.0]])
    # y = 0 (correct): -(3 - 1) / (3 - 0); y = 2 (wrong): -(0 - 3) / (3 - 0)
    assert torch.allclose(dlr_loss(z, torch.tensor([0, 2])), torch.tensor([-2 / 3, 1.0]))
    # targeted, y = 0, t = 3: -(3 - (-1)) / (3 - (0 + (-1)) / 2)
    got = dlr_targeted_loss(z[:1], torch.tensor([0]), torch.tensor([3]))
    assert torch.allclose(got, torch.tensor([-4 / 3.5]))
    # invariant to shifting and scaling the logits
    assert torch.allclose(dlr_loss(5 * z + 2, torch.tensor([0, 2])), dlr_loss(z, torch.tensor([0, 2])))


def test_bad_options_fail_loudly(setup) -> None:
    model, x, y = setup
    two_class = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    y2 = y[:4] % 2
    with pytest.raises(ValueError, match="at least 3 classes"):
        apgd(two_class, x[:4], y2, threat=Linf(0.1), steps=2, loss="dlr")
    with pytest.raises(ValueError, match="at least 4 classes"):
        apgd_t(two_class, x[:4], y2, threat=Linf(0.1), steps=2)
    with pytest.raises(ValueError, match="needs target"):
        apgd(model, x[:4], y[:4], threat=Linf(0.1), steps=2, loss="dlr-targeted")
    with pytest.raises(ValueError, match="steps"):
        apgd_ce(model, x[:4], y[:4], threat=Linf(0.1), steps=0)
    with pytest.raises(ValueError, match="queries"):
        square(model, x[:4], y[:4], threat=Linf(0.1), queries=0)


def test_apgd_ce_beats_fgsm(setup) -> None:
    model, x, y = setup
    threat = Linf(0.12)
    clean = accuracy(model, x, y)
    one_step = accuracy(model, fgsm(model, x, y, threat=threat), y)
    robust = accuracy(model, apgd_ce(model, x, y, threat=threat, steps=20, generator=gen()), y)
    assert robust <= one_step <= clean
    assert robust < clean - 0.3


def test_apgd_targeted_hits_the_target(setup) -> None:
    model, x, y = setup
    target = (y + 1) % NUM_CLASSES
    x_adv = apgd(model, x, y, threat=Linf(0.25), steps=20, loss="dlr-targeted", target=target, generator=gen())
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == target).float().mean() > 0.9


def test_apgd_t_targets_the_top_ranked_other_classes(setup) -> None:
    model, x, y = setup
    x, y = x[:16], y[:16]
    with torch.no_grad():
        logits = model(x)
    correct = (logits.argmax(1) == y).nonzero().squeeze(1)
    trace: dict = {}
    # eps = 0: nothing can be broken, so every target class gets its run on every correct point.
    apgd_t(model, x, y, threat=Linf(0.0), steps=3, n_target_classes=9, generator=gen(), trace=trace)
    runs = trace["runs"]
    assert len(runs) == NUM_CLASSES - 1  # 9 asked, only 4 other classes exist
    for i, run in enumerate(runs):
        assert torch.equal(run["index"], correct)
        for n, t in zip(run["index"].tolist(), run["target"].tolist()):
            ranked = [c for c in logits[n].argsort(descending=True).tolist() if c != y[n]]
            assert t == ranked[i]
    trace = {}
    apgd_t(model, x, y, threat=Linf(0.0), steps=3, n_target_classes=2, restarts=2, generator=gen(), trace=trace)
    assert len(trace["runs"]) == 4


# --- Square ----------------------------------------------------------------------------------


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        raise RuntimeError("gradient requested from a score-based attack")


class GradientFree(nn.Module):
    """Wraps a model so that any backward pass raises; counts the examples it is queried on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.queried = 0

    def forward(self, x: Tensor) -> Tensor:
        self.queried += len(x)
        return _NoBackward.apply(self.model(_NoBackward.apply(x)))


def test_square_uses_no_gradients_and_breaks_an_undefended_model(setup) -> None:
    model, x, y = setup
    wrapped = GradientFree(model)
    with pytest.raises(RuntimeError, match="score-based"):  # the guard works on gradient attacks
        apgd_ce(wrapped, x[:4], y[:4], threat=Linf(0.1), steps=2)
    threat = Linf(0.2)
    x_adv = square(wrapped, x, y, threat=threat, queries=300, generator=gen())
    assert threat.contains(x, x_adv).all()
    assert accuracy(model, x, y) > 0.95
    assert accuracy(model, x_adv, y) <= 0.05
    # Broken examples are not queried again: far fewer than n * queries.
    assert wrapped.queried < 0.5 * len(x) * 300


def test_square_query_budget(setup) -> None:
    model, x, y = setup
    x, y = x[:8], y[:8]
    wrapped = GradientFree(model)
    # eps = 0: nothing breaks, so each example gets exactly `queries` queries (+1 clean check).
    x_adv = square(wrapped, x, y, threat=Linf(0.0), queries=20, generator=gen())
    assert torch.equal(x_adv, x)
    assert wrapped.queried == len(x) * (20 + 1)


def test_square_targeted(setup) -> None:
    model, x, y = setup
    target = (y + 2) % NUM_CLASSES
    x_adv = square(model, x, y, threat=Linf(0.3), queries=200, targeted=True, target=target, generator=gen())
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == target).float().mean() > 0.8


def test_square_p_schedule() -> None:
    got = [square_p_schedule(i, 10000) for i in (0, 10, 11, 50, 51, 200, 201)]
    assert got == [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1]
    assert square_p_schedule(8001, 10000) == pytest.approx(0.8 / 512)
    assert square_p_schedule(9999, 10000, p_init=0.05) == pytest.approx(0.05 / 512)
    # a 5,000-query budget is rescaled to 10,000: iteration 6 counts as 12
    assert square_p_schedule(5, 5000) == 0.8 and square_p_schedule(6, 5000) == 0.4


# --- random noise ----------------------------------------------------------------------------


def test_noise_keeps_any_misclassified_sample(setup) -> None:
    model, x, y = setup
    threat = Linf(0.25)
    one = random_noise(model, x, y, threat=threat, samples=1, generator=gen(7))
    ten = random_noise(model, x, y, threat=threat, samples=10, generator=gen(7))  # same first sample
    with torch.no_grad():
        wrong_one = model(one).argmax(1) != y
        wrong_ten = model(ten).argmax(1) != y
    assert (wrong_ten | ~wrong_one).all()  # every point broken by the first sample stays broken
    assert wrong_ten.sum() > wrong_one.sum()
    # every sample is a corner of the ball (up to clipping at the bounds)
    delta = (ten - x).abs()
    assert ((delta - threat.eps).abs() < 1e-6).logical_or(ten == 0).logical_or(ten == 1).all()
