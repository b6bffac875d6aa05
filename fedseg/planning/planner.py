"""The plan nnU-Net v2's default ``ExperimentPlanner`` would make, from a (pooled) fingerprint.

Why our own code: nnU-Net's planner reads per-case lists from ``dataset_fingerprint.json`` and
the dataset folder from ``nnUNet_raw``, instantiates torch networks to estimate memory and
writes into ``nnUNet_preprocessed`` — it cannot run on a federated fingerprint, and nnunetv2 is
a heavy dependency for a server that only plans. Every rule below is a transcription of nnunetv2
2.x (checked against 2.8.1; ``tools/make_nnunet_goldens.py`` and ``tests/test_planner.py`` compare
the result with nnU-Net's own plans):

==========================================  ===================================================
fedseg                                      nnunetv2 / dynamic_network_architectures
==========================================  ===================================================
:func:`fullres_target_spacing`              ``ExperimentPlanner.determine_fullres_target_spacing``
:func:`transpose`                           ``ExperimentPlanner.determine_transpose``
:func:`normalization_schemes`               ``determine_normalization_scheme_and_whether_mask_
                                            is_used_for_norm`` + ``get_normalization_scheme``
:func:`get_pool_and_conv_props`             ``experiment_planners.network_topology.
                                            get_pool_and_conv_props`` (+ ``pad_shape``)
:func:`conv_feature_map_size`               ``PlainConvUNet.compute_conv_feature_map_size``
                                            (encoder + decoder, no deep supervision), i.e.
                                            ``ExperimentPlanner.static_estimate_VRAM_usage``
:func:`configuration`                       ``ExperimentPlanner.get_plans_for_configuration``
:func:`plan_configurations`                 ``ExperimentPlanner.plan_experiment`` (3d_fullres,
                                            3d_lowres, 3d_cascade_fullres, 2d)
:func:`intensity_properties`                ``DatasetFingerprintExtractor.run`` statistics
==========================================  ===================================================

Every rule takes a :class:`~fedseg.planning.planners.PlannerSpec`: nnU-Net's default planner
unless told, or its ResEnc M / L planners (``nnUNetPlannerResEncM`` / ``L``, which change the
network, its estimate, the reference values, the shrink loop's test and the batch cap;
``fedseg.planning.planners``, goldens in ``tests/goldens/resenc.json``).

Statistics over cases come from the fingerprint's histograms: a percentile is computed like
``np.percentile`` (method "linear": virtual index (n-1)q, numpy's ``_lerp``) on the sorted
per-case values that the histogram holds (exact when a bin holds one distinct value, see
``fingerprint.py``); a median like ``np.median`` (mean of the two middle values).

Deliberate differences: ``numTraining`` is the number of cases actually fingerprinted (nnU-Net
reads it from dataset.json); a 2D dataset (median resampled shape 1 along the first axis) is
refused (fedseg trains 3D); ``3d_cascade_fullres`` is stored resolved (3d_fullres' fields plus
``inherits_from`` and ``previous_stage``, what nnU-Net's ``PlansManager`` hands its trainer)
instead of nnU-Net's two-key stub, see ``fedseg.planning.plan``.
"""

from __future__ import annotations

import functools
import math
from copy import deepcopy
from typing import Any

import numpy as np

from fedseg.data.dataset_json import DatasetJson
from fedseg.errors import FedsegError
from fedseg.planning.fingerprint import NNUNET_FOREGROUND_SAMPLES, Fingerprint, Histogram
from fedseg.planning.plan import (
    CASCADE,
    DATA_RESAMPLING,
    PROBABILITIES_RESAMPLING,
    RESAMPLE_FN,
    SEG_RESAMPLING,
    ConfigurationPlan,
    IntensityProperties,
    Plan,
)
from fedseg.planning.planners import DEFAULT, PlannerSpec

