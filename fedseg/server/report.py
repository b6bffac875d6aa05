"""The run report: ``report.html`` (one self-contained file), ``report.md`` and ``plots.png``,
from the run folder alone.

Reading only the run folder (``metrics.jsonl``, ``plan.json``, ``job.json``, ``status.json``,
``test_scores.json``), not the job's memory, means a report can be redrawn for any run, also a
crashed or a running one, with ``fedseg report RUN_DIR``. The job writes it when it exports the
model; ``fedseg simulate`` writes it again once the test cases are scored, so that the final
table is on cases no model trained on. What is read: :mod:`report_data` (a cross-validation's
records: :mod:`report_cv_data`); the tables: :mod:`report_tables` (the cross-validation and
model-selection section: :mod:`report_cv_tables`); the figure: :mod:`report_plots`; the
page: :mod:`report_html`.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedseg.errors import FedsegError
from fedseg.server import report_data
from fedseg.server.report_cv_tables import TITLE as CV_TITLE
from fedseg.server.report_cv_tables import cv_tables, intro, rounds_note
from fedseg.server.report_html import GLOSSARY, render_html
from fedseg.server.report_plots import write_png
from fedseg.server.report_tables import (
    final_table,
    findings,
    loss_table,
    round_tables,
    settings_table,
    to_markdown,
    trouble_table,
)
from fedseg.server.rundir import RunDir


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def render_markdown(data: report_data.RunData) -> str:
    lines = [f"# fedseg run `{data.name}`", "",
             f"{data.status.get('state', '?')}, round {data.status.get('round', '?')} of "
             f"{data.status.get('rounds', '?')}; sites: {', '.join(data.sites) or '-'}; "
             f"classes: {', '.join(n for _, n in data.classes) or '-'}. "
             "The same report with the figure inline: `report.html`.", ""]
    found = findings(data)
    if found:
        lines += ["**Look at:**", "", *[f"- {f}" for f in found], ""]
    ft = final_table(data)
    lines.append(to_markdown(ft) if ft else "## Final result\n\nno evaluation was logged yet\n")
    glossary = GLOSSARY.replace("<b>", "**").replace("</b>", "**").replace("<i>", "*") \
        .replace("</i>", "*")
    lines += [glossary, ""]
    cv = cv_tables(data)
    if cv:
        lines += [f"## {CV_TITLE}", "", intro(data), "", *[to_markdown(t) for _, t in cv]]
    lines += ["## Per round", "",
              "![Dice and HD95 per class and site, mean Dice, loss](plots.png)", ""]
    note = rounds_note(data)
    if note:
        lines += [note, ""]
    lines += [to_markdown(t) for t in round_tables(data)]
    lt = loss_table(data)
    if lt is not None:
        lines.append(to_markdown(lt))
    lines += [to_markdown(settings_table(data)), to_markdown(trouble_table(data))]
    lines += ["Files: `plan.json`, `job.json`, `metrics.jsonl`, `test_scores.json` (when scored), "
              "`checkpoints/last.npz`, `checkpoints/best.npz`, `model/` (use with `fedseg predict "
              "--model`). Redraw with `fedseg report RUN_DIR`.", ""]
    return "\n".join(lines)


def write_reports(root: str | Path) -> tuple[Path, Path]:
    """(report.md, report.html) of the run folder ``root``, with ``plots.png`` beside them."""
    root = Path(root)
    if not (root / "metrics.jsonl").is_file():
        raise FedsegError(f"{root}: no metrics.jsonl; give a run folder (RUN_DIR, e.g. "
                          "WORK/run of fedseg simulate, or the job's run_dir)")
    data = report_data.load(root)
    png = write_png(data, root / "plots.png")
    md, page = root / "report.md", root / "report.html"
    _atomic(md, render_markdown(data))
    _atomic(page, render_html(data, png))
    return md, page


def write_report(run: RunDir) -> Path:
    """The job's call at export: writes every form of the report; returns ``report.md``."""
    return write_reports(run.root)[0]
