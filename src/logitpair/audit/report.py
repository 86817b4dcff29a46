"""Human report of a gradient-masking audit: Markdown text and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from logitpair.audit.checks import AuditReport
from logitpair.audit.docs import CHECK_DOCS, TOLERANCE_DOC


def plot_audit(rep: AuditReport, out_dir: Path) -> list[str]:
    """Accuracy vs eps, vs PGD steps, vs restarts, and the loss surfaces; returns the file names."""
    import io

    from logitpair.io import write_bytes
    from logitpair.report import _plt, plot_curves

    names = []
    for key, xlabel, title in (
        ("eps", "eps (L-inf)", f"PGD-{rep.settings['sweep_steps']} accuracy vs eps"),
        ("steps", "PGD steps (1 random start)", "accuracy vs PGD steps"),
        ("restarts", f"random restarts (PGD-{rep.settings['restarts_steps']})", "accuracy vs PGD restarts"),
    ):
        if rep.curves.get(key):
            name = f"audit_{key}.png"
            buf = io.BytesIO()  # rendered in memory, then written atomically
            plot_curves(buf, {"PGD": rep.curves[key]}, key, xlabel, title)  # type: ignore[arg-type]
            write_bytes(out_dir / name, buf.getvalue())
            names.append(name)
    if rep.surfaces:
        plt = _plt()
        k = len(rep.surfaces)
        fig = plt.figure(figsize=(3.2 * k, 3.4), dpi=100)
        for j, surf in enumerate(rep.surfaces):
            ax = fig.add_subplot(1, k, j + 1, projection="3d")
            t = torch.tensor(surf["ticks"])
            a, b = torch.meshgrid(t, t, indexing="ij")
            ax.plot_surface(a.numpy(), b.numpy(), torch.tensor(surf["loss"]).numpy(), cmap="viridis", linewidth=0)
            ax.set_xlabel("sign(grad)", fontsize=7)
            ax.set_ylabel("random sign", fontsize=7)
            ax.set_zlabel("CE loss", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_title(f"point {surf['index']} (label {surf['label']})", fontsize=8)
        fig.suptitle(
            f"loss along the gradient sign and a random sign direction (eps = {rep.settings['eps']:g})",
            fontsize=9,
        )
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        write_bytes(out_dir / "audit_surface.png", buf.getvalue())
        names.append("audit_surface.png")
    return names


def audit_markdown(doc: dict[str, Any]) -> str:
    """The human report of an :func:`audit_run` document."""
    from logitpair.report import markdown_table, pct_ci

    checks = doc["checks"]
    failed = [c for c in checks if c["passed"] is False]
    skipped = [c for c in checks if c["passed"] is None]
    st = doc["settings"]
    suite = st["suite"] if isinstance(st["suite"], str) else "custom"
    text = f"# Gradient-masking audit of `{doc.get('run', 'model')}`\n\n"
    if doc["verdict"] == "suspect":
        text += f"**Verdict: SUSPECT** — {len(failed)} of {len(checks)} checks failed"
    else:
        text += "**Verdict: pass** — no check failed"
    text += f" ({len(skipped)} skipped).\n\n" if skipped else ".\n\n"
    if failed:
        text += "".join(f"- **{c['name']}**: {c['detail']}\n" for c in failed) + "\n"
    text += (
        f"Dataset {doc.get('dataset', '?')}, method {doc.get('method')} (not used by the checks), L∞ ε = "
        f"{doc['eps']:g}, first {doc['n']} test points, seed {st['seed']}, suite {suite}, "
        f"source model: {doc.get('source') or 'none'}; {doc['seconds']:.0f} s.\n\n"
    )
    rows = [[c["name"], c["status"], str(c["detail"]).replace("|", "\\|")] for c in checks]
    text += markdown_table(["check", "result", "detail"], rows) + "\n"
    sm = doc["summary"]
    acc_rows = [["clean", pct_ci(sm.get("clean")), str(doc["n"])]]
    if "baseline" in sm:
        acc_rows.append([f"baseline {st['baseline']['label']}", pct_ci(sm["baseline"]), str(doc["n"])])
        acc_rows.append([f"worst case: baseline + {suite} suite", pct_ci(sm["suite_worst_case"]), str(doc["n"])])
    acc_rows.append(["worst case over every attack of the audit", pct_ci(sm.get("worst_case_all")), str(doc["n"])])
    text += "## Accuracy at the model's ε\n\n" + markdown_table(["", "accuracy % [95% CI]", "N"], acc_rows)
    text += "\nA point counts as robust only if it is correct clean and under every attack.\n\n"
    if doc.get("plots"):
        text += "## Plots\n\n" + "".join(f"![{p}]({p})\n" for p in doc["plots"]) + "\n"
    explain = [c["name"] for c in checks if c["passed"] is not True]
    if explain:
        text += "## About the failed and skipped checks\n\n"
        text += "".join(f"### `{name}`\n\n{CHECK_DOCS[name]}\n\n" for name in explain)
    text += "## Tolerance\n\n" + TOLERANCE_DOC
    text += "\nEvery check is documented in `logitpair.audit.CHECK_DOCS`.\n"
    return text