# ExperimentPlanner.__init__ constants (nnunetv2 2.x) shared by every planner; what differs
# between the default and the ResEnc planners is a PlannerSpec (fedseg.planning.planners)
ANISO_THRESHOLD = 3
UNET_BASE_NUM_FEATURES = 32
UNET_REFERENCE_VAL_CORRESP_BS_2D = 12
UNET_REFERENCE_VAL_CORRESP_BS_3D = 2
UNET_FEATUREMAP_MIN_EDGE_LENGTH = 4
UNET_MIN_BATCH_SIZE = 2
UNET_MAX_FEATURES_2D = 512
UNET_MAX_FEATURES_3D = 320
LOWRES_CREATION_THRESHOLD = 0.25

# nnunetv2.preprocessing.normalization.map_channel_name_to_normalization
_NORMALIZATION_BY_NAME = {
    "ct": "CTNormalization",
    "nonorm": "NoNormalization",
    "zscore": "ZScoreNormalization",
    "rescale_to_0_1": "RescaleTo01Normalization",
    "rgb_to_0_1": "RGBTo01Normalization",
}
# ImageNormalization.leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true
_LEAVES_ZERO_OUTSIDE_MASK = {"ZScoreNormalization": True}


# ---- statistics from histograms, numpy-style ---------------------------------------------


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's ``_lerp`` (the same floating-point operations, so ties round identically)."""
    diff = b - a
    if t >= 0.5:
        return b - diff * (1 - t)
    return a + diff * t


def _values_at_ranks(values: np.ndarray, cum: np.ndarray, ranks: list[int]) -> list[float]:
    """Values of the given 0-based ranks of the sorted sample (``cum``: cumulative counts)."""
    idx = np.searchsorted(cum, np.asarray(ranks, dtype=np.float64), side="right")
    idx = np.minimum(idx, values.size - 1)
    return [float(values[i]) for i in idx]


def percentile(values: np.ndarray, weights: np.ndarray, q: float, scale: float = 1.0) -> float:
    """``np.percentile(sample, q)`` (method "linear") of the sample in which each sorted
    ``values[i]`` occurs ``weights[i] * scale`` times."""
    if values.size == 0:
        raise FedsegError("empty fingerprint: no cases")
    cum = np.cumsum(weights * scale)
    n = int(round(cum[-1]))
    h = (n - 1) * (q / 100)  # numpy 'linear': virtual index (n - 1) * quantile
    if h >= n - 1:
        return _values_at_ranks(values, cum, [n - 1])[0]
    lo = math.floor(h)
    a, b = _values_at_ranks(values, cum, [lo, lo + 1])
    return _lerp(a, b, h - lo)


