"""What a run report shows, read from the run folder alone (no job memory, no torch).

Why a module of its own: the markdown report, the HTML report, the console summaries of
``fedseg simulate`` / ``fedseg-server start`` and the TensorBoard writer all need the same
reading of ``metrics.jsonl`` (per-class, per-site Dice and HD95 per round), ``plan.json``,
``job.json``, ``status.json`` and ``test_scores.json``; reading them in one place keeps the
numbers in all of them the same. A crashed or still-running run folder reads too.

Class names come from the plan's ``labels`` (the keys of the metrics are the label values,
``"1"`` or ``"1,2"`` for a region, as :func:`fedseg.training.evaluate.label_groups` makes
them), never from a fixed list. An undefined HD95 (a structure missed or predicted where
there is none) is NaN in the metrics and stays missing here: it is counted, never replaced by a
distance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.server import report_cv_data
from fedseg.server.report_cv_data import CrossVal
from fedseg.server.report_values import POOLED, num
from fedseg.server.rundir import RunDir

# record statuses a reader must see: a site left out of a round or of the job, and why
TROUBLE = ("dropped", "rejected", "refused", "failed", "skipped", "too_few_sites",
           "disconnected", "aborted")


@dataclass
class Scores:
    """One site's (or the pool's) Dice and HD95 per class; ``missing``: per class, how many
    cases have no HD95 (``missing_cases``), or, from a job that did not count them, whether
    the site's validation has none at all (1)."""

    cases: int | None
    dice: dict[str, float]
    hd95: dict[str, float]
    missing: dict[str, int] = field(default_factory=dict)
    missing_cases: bool = True

    def mean_dice(self) -> float:
        vals = [v for v in self.dice.values() if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    def mean_hd95(self) -> float:
        vals = [v for v in self.hd95.values() if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    def missing_total(self) -> int:
        return sum(self.missing.values())


@dataclass
class FinalTable:
    """The table a reader looks at first: ``source`` says which cases it is on."""

    source: str
    on_test_cases: bool
    rows: dict[str, Scores]  # site -> scores; "mean of sites" / "pooled" last


@dataclass
class Trouble:
    round: int | None
    phase: str
    who: str
    status: str
    reason: str


@dataclass
class RunData:
    name: str
    root: Path
    classes: list[tuple[str, str]]  # (metrics key, display name), in the plan's label order
    sites: list[str]  # sorted site names (pooled not among them)
    evals: dict[int, dict[str, Scores]]  # round -> site (and "pooled") -> scores
    loss: dict[str, list[tuple[int, float]]]  # site (or "pooled") -> (round, loss)
    final: FinalTable | None
    settings: list[tuple[str, str]]
    trouble: list[Trouble]
    status: dict[str, Any]
    cv: CrossVal | None = None  # a cross-validation run's folds, selection, postprocessing

    def class_name(self, key: str) -> str:
        return dict(self.classes).get(key, f"class {key}")

    def series(self, site: str, key: str, metric: str) -> list[tuple[int, float]]:
        """(round, value) of one site's class ``key`` (metric "dice"/"hd95"; key "mean": the
        mean Dice over classes), NaN where missing, in round order."""
        out = []
        for rnd in sorted(self.evals):
            s = self.evals[rnd].get(site)
            if s is None:
                continue
            if key == "mean":
                out.append((rnd, s.mean_dice()))
            else:
                out.append((rnd, getattr(s, metric).get(key, math.nan)))
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def class_names(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """(metrics key, label name) for each foreground label or region of a plan dict."""
    out = []
    for name, val in (plan.get("labels") or {}).items():
        vals = [int(v) for v in (val if isinstance(val, list) else [val])]
        if vals != [0]:
            out.append((",".join(str(v) for v in vals), str(name)))
    return out


def _eval_scores(rec: dict[str, Any]) -> Scores:
    dice = {str(k): num(v) for k, v in (rec.get("dice") or {}).items()}
    hd = {str(k): num(v) for k, v in (rec.get("hd95") or {}).items()}
    logged = rec.get("hd95_missing")  # per class, when the job logs case counts
    if isinstance(logged, dict):
        missing = {str(k): int(v or 0) for k, v in logged.items()}
    else:  # an older job: a site whose validation cases have no HD95 for a class at all
        missing = {k: int(math.isnan(v) and not math.isnan(dice.get(k, math.nan)))
                   for k, v in hd.items()}
    cases = rec.get("cases")
    return Scores(int(cases) if isinstance(cases, int) else None, dice, hd, missing,
                  missing_cases=isinstance(logged, dict))


def _test_table(scores: dict[str, Any], classes: list[str]) -> FinalTable:
    rows: dict[str, Scores] = {}
    for site, s in sorted(scores.items()):
        mean = s.get("mean") or {}
        rows[site] = Scores(
            int(s.get("cases") or 0),
            {k: num((mean.get(k) or {}).get("Dice")) for k in mean},
            {k: num((mean.get(k) or {}).get("HD95")) for k in mean},
            {k: int((mean.get(k) or {}).get("HD95_missing") or 0) for k in mean},
        )
    if len(rows) > 1:
        keys = classes or sorted({k for r in rows.values() for k in r.dice})

        def avg(vals: list[float]) -> float:
            v = [x for x in vals if not math.isnan(x)]
            return sum(v) / len(v) if v else math.nan

        rows["mean of sites"] = Scores(
            sum(r.cases or 0 for r in rows.values()),
            {k: avg([r.dice.get(k, math.nan) for r in rows.values()]) for k in keys},
            {k: avg([r.hd95.get(k, math.nan) for r in rows.values()]) for k in keys},
            {k: sum(r.missing.get(k, 0) for r in rows.values()) for k in keys},
        )
    return FinalTable("the final model on each site's held-out test cases (test_scores.json)",
                      True, rows)


def final_table(evals: dict[int, dict[str, Scores]], test: dict[str, Any],
                classes: list[str], cv: CrossVal | None = None) -> FinalTable | None:
    """Test scores when the run has them (cases never trained on), else the last round's
    validation (each site's validation fifth of its training cases). A cross-validation
    run's final model is an ensemble: the test table says which, and the last round's
    validation is said to be the last model's only."""
    if test:
        table = _test_table(test, classes)
        if cv is not None:
            table.source = (f"the final model, {cv.final_model()}, on each site's held-out "
                            "test cases (test_scores.json)")
        return table
    if not evals:
        return None
    last = max(evals)
    rows = dict(sorted((k, v) for k, v in evals[last].items() if k != POOLED))
    if POOLED in evals[last]:
        rows[POOLED] = evals[last][POOLED]
    source = f"validation cases after round {last} (no test split scored)"
    span = cv.model_of(last) if cv is not None else None
    if cv is not None:
        source = (f"validation cases of {'the model ' + span.label if span else 'one model'} "
                  f"after round {last} (no test split scored); the final model is "
                  f"{cv.final_model()}, scored in 'Cross-validation and model selection'")
    return FinalTable(source, False, rows)


def _fmt_list(v: Any) -> str:
    return " x ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if v else "?"


def settings(job: dict[str, Any], plan: dict[str, Any], recs: list[dict[str, Any]],
             status: dict[str, Any]) -> list[tuple[str, str]]:
    """The run's settings as (label, value) lines, from job.json, plan.json and the records."""
    out: list[tuple[str, str]] = []
    confs = plan.get("configurations") or {}
    # the plan's (or the job's) choice, else nnU-Net's: 3d_fullres for 3D data, 2d for 2D
    conf_name = str(plan.get("configuration") or job.get("configuration")
                    or ("3d_fullres" if "3d_fullres" in confs or not confs else "2d"))
    if conf_name not in confs and confs:
        conf_name = next(iter(confs))
    conf = confs.get(conf_name) or {}
    # a job choosing among configurations trained each: every line says each one's value
    trained = [str(c) for c in job.get("configurations") or [] if c in confs] or [conf_name]
    confs_of = {c: confs.get(c) or {} for c in trained}

    def per_conf(value: Callable[[dict[str, Any]], str]) -> str:
        if len(trained) == 1:
            return value(conf)
        return "; ".join(f"{c}: {value(v)}" for c, v in confs_of.items())

    def network(c: dict[str, Any]) -> str:
        feats = c.get("features_per_stage") or []
        net = ("nnU-Net's ResidualEncoderUNet, residual blocks per stage "
               f"{'-'.join(str(b) for b in c.get('n_blocks_per_stage') or [])}"
               if c.get("architecture") == "ResidualEncoderUNet"
               else "U-Net (MONAI DynUNet, nnU-Net's plain U-Net)")
        return (f"{net}, {c.get('n_stages', '?')} stages, features "
                f"{'-'.join(str(f) for f in feats) or '?'}")

    if plan:
        which = (f"configuration {conf_name}" if len(trained) == 1
                 else f"configurations {', '.join(trained)}")
        out.append(("plan", f"{plan.get('dataset_name', '?')}, {which} "
                            f"(plan has: {', '.join(confs) or '?'}), preset "
                            f"{job.get('plan_preset', '?')}"))
        out.append(("patch size (voxels)", per_conf(lambda c: _fmt_list(c.get("patch_size")))))
        out.append(("spacing (mm)", per_conf(
            lambda c: _fmt_list([round(float(x), 3) for x in c.get("spacing", [])]))))
        out.append(("batch size", per_conf(lambda c: str(c.get("batch_size", "?")))))
        out.append(("network", per_conf(network)))
        chans = plan.get("channel_names") or {}
        norms = conf.get("normalization_schemes") or []
        out.append(("channels", ", ".join(
            f"{v} ({norms[i] if i < len(norms) else '?'})" for i, v in enumerate(chans.values()))))
        out.append(("labels", ", ".join(f"{n} = {v}" for n, v in (plan.get("labels") or {}).items())))
        out.append(("training cases (all sites)", str(plan.get("num_training_cases", "?"))))
    if job:
        agg = job.get("aggregation") or {}
        kind = str(agg.get("kind", "fedavg"))
        detail = "" if kind == "fedavg" and agg.get("lr", 1.0) == 1.0 else f", server LR {agg.get('lr')}"
        if kind == "fedavgm":
            detail += f", momentum {agg.get('momentum')}"
        if kind == "fedprox":
            detail += f", mu {job.get('proximal_mu')}"
        folds = job.get("folds") if isinstance(job.get("folds"), int) else 1
        if folds > 1:  # the job's rounds are per model, numbered on across the models
            n_conf = len(job.get("configurations") or []) or 1
            models = folds * n_conf
            total = models * job["rounds"] if isinstance(job.get("rounds"), int) else "?"
            out.append(("rounds", f"{status.get('round', '?')} done of {total}: {models} models "
                                  f"({f'{n_conf} configurations x ' if n_conf > 1 else ''}"
                                  f"{folds} folds), {job.get('rounds', '?')} rounds each"))
            out.append(("cross-validation", f"{folds} folds of every site's own training cases"
                        + (f"; the best of {', '.join(job['configurations'])} and their pair "
                           "ensembles chosen by pooled CV Dice" if n_conf > 1 else
                           "; the final model is the folds' ensemble")))
        else:
            out.append(("rounds", f"{status.get('round', '?')} done of {job.get('rounds', '?')}"))
        out.append(("local iterations per round", str(job.get("local_iterations", "?"))))
        out.append(("evaluation", f"every {job.get('eval_every', '?')} round(s) and after the last"))
        out.append(("aggregation", kind + detail))
        out.append(("site learning rate", f"{job.get('site_lr', '?')} (poly schedule), momentum "
                                          f"{job.get('site_momentum_beta', 0.99)}, "
                                          f"{job.get('site_momentum', '?')} each round"))
        thr = job.get("secagg_threshold") or "floor(n/2)+1"
        per_site = "on" if job.get("per_site_metrics", True) else "off"
        out.append(("secure aggregation", f"on (threshold {thr}, per-site metrics {per_site})"
                    if job.get("secure_aggregation") else "off"))
        dp = job.get("dp") or {}
        if dp.get("enabled"):
            eps = [r["dp_epsilon"] for r in recs if isinstance(r.get("dp_epsilon"), int | float)]
            spent = f"epsilon {eps[-1]:.3g} spent" if eps else "no round released yet"
            out.append(("differential privacy", f"on: {spent} at delta {dp.get('delta')}, clip "
                                                f"{dp.get('clip_norm')}, noise multiplier "
                                                f"{dp.get('noise_multiplier') or 'from target'}"
                                                f" (target epsilon {dp.get('target_epsilon')})"))
        else:
            out.append(("differential privacy", "off"))
        out.append(("seed", str(job.get("seed", "?"))))
    sites = sorted({r["site"] for r in recs if r.get("phase") == "enrol" and r.get("status") == "ok"})
    if sites:
        out.append(("sites enrolled", ", ".join(sites)))
    times = [r["time"] for r in recs if isinstance(r.get("time"), int | float)]
    if times:
        mins = (max(times) - min(times)) / 60
        out.append(("logged time span", f"{mins:.1f} min"))
    out.append(("state", f"{status.get('state', '?')} (phase {status.get('phase', '?')})"
                + (f": {status['error']}" if status.get("error") else "")))
    return out


def troubles(recs: list[dict[str, Any]]) -> list[Trouble]:
    out = []
    for r in recs:
        if r.get("status") in TROUBLE:
            rnd = r.get("round")
            who = r.get("site") or (f"node {r['node']}" if "node" in r else "-")
            out.append(Trouble(int(rnd) if isinstance(rnd, int) else None, str(r.get("phase", "?")),
                               str(who), str(r["status"]), str(r.get("reason", ""))))
    return out


def load(root: str | Path) -> RunData:
    """Everything a report shows, from the run folder ``root``."""
    run = RunDir(root)
    recs = run.read_metrics()
    plan = _read_json(run.plan_path)
    job = _read_json(run.root / "job.json")
    status = run.status()
    test = _read_json(run.root / "test_scores.json")
    classes = class_names(plan)

    cv = report_cv_data.load(recs, job)
    evals: dict[int, dict[str, Scores]] = {}
    loss: dict[str, list[tuple[int, float]]] = {}
    for r in recs:
        if r.get("status", "ok") != "ok" or "round" not in r or "site" not in r:
            continue
        if r.get("phase") == "eval" and "dice" in r:
            evals.setdefault(int(r["round"]), {})[str(r["site"])] = _eval_scores(r)
        elif r.get("phase") == "train" and isinstance(r.get("loss"), int | float):
            loss.setdefault(str(r["site"]), []).append((int(r["round"]), float(r["loss"])))
    seen = ({k for by_site in evals.values() for s in by_site.values() for k in s.dice}
            | {k for s in test.values() if isinstance(s, dict) for k in (s.get("mean") or {})})
    if seen:  # what was scored: an ignore label, say, is in the plan but never a class
        classes = [c for c in classes if c[0] in seen]
    known = {k for k, _ in classes}
    classes += [(k, f"class {k}") for k in sorted(seen - known)]
    sites = sorted({s for by_site in evals.values() for s in by_site if s != POOLED}
                   | {str(r["site"]) for r in recs if r.get("phase") == "enrol" and "site" in r})
    return RunData(
        # the job's id (simulate's run folders are all called "run"), else the folder's name
        name=str(job.get("job_id") or run.root.resolve().name),
        root=run.root, classes=classes, sites=sites, evals=evals,
        loss={k: sorted(dict(v).items()) for k, v in loss.items()},
        final=final_table(evals, test, [k for k, _ in classes], cv),
        settings=settings(job, plan, recs, status), trouble=troubles(recs), status=status,
        cv=cv,
    )
