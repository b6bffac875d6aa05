"""What the network outputs and what gets scored, from dataset.json's ``labels`` — nnU-Net's
``LabelManager``, torch-free so the server and the evaluator can use it.

Three kinds of ``labels`` (nnU-Net v2):
- plain labels ``{"background": 0, "liver": 1, "tumour": 2}``: softmax over every value;
- regions ``{"background": 0, "disc": [1, 2], "cup": 2}`` with ``regions_class_order``: one
  sigmoid output per foreground region (regions may overlap: the cup lies inside the disc), a
  voxel is in a region when its probability is above 0.5, and the label map is painted region
  by region in order with the values of ``regions_class_order``;
- an ``"ignore"`` label (highest value): its voxels are unlabelled — excluded from the loss and
  from every metric, never predicted (the network has no output for it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def _values(v: int | list[int]) -> list[int]:
    return [int(x) for x in (v if isinstance(v, list) else [v])]


@dataclass(frozen=True)
class LabelLayout:
    labels: dict[str, int | list[int]]
    regions_class_order: tuple[int, ...] | None = None

    @classmethod
    def of(cls, labels: Mapping[str, int | list[int]],
           regions_class_order: Sequence[int] | None = None) -> LabelLayout:
        order = tuple(int(v) for v in regions_class_order) if regions_class_order else None
        return cls(dict(labels), order)

    @property
    def has_regions(self) -> bool:
        return self.regions_class_order is not None

    @property
    def ignore_label(self) -> int | None:
        v = self.labels.get("ignore")
        return int(v) if isinstance(v, int) else None

    @property
    def foreground(self) -> dict[str, list[int]]:
        """Scored structure name -> label values it covers (background and ignore excluded)."""
        return {k: _values(v) for k, v in self.labels.items()
                if k not in ("background", "ignore")}

    @property
    def softmax_values(self) -> list[int]:
        """Softmax output channel -> label value (background first; ignore has no channel)."""
        vals = {x for k, v in self.labels.items() if k != "ignore" for x in _values(v)}
        return sorted(vals | {0})

    @property
    def num_outputs(self) -> int:
        return len(self.foreground) if self.has_regions else len(self.softmax_values)

    def regions(self) -> list[list[int]]:
        """Sigmoid output channel -> the label values of its region."""
        return list(self.foreground.values())

    def paint(self, masks: np.ndarray) -> np.ndarray:
        """Region masks (R, ...) bool -> label map, region by region in order (nnU-Net's
        ``convert_probabilities_to_segmentation`` for regions)."""
        assert self.regions_class_order is not None
        seg = np.zeros(masks.shape[1:], dtype=np.int16)
        for mask, value in zip(masks, self.regions_class_order, strict=True):
            seg[mask] = value
        return seg


def label_groups(labels: Mapping[str, int | list[int]]) -> dict[str, list[int]]:
    """Foreground label/region key -> values, from a dataset.json ``labels`` mapping: the keys
    every score is reported under (``"1"``, ``"1,2"`` for a region). Here, torch-free, because
    the server lays out the secure evaluation sums by them (``server/secure_apply.py``)."""
    out: dict[str, list[int]] = {}
    for name, val in labels.items():
        vals = [int(v) for v in (val if isinstance(val, list) else [val])]
        if vals == [0] or name == "ignore":
            continue
        out[",".join(str(v) for v in vals)] = vals
    return out