def median(values: np.ndarray, weights: np.ndarray) -> float:
    """``np.median`` of the sample (mean of the two middle values when its size is even)."""
    if values.size == 0:
        raise FedsegError("empty fingerprint: no cases")
    cum = np.cumsum(weights)
    n = int(round(cum[-1]))
    if n % 2:
        return _values_at_ranks(values, cum, [n // 2])[0]
    a, b = _values_at_ranks(values, cum, [n // 2 - 1, n // 2])
    return (a + b) / 2


def hist_percentile(hist: Histogram, q: float, scale: float = 1.0) -> float:
    """:func:`percentile` of a histogram's values (bin weight x ``scale`` = occurrences:
    weights are case counts for spacings and shapes; for intensities ``scale`` is nnU-Net's
    per-case sample size)."""
    return percentile(*hist.sorted_values(), q, scale)


def hist_median(hist: Histogram) -> float:
    return median(*hist.sorted_values())


def median_resampled_shape(fp: Fingerprint, target_spacing: np.ndarray) -> np.ndarray:
    """``np.median([compute_new_shape(shape, spacing, target) for each case], 0)``.

    ``compute_new_shape`` gives ``round(spacing / target * shape)`` per axis, a non-decreasing
    function of the extent shape*spacing, so the median follows from the extent histogram
    (fedseg rounds ``extent / target``: the same number except, in principle, when the
    quotient is a tie x.5 that the two operation orders round differently by one ulp).
    """
    out = []
    for ax in range(3):
        values, weights = fp.extent_after_crop[ax].sorted_values()
        new = np.array([round(v / float(target_spacing[ax])) for v in values], dtype=np.float64)
        out.append(median(new, weights))
    return np.array(out)


def intensity_properties(fp: Fingerprint) -> dict[str, IntensityProperties]:
    """Per channel what ``DatasetFingerprintExtractor.run`` reports.

    nnU-Net computes them on int(1e8 // num_cases) foreground voxels drawn with replacement from
    every case; fedseg computes the same statistics on the exact mixture that sample is drawn
    from (every case weight 1), so they agree up to nnU-Net's sampling noise (~1e-4 std for the
    mean) and the histogram's bin width for the percentiles (exact for integer CT values).
    """
    samples_per_case = int(NNUNET_FOREGROUND_SAMPLES // max(fp.num_cases, 1))
    out = {}
    for c in sorted(fp.intensities, key=int):
        ch = fp.intensities[c]
        k = ch.num_cases_with_foreground
        if k == 0 or ch.min is None or ch.max is None:
            raise FedsegError(
                f"channel {c} ({fp.channel_names[c]}): no foreground voxel (label > 0) in any "
                "case; check the labelsTr files"
            )
        mean = ch.sum_case_means / k
        var = max(ch.sum_case_mean_squares / k - mean * mean, 0.0)
        p = {q: hist_percentile(ch.histogram, q, samples_per_case) for q in (0.5, 50.0, 99.5)}
        out[c] = IntensityProperties(
            mean=mean,
            std=math.sqrt(var),
            median=p[50.0],
            min=ch.min,
            max=ch.max,
            percentile_00_5=p[0.5],
            percentile_99_5=p[99.5],
        )
    return out


# ---- ExperimentPlanner rules ------------------------------------------------------------


def fullres_target_spacing(fp: Fingerprint) -> np.ndarray:
    """``determine_fullres_target_spacing``: median spacing; on an anisotropic axis with few
    voxels, the 10th percentile (but not below the next-largest spacing)."""
    target = np.array([hist_percentile(fp.spacing[ax], 50) for ax in range(3)])
    target_size = np.array([hist_percentile(fp.shape_after_crop[ax], 50) for ax in range(3)])
    worst_spacing_axis = int(np.argmax(target))
    other_axes = [i for i in range(len(target)) if i != worst_spacing_axis]
    other_spacings = [target[i] for i in other_axes]
    other_sizes = [target_size[i] for i in other_axes]
    has_aniso_spacing = target[worst_spacing_axis] > (ANISO_THRESHOLD * max(other_spacings))
    has_aniso_voxels = target_size[worst_spacing_axis] * ANISO_THRESHOLD < min(other_sizes)
    if has_aniso_spacing and has_aniso_voxels:
        t = hist_percentile(fp.spacing[worst_spacing_axis], 10)
        if t < max(other_spacings):
            t = max(max(other_spacings), t) + 1e-5
        target[worst_spacing_axis] = t
    return target


def transpose(target_spacing: np.ndarray) -> tuple[list[int], list[int]]:
    """``determine_transpose``: the coarsest axis first."""
    max_spacing_axis = int(np.argmax(target_spacing))
    remaining = [i for i in range(3) if i != max_spacing_axis]
    forward = [max_spacing_axis, *remaining]
    backward = [forward.index(i) for i in range(3)]
    return forward, backward


def normalization_schemes(
    channel_names: dict[str, str], median_relative_size_after_cropping: float
) -> tuple[list[str], list[bool]]:
    """``determine_normalization_scheme_and_whether_mask_is_used_for_norm``."""
    names = [channel_names[c] for c in sorted(channel_names, key=int)]
    schemes = [_NORMALIZATION_BY_NAME.get(n.casefold(), "ZScoreNormalization") for n in names]
    if median_relative_size_after_cropping < (3 / 4.0):
        use_mask = [_LEAVES_ZERO_OUTSIDE_MASK.get(s, False) for s in schemes]
    else:
        use_mask = [False] * len(schemes)
    return schemes, use_mask


def _pad_shape(shape: list[Any], must_be_divisible_by: list[int]) -> np.ndarray:
    """``network_topology.pad_shape``."""
    new_shp = [
        shape[i] + must_be_divisible_by[i] - shape[i] % must_be_divisible_by[i]
        for i in range(len(shape))
    ]
    for i in range(len(shape)):
        if shape[i] % must_be_divisible_by[i] == 0:
            new_shp[i] -= must_be_divisible_by[i]
    return np.array(new_shp).astype(int)


def get_pool_and_conv_props(
    spacing: Any, patch_size: Any, min_feature_map_size: int, max_numpool: int
) -> tuple[list[int], list[list[int]], list[list[int]], tuple[int, ...], np.ndarray]:
    """``network_topology.get_pool_and_conv_props`` (nnU-Net v1's get_pool_and_conv_props_v2).

    Returns (pools per axis, strides per stage, kernel sizes per stage, padded patch size,
    shape_must_be_divisible_by).
    """
    pools, strides, kernels, padded, divisible = _pool_and_conv_props(
        tuple(float(i) for i in spacing), tuple(float(i) for i in patch_size),
        min_feature_map_size, max_numpool,
    )
    return (
        list(pools),
        [list(st) for st in strides],
        [list(k) for k in kernels],
        padded,
        np.array(divisible),
    )


@functools.lru_cache(maxsize=4096)
def _pool_and_conv_props(
    spacing: tuple[float, ...],
    patch_size: tuple[float, ...],
    min_feature_map_size: int,
    max_numpool: int,
) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...],
           tuple[int, ...], tuple[int, ...]]:
    dim = len(spacing)
    current_spacing = [float(i) for i in spacing]
    current_size = [float(i) for i in patch_size]
    pool_op_kernel_sizes = [[1] * dim]
    conv_kernel_sizes: list[list[int]] = []
    num_pool_per_axis = [0] * dim
    kernel_size = [1] * dim
    while True:
        valid = [i for i in range(dim) if current_size[i] >= 2 * min_feature_map_size]
        if len(valid) < 1:
            break
        min_spacing_of_valid = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / min_spacing_of_valid < 2]
        valid = [i for i in valid if num_pool_per_axis[i] < max_numpool]
        if len(valid) == 1:
            if current_size[valid[0]] >= 3 * min_feature_map_size:
                pass
            else:
                break
        if len(valid) < 1:
            break
        for d in range(dim):
            if kernel_size[d] == 3:
                continue
            if current_spacing[d] / min(current_spacing) < 2:
                kernel_size[d] = 3
        pool_kernel_sizes = [1] * dim
        for v in valid:
            pool_kernel_sizes[v] = 2
            num_pool_per_axis[v] += 1
            current_spacing[v] *= 2
            current_size[v] = float(math.ceil(current_size[v] / 2))
        pool_op_kernel_sizes.append(pool_kernel_sizes)
        conv_kernel_sizes.append(list(kernel_size))
    must_be_divisible_by = [2**i for i in num_pool_per_axis]
    padded = _pad_shape(list(patch_size), must_be_divisible_by)
    conv_kernel_sizes.append([3] * dim)
    return (
        tuple(num_pool_per_axis),
        tuple(tuple(p) for p in pool_op_kernel_sizes),
        tuple(tuple(k) for k in conv_kernel_sizes),
        tuple(int(i) for i in padded),
        tuple(must_be_divisible_by),
    )


def _features_per_stage(num_stages: int, max_num_features: int) -> list[int]:
    return [min(max_num_features, UNET_BASE_NUM_FEATURES * 2**i) for i in range(num_stages)]


def conv_feature_map_size(
    patch_size: Any, strides: list[list[int]], features: list[int], num_classes: int
) -> int:
    """The default planner's estimate (``PlainConvUNet``, see ``planners.DEFAULT``)."""
    return DEFAULT.feature_map_size(patch_size, strides, features, num_classes)


def configuration(
    spacing: np.ndarray,
    median_shape: Any,
    data_identifier: str,
    approximate_n_voxels_dataset: float,
    num_label_names: int,
    gpu_memory_gb: float,
    spec: PlannerSpec = DEFAULT,
) -> dict[str, Any]:
    """``get_plans_for_configuration`` of ``spec``'s planner: patch size under the memory
    budget, topology, batch."""
    assert all(i > 0 for i in spacing), f"Spacing must be > 0! Spacing: {spacing}"
    dim = len(spacing)
    max_num_features = UNET_MAX_FEATURES_2D if dim == 2 else UNET_MAX_FEATURES_3D
    tmp = 1 / np.array(spacing)
    if dim == 3:
        initial_patch_size = [round(i) for i in tmp * (256**3 / np.prod(tmp)) ** (1 / 3)]
    else:
        initial_patch_size = [round(i) for i in tmp * (2048**2 / np.prod(tmp)) ** (1 / 2)]
    initial_patch_size = np.array(
        [min(i, j) for i, j in zip(initial_patch_size, median_shape[:dim], strict=True)]
    )
    _, strides, kernels, patch_size, divisible = get_pool_and_conv_props(
        spacing, initial_patch_size, UNET_FEATUREMAP_MIN_EDGE_LENGTH, 999999
    )
    features = _features_per_stage(len(strides), max_num_features)
    estimate = spec.feature_map_size(patch_size, strides, features, num_label_names)
    reference = (spec.reference_val_2d if dim == 2 else spec.reference_val_3d) * (
        gpu_memory_gb / spec.reference_val_corresp_gb
    )
    ref_bs = UNET_REFERENCE_VAL_CORRESP_BS_2D if dim == 2 else UNET_REFERENCE_VAL_CORRESP_BS_3D

    def too_large(estimate: float) -> bool:
        # the default planner corrects for its batch-2 minimum; the ResEnc planners do not
        if spec.batch_size_corrected_loop:
            return (estimate / ref_bs * 2) > reference
        return estimate > reference

    while too_large(estimate):
        axis = int(np.argsort(
            [i / j for i, j in zip(patch_size, median_shape[:dim], strict=True)]
        )[-1])
        # reduce by the divisibility of the SMALLER candidate so no valid size is skipped
        patch = list(patch_size)
        tmp_patch = deepcopy(patch)
        tmp_patch[axis] -= divisible[axis]
        _, _, _, _, divisible = get_pool_and_conv_props(
            spacing, tmp_patch, UNET_FEATUREMAP_MIN_EDGE_LENGTH, 999999
        )
        patch[axis] -= divisible[axis]
        _, strides, kernels, patch_size, divisible = get_pool_and_conv_props(
            spacing, patch, UNET_FEATUREMAP_MIN_EDGE_LENGTH, 999999
        )
        features = _features_per_stage(len(strides), max_num_features)
        estimate = spec.feature_map_size(patch_size, strides, features, num_label_names)
    batch_size = round((reference / estimate) * ref_bs)
    bs_5_percent = round(
        approximate_n_voxels_dataset * spec.max_dataset_covered
        / np.prod(patch_size, dtype=np.float64)
    )
    batch_size = max(min(batch_size, bs_5_percent), UNET_MIN_BATCH_SIZE)
    n_stages = len(strides)
    return {
        "data_identifier": data_identifier,
        "spacing": [float(s) for s in spacing],
        "median_image_size_in_voxels": [float(s) for s in median_shape],
        "patch_size": [int(p) for p in patch_size],
        "batch_size": int(batch_size),
        "n_stages": n_stages,
        "features_per_stage": features,
        "kernel_sizes": [[int(k) for k in ks] for ks in kernels],
        "strides": [[int(s) for s in st] for st in strides],
        **spec.architecture_fields(n_stages),
    }


def _plan_3d(spacing_t: np.ndarray, new_median_t: np.ndarray, spec: PlannerSpec,
             approx_voxels: float, num_label_names: int, gpu_memory_gb: float,
             num_training: int) -> dict[str, Any]:
    """3d_fullres and, when nnU-Net would make one, 3d_lowres and 3d_cascade_fullres.

    3d_lowres: the spacing grows by 3 % a step (the coarse axes first while any is more than
    2x finer than the coarsest) until the lowres patch covers 25 % of the lowres median image;
    dropped if its median image is not at least 2x smaller than fullres' (in voxels).
    """
    fullres = configuration(
        spacing_t, new_median_t, spec.data_identifier("3d_fullres"), approx_voxels,
        num_label_names, gpu_memory_gb, spec,
    )
    median_num_voxels = np.prod(new_median_t, dtype=np.float64)
    num_voxels_in_patch = np.prod(fullres["patch_size"], dtype=np.float64)
    lowres: dict[str, Any] | None = None
    lowres_spacing = deepcopy(spacing_t)
    while num_voxels_in_patch / median_num_voxels < LOWRES_CREATION_THRESHOLD:
        max_spacing = max(lowres_spacing)
        if np.any((max_spacing / lowres_spacing) > 2):
            lowres_spacing[(max_spacing / lowres_spacing) > 2] *= 1.03
        else:
            lowres_spacing *= 1.03
        median_num_voxels = np.prod(spacing_t / lowres_spacing * new_median_t, dtype=np.float64)
        lowres = configuration(
            lowres_spacing,
            tuple(round(i) for i in spacing_t / lowres_spacing * new_median_t),
            spec.data_identifier("3d_lowres"),
            float(np.prod(median_num_voxels) * num_training),
            num_label_names,
            gpu_memory_gb,
            spec,
        )
        num_voxels_in_patch = np.prod(lowres["patch_size"], dtype=np.int64)
    if np.prod(new_median_t, dtype=np.float64) / median_num_voxels < 2:
        lowres = None
    fullres["batch_dice"] = lowres is not None
    configs = {"3d_fullres": fullres}
    if lowres is not None:
        lowres["batch_dice"] = False
        lowres["next_stage"] = CASCADE
        configs["3d_lowres"] = lowres
    return configs


def resampling_settings() -> dict[str, Any]:
    """``determine_resampling`` + ``determine_segmentation_softmax_export_fn`` (the same for
    every configuration of the default planner)."""
    return {
        "resampling_fn_data": RESAMPLE_FN,
        "resampling_fn_data_kwargs": DATA_RESAMPLING.model_dump(),
        "resampling_fn_seg": RESAMPLE_FN,
        "resampling_fn_seg_kwargs": SEG_RESAMPLING.model_dump(),
        "resampling_fn_probabilities": RESAMPLE_FN,
        "resampling_fn_probabilities_kwargs": PROBABILITIES_RESAMPLING.model_dump(),
    }


def plan_configurations(
    fp: Fingerprint, ds: DatasetJson, gpu_memory_gb: float = 8.0, spec: PlannerSpec = DEFAULT
) -> dict[str, Any]:
    """``plan_experiment`` of ``spec``'s planner (nnU-Net's default ``ExperimentPlanner``
    unless told): everything of nnU-Net's plans fedseg compares, as plain dicts.

    Keys: ``transpose_forward``, ``transpose_backward``, ``original_median_spacing_after_transp``,
    ``original_median_shape_after_transp``, ``median_relative_size_after_cropping`` and
    ``configurations`` with ``3d_fullres``, ``2d`` and, when nnU-Net would make them,
    ``3d_lowres`` and ``3d_cascade_fullres`` (resolved: 3d_fullres' fields, ``inherits_from``,
    ``previous_stage``).
    """
    if fp.num_cases < 1:
        raise FedsegError("the fingerprint holds no case; every site needs training cases")
    if gpu_memory_gb <= 0:
        raise FedsegError(f"gpu_memory_gb={gpu_memory_gb}: must be positive (GiB of the GPU)")
    if fp.channel_names != ds.channel_names:
        raise FedsegError(
            f"fingerprint channels {fp.channel_names} differ from dataset.json channel_names "
            f"{ds.channel_names}"
        )
    num_training = fp.num_cases
    num_label_names = len(ds.labels)
    target = fullres_target_spacing(fp)
    tf, tb = transpose(target)
    spacing_t = target[tf]
    new_median = median_resampled_shape(fp, target)
    new_median_t = new_median[tf]
    approx_voxels = float(np.prod(new_median_t, dtype=np.float64) * num_training)
    configs: dict[str, Any] = {}
    if new_median_t[0] != 1:  # nnU-Net: 2D data (one slice after resampling) gets no 3D plan
        configs.update(_plan_3d(spacing_t, new_median_t, spec, approx_voxels, num_label_names,
                                gpu_memory_gb, num_training))
    plan2d = configuration(
        spacing_t[1:], new_median_t[1:], spec.data_identifier("2d"), approx_voxels,
        num_label_names, gpu_memory_gb, spec,
    )
    plan2d["batch_dice"] = True

    rel = hist_median(fp.relative_size_after_crop)
    schemes, use_mask = normalization_schemes(ds.channel_names, rel)
    configs["2d"] = plan2d
    for cfg in configs.values():
        cfg["normalization_schemes"] = list(schemes)
        cfg["use_mask_for_norm"] = list(use_mask)
        cfg.update(resampling_settings())
    if "3d_lowres" in configs:
        configs[CASCADE] = {**deepcopy(configs["3d_fullres"]), "inherits_from": "3d_fullres",
                            "previous_stage": "3d_lowres"}

    median_spacing = np.array([hist_median(fp.spacing[ax]) for ax in range(3)])[tf]
    median_shape = np.array([hist_median(fp.shape_after_crop[ax]) for ax in range(3)])[tf]
    return {
        "transpose_forward": [int(i) for i in tf],
        "transpose_backward": [int(i) for i in tb],
        "original_median_spacing_after_transp": [float(i) for i in median_spacing],
        "original_median_shape_after_transp": [int(round(i)) for i in median_shape],
        "median_relative_size_after_cropping": rel,
        "configurations": configs,
    }


def make_plan(
    fp: Fingerprint, ds: DatasetJson, gpu_memory_gb: float = 8.0, dataset_name: str = "fedseg",
    spec: PlannerSpec = DEFAULT,
) -> Plan:
    """The plan nnU-Net v2's planner ``spec`` (default: ``ExperimentPlanner``) makes for the
    data ``fp`` summarises.

    ``fp`` is the sum of every site's fingerprint; ``ds`` the (common) dataset.json;
    ``gpu_memory_gb`` the smallest site GPU (nnU-Net's ``gpu_memory_target_in_gb``, default 8).
    """
    raw = plan_configurations(fp, ds, gpu_memory_gb, spec)
    configs = {name: ConfigurationPlan(**cfg) for name, cfg in raw["configurations"].items()}
    return Plan(
        dataset_name=dataset_name,
        channel_names=dict(ds.channel_names),
        labels=dict(ds.labels),
        regions_class_order=ds.regions_class_order,
        file_ending=ds.file_ending,
        num_training_cases=fp.num_cases,
        gpu_memory_gb=float(gpu_memory_gb),
        transpose_forward=raw["transpose_forward"],
        transpose_backward=raw["transpose_backward"],
        original_median_spacing_after_transp=raw["original_median_spacing_after_transp"],
        original_median_shape_after_transp=[float(i) for i in raw[
            "original_median_shape_after_transp"
        ]],
        foreground_intensity_properties_per_channel=intensity_properties(fp),
        configurations=configs,
    )
