"""The audit's check names and their documentation (one section per check, shown in reports).

Each section says what the check measures, why a failure means the robustness numbers
cannot be trusted, and what to do then. :data:`TOLERANCE_DOC` is the rule shared by every
"accuracy must not rise" comparison.
"""

from __future__ import annotations

CHECK_NAMES: tuple[str, ...] = (
    "eps_monotone",
    "large_eps_zero",
    "more_steps_no_better",
    "more_restarts_no_better",
    "fgsm_not_stronger",
    "noise_not_stronger",
    "transfer_not_stronger",
    "square_not_stronger",
    "baseline_gap",
    "deterministic_forward",
    "gradient_health",
)

TOLERANCE_DOC = """\
Every "must not rise" comparison is paired: the same points and, where the attacks allow,
the same random starts. For per-example robust flags A (the smaller eps, fewer steps or
restarts: expected to have the higher or equal accuracy) and B (the larger budget), the
rise acc(B) - acc(A) counts only when it exceeds max(1 percentage point, 2 standard
errors), with the paired (McNemar) standard error SE = sqrt(b + c) / n, where b and c
count the points robust under only one of the two. "Attack X breaks points that the
reference attacks missed" is the special case A = reference and X, B = reference: its k
extra points fail the check when k/n > 1 point and k > 2 sqrt(k), i.e. k > max(n/100, 4).
"""


CHECK_DOCS: dict[str, str] = {
    "eps_monotone": """\
**Accuracy must not rise with eps.** PGD (one random start, step 2.5 eps / steps) runs at
several multiples of eps, at the large eps of `large_eps_zero`, and at 0 (clean accuracy).
A larger ball contains the smaller one, so a working attack can only do better; any pair
eps1 < eps2 whose accuracy rises by more than the tolerance fails. A rise means the attack
gets *worse* with more freedom: gradients that vanish or mislead away from the data
(saturated softmax, quantisation, input purification, detectors that answer from memory).
If it fails, PGD numbers for this model are not evidence of robustness; use gradient-free
(Square) and adaptive attacks (BPDA, Athalye et al. 2018).""",
    "large_eps_zero": """\
**Unbounded attacks must succeed.** At eps = half the input range (0.5 for [0, 1] images)
every image can be turned into the same flat grey image, which carries no class
information, so a working attack drives accuracy to about zero; the check fails when PGD
leaves more than 2% of the points correct (Carlini et al. 2019, Sec. 5.6: "verify that
unbounded attacks reach 100% success"). If it fails, the gradient does not lead to the
decision boundary: the model masks gradients, or the attack is broken.""",
    "more_steps_no_better": """\
**More PGD steps must not raise accuracy.** PGD with one random start runs with several
step counts (default step 2.5 eps / steps, so the total path length is the same); any
pair with fewer and more steps whose accuracy rises by more than the tolerance fails.
Small steps getting stuck where large steps pass is the signature of a rugged
("shattered", Athalye et al. 2018) loss surface: many local maxima near every point. The
curve also shows whether the attack has converged: a still-falling curve means the
baseline used too few steps (Engstrom et al. 2018 broke the ALP ImageNet model this way).""",
    "more_restarts_no_better": """\
**More random restarts must not raise accuracy.** PGD runs with 1, 2, 4, ... random
restarts from the same seed, so the runs with more restarts contain the runs with fewer
and, for a deterministic model, accuracy can only fall. A rise above the tolerance means
the success the attack saw on one forward pass did not hold when the result was checked
on the next: the forward pass is randomised, stateful or batch-dependent, and the
evaluation needs Expectation over Transformation (EOT) and repeated scoring.""",
    "fgsm_not_stronger": """\
**One-step FGSM must not beat multi-step PGD.** FGSM (one signed step of size eps from
the clean point) is a strict special case of what PGD can reach; the check fails when
FGSM breaks more points that PGD-40 (2 restarts) missed than the tolerance allows
(Carlini et al. 2019: "iterative attacks should perform better than single-step
attacks"). If it fails, small steps are misled by local gradient structure that one large
step jumps over: gradient masking, or a PGD step size far too small.""",
    "noise_not_stronger": """\
**Random noise must not beat gradient attacks.** Random corners of the eps-ball (forward
passes only) should break nothing that the white-box gradient attacks of the audit (all
PGD runs at this eps, APGD-CE and APGD-T of the suite) missed; the check fails when they
break more extra points than the tolerance allows. If it fails, gradients are useless
near these points (zero, random or misleading), typically because of a non-differentiable
or saturating component.""",
    "transfer_not_stronger": """\
**Black-box transfer must not beat white-box attacks.** Adversarial examples crafted with
PGD-40 (2 restarts) on an independently trained source model (`--source`) should break
nothing that the white-box gradient attacks missed; the check fails when they break more
extra points than the tolerance allows (Carlini et al. 2019, Sec. 5.7). Skipped when no
source model is given. If it fails, the model's own gradients are masked while a smooth
surrogate still finds its adversarial examples.""",
    "square_not_stronger": """\
**A gradient-free attack must not beat the gradient attacks.** Square (score-based random
search, no gradients) runs last in the suite, only on points the gradient attacks left
robust; the check fails when it breaks more extra points than the tolerance allows (as
AutoAttack's `check_square_sr`). If it fails, the gradient attacks are being fooled:
report the worst case over all attacks and prefer adaptive attacks.""",
    "baseline_gap": """\
**The PGD baseline must not overstate robustness.** Fails when the baseline (ours by
default: PGD-40 with 2 restarts and step 2.5 eps / 40; `--steps`, `--restarts` and
`--step-size` select another, e.g. the paper's own 40 steps of eps / 30 from one start)
exceeds the worst case over the baseline and the strong suite (quick suite with `--quick`,
AutoAttack's standard set otherwise) by more than 10 points. This is what exposed Clean
Logit Pairing and logit squeezing (Mosbach et al. 2018, https://arxiv.org/abs/1810.12042:
MNIST logit squeezing 70.6% under baseline PGD, 5.0% under a strong attack); docs/MASKING.md
shows it on Fashion-MNIST. The quick suite is weaker than the standard one, so a passing
`--quick` audit does not clear a model of this check. If it fails, never quote the
baseline number.""",
    "deterministic_forward": """\
**The same input must give the same logits.** The first points are passed through the
model twice as one batch and a few of them one at a time; the check fails when logits
differ by more than 1e-4 (1 + max |logit|). A randomised or batch-dependent model makes
single-sample gradients and single-forward scoring meaningless: attack it with EOT
(averaging gradients over the randomness) and score by majority over several forwards.""",
    "gradient_health": """\
**Input gradients must exist and be finite.** The cross-entropy gradient with respect to
the input is computed at every clean point and at one random point of its eps-ball. The
check fails when 5% or more of the points of either set have an all-zero gradient, or any
point has a non-finite logit or gradient. Exact zeros come from non-differentiable parts
(rounding, argmax, thresholds) and from a saturated softmax: with huge logits the CE
gradient underflows to 0 in float32 for confidently classified points, so PGD and APGD-CE
cannot move although the decision is not robust. The logit scale (median logit norm and
top-1 margin) is reported for that reason.""",
}
