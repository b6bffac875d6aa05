"""Postprocessing decided on validation cases and applied to prediction files.

Why its own module: :mod:`fedseg.training.postprocess` holds nnU-Net's rules on arrays and sums;
this is the part that touches a site's files — predict the validation fifth of ``imagesTr``
(the cases ``fedseg/data/splits.py`` holds out of training, never the test split), score every
candidate against the labels, and rewrite prediction files with the chosen postprocessing. The
quality harness decides each model's postprocessing this way (sums over all sites: the same
figures a federation's secure sum would give) before scoring the test split.

``python -m fedseg.training.postprocess_eval --model M --work W --json OUT SITE...`` writes the
decision (the :class:`~fedseg.training.postprocess.Postprocessing` and the Dice behind it);
``fedseg postprocess -m M SITE...`` (:func:`decide_into_bundle`) also writes it into the bundle,
where ``fedseg predict`` applies it. The candidates are scored on predictions made WITHOUT the
bundle's current decision, so deciding again replaces it rather than stacking on it.

Which cases: the validation fifth by default, which the model did not train on when it was
trained by ``fedseg train`` or a one-model federation. A cross-validation ensemble's folds each
trained on most of that fifth (nnU-Net decides an ensemble's postprocessing on each fold's own
validation predictions: the federated path, ``fedseg/training/cv_predictions.py``), so for it
give sites that took no part in training, with ``cases="all"`` (``--all-cases``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fedseg.training.postprocess import DiceSums, Postprocessing, decide, variant_dice

CaseSet = Literal["validation", "all"]


def _first_plan(model_dir: Path):
    """The plan of the bundle, or of an ensemble's first member (members share the labels)."""
    from fedseg.models.ensemble import resolve_models

    return resolve_models([model_dir])[0].plan


def site_sums(model_dir: Path, site: Path, work: Path, device: str = "auto",
              cases: CaseSet = "validation") -> DiceSums:
    """Every candidate's Dice sums on ``site``'s validation cases (``cases="all"``: all of
    ``imagesTr``, for a site that did not train the model), predicted with the bundle (single
    or ensemble) WITHOUT any postprocessing the bundle already records."""
    from fedseg.data.dataset import list_cases, read_dataset_json
    from fedseg.data.io import read_image
    from fedseg.data.labels import label_groups
    from fedseg.data.splits import split_cases
    from fedseg.models.bundle_files import bundle_kind
    from fedseg.training.ensemble_predict import predict_ensemble_files
    from fedseg.training.predict import predict_files

    plan = _first_plan(model_dir)
    groups = label_groups(plan.labels)
    ignore = plan.layout.ignore_label
    ds = read_dataset_json(site)
    all_cases = list_cases(site, ds)
    if cases == "all":
        chosen = list(all_cases)
    else:
        _, val = split_cases([c.case_id for c in all_cases])
        val_ids = set(val)
        chosen = [c for c in all_cases if c.case_id in val_ids]
    sums = DiceSums.empty(groups)
    if not chosen:
        return sums
    out = work / "validation" / site.name
    images = [p for c in chosen for p in c.images]
    if bundle_kind(model_dir) == "ensemble":
        written = predict_ensemble_files([model_dir], images, out, device=device,
                                         mirror_tta=True, postprocess=False)
    else:
        written = predict_files(model_dir, images, out, device=device, mirror_tta=True,
                                postprocess=False)
    by_id = {c.case_id: c for c in chosen}
    for path in written:
        case = by_id[path.name[: -len(ds.file_ending)]]
        assert case.label is not None
        pred = read_image(path).data[0]
        ref = read_image(case.label).data[0]
        sums.add(variant_dice(pred, ref, groups, ignore))
    return sums


def decide_on_validation(model_dir: Path, sites: list[Path], work: Path,
                         device: str = "auto", cases: CaseSet = "validation") -> dict[str, Any]:
    """The postprocessing nnU-Net's rules choose on all sites' validation cases together."""
    from fedseg.data.labels import label_groups

    groups = label_groups(_first_plan(model_dir).labels)
    total = DiceSums.empty(groups).to_vector()
    for site in sites:
        total = total + site_sums(model_dir, site, work, device, cases).to_vector()
    pooled = DiceSums.from_vector(groups, total)
    pp, report = decide(pooled, groups)
    return {"postprocessing": pp.model_dump(), "decision": report,
            "validation_cases": int(max(pooled.counts["none"], default=0))}


def decide_into_bundle(model_dir: Path, sites: list[Path], work: Path, device: str = "auto",
                       cases: CaseSet = "validation") -> dict[str, Any]:
    """``fedseg postprocess``: :func:`decide_on_validation`, then the decision written into the
    bundle (single or ensemble), where ``fedseg predict`` applies it. The non-federated path
    (one site's own training, or sites on one machine); a federation decides on pooled sums.
    No validation case at all is one line: nothing would be decided."""
    from fedseg.errors import FedsegError
    from fedseg.models.bundle_postprocessing import write_postprocessing

    res = decide_on_validation(model_dir, sites, work, device, cases)
    if res["validation_cases"] == 0:
        what = "validation cases (1 in 5 of imagesTr)" if cases == "validation" else "cases"
        raise FedsegError(f"{', '.join(str(s) for s in sites)}: no {what} with a label to "
                          "decide postprocessing on; nothing written")
    write_postprocessing(model_dir, Postprocessing.model_validate(res["postprocessing"]))
    return res


def apply_to_files(paths: list[Path], pp: Postprocessing) -> None:
    """Rewrite each prediction file with ``pp`` applied, in its own format and geometry."""
    from fedseg.data.io import io_for, read_image

    if not pp.keep_largest:
        return
    for path in paths:
        seg = pp.apply(read_image(path).data[0])
        io_for(path).write_seg(seg, path, path)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(description="decide postprocessing on the sites' validation cases")
    p.add_argument("--model", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("sites", nargs="+")
    a = p.parse_args(argv)
    res = decide_on_validation(Path(a.model), [Path(s) for s in a.sites], Path(a.work), a.device)
    Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["postprocessing"]), flush=True)
    return 0


if __name__ == "__main__":
    from fedseg.errors import run_cli

    raise SystemExit(run_cli("fedseg-postprocess", main))
