"""Tables and the learning-curve plot of a ``bench/quality.py`` result (JSON in, text/PNG out).

Separate from the driver so a result file can be redrawn without training anything:
``python bench/quality_report.py RESULT.json [--md OUT.md] [--plot OUT.png]``.

Rows are models, columns the test sites and their mean (each site weighs the same); "own site"
rows put each site's own local (or fine-tuned) model in that site's column — what a hospital
that trains alone (or personalises the federated model) would deploy.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def rows(res: dict) -> list[tuple[str, str, dict[str, dict]]]:
    """(row name, budget, {site: that site's scores}) including the "own site" rows."""
    scores, models = res["scores"], res["models"]
    sites = [Path(d).name for d in res["data"]]
    out = []
    for name, per_site in scores.items():
        out.append((name, str(models[name]["budget"]), per_site))
    for kind, label in (("local", "local-only, own site"), ("federated_ft", "federated + FT, own site")):
        own = {m["site"]: n for n, m in models.items() if m["kind"] == kind}
        if own and all(s in own for s in sites):
            out.append((label, str(models[own[sites[0]]]["budget"]),
                        {s: scores[own[s]][s] for s in sites}))
    return out


def class_keys(res: dict) -> list[str]:
    first = next(iter(res["scores"].values()))
    return list(next(iter(first.values()))["mean"])


def table(res: dict, metric: str) -> str:
    """Foreground-mean ``metric`` per test site, their mean, and each class's site mean."""
    sites = [Path(d).name for d in res["data"]]
    keys = class_keys(res)
    head = ["model", "budget (samples)", *sites, "mean", *[f"class {k} (mean)" for k in keys]]
    if metric == "HD95":  # (case, class) pairs without a distance: a structure missed/invented
        head.append("missing")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, budget, per_site in rows(res):
        fg = [per_site[s]["foreground_mean"][metric] for s in sites]
        per_class = [_mean([per_site[s]["mean"][k][metric] for s in sites]) for k in keys]
        digits = 3 if metric == "Dice" else 2
        cells = [name, budget, *[_fmt(v, digits) for v in fg], f"**{_fmt(_mean(fg), digits)}**",
                 *[_fmt(v, digits) for v in per_class]]
        if metric == "HD95":
            miss = [per_site[s]["foreground_mean"].get("HD95_missing") for s in sites]
            cells.append("—" if None in miss else str(sum(int(m) for m in miss)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_class_table(res: dict, metric: str) -> str:
    sites = [Path(d).name for d in res["data"]]
    keys = class_keys(res)
    head = ["model", *[f"{s} c{k}" for s in sites for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, _, per_site in rows(res):
        cells = [_fmt(per_site[s]["mean"][k][metric], 3 if metric == "Dice" else 2)
                 for s in sites for k in keys]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def summary(res: dict) -> dict[str, Any]:
    """The acceptance figures: mean foreground Dice over the test sites per model."""
    sites = [Path(d).name for d in res["data"]]
    out = {}
    for name, _, per_site in rows(res):
        out[name] = _mean([per_site[s]["foreground_mean"]["Dice"] for s in sites])
    return out


def markdown_tables(res: dict) -> str:
    st = res["settings"]
    budget = (f"budget {st['budget_iterations']} iterations x batch {st['batch_size']} = "
              f"{st['budget_samples']} samples; federated {st['rounds']} rounds x "
              f"{st['local_iterations']} iterations x {st['sites']} sites; local-only "
              f"{st['local_only_iterations']} iterations per site; fine-tune "
              f"{st['finetune_iterations']} iterations per site; preset {st['preset']}; secure "
              f"aggregation {'on' if st['secure_aggregation'] else 'off'}")
    parts = [
        f"Training cases (4 in 5 of each site's imagesTr): {st['training_cases']}; {budget}.",
        "", "Dice, foreground mean (test cases of each site):", "", table(res, "Dice"),
        "", "HD95 (mm), foreground mean (missing: test (case, class) pairs where the model "
        "predicted nothing or only false positives, so no distance exists; their Dice is 0):",
        "", table(res, "HD95"),
        "", "Dice per site and class:", "", per_class_table(res, "Dice"),
    ]
    if res.get("scores_postprocessed"):
        pp = {**res, "scores": res["scores_postprocessed"]}
        chosen = "; ".join(f"{n}: {d['postprocessing']['keep_largest'] or 'none'}"
                           for n, d in res.get("postprocessing", {}).items())
        parts += ["", "With nnU-Net's largest-component postprocessing, decided per model on the "
                  "validation cases of all sites (label sets whose largest component alone is "
                  f"kept — {chosen}). Dice, foreground mean:", "", table(pp, "Dice"),
                  "", "HD95 (mm), foreground mean, postprocessed:", "", table(pp, "HD95"),
                  "", "Dice per site and class, postprocessed:", "", per_class_table(pp, "Dice")]
    if any(res["curves"].values()):
        parts += ["", "Learning curve (foreground Dice over all test cases):", "",
                  "| model | samples | Dice |", "|---|---|---|"]
        for name, pts in res["curves"].items():
            for pt in pts:
                parts.append(f"| {name} | {pt['samples']} | {_fmt(pt['pooled_test_dice'])} |")
    return "\n".join(parts)


def curve_plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, colour in (("pooled", "tab:blue"), ("federated", "tab:orange")):
        pts = res["curves"].get(name) or []
        if pts:
            ax.plot([p["samples"] for p in pts], [p["pooled_test_dice"] for p in pts],
                    marker="o", color=colour, label=name)
    st = res["settings"]
    ax.set_xlabel("training samples (iterations x batch, summed over sites)")
    ax.set_ylabel("foreground Dice, all test cases")
    ax.set_title(f"{st['sites']} sites, preset {st['preset']}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(res: dict, md_path: str | None, plot_path: str | None) -> None:
    """Print the tables; write them (markdown) and the curve (PNG) where asked."""
    md = markdown_tables(res)
    print(md)
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(md + "\n")
    if plot_path:
        curve_plot(res, Path(plot_path))


def main() -> int:
    p = argparse.ArgumentParser(description="redraw a bench/quality.py result")
    p.add_argument("result")
    p.add_argument("--md")
    p.add_argument("--plot")
    a = p.parse_args()
    write_outputs(json.loads(Path(a.result).read_text()), a.md, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
