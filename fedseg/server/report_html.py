"""The run report as ONE self-contained HTML file (styles inline, the figure as a base64 PNG).

Why one file: a consortium mails a report to a clinician or attaches it to a ticket; a page
that loads nothing else opens the same anywhere, offline, and cannot leak a request to a
server. Every text is escaped: site names and failure reasons come from the sites.
"""

from __future__ import annotations

import base64
import html
import time

from fedseg.server.report_cv_tables import TITLE as CV_TITLE
from fedseg.server.report_cv_tables import cv_tables, intro, rounds_note
from fedseg.server.report_data import RunData
from fedseg.server.report_tables import (
    Table,
    final_table,
    findings,
    loss_table,
    round_tables,
    settings_table,
    trouble_table,
)

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;
max-width:1150px;color:#1b1b1b;line-height:1.4;padding:0 16px}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#555;margin-top:0}
table{border-collapse:collapse;margin:.5em 0 .3em;font-size:.9em}
th,td{border:1px solid #d0d0d0;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f2f4f7}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafbfc}
td.missing{color:#b45309;font-style:italic}td.low{color:#b91c1c;font-weight:600}
.reason{text-align:left;white-space:normal}th.reason{white-space:nowrap}
.note{color:#555;font-size:.85em;max-width:1000px}
.findings{background:#fff7ed;border:1px solid #fdba74;padding:.5em 1em;border-radius:4px}
.ok{background:#f0fdf4;border:1px solid #86efac;padding:.5em 1em;border-radius:4px}
.wide{overflow-x:auto}img{max-width:100%;border:1px solid #eee}
"""

GLOSSARY = (
    "<b>Dice</b>: overlap of the predicted and the true structure (1 = perfect, 0 = missed). "
    "<b>HD95</b>: 95th-percentile distance between their boundaries in mm (lower is better); "
    "<i>missing</i> when the structure is on one side only (missed, or predicted where there "
    "is none): such a case has no distance, is counted, and is left out of the HD95 means. "
    "<i>n/a</i>: the class is in neither (nothing to find). <b>pooled</b>: the case-weighted "
    "mean over the sites' validation cases. Round 0 is the untrained model."
)


def _cell_class(head: str, value: str) -> str:
    if value == "missing":
        return ' class="missing"'
    if head.startswith("Dice") or head.endswith(" Dice"):
        try:
            if float(value) < 0.1:
                return ' class="low"'
        except ValueError:
            pass
    if head in ("reason", "value"):
        return ' class="reason"'
    return ""


def table_html(t: Table, table_id: str = "") -> str:
    e = html.escape
    ident = f' id="{e(table_id)}"' if table_id else ""
    parts = [f"<h{t.level}>{e(t.title)}</h{t.level}>"] if t.title else []
    if not t.rows:
        parts.append("<p>none</p>")
        return "\n".join(parts)
    parts.append(f'<div class="wide"><table{ident}><thead><tr>'
                 + "".join(f"<th{_cell_class(h, '') if h in ('reason', 'value') else ''}>"
                           f"{e(h)}</th>" for h in t.head) + "</tr></thead><tbody>")
    for r in t.rows:
        parts.append("<tr>" + "".join(f"<td{_cell_class(h, c)}>{e(c)}</td>"
                                      for h, c in zip(t.head, r, strict=True)) + "</tr>")
    parts.append("</tbody></table></div>")
    if t.note:
        parts.append(f'<p class="note">{e(t.note)}</p>')
    return "\n".join(parts)


def render_html(data: RunData, png: bytes) -> str:
    """The whole page; ``png``: the figure (``report_plots.render_png``)."""
    e = html.escape
    final = final_table(data)
    found = findings(data)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = [
        f"<h1>fedseg run <code>{e(data.name)}</code></h1>",
        f'<p class="sub">{e(data.status.get("state", "?"))}, round '
        f'{e(str(data.status.get("round", "?")))} of {e(str(data.status.get("rounds", "?")))}; '
        f"sites: {e(', '.join(data.sites) or '-')}; classes: "
        f"{e(', '.join(n for _, n in data.classes) or '-')}; run folder "
        f"<code>{e(str(data.root.resolve()))}</code>; report made {e(when)}</p>",
    ]
    if found:
        body.append('<div class="findings"><b>Look at:</b><ul>'
                    + "".join(f"<li>{e(f)}</li>" for f in found) + "</ul></div>")
    else:
        body.append('<div class="ok">Every class found at every site; no site dropped, '
                    "rejected or refused.</div>")
    body.append(table_html(final, "final") if final else "<h2>Final result</h2><p>no evaluation "
                "was logged yet</p>")
    body.append(f'<p class="note">{GLOSSARY}</p>')
    cv = cv_tables(data)
    if cv:
        body.append(f'<h2 id="crossval">{e(CV_TITLE)}</h2>'
                    f"<p>{e(intro(data)).replace('`model/`', '<code>model/</code>')}</p>")
        for ident, t in cv:
            body.append(table_html(t, ident))
    b64 = base64.b64encode(png).decode("ascii")
    body.append('<h2>Per round</h2><img id="plots" alt="Dice and HD95 per class, per site and '
                f'pooled, after each round; mean Dice; training loss" '
                f'src="data:image/png;base64,{b64}">')
    note = rounds_note(data)
    if note:
        body.append(f'<p class="note" id="rounds-note">{e(note)}</p>')
    for i, t in enumerate(round_tables(data)):
        body.append(table_html(t, f"rounds-{i}"))
    lt = loss_table(data)
    if lt is not None:
        body.append(table_html(lt, "loss"))
    body.append(table_html(settings_table(data), "settings"))
    body.append(table_html(trouble_table(data), "trouble"))
    body.append('<h2>Files</h2><p class="note">In the run folder: <code>plan.json</code>, '
                "<code>job.json</code> (every setting), <code>metrics.jsonl</code> (every "
                "record), <code>test_scores.json</code> (per case, when scored), "
                "<code>checkpoints/</code>, <code>model/</code> (use with <code>fedseg predict "
                "--model</code>). Redraw this report with <code>fedseg report RUN_DIR</code>.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>fedseg run {e(data.name)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")
