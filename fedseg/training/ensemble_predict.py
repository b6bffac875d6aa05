"""Prediction with an ensemble: the members' probabilities averaged in the original image
space, then argmax (softmax labels) or painting of the regions above 0.5 (sigmoid regions).

What nnU-Net does, per member and case (``export_prediction``'s
``convert_predicted_logits_to_segmentation_with_correct_shape(return_probabilities=True)``):
sliding-window logits with mirroring on the member's own preprocessed grid -> logits resampled
to the cropped grid -> softmax / sigmoid -> pasted into the uncropped volume (background
probability 1 outside the crop for softmax, 0 for regions: ``revert_cropping_on_probabilities``)
-> transposed back. Those volumes are what ``nnUNetv2_ensemble`` averages
(``average_probabilities``) before ``convert_probabilities_to_segmentation``; since every member
is mapped back to the original grid first, members with different plans or configurations
(``2d`` with ``3d_fullres``) average voxel by voxel. One difference, deliberate: nnU-Net
averages the folds of ONE configuration as logits inside its predictor and only configurations
as probabilities; fedseg averages every member as probabilities — one rule for folds and
configurations alike, and the mean of probabilities is the quantity a test can check. The mean
is weighted where an ensemble was given beside other models (it weighs as one model:
``fedseg.models.ensemble``), which is nnU-Net's mean of configurations each averaged over its
folds.

Each member's network is loaded once for the whole input folder; members that share a plan
and configuration (folds) share one preprocessing of each case. Memory: the running sum of
probabilities is one float32 volume per output channel at the original size (nnU-Net holds
the same per member).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from fedseg.data.dataset import CaseFiles, load_case
from fedseg.data.io import ending_of
from fedseg.data.labels import LabelLayout
from fedseg.errors import FedsegError
from fedseg.models.ensemble import Member, resolve_models
from fedseg.planning.plan import Plan
from fedseg.training.predict import (
    group_inputs,
    load_bundle_checked,
    load_network,
    predict_logits,
    resolve_device,
    to_original_grid,
    write_like,
)
from fedseg.training.preprocess import (
    CaseProperties,
    PreprocessedCase,
    preprocess_case,
    resample_tensor,
    separate_z_axis,
)

# (cases done, cases in all, the case's id, seconds it took)
CaseProgressFn = Callable[[int, int, str, float], None]


def logits_to_probabilities(logits: torch.Tensor, props: CaseProperties, plan: Plan) -> np.ndarray:
    """Logits (K, ...) on a member's preprocessed grid -> float32 probabilities (K, ...) on
    the original grid in nnU-Net array order (see the module docstring). The resampling is
    :func:`fedseg.training.predict.logits_to_segmentation`'s (linear on the logits)."""
    shape = props.shape_after_cropping_and_before_resampling
    sep = separate_z_axis(props.target_spacing, props.spacing_transposed)
    resampled = torch.cat([resample_tensor(logits[k:k + 1].float(), shape, sep)
                           for k in range(logits.shape[0])])
    regions = plan.layout.has_regions
    probs = (torch.sigmoid(resampled) if regions else torch.softmax(resampled, 0)).cpu().numpy()
    del resampled
    outside = np.zeros((probs.shape[0],) + (1,) * (probs.ndim - 1), dtype=np.float32)
    if not regions:
        outside[0] = 1.0  # outside the crop: certainly background
    return to_original_grid(probs.astype(np.float32, copy=False), props, plan, outside)


def probabilities_to_segmentation(probs: np.ndarray, layout: LabelLayout) -> np.ndarray:
    """nnU-Net's ``convert_probabilities_to_segmentation``: the argmax's label value, or
    every region above 0.5 painted in ``regions_class_order``."""
    if layout.has_regions:
        return layout.paint(probs > 0.5)
    lut = np.asarray(layout.softmax_values, dtype=np.int64)
    return lut[probs.argmax(0)]


