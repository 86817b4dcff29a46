"""The Markdown summary of a ``benchmarks/run.py`` result, and writing it into a document."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _certify import markdown as certify_markdown
from _scaling import markdown as scaling_markdown


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _ratio(e: Any) -> str:
    """``median [min–max]`` of a ratio entry."""
    if not isinstance(e, dict):
        return str(e)
    if "error" in e:
        return f"error: {e['error']}"
    if e.get("median") is None:
        return "–"
    return f"{e['median']:.2f} [{e['min']:.2f}–{e['max']:.2f}]"


def _mib(v: Any) -> str:
    return f"{v:.0f}" if isinstance(v, (int, float)) else "–"


def _count(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return "–"
    return f"{v / 1e6:.2f} M" if v >= 1e5 else f"{v / 1e3:.1f} k" if v >= 1e3 else str(int(v))


def _attack_section(r: dict[str, Any]) -> str:
    rows = []
    for name, e in r.get("pgd_floor_ratio", {}).items():
        art = r["vs_art"].get(name, "–") if isinstance(r.get("vs_art"), dict) else r.get("vs_art", "–")
        rows.append([
            f"`{name}`", "×".join(map(str, e.get("shape", []))), str(e.get("batch")), str(e.get("steps")),
            _ratio(e), _ratio(r["pgd_last_iterate_floor_ratio"][name]), _ratio(r["apgd_floor_ratio"][name]),
            _ratio(art), _mib(e.get("peak_rss_mib")), _mib(e.get("reference_peak_rss_mib")),
        ])  # fmt: skip
    if not rows:
        return ""
    text = "### Attack cost (time ÷ floor; ART ÷ ours)\n\n"
    text += "Floor: k × (forward + `torch.autograd.grad` of the summed CE w.r.t. the input, parameters frozen). "
    text += "Median [min–max] over the interleaved repeats; peak RSS of the measuring process in MiB.\n\n"
    return text + _table(
        ["model", "input", "batch", "k", "PGD ÷ floor", "PGD last iterate ÷ floor", "APGD-CE ÷ floor",
         "ART PGD ÷ our PGD", "PGD peak MiB", "floor peak MiB"], rows,
    )  # fmt: skip


def _train_section(r: dict[str, Any]) -> str:
    per_model = r.get("train_step_ratio", {})
    if not per_model:
        return ""
    models = list(per_model)
    methods = list(dict.fromkeys(m for v in per_model.values() for m in v))
    rows = []
    for m in methods:
        floor = next((per_model[a][m]["floor"] for a in models if m in per_model[a]), "–")
        rows.append([f"`{m}`", floor] + [_ratio(per_model[a].get(m, "–")) for a in models])
    text = "### Training step (time ÷ floor)\n\n"
    text += "One step of `METHODS.get(name)` + backward + SGD step ÷ its floor (written in the benchmark). "
    batches = ", ".join(f"`{a}` {next(iter(per_model[a].values())).get('batch')}" for a in models)
    text += f"Batch: {batches}.\n\n"
    return text + _table(["method", "floor"] + [f"`{a}`" for a in models], rows)


def _eval_section(r: dict[str, Any]) -> str:
    vs = r.get("vs_autoattack")
    if not isinstance(vs, dict):
        return f"### Evaluations vs AutoAttack\n\n{vs}\n"
    rows = []
    for label, e in vs.items():
        reused = isinstance(e["autoattack"], dict) and e["autoattack"].get("reused_from")
        entries = [
            ("AutoAttack (pyautoattack, standard)" + (" (reused, earlier run)" if reused else ""), e["autoattack"])
        ]
        entries += [(f"`{s}`", v) for s, v in e["suites"].items()]
        aa = e["autoattack"] if isinstance(e["autoattack"], dict) and "robust" in e["autoattack"] else None
        for name, v in entries:
            if not isinstance(v, dict) or "robust" not in v:
                rows.append([label, name, str(v), "", "", "", "", ""])
                continue
            acc = 100 * v["robust"]["value"]
            delta = f"{acc - 100 * aa['robust']['value']:+.1f}" if aa is not None else "–"
            t = v["seconds"]["median"]
            frac = f" ({t / aa['seconds']['median']:.3f})" if aa is not None else ""
            p = v.get("passes") or {}
            rows.append([label, name, f"{acc:.1f}", delta, f"{t:.0f}{frac}", _count(p.get("grad")),
                         _count(p.get("no_grad")), _mib(v.get("peak_rss_mib"))])  # fmt: skip
    n = next(iter(vs.values()))["n"] if vs else "–"
    text = "### Evaluations vs AutoAttack\n\n"
    text += f"First {n} test points of each run at its training ε; robust accuracy in %, Δ = points above "
    text += "AutoAttack; wall seconds (fraction of AutoAttack's); images forwarded with autograd on / off.\n\n"
    text += _table(["run", "attack", "robust %", "Δ vs AA", "seconds", "autograd passes", "forward-only passes",
                    "peak MiB"], rows)  # fmt: skip
    trows = []
    for label, e in vs.items():
        for key, t in e.get("targets", {}).items():
            if isinstance(t, dict):
                trows.append(
                    [label, key, f"{t['value']:.3f}", f"≤ {t['target']}", "met" if t["met"] else "**not met**"]
                )
    if trows:
        text += "\nTargets (issues 13 and 17; no cost targets on the models built to mask gradients):\n\n"
        text += _table(["run", "figure", "value", "target", ""], trows)
    sp = r.get("eval_speedup")
    if isinstance(sp, dict) and sp:
        srows = [[label, f"`{e.get('suite')}`", _ratio(e)] for label, e in sp.items()]
        text += "\n`eval_speedup` (every attack on all points ÷ the protocol, attacks on survivors only):\n\n"
        text += _table(["run", "suite", "speedup"], srows)
    return text


def _data_section(r: dict[str, Any]) -> str:
    d = r.get("data")
    if not isinstance(d, dict):
        return ""
    rows = []
    idx = d.get("idx")
    if isinstance(idx, dict):
        rows.append(["Fashion-MNIST IDX (train + test)", str(idx["images"]), _ratio(idx["images_per_second"]),
                     _mib(idx.get("peak_rss_mib"))])  # fmt: skip
    else:
        rows.append(["Fashion-MNIST IDX", "–", str(idx), "–"])
    f = d.get("image_folder")
    if isinstance(f, dict):
        for split, label in (("test", "evaluation transform"), ("train", "training augmentation")):
            e = f.get(split)
            if isinstance(e, dict):
                rows.append([f"`imagenet` folder, generated 500×375 JPEGs → 224, {label}", str(f["images_per_split"]),
                             _ratio(e["images_per_second"]), _mib(e.get("peak_rss_mib"))])  # fmt: skip
    elif f is not None:
        rows.append(["`imagenet` folder", "–", str(f), "–"])
    return "### Data loading (images per second)\n\n" + _table(["what", "images", "images/s", "peak MiB"], rows)


def markdown_summary(r: dict[str, Any]) -> str:
    env = r.get("environment", {})
    s = r.get("settings", {})
    v = r.get("versions", {})
    head = f"Command: `{r.get('command')}`\n\n"
    head += (
        f"Machine: {env.get('platform')} ({env.get('machine')}), device {s.get('device')}, torch {v.get('torch')}, "
        f"{s.get('threads')} thread(s), {s.get('repeats')} interleaved repeats (median [min–max]); "
        f"ART {v.get('adversarial-robustness-toolbox') or 'not installed'}, "
        f"pyautoattack {v.get('pyautoattack') or 'not installed'}; took {r.get('seconds', 0):.0f} s.\n\n"
    )
    parts = [head, _attack_section(r), _train_section(r), _eval_section(r), _data_section(r), certify_markdown(r),
             scaling_markdown(r)]  # fmt: skip
    return "\n".join(p for p in parts if p)


def write_docs(path: Path, summary: str, begin: str, end: str) -> None:
    """Replace the text between ``begin`` and ``end`` in ``path`` (appended if the markers are missing)."""
    old = path.read_text() if path.is_file() else ""
    block = f"{begin}\n\n{summary}\n{end}"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        tail = rest.split(end, 1)[1]
        new = head + block + tail
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + block + "\n"
    path.write_text(new)
