"""The report's "Cross-validation and model selection" section, as :class:`Table` rows.

Why its own module: these tables exist only for a run with ``folds`` > 1 (``data.cv``), and
they read other records than the per-round tables (``fold``, ``cv``, ``selection``,
``postprocessing``: :mod:`report_cv_data`); the markdown and the HTML report lay them out
with the same renderers as every other table, so both say the same numbers. Class names are
the report's own (``data.class_name``), never the metrics keys.
"""

from __future__ import annotations

import math

from fedseg.server.report_cv_data import CrossVal
from fedseg.server.report_data import RunData
from fedseg.server.report_tables import Table, fmt_dice

TITLE = "Cross-validation and model selection"


def _mean(dice: dict[str, float], keys: list[str]) -> float:
    vals = [dice.get(k, math.nan) for k in keys]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _n(v: int | None) -> str:
    return "?" if v is None else str(v)


def intro(data: RunData) -> str:
    """The section's opening line: what was trained and what ``RUN_DIR/model`` is."""
    cv = data.cv
    assert cv is not None
    confs = (f" of each of {len(cv.configurations)} configurations ("
             f"{', '.join(cv.configurations)})" if len(cv.configurations) > 1 else "")
    return (f"{cv.folds} fold models{confs}, trained one after the other, each on all folds "
            "but its own at every site and scored on its own fold's validation cases (cases "
            f"it did not train on). The final model (`model/`) is {cv.final_model()}.")


def fold_table(data: RunData, cv: CrossVal) -> Table:
    keys = [k for k, _ in data.classes]
    with_conf = bool(cv.configurations) or any(f.configuration for f in cv.fold_scores)
    spans = {(m.configuration, m.fold): m for m in cv.models}
    head = [*(["configuration"] if with_conf else []), "fold", "rounds", "validation cases",
            *[f"Dice {n}" for _, n in data.classes], "Dice mean"]
    rows = []
    for f in cv.fold_scores:
        span = spans.get((f.configuration, f.fold))
        rows.append([*([f.configuration or "-"] if with_conf else []), str(f.fold),
                     f"{span.first}-{span.last}" if span else "?", _n(f.cases),
                     *[fmt_dice(f.dice.get(k, math.nan)) for k in keys],
                     fmt_dice(_mean(f.dice, keys))])
    return Table(head, rows, "Each fold model on its fold's validation cases",
                 "pooled over the sites (case-weighted); 'rounds': the job's rounds that "
                 "trained the model", level=3)


def cv_table(data: RunData, cv: CrossVal) -> Table:
    keys = [k for k, _ in data.classes]
    with_conf = any(c.configuration for c in cv.cv)
    head = [*(["configuration"] if with_conf else []), "folds scored", "validation cases",
            *[f"Dice {n}" for _, n in data.classes], "Dice mean"]
    rows = [[*([c.configuration or "-"] if with_conf else []),
             f"{len(c.folds_scored)} of {_n(c.folds)}", _n(c.cases),
             *[fmt_dice(c.dice.get(k, math.nan)) for k in keys], fmt_dice(_mean(c.dice, keys))]
            for c in cv.cv]
    return Table(head, rows, "Cross-validation Dice" + (" per configuration" if with_conf else ""),
                 "case-weighted mean over the folds: every case of every site validated once, "
                 "by the fold model that did not train on it", level=3)


def selection_table(data: RunData, cv: CrossVal) -> Table | None:
    sel = cv.selection
    if sel is None:
        return None
    keys = [k for k, _ in data.classes]
    head = ["candidate", "configurations", *[f"Dice {n}" for _, n in data.classes],
            "Dice mean", "chosen"]
    rows = [[c.name, " + ".join(c.configurations),
             *[fmt_dice(c.dice.get(k, math.nan)) for k in keys],
             fmt_dice(c.mean_dice if not math.isnan(c.mean_dice) else _mean(c.dice, keys)),
             "chosen" if c.name == sel.chosen else ""] for c in sel.candidates]
    how = ("through the secure sum: the server saw only these pooled means" if sel.secure
           else "per site in clear (per_site_metrics), pooled case-weighted")
    return Table(head, rows, f"Model selection: each candidate on the pooled CV predictions "
                             f"({_n(sel.cases)} cases)",
                 "Each configuration's fold ensemble and each pair of them (probabilities "
                 "averaged), scored at the sites on the cross-validation predictions they kept, "
                 f"{how}; the best mean Dice is chosen (nnU-Net's rule).", level=3)


def selection_site_table(data: RunData, cv: CrossVal) -> Table | None:
    """Per site (only when the job logged per-site metrics): each candidate's mean Dice."""
    sel = cv.selection
    if sel is None or not sel.per_site:
        return None
    keys = [k for k, _ in data.classes]
    names = [c.name for c in sel.candidates]
    rows = []
    for site, (cases, dice) in sel.per_site.items():
        rows.append([site, _n(cases), *[fmt_dice(_mean(
            {k: dice.get(f"{n}/{k}", math.nan) for k in keys}, keys)) for n in names]])
    return Table(["site", "cases", *[f"{n} Dice mean" for n in names]], rows,
                 "Model selection per site (mean Dice over the classes)", level=3)


def _group_name(data: RunData, vals: list[int]) -> str:
    key = ",".join(str(v) for v in vals)
    if key in dict(data.classes):
        return data.class_name(key)
    return "all foreground"


def postprocessing_table(data: RunData, cv: CrossVal) -> Table | None:
    pp = cv.postprocessing
    if pp is None:
        return None
    rows = []
    for s in pp.steps:
        what = ("all foreground (mean Dice)" if s.key == "foreground"
                else f"{data.class_name(s.key)} (its Dice)")
        rows.append([what, fmt_dice(s.before), fmt_dice(s.after), "yes" if s.applied else "no"])
    kept = ", ".join(_group_name(data, g) for g in pp.keep_largest) or "nothing"
    return Table(["keep the largest component of", "Dice before", "Dice after", "applied"],
                 rows, f"Postprocessing, decided on {pp.candidate}'s pooled CV Dice "
                       f"({_n(pp.cases)} cases)",
                 f"Decision: keep the largest component of {kept}. nnU-Net's rule: the "
                 "foreground step is applied when it raises the mean Dice and lowers no class; "
                 "then each class's step when it raises that class's Dice. The decision is in "
                 "the model's bundle.json; fedseg predict applies it.", level=3)


def cv_tables(data: RunData) -> list[tuple[str, Table]]:
    """The section's tables as (HTML id, table), in reading order; none for a run that
    trained one model."""
    cv = data.cv
    if cv is None:
        return []
    out = [("cv-folds", fold_table(data, cv)), ("cv", cv_table(data, cv)),
           ("selection", selection_table(data, cv)),
           ("selection-sites", selection_site_table(data, cv)),
           ("postprocessing", postprocessing_table(data, cv))]
    return [(k, t) for k, t in out if t is not None]


def rounds_note(data: RunData) -> str:
    """For the per-round tables of a cross-validation run: which rounds trained which model
    (each starts from fresh weights, so a curve restarts at each model); empty otherwise."""
    cv = data.cv
    if cv is None or len(cv.models) < 2:
        return ""
    spans = "; ".join(f"{m.label}: rounds {m.first}-{m.last}" for m in cv.models)
    return (f"Rounds are numbered on across the {len(cv.models)} models, each trained from fresh "
            f"weights (a curve restarts at each model; round 0 is the first model untrained): "
            f"{spans}. The 'model' column says whose evaluation a row is.")

