"""A site's cross-validation predictions, kept at the site: what nnU-Net keeps of each fold's
validation cases (``--npz``: the probabilities), so that configurations and their ensembles are
compared, and postprocessing decided, on the CV predictions — without a model travelling again
and without any image, label or per-case number leaving the site.

Why a store of its own: nnU-Net's ``find_best_configuration`` ensembles the CV predictions of
two configurations offline, from the probabilities each fold wrote for its validation cases.
In a federation those cases are at the sites, so each site keeps the probabilities its fold
models gave its validation cases (the final evaluation of each fold model writes them), and the
server later asks for Dice of candidates built from them (``fedseg/server/phases/selection.py``):
a candidate is one or more configurations (plans) whose stored probabilities are averaged, as
``nnUNetv2_ensemble`` averages probability files. Every case of the site is validated once per
configuration over the folds (the fold split depends only on the case ids), so each candidate
is scored on all the site's cases.

Layout: ``CACHE_DIR/cv/JOB_ID/PLAN_HASH/CASE.npz`` (``p``: float16 probabilities on the
original image grid, nnU-Net axis order, as :func:`fedseg.training.ensemble_predict.
case_probabilities` gives them). float16 halves the disk and changes an argmax only where two
classes are within ~1e-3: far below what a Dice comparison resolves.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedseg.data.dataset import list_cases, read_dataset_json
from fedseg.data.io import read_image
from fedseg.data.labels import label_groups
from fedseg.errors import FedsegError
from fedseg.planning.plan import Plan
from fedseg.protocol.messages import CV_POSTPROCESS_PREFIX as POSTPROCESS_PREFIX
from fedseg.training.postprocess import NONE, candidates, class_dice, variant_dice


def store_dir(cache_dir: Path, job_id: str, plan_hash: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)[:80] or "job"
    return Path(cache_dir) / "cv" / safe / plan_hash


def store(plan: Plan, weights: Mapping[str, np.ndarray], data_dir: Path, case_ids: list[str],
          out: Path, device: str = "auto") -> int:
    """Predict ``case_ids`` of the site with ``weights`` (the fold model) and keep their
    probabilities in ``out``; returns the number of cases written."""
    import torch

    from fedseg.models.bundle import BundleInfo, save_bundle
    from fedseg.training.ensemble_predict import case_probabilities

    ds = read_dataset_json(data_dir)
    wanted = set(case_ids)
    files = [p for c in list_cases(data_dir, ds, "Tr") if c.case_id in wanted for p in c.images]
    if not files:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedseg-cv-", dir=out) as tmp:
        bundle = save_bundle(Path(tmp) / "model", plan, plan.dataset_json(),
                             {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()},
                             BundleInfo(note="fold model, for its validation predictions"))
        probs = case_probabilities([bundle], files, device=device)
        for case, p in probs.items():
            part = out / f".{case}.tmp.npz"
            np.savez_compressed(part, p=p.astype(np.float16))
            part.replace(out / f"{case}.npz")  # complete files only
    return len(probs)


def _load(d: Path, case: str) -> np.ndarray:
    with np.load(d / f"{case}.npz") as z:
        return z["p"].astype(np.float32)


def score_candidates(
    data_dir: Path, plan: Plan, stores: Mapping[str, list[Path]], postprocess: str | None = None,
) -> tuple[dict[str, float], int]:
    """Mean Dice over the site's cases of every candidate (name -> the store folders whose
    probabilities it averages), keyed ``NAME/CLASS``; with ``postprocess`` = a candidate's name,
    also every postprocessing candidate applied to that one, keyed ``pp/VARIANT/CLASS``
    (``fedseg.training.postprocess``). Returns (means, number of cases scored)."""
    from fedseg.training.ensemble_predict import probabilities_to_segmentation

    ds = read_dataset_json(data_dir)
    groups = label_groups(plan.labels)
    layout = plan.layout
    ignore = plan.layout.ignore_label
    all_dirs = [d for ds_ in stores.values() for d in ds_]
    for d in all_dirs:
        if not d.is_dir():
            raise FedsegError(f"{d}: no cross-validation predictions of this job at this site "
                              "(its fold evaluations did not run here); the site cannot score "
                              "the ensembles")
    cases = [c for c in list_cases(data_dir, ds, "Tr")
             if c.label is not None and all((d / f"{c.case_id}.npz").is_file() for d in all_dirs)]
    sums: dict[str, list[float]] = {}

    def add(key: str, v: float) -> None:
        if not math.isnan(v):
            sums.setdefault(key, []).append(v)

    for c in cases:
        assert c.label is not None
        ref = read_image(c.label).data[0]
        probs = {d: _load(d, c.case_id) for d in set(all_dirs)}  # each file once per case
        for name, dirs in stores.items():
            mean = sum(probs[d] for d in dirs) / len(dirs)
            seg = probabilities_to_segmentation(mean, layout)
            if name == postprocess:
                variants = variant_dice(seg, ref, groups, ignore)
                for variant, per_class in variants.items():
                    for k, v in per_class.items():
                        add(f"{POSTPROCESS_PREFIX}/{variant}/{k}", v)
                per = variants[NONE]
            else:
                per = class_dice(seg, ref, groups, ignore)
            for k, v in per.items():
                add(f"{name}/{k}", v)
    keys = [f"{n}/{k}" for n in stores for k in groups]
    if postprocess is not None:
        keys += [f"{POSTPROCESS_PREFIX}/{v}/{k}" for v in candidates(groups) for k in groups]
    return {k: (float(np.mean(sums[k])) if sums.get(k) else float("nan")) for k in keys}, len(cases)


def forget(cache_dir: Path, job_id: str) -> None:
    """Remove a job's stored CV predictions (not called by the job: a site keeps them until
    its operator clears the cache, like nnU-Net's validation folders)."""
    shutil.rmtree(store_dir(cache_dir, job_id, "x").parent, ignore_errors=True)
