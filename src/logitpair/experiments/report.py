"""The report of ``logitpair reproduce``: ``report.md`` and ``comparison.png`` from ``results.json``.

:func:`report_markdown` writes one section per function below: the header (scale, dataset, ε,
points, seeds and the scale's substitutions), the paper's numbers next to ours, the spread over
seeds, our full evaluation (the protocol writes its own attack lines and tables,
:mod:`logitpair.experiments.protocols`), training time and audit verdicts, the paired McNemar
tests, the settings with their sources, the notes and the command. Metric labels come from the
protocol's declarations; everything else from ``results.json``, so a report can be rebuilt
from a saved one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from logitpair.experiments.protocols import PROTOCOLS, Protocol
from logitpair.io import atomic_write
from logitpair.report import markdown_table, pct_ci

SETTINGS_PAGE = "docs/PAPER_SETTINGS.md"  # every preset's settings with their sources (experiments.settings_page)
Results = dict[str, Any]


def eps_label(eps: float) -> str:
    """``16/255 (0.0627)`` for a whole number of 255ths, else ``0.1``."""
    k = round(eps * 255)
    return f"{k}/255 ({eps:.4g})" if abs(eps * 255 - k) < 1e-6 and k not in (0, 255) else f"{eps:.4g}"


def _paper(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _verdict(audits: list[dict[str, Any]]) -> str:
    return "; ".join(a["verdict"] + (" (" + ", ".join(a["failed"]) + ")" if a["failed"] else "") for a in audits)


def _protocol(res: Results) -> Protocol:
    return PROTOCOLS.get(res["protocol"])


def header(res: Results) -> str:
    k = res["seeds"]
    text = f"# Reproducing {res['table']}: {res['title']}\n\n"
    text += (
        f"Scale `{res['scale']}`, dataset {res['dataset']} (the paper's: {res['paper_dataset']}), L∞ ε = "
        f"{eps_label(res['eps'])}, first {res['n']} test points, {k} seed(s), evaluation seed {res['evaluation_seed']}. "
        "Accuracy in %: the paper's as printed, ours with 95% Wilson intervals (N per entry = the number of test "
        "points); a point counts as robust only if it is correct clean and under the attack. "
        f"Ours from seed 0{' (spread over seeds below)' if k > 1 else ''}.\n\n"
    )
    if res["substitutions"]:
        text += "**Substitutions at this scale (ours):**\n\n" + "".join(f"- {s}\n" for s in res["substitutions"]) + "\n"
    return text


def side_by_side(res: Results) -> str:
    cols = res["columns"]
    head = ["model", *(f"{c['label']}: {who}" for c in cols for who in ("paper", "ours")), "audit"]
    table = []
    for r in res["rows"]:
        cells = [cell for c in cols for cell in (_paper(r["paper"].get(c["key"])), pct_ci(r["ours"].get(c["key"])))]
        table.append([r["label"], *cells, _verdict(r["audit"][:1])])
    return "## Side by side with the paper\n\n" + markdown_table(head, table)


def _spread_cell(sp: dict[str, Any] | None) -> str:
    return "—" if not sp or sp["mean"] is None else f"{100 * sp['mean']:.1f} ± {100 * (sp['sd'] or 0):.1f}"


def seed_spread(res: Results) -> str:
    k, cols = res["seeds"], res["columns"]
    if k <= 1:
        return ""
    table = [[r["label"], *(_spread_cell(r["spread"].get(c["key"])) for c in cols), _verdict(r["audit"])]
             for r in res["rows"]]  # fmt: skip
    return f"\nSpread over {k} seeds (mean ± sample sd of our values, %):\n\n" + markdown_table(
        ["model", *(c["label"] for c in cols), "audit per seed"], table
    )


def full_evaluation(res: Results) -> str:
    attacks = res["attacks"]
    text = "\n## Our full evaluation (seed 0)\n\n"
    text += f"- the paper's attack: {attacks['paper']['label']}"
    text += (
        f" (as the paper gives it, {res['table']})\n"
        if attacks["paper_given"]
        else " (ours where the paper gives no setting)\n"
    )
    protocol = _protocol(res)
    text += "".join(protocol.attack_lines(res)) + "\n"
    return text + protocol.tables(res)


def training_and_audit(res: Results) -> str:
    rows = [[r["label"], ", ".join(f"{s:.0f}" for s in r["train_seconds"]), _verdict(r["audit"])]
            for r in res["rows"]]  # fmt: skip
    rows += [[o["label"], ", ".join(f"{s:.0f}" for s in o["train_seconds"]), f"({o['role']})"]
             for o in res["other_models"]]  # fmt: skip
    text = "Training seconds per seed and the quick gradient-masking audit (`logitpair audit`; `suspect` = some check failed):\n\n"
    return text + markdown_table(["model", "train s", "audit"], rows)


def comparisons(res: Results) -> str:
    if not res["comparisons"]:
        return ""
    text = "\n## Paired comparisons (McNemar's exact test on the same points)\n\n"
    text += (
        "A only / B only: points only A / only B gets right; p: exact two-sided binomial test on these "
        "discordant points (the null hypothesis: equally accurate).\n\n"
    )
    names = {r["name"]: r["label"] for r in res["rows"]}
    label = _protocol(res).label
    table = []
    for c in res["comparisons"]:
        a = f"{names.get(c['row_a'], c['row_a'])}: {label(c['metric_a'])}"
        b = f"{names.get(c['row_b'], c['row_b'])}: {label(c['metric_b'])}"
        table.append([str(c["seed"]), a, b, f"{100 * c['a']:.1f}", f"{100 * c['b']:.1f}", str(c["a_only"]),
                      str(c["b_only"]), f"{c['p_value']:.3g}", str(c["n"])])  # fmt: skip
    return text + markdown_table(["seed", "A", "B", "A %", "B %", "A only", "B only", "p", "N"], table)


def settings(res: Results) -> str:
    text = "\n## Settings\n\n"
    text += f"Each with its source; {SETTINGS_PAGE} in the logitpair repository lists every preset's settings.\n\n"
    text += "".join(f"- {s['setting']} — *{s['source']}*\n" for s in res["settings"])
    text += "".join(f"- {r['label']}: {s} — *ours*\n" for r in [*res["rows"], *res["other_models"]]
                    for s in r["ours_settings"])  # fmt: skip
    if res["scale"] != "full":
        text += f"\nThe list above is the full-scale recipe; at scale `{res['scale']}` the substitutions at the top apply.\n"
    return text


def closing(res: Results) -> str:
    text = "\n## Notes\n\n" + "".join(f"- {n}\n" for n in res["notes"]) if res["notes"] else ""
    text += "\n![paper vs ours](comparison.png)\n"
    env = res["environment"]
    return text + (
        f"\nReproduce: `{res['command']}` ({res['seconds']:.0f} s on {env.get('machine')}, {env.get('threads')} "
        f"threads, torch {env.get('torch')}, device {res['device']}).\n"
    )


SECTIONS = (header, side_by_side, seed_spread, full_evaluation, training_and_audit, comparisons, settings, closing)


def report_markdown(res: Results) -> str:
    """The report: the paper's numbers and ours side by side, our full evaluation, paired tests, settings."""
    return "".join(section(res) for section in SECTIONS)


