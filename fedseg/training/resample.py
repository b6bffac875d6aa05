"""Resampling to a configuration's spacing: nnU-Net's ``resample_data_or_seg_to_shape``.

Why its own module: preprocessing (images, segmentations) and prediction (logits back to the
original grid) share it, and its rules are checked against nnU-Net's own output
(``tests/goldens/resampling.json``).

Resampling follows the plan's ``resampling_fn_*_kwargs`` (nnU-Net's defaults: images order 3,
segmentations order 1, ``order_z`` 0) and reproduces nnU-Net 2.8.1 with batchgenerators 0.25.5
(checked on its own output): images of order != 1 go through ``scipy.ndimage.zoom(order,
mode="nearest", grid_mode=True)`` clipped to the input's range, which is what nnU-Net's
``skimage.transform.resize(order, mode="edge", anti_aliasing=False)`` runs; images of order 1
through torch ``F.interpolate`` (linear, ``align_corners=False``: the same coordinate mapping
and edge clamping in float32, 20x faster). Segmentations as batchgenerators'
``resize_segmentation``: every label's indicator resized in float64, the largest wins, an exact
tie goes to the nearest-neighbour label. The anisotropic rule is nnU-Net's
``determine_do_sep_z_and_axis``: if the current or the target spacing has max/min > 3 and
exactly one axis is the coarse one, the slices are resampled in-plane and that axis separately
with ``order_z`` (0: nearest neighbour; ``force_separate_z`` True/False overrides the rule).

Prediction resamples logits with :func:`resample_tensor` (order 1, nnU-Net's
``resampling_fn_probabilities_kwargs``).

Why hand-written rather than MONAI's ``Spacing``/``Resize``: MONAI derives the output grid from
the affine (not nnU-Net's ``round(old_spacing / new_spacing * shape)``) and has no separate
treatment of the coarse axis of anisotropic data.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from fedseg.errors import FedsegError
from fedseg.planning.plan import DATA_RESAMPLING, SEG_RESAMPLING, ResamplingKwargs

ANISO_THRESHOLD = 3.0  # nnU-Net's ANISO_THRESHOLD


def compute_new_shape(
    old_shape: list[int] | tuple[int, ...], old_spacing: list[float], new_spacing: list[float]
) -> list[int]:
    """nnU-Net's rule: ``round(old_spacing / new_spacing * old_shape)`` per axis."""
    triples = zip(old_spacing, new_spacing, old_shape, strict=True)
    return [int(round(o / n * s)) for o, n, s in triples]


def separate_z_axis(
    current_spacing: list[float], new_spacing: list[float], force: bool | None = None
) -> int | None:
    """The axis nnU-Net resamples separately (``order_z``), or None: nnU-Net's
    ``determine_do_sep_z_and_axis`` (``force`` is its ``force_separate_z``: True takes the
    coarse axis of the current spacing, False none, None decides by the 3x anisotropy rule)."""
    if force is False:
        return None
    for sp in (current_spacing,) if force else (current_spacing, new_spacing):
        arr = np.asarray(sp, dtype=float)
        if force or arr.max() / arr.min() > ANISO_THRESHOLD:
            axes = np.flatnonzero(arr.max() / arr == 1)
            return int(axes[0]) if len(axes) == 1 else None
    return None


def _nearest_index(n_in: int, n_out: int) -> torch.Tensor:
    # map_coordinates(order=0) at nnU-Net's coordinates scale * (x + 0.5) - 0.5
    idx = torch.floor((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out))
    return idx.clamp_(0, n_in - 1).long()


def resample_tensor(x: torch.Tensor, new_shape: list[int], sep_axis: int | None) -> torch.Tensor:
    """Linear resampling of ``x`` (C, *spatial) float to ``new_shape``.

    With ``sep_axis`` set: linear in the other axes, nearest neighbour along ``sep_axis``.
    """
    shape = list(x.shape[1:])
    if shape == list(new_shape):
        return x
    nd = len(shape)
    if sep_axis is None or nd < 3:
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
        return F.interpolate(x[None], size=list(new_shape), mode=mode, align_corners=False)[0]
    # in-plane: the separate axis becomes the batch axis
    inplane = [new_shape[a] for a in range(nd) if a != sep_axis]
    y = x.movedim(sep_axis + 1, 0)  # (A, C, P, Q)
    if [s for a, s in enumerate(shape) if a != sep_axis] != inplane:
        y = F.interpolate(y, size=inplane, mode="bilinear", align_corners=False)
    if shape[sep_axis] != new_shape[sep_axis]:
        y = y.index_select(0, _nearest_index(shape[sep_axis], new_shape[sep_axis]).to(y.device))
    return y.movedim(0, sep_axis + 1).contiguous()


def _resize(x: np.ndarray, shape: list[int], order: int) -> np.ndarray:
    """``skimage.transform.resize(x, shape, order, mode="edge", anti_aliasing=False)`` (what
    nnU-Net calls) in the scipy calls it makes: a spline zoom on the pixel-area grid, edge
    values repeated, clipped to the input's range (resize's ``clip=True``)."""
    if list(x.shape) == list(shape):
        return x
    zoom = [n / o for n, o in zip(shape, x.shape, strict=True)]
    out = ndimage.zoom(x, zoom, order=order, mode="nearest", grid_mode=True)
    return np.clip(out, x.min(), x.max(), out=out)


