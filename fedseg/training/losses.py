"""nnU-Net's training losses: Dice + cross-entropy for labels, Dice + BCE for regions, with deep
supervision — MONAI's Dice losses composed with torch's cross-entropies.

Composed here rather than MONAI's ``DiceCELoss`` because that one can neither ignore voxels
(the ``ignore`` label, or label -1 outside the body with ``ignore_outside``) nor take nnU-Net's
region targets (several overlapping sigmoid masks derived from one label map).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, MaskedDiceLoss

from fedseg.data.labels import LabelLayout

IGNORE = -1
"""Label value the loss skips: the ignore label and, with ``ignore_outside``, label -1 are
mapped to it before the loss (see :func:`mark_ignored`)."""


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """nnU-Net's: ``1 / 2**i`` per output (full resolution first), the last one 0, normalised."""
    w = [1 / 2**i for i in range(n_outputs)]
    if n_outputs > 1:
        w[-1] = 0.0
    s = sum(w)
    return [x / s for x in w]


class DiceCELoss(torch.nn.Module):
    """nnU-Net's ``DC_and_CE_loss``: soft Dice without background + cross-entropy, weight 1:1.

    MONAI's ``DiceLoss`` (softmax, one-hot target, ``batch`` = batch Dice, smooth 1e-5 as
    nnU-Net) plus ``F.cross_entropy``; ``ignore_index`` voxels count in neither. Targets are
    label-value indices (the softmax channel of each value)."""

    def __init__(self, batch_dice: bool, ignore_index: int | None = None) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.dice = DiceLoss(
            include_background=False, to_onehot_y=True, softmax=True, batch=batch_dice,
            smooth_nr=1e-5, smooth_dr=1e-5, ignore_index=ignore_index,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        if self.ignore_index is None:
            ce = F.cross_entropy(logits, target[:, 0])
        else:
            valid = (target != self.ignore_index).sum().clamp_min(1)
            ce = F.cross_entropy(
                logits, target[:, 0], ignore_index=self.ignore_index, reduction="sum"
            ) / valid
        return self.dice(logits, target) + ce


class RegionDiceBCELoss(torch.nn.Module):
    """nnU-Net's ``DC_and_BCE_loss`` for region-based training: per region a sigmoid output,
    its mask the voxels whose label is one of the region's values; soft Dice over every region
    (background is not an output) + binary cross-entropy, weight 1:1, smooth 1e-5."""

    def __init__(self, regions: Sequence[Sequence[int]], batch_dice: bool,
                 ignore_index: int | None = None) -> None:
        super().__init__()
        self.regions = [list(r) for r in regions]
        self.ignore_index = ignore_index
        kw = dict(include_background=True, sigmoid=True, batch=batch_dice, smooth_nr=1e-5,
                  smooth_dr=1e-5)
        # the masked variant only where there is a mask (it warns on every call without one)
        self.dice = DiceLoss(**kw) if ignore_index is None else MaskedDiceLoss(**kw)

    def targets(self, target: torch.Tensor) -> torch.Tensor:
        t = target[:, 0]
        return torch.stack([torch.isin(t, torch.as_tensor(r, device=t.device))
                            for r in self.regions], 1).float()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        masks = self.targets(target)
        if self.ignore_index is None:
            bce = F.binary_cross_entropy_with_logits(logits, masks)
            return self.dice(logits, masks) + bce
        valid = (target != self.ignore_index).float()
        bce = (F.binary_cross_entropy_with_logits(logits, masks, reduction="none") * valid).sum()
        bce = bce / (valid.sum() * logits.shape[1]).clamp_min(1)
        return self.dice(logits, masks, mask=valid) + bce


class DeepSupervisionLoss(torch.nn.Module):
    """Weighted sum of ``base`` over the heads, the target downsampled to each head (nearest)."""

    def __init__(self, base: torch.nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        self.base = base
        self.weights = list(weights)

    def forward(self, outputs: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for out, w in zip(outputs, self.weights, strict=False):
            if w == 0:
                continue
            t = target
            if t.shape[2:] != out.shape[2:]:
                t = F.interpolate(t.float(), size=out.shape[2:], mode="nearest-exact").long()
            term = w * self.base(out, t)
            total = term if total is None else total + term
        assert total is not None
        return total


def make_loss(layout: LabelLayout, batch_dice: bool, ignore: bool) -> torch.nn.Module:
    """The base loss of a plan's labels; ``ignore``: targets carry :data:`IGNORE` voxels."""
    index = IGNORE if ignore else None
    if layout.has_regions:
        return RegionDiceBCELoss(layout.regions(), batch_dice, index)
    return DiceCELoss(batch_dice, index)


def mark_ignored(seg: torch.Tensor, layout: LabelLayout, ignore_outside: bool) -> torch.Tensor:
    """Loss targets from an augmented label map: label -1 (outside the body, padding) becomes
    background unless ``ignore_outside``; the ignore label becomes :data:`IGNORE`; for softmax
    training every label value becomes its output channel (values need not be 0..K-1)."""
    if not ignore_outside:
        seg = seg.clamp_min(0)
    ign = layout.ignore_label
    if ign is not None:
        seg = torch.where(seg == ign, torch.full_like(seg, IGNORE), seg)
    if not layout.has_regions:
        values = layout.softmax_values
        if values != list(range(len(values))):
            lut = torch.full((max(values) + 2,), IGNORE, dtype=seg.dtype, device=seg.device)
            lut[torch.as_tensor(values, device=seg.device) + 1] = torch.arange(
                len(values), dtype=seg.dtype, device=seg.device)
            seg = lut[seg.long() + 1]
    return seg
