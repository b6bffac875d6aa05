"""What the report shows of a cross-validation run, read from ``metrics.jsonl`` and ``job.json``.

Why a module of its own: a federated job with ``folds`` > 1 (and perhaps several
``configurations``) trains several models one after the other and then chooses among them
(``fedseg/server/phases/crossval.py``, ``phases/selection.py``). Its ``fold``, ``cv``,
``selection`` and ``postprocessing`` records are read here, and so is which rounds belong to
which model: the job numbers its rounds on across the models (model m is fold m % K of
configuration m // K and covers rounds m*R+1 .. (m+1)*R), so a per-round table of such a run
would otherwise read as one model's curve. Records are read tolerantly (a crashed or running
run folder has only some of them); a resumed job may log a fold or the selection twice, and
the latest record counts, as in ``crossval.cv_summary``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedseg.server.report_values import POOLED, num


@dataclass
class ModelSpan:
    """One trained model of the job and the rounds that trained it."""

    configuration: str | None
    fold: int
    first: int
    last: int

    @property
    def label(self) -> str:
        return f"{self.configuration + ' ' if self.configuration else ''}fold {self.fold}"


@dataclass
class FoldScore:
    configuration: str | None
    fold: int
    round: int | None
    cases: int | None
    dice: dict[str, float]


@dataclass
class CvScore:
    configuration: str | None
    folds: int | None
    folds_scored: list[int]
    cases: int | None
    dice: dict[str, float]


@dataclass
class Candidate:
    name: str
    configurations: list[str]
    dice: dict[str, float]
    mean_dice: float


@dataclass
class Selection:
    cases: int | None
    candidates: list[Candidate]
    chosen: str | None
    secure: bool
    per_site: dict[str, tuple[int | None, dict[str, float]]] = field(default_factory=dict)


@dataclass
class PostStep:
    """One of nnU-Net's keep-largest-component decisions: ``key`` "foreground" or a class."""

    key: str
    before: float
    after: float
    applied: bool


@dataclass
class Postprocessing:
    candidate: str
    cases: int | None
    keep_largest: list[list[int]]
    steps: list[PostStep]


@dataclass
class CrossVal:
    """Everything of a cross-validation run; ``models`` in training order."""

    folds: int
    rounds_per_model: int | None
    configurations: list[str]
    models: list[ModelSpan]
    fold_scores: list[FoldScore]
    cv: list[CvScore]
    selection: Selection | None
    postprocessing: Postprocessing | None

    def model_of(self, rnd: int) -> ModelSpan | None:
        """The model evaluated (or trained) at round ``rnd``; round 0 is the first model
        untrained."""
        if rnd == 0 and self.models:
            return self.models[0]
        return next((m for m in self.models if m.first <= rnd <= m.last), None)

    def final_model(self) -> str:
        """What ``RUN_DIR/model`` is, in words (the selected ensemble, or the folds')."""
        sel = self.selection
        if sel is not None and sel.chosen:
            cand = next((c for c in sel.candidates if c.name == sel.chosen), None)
            confs = cand.configurations if cand else [sel.chosen]
            what = (f"its {self.folds} fold models" if len(confs) == 1 else
                    f"{' and '.join(confs)}, {self.folds} fold models each")
            return f"the selected ensemble {sel.chosen} ({what})"
        if len(self.configurations) > 1:
            return (f"the ensemble to be chosen among {', '.join(self.configurations)} "
                    "(no selection logged yet)")
        conf = self.configurations[0] if self.configurations else None
        return f"the ensemble of the {self.folds} {conf + ' ' if conf else ''}fold models"


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _dice(v: Any) -> dict[str, float]:
    return {str(k): num(x) for k, x in v.items()} if isinstance(v, dict) else {}


def _conf(v: Any) -> str | None:
    return str(v) if v else None