def _spline_resample(
    x: np.ndarray, new_shape: list[int], sep: int | None, order: int, order_z: int
) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg`` for one image channel (float64 inside, as there)."""
    x = x.astype(np.float64)
    if sep is None:
        return _resize(x, new_shape, order)
    inplane = [n for a, n in enumerate(new_shape) if a != sep]
    y = np.moveaxis(np.stack([_resize(s, inplane, order) for s in np.moveaxis(x, sep, 0)]), 0, sep)
    if y.shape[sep] == new_shape[sep]:
        return y
    if order_z == 0:  # map_coordinates(order=0) at scale * (x + 0.5) - 0.5
        return np.take(y, _nearest_index(y.shape[sep], new_shape[sep]).numpy(), axis=sep)
    zoom = [new_shape[sep] / y.shape[sep] if a == sep else 1.0 for a in range(y.ndim)]
    return ndimage.zoom(y, zoom, order=order_z, mode="nearest", grid_mode=True)


def resample_data(
    data: np.ndarray, new_shape: list[int], current_spacing: list[float],
    new_spacing: list[float], settings: ResamplingKwargs = DATA_RESAMPLING,
) -> np.ndarray:
    """Resample an image (C, *spatial) with the plan's ``resampling_fn_data_kwargs``, one
    channel at a time to bound memory."""
    if list(data.shape[1:]) == list(new_shape):
        return data
    sep = separate_z_axis(current_spacing, new_spacing, settings.force_separate_z)
    linear = settings.order == 1 and (sep is None or settings.order_z == 0)
    out = np.empty((data.shape[0], *new_shape), dtype=np.float32)
    for c in range(data.shape[0]):
        if linear:  # the same numbers as the spline of order 1, 20x faster
            t = torch.from_numpy(np.ascontiguousarray(data[c : c + 1], dtype=np.float32))
            out[c] = resample_tensor(t, new_shape, sep)[0].numpy()
        else:
            out[c] = _spline_resample(data[c], new_shape, sep, settings.order, settings.order_z)
    return out


def _resize_seg(x: np.ndarray, shape: list[int], order: int) -> np.ndarray:
    """batchgenerators' ``resize_segmentation(x, shape, order)`` (0.25.5, what nnU-Net 2.8.1
    calls): each label's indicator resized like an image (float64), the largest wins; an exact
    tie goes to the nearest-neighbour label where that is one of the tied labels (its
    ``seg_tiebreak="nearest"``), else to the smaller label. Labels one at a time with a running
    maximum, so memory stays at a few volumes whatever the number of labels."""
    if list(x.shape) == list(shape):
        return x.copy()
    nn = _resize(x.astype(np.float64), shape, 0)
    if order == 0:
        return nn.astype(x.dtype)
    labels = np.unique(x)
    if len(labels) == 1:
        return np.full(shape, labels[0], dtype=x.dtype)
    nn_idx = np.searchsorted(labels, nn).astype(np.int32)  # order 0 picks input values only
    del nn
    win = np.zeros(shape, dtype=np.int32)
    best: np.ndarray | None = None
    nn_top = np.zeros(shape, dtype=bool)  # the nearest neighbour's label holds the top score
    for i, c in enumerate(labels):
        score = _resize((x == c).astype(np.float64), shape, order)
        is_nn = nn_idx == i
        if best is None:
            best = score
            nn_top = is_nn & (score > 0)
            continue
        nn_top |= is_nn & (score == best) & (score > 0)
        better = score > best
        np.copyto(nn_top, is_nn, where=better)
        np.copyto(win, i, where=better)
        np.maximum(best, score, out=best)
    np.copyto(win, nn_idx, where=nn_top)
    return labels[win].astype(x.dtype)


def resample_seg(
    seg: np.ndarray, new_shape: list[int], current_spacing: list[float],
    new_spacing: list[float], settings: ResamplingKwargs = SEG_RESAMPLING,
) -> np.ndarray:
    """Resample a label map (1, *spatial) as nnU-Net's ``resample_data_or_seg`` with
    ``is_seg=True``: :func:`_resize_seg` in-plane (or in 3D), nearest neighbour along the
    separate axis. ``order_z`` other than 0 is not implemented."""
    if settings.order_z != 0:
        raise FedsegError(
            f"plan: resampling_fn_seg_kwargs order_z {settings.order_z}: fedseg resamples "
            "segmentations with order_z 0 only (nnU-Net's default); re-make the plan"
        )
    if list(seg.shape[1:]) == list(new_shape):
        return seg
    sep = separate_z_axis(current_spacing, new_spacing, settings.force_separate_z)
    x = seg[0]
    if sep is None:
        return _resize_seg(x, new_shape, settings.order)[None]
    inplane = [n for a, n in enumerate(new_shape) if a != sep]
    y = np.moveaxis(np.stack([_resize_seg(s, inplane, settings.order)
                              for s in np.moveaxis(x, sep, 0)]), 0, sep)
    if y.shape[sep] != new_shape[sep]:
        y = np.take(y, _nearest_index(y.shape[sep], new_shape[sep]).numpy(), axis=sep)
    return np.ascontiguousarray(y)[None]
