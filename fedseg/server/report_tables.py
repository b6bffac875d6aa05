"""The report's tables, as plain rows, and their markdown and plain-text forms.

Why rows first and renderers second: the same final table must read the same in the HTML
report, in report.md and at the end of ``fedseg simulate`` / ``fedseg-server start`` (a
terminal or a log file: fixed-width columns, no colours, no redrawn lines), so a table is built
once as strings and only then laid out.

Missing values: an HD95 that is undefined (the structure is empty in the prediction or in the
reference) reads ``missing`` and is counted in the ``HD95 missing`` column; a Dice that is
undefined (the class is absent from both) reads ``n/a``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from fedseg.server.report_data import POOLED, RunData, Scores

MAX_ROUND_ROWS = 25  # per-round tables of a long run show this many evaluated rounds


@dataclass
class Table:
    head: list[str]
    rows: list[list[str]]
    title: str = ""
    note: str = ""
    level: int = 2  # the title's heading level (a section's sub-tables: 3)


def fmt_dice(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3f}"


def fmt_hd(v: float, dice: float = 0.0) -> str:
    """HD95 in mm; undefined: ``missing`` (a structure on one side only) or ``n/a`` (on
    neither side: nothing to measure)."""
    if not math.isnan(v):
        return f"{v:.2f}"
    return "n/a" if math.isnan(dice) else "missing"


def final_table(data: RunData) -> Table | None:
    """Per site (and the mean of sites or the pool): Dice and HD95 per class, their means,
    and how many HD95 values are missing."""
    ft = data.final
    if ft is None:
        return None
    keys = [k for k, _ in data.classes]
    names = [n for _, n in data.classes]
    head = ["site", "cases", *[f"Dice {n}" for n in names], *[f"HD95 {n} (mm)" for n in names],
            "Dice mean", "HD95 mean (mm)", "HD95 missing"]
    rows = []
    for site, s in ft.rows.items():
        rows.append([site, "?" if s.cases is None else str(s.cases),
                     *[fmt_dice(s.dice.get(k, math.nan)) for k in keys],
                     *[fmt_hd(s.hd95.get(k, math.nan), s.dice.get(k, math.nan)) for k in keys],
                     fmt_dice(s.mean_dice()), fmt_hd(s.mean_hd95(), s.mean_dice()),
                     str(s.missing_total())])
    by_case = all(s.missing_cases for s in ft.rows.values())
    unit = "cases" if by_case else "sites whose validation cases all lack it"
    note = (f"HD95 missing: {unit} (a structure predicted where there is none, or missed); "
            "such a value has no distance and is left out of the HD95 mean, its Dice is 0.")
    if not ft.on_test_cases:
        note += (" Validation HD95 is the mean over the cases where it is defined. "
                 "'pooled' is the case-weighted mean of the sites.")
    return Table(head, rows, f"Final result: {ft.source}", note)


def _pick_rounds(rounds: list[int]) -> list[int]:
    if len(rounds) <= MAX_ROUND_ROWS:
        return rounds
    step = (len(rounds) - 1) / (MAX_ROUND_ROWS - 1)
    return sorted({rounds[round(i * step)] for i in range(MAX_ROUND_ROWS)})


def _columns(data: RunData) -> list[str]:
    have = {s for by_site in data.evals.values() for s in by_site}
    return [s for s in data.sites if s in have] + ([POOLED] if POOLED in have else [])


def _model_cells(data: RunData) -> tuple[list[str], Callable[[int], list[str]]]:
    """A cross-validation run's per-round tables have a 'model' column (its rounds are
    numbered on across the models): (its header, round -> its cell); none otherwise."""
    cv = data.cv
    if cv is None or len(cv.models) < 2:
        return [], lambda rnd: []

    def cell(rnd: int) -> list[str]:
        span = cv.model_of(rnd)
        return [span.label + (" (untrained)" if rnd == 0 else "") if span else "?"]

    return ["model"], cell


def round_tables(data: RunData) -> list[Table]:
    """One table per class: Dice and HD95 of every site and the pool after each evaluated
    round (round 0 = the untrained model; "(n missing)": cases left out of that HD95 mean),
    then the mean Dice over classes."""
    rounds = sorted(data.evals)
    shown = _pick_rounds(rounds)
    note = "" if shown == rounds else (f"{len(shown)} of {len(rounds)} evaluated rounds shown; "
                                       "every round is in metrics.jsonl")
    cols = _columns(data)
    mhead, mcell = _model_cells(data)
    out = []

    def cell(s: Scores | None, key: str) -> list[str]:
        if s is None:
            return ["-", "-"]
        d, h = s.dice.get(key, math.nan), s.hd95.get(key, math.nan)
        n = s.missing.get(key, 0) if s.missing_cases else 0
        return [fmt_dice(d), fmt_hd(h, d) + (f" ({n} missing)" if n and not math.isnan(h) else "")]

    for key, name in data.classes:
        head = ["round", *mhead, *[f"{c} {m}" for c in cols for m in ("Dice", "HD95")]]
        rows = [[str(r), *mcell(r), *[x for c in cols for x in cell(data.evals[r].get(c), key)]]
                for r in shown]
        out.append(Table(head, rows, f"{name}: Dice and HD95 (mm) per site after each round", note))
    head = ["round", *mhead, *cols]
    rows = [[str(r), *mcell(r), *[fmt_dice(data.evals[r][c].mean_dice())
                                  if c in data.evals[r] else "-" for c in cols]]
            for r in shown]
    out.append(Table(head, rows, "Mean Dice over the classes, per site after each round", note))
    return out


def loss_table(data: RunData) -> Table | None:
    if not data.loss:
        return None
    cols = sorted(k for k in data.loss if k != POOLED) + ([POOLED] if POOLED in data.loss else [])
    by = {c: dict(data.loss[c]) for c in cols}
    rounds = _pick_rounds(sorted({r for c in cols for r in by[c]}))
    mhead, mcell = _model_cells(data)
    rows = [[str(r), *mcell(r), *[f"{by[c][r]:.4f}" if r in by[c] else "-" for c in cols]]
            for r in rounds]
    note = ("only the pooled (case-weighted) loss: with secure aggregation no site's own loss "
            "reaches the server") if cols == [POOLED] else ""
    return Table(["round", *mhead, *cols], rows, "Training loss (Dice + cross-entropy) per round", note)


def settings_table(data: RunData) -> Table:
    return Table(["setting", "value"], [[k, v] for k, v in data.settings], "Run settings")


def trouble_table(data: RunData) -> Table:
    rows = [["-" if t.round is None else str(t.round), t.phase, t.who, t.status, t.reason]
            for t in data.trouble]
    return Table(["round", "phase", "site", "what", "reason"], rows,
                 f"Drops, rejections and refusals: {len(rows)}")


def findings(data: RunData) -> list[str]:
    """The few lines a reader must not miss: a class the model does not find, missing
    distances, sites left out, a run that did not finish."""
    out = []
    ft = data.final
    if ft is not None:
        sites = {k: v for k, v in ft.rows.items() if k not in (POOLED, "mean of sites")}
        for key, name in data.classes:
            vals = {s: v.dice.get(key, math.nan) for s, v in sites.items()}
            low = sorted(s for s, v in vals.items() if not math.isnan(v) and v < 0.1)
            if sites and len(low) == len(sites):
                out.append(f"{name}: Dice below 0.1 at every site: the model does not find it")
            elif low:
                out.append(f"{name}: Dice below 0.1 at {', '.join(low)}")
        missing = sum(v.missing_total() for v in sites.values())
        if missing:
            unit = ("case(s)" if all(v.missing_cases for v in sites.values())
                    else "site/class pair(s)")
            out.append(f"HD95 missing for {missing} {unit}: structures missed or predicted where "
                       "there are none (see the final table)")
    counts: dict[str, int] = {}
    for t in data.trouble:
        counts[t.status] = counts.get(t.status, 0) + 1
    if counts:
        out.append("left out: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                   + " (reasons below)")
    state = data.status.get("state")
    if state and state != "finished":
        out.append(f"the run has not finished: state {state}, phase {data.status.get('phase', '?')}")
    return out


def _numeric(cell: str) -> bool:
    """A number or a placeholder for one: such columns are right-aligned."""
    cell = cell.split(" (", 1)[0]  # "4.20 (1 missing)"
    if cell in ("n/a", "missing", "-", "?"):
        return True
    try:
        float(cell)
    except ValueError:
        return False
    return True


def to_markdown(t: Table) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")

    lines = [f"{'#' * t.level} {t.title}", ""] if t.title else []
    if not t.rows:
        return "\n".join([*lines, "none", ""])
    right = [i > 0 and all(_numeric(r[i]) for r in t.rows) for i in range(len(t.head))]
    lines += ["| " + " | ".join(esc(h) for h in t.head) + " |",
              "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in t.rows]
    if t.note:
        lines += ["", t.note]
    return "\n".join([*lines, ""])


def to_text(t: Table) -> str:
    """Fixed-width columns (first left-aligned, the rest right-aligned): a terminal and a
    log file read it alike."""
    widths = [max(len(r[i]) for r in [t.head, *t.rows]) for i in range(len(t.head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()

    out = [t.title] if t.title else []
    out += [line(t.head), "  ".join("-" * w for w in widths), *[line(r) for r in t.rows]]
    return "\n".join(out)


def console_summary(data: RunData) -> str:
    """What a job's console shows at its end: the per-class, per-site final table and the
    findings (a class not found, drops)."""
    t = final_table(data)
    if t is None:
        return "no evaluation was logged"
    parts = [to_text(t)]
    f = findings(data)
    if f:
        parts.append("\n".join(f"! {x}" for x in f))
    return "\n".join(parts)