def plot_comparison(path: Path, res: Results) -> None:
    """Grouped bars: the paper's number and ours (with its 95% interval) per row and paper column."""

    def draw(p: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = res["columns"]
        fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.6), squeeze=False)
        for ax, c in zip(axes[0], cols, strict=True):
            _bars(ax, res["rows"], c)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{res['table']} ({res['scale']}, {res['dataset']}, N={res['n']})", fontsize=10)
        fig.tight_layout()
        fig.savefig(p, format="png", dpi=110)
        plt.close(fig)

    atomic_write(path, draw)


def _bars(ax: Any, rows: list[dict[str, Any]], c: dict[str, str]) -> None:
    labels = [r["name"] for r in rows]
    xs = range(len(labels))
    paper = [r["paper"].get(c["key"]) for r in rows]
    ours = [r["ours"].get(c["key"]) for r in rows]
    ax.bar([i - 0.2 for i in xs], [v if v is not None else 0 for v in paper], 0.4, label="paper", color="#999999")
    vals = [100 * o["value"] if o else 0 for o in ours]
    err = [[100 * (o["value"] - o["ci95"][0]) if o else 0 for o in ours],
           [100 * (o["ci95"][1] - o["value"]) if o else 0 for o in ours]]  # fmt: skip
    ax.bar([i + 0.2 for i in xs], vals, 0.4, yerr=err, capsize=3, label="ours", color="#1f77b4")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_title(c["label"], fontsize=9)
    ax.set_ylabel("accuracy %")
