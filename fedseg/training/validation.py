"""Evaluate a model on a site's preprocessed validation cases (the federation's per-round check).

Done on the preprocessed grid (target spacing, cropped) rather than the original images: it
needs no resampling back and no image I/O beyond the cached arrays, so it is cheap enough to run
every round; voxels outside the non-zero mask (label -1) count as background. The final model is
still judged on original images with ``fedseg predict`` + ``fedseg evaluate``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from fedseg.planning.plan import Plan
from fedseg.training.evaluate import case_metrics, label_groups
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
) -> tuple[dict[str, float], dict[str, float], float]:
    """(mean Dice per class, mean HD95 per class, seconds) over ``case_ids``. ``hd95_missing``
    (filled when given): per class, the cases whose HD95 is undefined (the structure on one
    side only), which the HD95 mean leaves out: the run report counts them."""
    t0 = time.monotonic()
    cfg = plan.config(config)
    groups = label_groups(plan.labels)
    layout = plan.layout
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
