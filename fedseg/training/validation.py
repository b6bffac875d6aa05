"""Evaluate a model on a site's preprocessed validation cases (the federation's per-round check).

Done on the preprocessed grid (target spacing, cropped) rather than the original images: it
needs no resampling back and no image I/O beyond the cached arrays, so it is cheap enough to run
every round; voxels outside the non-zero mask (label -1) count as background. The final model is
still judged on original images with ``fedseg predict`` + ``fedseg evaluate``.

The same pass can score nnU-Net's postprocessing candidates (``postprocess_sums``): each case's
prediction, made once for the metrics, also gives every candidate's Dice
(:func:`fedseg.training.postprocess.variant_dice`), added into a
:class:`~fedseg.training.postprocess.DiceSums` that the site sends (securely summed) for the
server's decision. On this grid, not the original one nnU-Net decides on: a component's size
in target-spacing voxels is its volume up to one constant per case, so "largest" is the same
component except for near-ties, and predicting on the original images would cost a resampling
per case every time.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from fedseg.planning.plan import Plan
from fedseg.training.evaluate import case_metrics, label_groups
from fedseg.training.postprocess import DiceSums, variant_dice
from fedseg.training.predict import predict_logits, segment
from fedseg.training.preprocess import PreprocessedDataset


def evaluate_cases(
    net: torch.nn.Module,
    plan: Plan,
    dataset: PreprocessedDataset,
    case_ids: list[str],
    device: torch.device,
    config: str | None = None,
    mirror_tta: bool = False,
    hd95_missing: dict[str, int] | None = None,
    postprocess_sums: DiceSums | None = None,
) -> tuple[dict[str, float], dict[str, float], float]:
    """(mean Dice per class, mean HD95 per class, seconds) over ``case_ids``. ``hd95_missing``
    (filled when given): per class, the cases whose HD95 is undefined (the structure on one
    side only), which the HD95 mean leaves out: the run report counts them.
    ``postprocess_sums`` (added to when given; ``DiceSums.empty(label_groups(plan.labels))``):
    every postprocessing candidate's Dice of each case, from the same prediction."""
    t0 = time.monotonic()
    cfg = plan.config(config)
    groups = label_groups(plan.labels)
    layout = plan.layout
    if postprocess_sums is not None and postprocess_sums.classes != list(groups):
        raise ValueError(f"postprocess_sums has classes {postprocess_sums.classes}, the plan's "
                         f"labels give {list(groups)}; make it with DiceSums.empty(groups)")
    net.eval()
    dice: dict[str, list[float]] = {k: [] for k in groups}
    hd: dict[str, list[float]] = {k: [] for k in groups}
    with torch.no_grad():
        for cid in case_ids:
            data, seg, props = dataset.load(cid, mmap=False)
            logits = predict_logits(data, net, cfg.patch_size, device, mirror_tta=mirror_tta)
            pred = segment(logits, layout)
            ref = np.where(seg[0] < 0, 0, seg[0])
            m = case_metrics(pred, ref, props.target_spacing, groups, layout.ignore_label)
            if postprocess_sums is not None:
                postprocess_sums.add(variant_dice(pred, ref, groups, layout.ignore_label))
            for k, r in m.items():
                if not math.isnan(r["Dice"]):
                    dice[k].append(r["Dice"])
                if not math.isnan(r["HD95"]):
                    hd[k].append(r["HD95"])
                if hd95_missing is not None:
                    hd95_missing[k] = hd95_missing.get(k, 0) + int(r.get("HD95_missing", 0))
    mean_d = {k: float(np.mean(v)) if v else float("nan") for k, v in dice.items()}
    mean_h = {k: float(np.mean(v)) if v else float("nan") for k, v in hd.items()}
    return mean_d, mean_h, time.monotonic() - t0
