"""Scoring predictions against reference labels: Dice and HD95 per class per case.

Why these conventions: fedseg's numbers must be comparable with nnU-Net's ``summary.json`` and
with published federated results, so the bookkeeping is nnU-Net v2's
(``nnunetv2/evaluation/evaluate_predictions.py``):

* Dice = 2 TP / (2 TP + FP + FN) per foreground label (a region's values are OR-ed); when a
  class is absent from BOTH reference and prediction, Dice is NaN (nnU-Net's choice: "nothing to
  find, nothing found" is neither a success nor a failure) and that case does not count in the
  class mean (``nanmean``). Present in only one of the two: Dice 0.
* Per-class means are ``nanmean`` over cases; ``foreground_mean`` is the mean of the per-class
  means. Deviation: nnU-Net takes a plain mean there, so one class absent from every case makes
  its overall mean NaN; fedseg skips such a class (``nanmean``) instead.
* HD95 (not in stock nnU-Net) uses MONAI's ``compute_hausdorff_distance`` (95th percentile,
  symmetric) with the reference file's voxel spacing, so it is in mm. Both empty: NaN (excluded
  from means, like Dice). One of the two empty: the distance is undefined, so HD95 is NaN
  (missing) and the case is COUNTED (``HD95_missing`` per class and in the foreground mean)
  instead of being given a made-up value: the BraTS convention (the image diagonal) put
  65-85 mm into a mean of 2-5 mm distances, which made a mean HD95 unreadable. A missed or
  hallucinated structure is already penalised by its Dice of 0; the count says how many there
  were.

Dice itself comes from MONAI's ``DiceMetric`` (``ignore_empty=False``), with the both-empty case
then set to NaN as above.

NaN is returned as ``float('nan')`` and written to JSON as ``null``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedseg.data.dataset import load_nifti, read_dataset_json
from fedseg.data.io import SUPPORTED_ENDINGS, ending_of, strip_ending
from fedseg.data.labels import label_groups
from fedseg.errors import FedsegError

METRICS = ("Dice", "HD95")


def case_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, ...] | list[float],
    groups: Mapping[str, list[int]],
    ignore_label: int | None = None,
) -> dict[str, dict[str, float]]:
    """Dice, HD95 (mm) and voxel counts per class for one case (arrays of one shape).

    ``ignore_label``: voxels the reference marks with it count nowhere (nnU-Net's ignore label).
    A volume one voxel thick (a 2D image) is scored as 2D: its in-plane boundaries, not its
    two faces, give the HD95."""
    from monai.metrics import DiceMetric, compute_hausdorff_distance

    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs reference {ref.shape}")
    if pred.ndim == 3 and pred.shape[0] == 1:
        pred, ref, spacing = pred[0], ref[0], list(spacing)[1:]
    keep = None if ignore_label is None else ref != ignore_label
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    out: dict[str, dict[str, float]] = {}
    for key, vals in groups.items():
        mr = np.isin(ref, vals)
        mp = np.isin(pred, vals)
        if keep is not None:
            mr &= keep
            mp &= keep
        n_ref, n_pred = int(mr.sum()), int(mp.sum())
        tp = int(np.logical_and(mr, mp).sum())
        res = {"TP": tp, "FP": n_pred - tp, "FN": n_ref - tp, "n_ref": n_ref, "n_pred": n_pred,
               "HD95_missing": 0}
        if n_ref == 0 and n_pred == 0:
            res.update(Dice=math.nan, HD95=math.nan)
        else:
            tr = torch.from_numpy(mr)[None, None].float()
            tpred = torch.from_numpy(mp)[None, None].float()
            res["Dice"] = float(dice(tpred, tr)[0, 0])
            dice.reset()
            if n_ref == 0 or n_pred == 0:  # undefined: missing, and counted
                res["HD95"] = math.nan
                res["HD95_missing"] = 1
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # MONAI's deprecation chatter
                    hd = compute_hausdorff_distance(
                        tpred, tr, include_background=True, percentile=95.0,
                        spacing=[float(s) for s in spacing],
                    )
                res["HD95"] = float(hd[0, 0])
        out[key] = res
    return out


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def summarize(per_case: list[dict], keys: list[str]) -> tuple[dict, dict]:
    """(per-class nanmean over cases, foreground mean over classes) of Dice and HD95, with the
    number of cases whose HD95 is undefined (one of reference / prediction empty)."""
    mean: dict[str, dict[str, float | int]] = {}
    for k in keys:
        mean[k] = {m: _nanmean([c["metrics"][k][m] for c in per_case]) for m in METRICS}
        mean[k]["HD95_missing"] = sum(int(c["metrics"][k].get("HD95_missing", 0))
                                      for c in per_case)
    fg: dict[str, float | int] = {m: _nanmean([mean[k][m] for k in keys]) for m in METRICS}
    fg["HD95_missing"] = sum(int(mean[k]["HD95_missing"]) for k in keys)
    return mean, fg


def json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return None if math.isnan(obj) or math.isinf(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _nifti_files(folder: Path) -> dict[str, Path]:
    out = {}
    for p in sorted(folder.iterdir()):
        stem = strip_ending(p.name)
        if stem is not None and p.is_file() and not p.name.startswith("."):
            out[stem] = p
    return out


def evaluate_folders(
    pred_dir: str | Path,
    labels_dir: str | Path,
    json_path: str | Path,
    labels: Mapping[str, int | list[int]] | None = None,
) -> dict:
    """Score every reference in ``labels_dir`` against ``pred_dir/CASE<ending>``; write JSON.

    ``labels`` is a dataset.json-style mapping (name -> value); when None it is read from
    ``labels_dir/../dataset.json`` if there is one, else every non-zero value found in a case's
    reference or prediction is scored. Every reference needs a prediction of the same shape.
    Returns ``{"metric_per_case": [...], "mean": {class: {Dice, HD95, HD95_missing}},
    "foreground_mean": {Dice, HD95, HD95_missing}, "labels": {...},
    "unmatched_predictions": [...]}``.
    """
    pred_dir, labels_dir = Path(pred_dir), Path(labels_dir)
    for d, what in ((pred_dir, "predictions"), (labels_dir, "reference labels")):
        if not d.is_dir():
            raise FedsegError(f"{d}: no such folder; give the folder of {what}")
    refs = _nifti_files(labels_dir)
    preds = _nifti_files(pred_dir)
    if not refs:
        raise FedsegError(
            f"{labels_dir}: no reference labels found ({' / '.join(SUPPORTED_ENDINGS)})")
    missing = [cid for cid in refs if cid not in preds]
    if missing:
        ending = ending_of(refs[missing[0]].name) or ""
        raise FedsegError(
            f"{pred_dir / (missing[0] + ending)}: missing prediction for reference "
            f"{refs[missing[0]]} ({len(missing)} of {len(refs)} missing); predict those cases first"
        )
    if labels is None and (labels_dir.parent / "dataset.json").is_file():
        labels = read_dataset_json(labels_dir.parent).labels
    fixed_groups = label_groups(labels) if labels is not None else None
    ignore = labels.get("ignore") if labels is not None else None
    ignore = ignore if isinstance(ignore, int) else None
    if fixed_groups is not None and not fixed_groups:
        raise FedsegError("labels: no foreground label to score; give e.g. {'organ': 1}")

    per_case = []
    for cid, ref_path in refs.items():
        ref, spacing, _ = load_nifti(ref_path)
        pred, _, _ = load_nifti(preds[cid])
        if pred.shape != ref.shape:
            raise FedsegError(
                f"{preds[cid]}: shape {pred.shape[::-1]} differs from the reference "
                f"{ref_path} {ref.shape[::-1]}; predictions must be on the label's grid"
            )
        ref = np.rint(ref).astype(np.int64)
        pred = np.rint(pred).astype(np.int64)
        if fixed_groups is None:
            found = np.union1d(np.unique(ref), np.unique(pred))
            groups = {str(v): [int(v)] for v in found if v != 0}
        else:
            groups = fixed_groups
        per_case.append({
            "case_id": cid,
            "reference_file": str(ref_path),
            "prediction_file": str(preds[cid]),
            "spacing": list(spacing),
            "metrics": case_metrics(pred, ref, spacing, groups, ignore),
        })

    if fixed_groups is None:  # classes seen anywhere; absent in a case = both empty there
        keys = sorted({k for c in per_case for k in c["metrics"]}, key=lambda k: int(k))
        for c in per_case:
            for k in keys:
                c["metrics"].setdefault(k, {
                    "TP": 0, "FP": 0, "FN": 0, "n_ref": 0, "n_pred": 0,
                    "Dice": math.nan, "HD95": math.nan, "HD95_missing": 0,
                })
        label_map = {k: int(k) for k in keys}
    else:
        keys = list(fixed_groups)
        label_map = {name: val for name, val in labels.items()
                     if val not in (0, [0]) and name != "ignore"}
    mean, fg = summarize(per_case, keys)
    result = {
        "metric_per_case": per_case,
        "mean": mean,
        "foreground_mean": fg,
        "labels": label_map,
        "unmatched_predictions": [str(p) for cid, p in preds.items() if cid not in refs],
    }
    out = Path(json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(json_safe(result), indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    return result