class EnsemblePredictor:
    """The members' networks, loaded once; :meth:`probabilities` of one case at a time."""

    def __init__(
        self, members: Sequence[Member], device: str | torch.device = "auto",
        mirror_tta: bool = True, sw_batch_size: int = 1,
    ) -> None:
        if not members:
            raise FedsegError("no model given; pass -m MODEL_DIR")
        self.members = list(members)
        self.device = resolve_device(device)
        self.mirror_tta = mirror_tta
        self.sw_batch_size = sw_batch_size
        self.nets = []
        for m in self.members:
            _, _, state, _ = load_bundle_checked(m.folder)  # corrupt weights: one line
            self.nets.append(load_network(m.plan, m.config, state, m.folder).to(self.device))
            del state

    @property
    def layout(self) -> LabelLayout:
        return self.members[0].plan.layout

    @property
    def num_channels(self) -> int:
        return self.members[0].dataset.num_channels

    def probabilities(self, files: CaseFiles) -> np.ndarray:
        """The members' probabilities (K, *original shape, nnU-Net array order) averaged with
        their weights (a plain mean unless an ensemble was given beside other models)."""
        case = load_case(files, with_label=False, num_channels=self.num_channels)
        shared: dict[tuple[str, str], PreprocessedCase] = {}  # folds: one preprocessing
        total: np.ndarray | None = None
        with torch.inference_mode():
            for m, net in zip(self.members, self.nets, strict=True):
                key = (m.plan.hash(), m.config)
                if key not in shared:
                    shared[key] = preprocess_case(case, m.plan, m.config)
                pc = shared[key]
                logits = predict_logits(pc.data, net, m.plan.config(m.config).patch_size,
                                        self.device, self.mirror_tta, self.sw_batch_size)
                probs = logits_to_probabilities(logits, pc.properties, m.plan)
                del logits
                if m.weight != 1.0:
                    probs *= np.float32(m.weight)
                if total is None:
                    total = probs
                else:
                    total += probs
        assert total is not None
        total /= np.float32(sum(m.weight for m in self.members))
        return total


def predict_ensemble_files(
    model_dirs: Sequence[str | Path],
    inputs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    device: str | torch.device = "auto",
    mirror_tta: bool = True,
    progress: CaseProgressFn | None = None,
    sw_batch_size: int = 1,
    postprocess: bool = True,
) -> list[Path]:
    """``fedseg predict -m A [-m B ...]`` with an ensemble bundle and/or several bundles: every
    case of ``inputs`` segmented with the mean probabilities of all their members, written as
    :func:`fedseg.training.predict.predict_files` writes (the input's format and geometry).
    ``progress(done, total, case_id, seconds)`` after each case. ``postprocess``: apply the
    decision :func:`fedseg.models.bundle_postprocessing.decision_for` names (one ensemble
    bundle's own; none for several ``-m``) to each label map on the original grid."""
    from fedseg.models.bundle_postprocessing import decision_for

    members = resolve_models(model_dirs)
    pp = decision_for(model_dirs)[0] if postprocess else None
    cases = group_inputs(inputs, members[0].dataset)
    predictor = EnsemblePredictor(members, device, mirror_tta, sw_batch_size)
    out_dir = Path(out_dir)
    written = []
    for i, files in enumerate(cases):
        t0 = time.perf_counter()
        seg = probabilities_to_segmentation(predictor.probabilities(files), predictor.layout)
        if pp is not None:
            seg = pp.apply(seg)
        ref = files.images[0]
        ending = ending_of(ref.name) or members[0].dataset.file_ending
        written.append(write_like(seg, ref, out_dir / f"{files.case_id}{ending}"))
        if progress is not None:
            progress(i + 1, len(cases), files.case_id, time.perf_counter() - t0)
    return written


def case_probabilities(
    model_dirs: Sequence[str | Path], inputs: str | Path | Sequence[str | Path],
    device: str | torch.device = "auto", mirror_tta: bool = True,
) -> dict[str, np.ndarray]:
    """Case id -> the ensemble's mean probabilities (K, *original shape, nnU-Net array order)
    for every case of ``inputs``: what :func:`predict_ensemble_files` segments, for checks
    and for callers that want the soft output."""
    members = resolve_models(model_dirs)
    predictor = EnsemblePredictor(members, device, mirror_tta)
    return {f.case_id: predictor.probabilities(f)
            for f in group_inputs(inputs, members[0].dataset)}
