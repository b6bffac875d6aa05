"""The report's figure: Dice and HD95 of every class, per site and pooled, after each round,
the mean Dice and the training loss.

Why these choices: rounds are whole numbers, so the round axis has integer ticks only; every
site keeps ONE colour in every panel (its place among the run's sorted site names) and the
pool is always black and thicker, so a reader can follow a site from panel to panel and across
reports of the same consortium. An undefined HD95 is not a point on the curve: it is drawn as
an ``x`` near the panel's top edge (one height per site) (and counted in the tables), never as a distance.
A cross-validation run trains several models one after the other with its rounds numbered on:
a dashed line marks where the next model starts and no curve joins two models.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from fedseg.server.report_data import POOLED, RunData

POOLED_COLOUR = "#000000"
SITE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                "#7f7f7f", "#bcbd22", "#17becf"]  # matplotlib's tab10


def site_colours(sites: list[str]) -> dict[str, str]:
    """Site -> colour: by sorted name (the same sites get the same colours in every run),
    pooled always black."""
    out = {s: SITE_COLOURS[i % len(SITE_COLOURS)] for i, s in enumerate(sorted(sites))}
    out[POOLED] = POOLED_COLOUR
    return out


def _style(site: str) -> dict:
    if site == POOLED:
        return {"lw": 2.6, "marker": "o", "ms": 5, "zorder": 3}
    return {"lw": 1.3, "marker": "o", "ms": 3.5, "alpha": 0.9, "zorder": 2}


def model_bounds(data: RunData) -> list[float]:
    """Where a cross-validation run's next model starts (between its rounds); none otherwise."""
    cv = data.cv
    return [m.last + 0.5 for m in cv.models[:-1]] if cv is not None else []


def _xy(pts: list[tuple[int, float]], bounds: list[float]) -> tuple[list[float], list[float]]:
    """A curve's x and y, broken (a NaN point) where a new model starts: one model's last
    round and the next's first are different models, not a step of one curve."""
    xs: list[float] = []
    ys: list[float] = []
    for r, v in pts:
        if xs and any(xs[-1] < b < r for b in bounds):
            xs.append(math.nan)
            ys.append(math.nan)
        xs.append(r)
        ys.append(v)
    return xs, ys


def render_png(data: RunData, dpi: int = 90) -> bytes:
    """The figure as PNG bytes (the HTML report inlines them; ``plots.png`` holds them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colours = site_colours(data.sites)
    bounds = model_bounds(data)
    order = [s for s in data.sites] + [POOLED]
    n_cls = max(1, len(data.classes))
    fig, axes = plt.subplots(n_cls + 1, 2, figsize=(11, 3.1 * (n_cls + 1)), squeeze=False)
    for row, (key, name) in enumerate(data.classes):
        ax_d, ax_h = axes[row]
        any_missing = False
        for i, site in enumerate(order):
            pts = data.series(site, key, "dice")
            if not pts:
                continue
            ax_d.plot(*_xy(pts, bounds), color=colours[site], label=site, **_style(site))
            hd = data.series(site, key, "hd95")
            ax_h.plot(*_xy(hd, bounds), color=colours[site], label=site, **_style(site))
            miss = [r for (r, v), (_, d) in zip(hd, pts, strict=True)
                    if math.isnan(v) and not math.isnan(d)]
            if miss:
                any_missing = True
                y = 0.96 - 0.05 * i  # one height per site: every site's x stays visible
                ax_h.plot(miss, [y] * len(miss), ls="none", marker="x", ms=7, mew=2,
                          color=colours[site], transform=ax_h.get_xaxis_transform(), clip_on=False)
        ax_d.set(title=f"{name}: Dice (higher is better)", ylabel="Dice", ylim=(0, 1.02))
        ax_h.set(title=f"{name}: HD95 in mm (lower is better)"
                 + ("; x = missing" if any_missing else ""), ylabel="HD95 (mm)")
        finite = [v for site in order for _, v in data.series(site, key, "hd95")
                  if not math.isnan(v)]
        # headroom: the missing marks (top fifth of the panel) stay clear of the curves
        ax_h.set_ylim(0, max(finite) * 1.3 if finite else 1.0)
    ax_m, ax_l = axes[n_cls]
    for site in order:
        pts = data.series(site, "mean", "dice")
        if pts:
            ax_m.plot(*_xy(pts, bounds), color=colours[site], label=site, **_style(site))
    ax_m.set(title="mean Dice over the classes", ylabel="Dice", ylim=(0, 1.02))
    for site in [s for s in order if s in data.loss]:
        pts = data.loss[site]
        ax_l.plot(*_xy(pts, bounds), color=colours.get(site, "#444444"),
                  label=site, **{**_style(site), "marker": "." if len(pts) > 30 else "o"})
    ax_l.set(title="training loss (Dice + CE)", ylabel="loss")
    for ax in axes.flat:
        ax.set_xlabel("round (0 = untrained model)" if ax is not ax_l else "round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for b in bounds:
            ax.axvline(b, color="#888888", ls="--", lw=0.8, zorder=1)
        if ax.lines and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"fedseg run {data.name}: global model after each round"
                 + ("; dashed line: the next fold/configuration model starts" if bounds else ""),
                 fontsize=12)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def write_png(data: RunData, path: Path) -> bytes:
    png = render_png(data)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(png)
    tmp.replace(path)
    return png