def _spans(job: dict[str, Any], folds: int, configs: list[str],
           fold_recs: list[FoldScore]) -> list[ModelSpan]:
    """From job.json (rounds per model, folds, configurations); a folder without them: from
    the fold records' last rounds."""
    rounds = _int(job.get("rounds"))
    if rounds and rounds > 0:
        return [ModelSpan(configs[m // folds] if configs else None, m % folds,
                          m * rounds + 1, (m + 1) * rounds)
                for m in range(folds * max(1, len(configs)))]
    out, prev = [], 0
    for f in sorted((f for f in fold_recs if f.round is not None), key=lambda f: f.round or 0):
        out.append(ModelSpan(f.configuration, f.fold, prev + 1, f.round or 0))
        prev = f.round or 0
    return out


def _selection(recs: list[dict[str, Any]]) -> Selection | None:
    pooled = [r for r in recs if r.get("phase") == "selection" and r.get("site") == POOLED
              and isinstance(r.get("candidates"), dict)]
    if not pooled:
        return None
    last = pooled[-1]
    cands = [Candidate(str(n), [str(x) for x in (c.get("configurations") or [n])],
                       _dice(c.get("dice")), num(c.get("mean_dice")))
             for n, c in last["candidates"].items() if isinstance(c, dict)]
    per_site: dict[str, tuple[int | None, dict[str, float]]] = {}
    for r in recs:
        if (r.get("phase") == "selection" and r.get("site") not in (None, POOLED)
                and isinstance(r.get("dice"), dict)):
            per_site[str(r["site"])] = (_int(r.get("cases")), _dice(r["dice"]))
    return Selection(_int(last.get("cases")), cands,
                     str(last["chosen"]) if last.get("chosen") else None,
                     bool(last.get("secure_aggregation")), dict(sorted(per_site.items())))


def _postprocessing(recs: list[dict[str, Any]]) -> Postprocessing | None:
    pp = [r for r in recs if r.get("phase") == "postprocessing"]
    if not pp:
        return None
    r = pp[-1]
    rep = r.get("report") if isinstance(r.get("report"), dict) else {}
    steps = []

    def step(key: str, v: Any) -> None:
        if isinstance(v, dict):
            steps.append(PostStep(key, num(v.get("before")), num(v.get("after")),
                                  bool(v.get("applied"))))

    step("foreground", rep.get("foreground"))
    for k, v in (rep.get("classes") or {}).items():
        step(str(k), v)
    keep = [[int(x) for x in g] for g in (r.get("keep_largest") or []) if isinstance(g, list)]
    return Postprocessing(str(r.get("candidate", "?")), _int(r.get("cases")), keep, steps)


def load(recs: list[dict[str, Any]], job: dict[str, Any]) -> CrossVal | None:
    """The run's cross-validation, or None for a run that trained one model."""
    folds = _int(job.get("folds")) or 0
    cv_recs = [r for r in recs if r.get("phase") in ("fold", "cv", "selection", "postprocessing")]
    if folds < 2 and not cv_recs:
        return None
    configs = [str(c) for c in (job.get("configurations") or [])]
    by_fold: dict[tuple[str | None, int], FoldScore] = {}
    for r in recs:
        if r.get("phase") == "fold" and _int(r.get("fold")) is not None:
            f = FoldScore(_conf(r.get("configuration")), int(r["fold"]), _int(r.get("round")),
                          _int(r.get("cases")), _dice(r.get("dice")))
            by_fold[(f.configuration, f.fold)] = f  # the latest (a resumed job logs again)
            folds = max(folds, _int(r.get("folds")) or 0)
    by_conf: dict[str | None, CvScore] = {}
    for r in recs:
        if r.get("phase") == "cv":
            c = CvScore(_conf(r.get("configuration")), _int(r.get("folds")),
                        [int(x) for x in (r.get("folds_scored") or []) if _int(x) is not None],
                        _int(r.get("cases")), _dice(r.get("dice")))
            by_conf[c.configuration] = c
            folds = max(folds, c.folds or 0)
    if not configs:  # a job.json without them: the records name the configurations
        configs = list(dict.fromkeys(c for c, _ in by_fold if c))
    order = {c: i for i, c in enumerate(configs)}

    def key(f: FoldScore) -> tuple[int, int]:
        return (order.get(f.configuration or "", len(order)), f.fold)

    fold_scores = sorted(by_fold.values(), key=key)
    return CrossVal(
        folds=folds, rounds_per_model=_int(job.get("rounds")), configurations=configs,
        models=_spans(job, max(folds, 1), configs, fold_scores), fold_scores=fold_scores,
        cv=sorted(by_conf.values(), key=lambda c: order.get(c.configuration or "", len(order))),
        selection=_selection(recs), postprocessing=_postprocessing(recs))
