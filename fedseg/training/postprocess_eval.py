"""Postprocessing decided on validation cases and applied to prediction files.

Why its own module: :mod:`fedseg.training.postprocess` holds nnU-Net's rules on arrays and sums;
this is the part that touches a site's files — predict the validation fifth of ``imagesTr``
(the cases ``fedseg/data/splits.py`` holds out of training, never the test split), score every
candidate against the labels, and rewrite prediction files with the chosen postprocessing. The
quality harness decides each model's postprocessing this way (sums over all sites: the same
figures a federation's secure sum would give) before scoring the test split.

``python -m fedseg.training.postprocess_eval --model M --work W --json OUT SITE...`` writes the
decision (the :class:`~fedseg.training.postprocess.Postprocessing` and the Dice behind it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedseg.training.postprocess import DiceSums, Postprocessing, decide, variant_dice


def site_sums(model_dir: Path, site: Path, work: Path, device: str = "auto") -> DiceSums:
    """Every candidate's Dice sums on ``site``'s validation cases, predicted with the bundle."""
    from fedseg.data.dataset import list_cases, read_dataset_json
    from fedseg.data.io import read_image
    from fedseg.data.labels import label_groups
    from fedseg.data.splits import split_cases
    from fedseg.planning.plan import Plan
    from fedseg.training.predict import predict_files

    plan = Plan.model_validate_json((model_dir / "plan.json").read_text())
    groups = label_groups(plan.labels)
    ignore = plan.layout.ignore_label
    ds = read_dataset_json(site)
    cases = list_cases(site, ds)
    _, val = split_cases([c.case_id for c in cases])
    val_ids = set(val)
    chosen = [c for c in cases if c.case_id in val_ids]
    sums = DiceSums.empty(groups)
    if not chosen:
        return sums
    out = work / "validation" / site.name
    written = predict_files(model_dir, [p for c in chosen for p in c.images], out, device=device,
                            mirror_tta=True)
    by_id = {c.case_id: c for c in chosen}
    for path in written:
        case = by_id[path.name[: -len(ds.file_ending)]]
        assert case.label is not None
        pred = read_image(path).data[0]
        ref = read_image(case.label).data[0]
        sums.add(variant_dice(pred, ref, groups, ignore))
    return sums


def decide_on_validation(model_dir: Path, sites: list[Path], work: Path,
                         device: str = "auto") -> dict[str, Any]:
    """The postprocessing nnU-Net's rules choose on all sites' validation cases together."""
    from fedseg.data.labels import label_groups
    from fedseg.planning.plan import Plan

    plan = Plan.model_validate_json((model_dir / "plan.json").read_text())
    groups = label_groups(plan.labels)
    total = DiceSums.empty(groups).to_vector()
    for site in sites:
        total = total + site_sums(model_dir, site, work, device).to_vector()
    pooled = DiceSums.from_vector(groups, total)
    pp, report = decide(pooled, groups)
    return {"postprocessing": pp.model_dump(), "decision": report,
            "validation_cases": int(max(pooled.counts["none"], default=0))}


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
