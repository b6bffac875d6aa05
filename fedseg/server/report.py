"""Plots and a short report of a federated run, from ``metrics.jsonl`` alone.

Reading only the metrics file (not the job's memory) means a report can be redrawn for any run,
also a crashed one, with ``fedseg report RUN_DIR``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from fedseg.server.rundir import RunDir


def _series(records: list[dict], phase: str, key: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if r.get("phase") == phase and key in r and r.get("status", "ok") == "ok":
            v = r[key]
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[r["site"]].append((int(r["round"]), float(v)))
    return out


def write_report(run: RunDir) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = run.read_metrics()
    dice = _series(recs, "eval", "mean_dice")
    loss = _series(recs, "train", "loss")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for site, pts in sorted(dice.items()):
        pts = sorted(dict(pts).items())
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                     lw=2.5 if site == "pooled" else 1.2, label=site)
    axes[0].set(title="global model: mean Dice (foreground classes)", xlabel="after round",
                ylabel="Dice", ylim=(0, 1))
    for site, pts in sorted(loss.items()):
        pts = sorted(dict(pts).items())
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker=".",
                     lw=2.5 if site == "pooled" else 1.2, label=site)
    axes[1].set(title="local training loss (Dice+CE)", xlabel="round", ylabel="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    png = run.root / "plots.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)

    pooled = sorted(dict(dice.get("pooled", [])).items())
    drops = [r for r in recs if r.get("status") in ("dropped", "rejected", "refused")]
    lines = [
        f"# fedseg run `{run.root.name}`",
        "",
        "![Dice and loss per round](plots.png)",
        "",
        "## Global model, pooled mean Dice after each evaluated round",
        "",
        "| round | Dice |",
        "|---|---|",
        *[f"| {r} | {d:.4f} |" for r, d in pooled],
        "",
        f"## Dropped or rejected messages: {len(drops)}",
        "",
        *[f"- round {r.get('round', '-')}, {r.get('site', r.get('node'))}: {r['status']} "
          f"({r.get('reason', '')})" for r in drops],
        "",
        "Files: `plan.json`, `metrics.jsonl`, `checkpoints/last.npz`, `checkpoints/best.npz`, "
        "`model/` (use with `fedseg predict --model`).",
        "",
    ]
    md = run.root / "report.md"
    md.write_text("\n".join(lines))
    return md
