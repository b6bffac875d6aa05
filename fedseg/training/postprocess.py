"""nnU-Net's postprocessing (keep only the largest connected component), decided from sums.

nnU-Net v2 (``nnunetv2/postprocessing/remove_connected_components.py``) decides on its
cross-validation predictions whether to keep only the largest connected component, first of all
foreground as one mask (accepted if the foreground-mean Dice improves and no class gets worse),
then of each class or region on its own (accepted if that class's mean Dice improves). It needs
the predictions and references in one place. A federation has them at the sites, so here the
decision is split in two:

* at a site, :func:`variant_dice` scores every candidate on one validation case and
  :class:`DiceSums` adds them up — per-case Dice sums and case counts per candidate and class, a
  fixed-length vector that can travel through the secure sum (:meth:`DiceSums.to_vector`);
* at the server, :func:`decide` applies nnU-Net's rules to the pooled means.

One deviation, because the site computes all candidates in one pass: the per-class candidates
are all scored on the same base (all-foreground step applied or not) instead of one after the
other on the result of the previous accepted step. For label maps this is exactly nnU-Net's
result (removing components of one class only turns that class's voxels into background, which
changes no other class's Dice); for overlapping regions it can differ, as nnU-Net's own comment
on region order says it may.

Hand-written: connected components come from ``scipy.ndimage.label`` with full connectivity
(nnU-Net's ``acvl_utils`` default); MONAI's ``get_largest_connected_component_mask`` would do the
same but needs scikit-image, one more dependency for one function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

NONE = "none"
FOREGROUND = "fg"


class Postprocessing(BaseModel):
    """What :func:`decide` chose: label sets whose largest component alone is kept, in order."""

    model_config = ConfigDict(extra="forbid")

    keep_largest: list[list[int]] = Field(
        default_factory=list, description="each entry: label values treated as one mask, of "
        "which only the largest connected component is kept (the rest becomes background)")

    def apply(self, seg: np.ndarray) -> np.ndarray:
        for values in self.keep_largest:
            seg = keep_largest_component(seg, values)
        return seg


def keep_largest_component(seg: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """``seg`` with every voxel of ``values`` outside their largest connected component (full
    connectivity) set to 0; a copy, the input is unchanged."""
    from scipy import ndimage

    mask = np.isin(seg, list(values))
    if not mask.any():
        return seg.copy()
    labelled, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(seg.ndim,
                                                                                  seg.ndim))
    out = seg.copy()
    if n > 1:
        sizes = np.bincount(labelled.ravel())
        sizes[0] = 0
        out[mask & (labelled != int(np.argmax(sizes)))] = 0
    return out


def candidates(groups: Mapping[str, list[int]]) -> dict[str, Postprocessing]:
    """Every postprocessing :func:`decide` may need scored: none, all foreground, and (with more
    than one class) each class alone on both bases."""
    fg = sorted({v for vals in groups.values() for v in vals})
    out = {NONE: Postprocessing(), FOREGROUND: Postprocessing(keep_largest=[fg])}
    if len(groups) > 1:
        for key, vals in groups.items():
            out[key] = Postprocessing(keep_largest=[list(vals)])
            out[f"{FOREGROUND}+{key}"] = Postprocessing(keep_largest=[fg, list(vals)])
    return out


def variant_dice(pred: np.ndarray, ref: np.ndarray, groups: Mapping[str, list[int]],
                 ignore_label: int | None = None) -> dict[str, dict[str, float]]:
    """Dice per class of every candidate applied to one case's predicted label map (NaN where
    reference and prediction are both empty, as in ``fedseg evaluate``). Candidates share their
    leading steps (``fg+k`` starts from ``fg``), so each step's result is computed once."""
    refs, keep = _references(ref, groups, ignore_label)
    done: dict[tuple[tuple[int, ...], ...], np.ndarray] = {(): pred}

    def run(steps: tuple[tuple[int, ...], ...]) -> np.ndarray:
        if steps not in done:
            done[steps] = keep_largest_component(run(steps[:-1]), steps[-1])
        return done[steps]

    return {name: _dice_per_class(run(tuple(tuple(v) for v in pp.keep_largest)), refs, groups,
                                  keep)
            for name, pp in candidates(groups).items()}


def class_dice(pred: np.ndarray, ref: np.ndarray, groups: Mapping[str, list[int]],
               ignore_label: int | None = None) -> dict[str, float]:
    """Dice per class of one predicted label map as it is (:func:`variant_dice`'s ``none``
    candidate, without computing the others)."""
    refs, keep = _references(ref, groups, ignore_label)
    return _dice_per_class(pred, refs, groups, keep)


def _references(ref: np.ndarray, groups: Mapping[str, list[int]], ignore_label: int | None
                ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Each class's reference mask, and the voxels that count (None: all; else not ignored)."""
    keep = None if ignore_label is None else ref != ignore_label
    refs = {k: np.isin(ref, vals) if keep is None else np.isin(ref, vals) & keep
            for k, vals in groups.items()}
    return refs, keep


def _dice_per_class(seg: np.ndarray, refs: Mapping[str, np.ndarray],
                    groups: Mapping[str, list[int]], keep: np.ndarray | None) -> dict[str, float]:
    per_class = {}
    for k, vals in groups.items():
        mp = np.isin(seg, vals) if keep is None else np.isin(seg, vals) & keep
        denom = int(mp.sum()) + int(refs[k].sum())
        per_class[k] = math.nan if denom == 0 else 2.0 * int((mp & refs[k]).sum()) / denom
    return per_class


class DiceSums(BaseModel):
    """Per candidate and class: the sum of the cases' Dice and the number of cases with a
    defined Dice — what sites add up so the server gets pooled case means."""

    model_config = ConfigDict(extra="forbid")

    classes: list[str]
    sums: dict[str, list[float]]
    counts: dict[str, list[float]]

    @classmethod
    def empty(cls, groups: Mapping[str, list[int]]) -> DiceSums:
        keys = list(groups)
        names = list(candidates(groups))
        return cls(classes=keys, sums={n: [0.0] * len(keys) for n in names},
                   counts={n: [0.0] * len(keys) for n in names})

    def add(self, case: Mapping[str, Mapping[str, float]]) -> None:
        for name, per_class in case.items():
            for i, key in enumerate(self.classes):
                d = per_class[key]
                if not math.isnan(d):
                    self.sums[name][i] += d
                    self.counts[name][i] += 1

    def to_vector(self) -> np.ndarray:
        """Fixed order (candidates as :func:`candidates` lists them, then classes): sums, then
        counts — the layout :meth:`from_vector` reads back after a (secure) sum."""
        names = list(self.sums)
        return np.asarray([x for n in names for x in self.sums[n]]
                          + [x for n in names for x in self.counts[n]], dtype=np.float64)

    @classmethod
    def from_vector(cls, groups: Mapping[str, list[int]], vec: np.ndarray) -> DiceSums:
        out = cls.empty(groups)
        names, c = list(out.sums), len(out.classes)
        half = len(names) * c
        if vec.shape != (2 * half,):
            raise ValueError(f"postprocessing sums: {vec.shape[0]} values, expected {2 * half}")
        for j, n in enumerate(names):
            out.sums[n] = [float(x) for x in vec[j * c:(j + 1) * c]]
            out.counts[n] = [float(x) for x in vec[half + j * c:half + (j + 1) * c]]
        return out

    def means(self, name: str) -> dict[str, float]:
        return {k: (s / n if n else math.nan)
                for k, s, n in zip(self.classes, self.sums[name], self.counts[name], strict=True)}


def _fg_mean(means: Mapping[str, float]) -> float:
    vals = [v for v in means.values() if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def decide(sums: DiceSums, groups: Mapping[str, list[int]]) -> tuple[Postprocessing, dict]:
    """nnU-Net's rules on pooled means: (the chosen postprocessing, a report of every Dice that
    decided it). A NaN never wins a comparison, so a class nobody has keeps no step."""
    base_means = sums.means(NONE)
    fg_means = sums.means(FOREGROUND)
    fg_ok = (_fg_mean(fg_means) > _fg_mean(base_means)
             and all(not (fg_means[k] < base_means[k]) for k in sums.classes))
    base = FOREGROUND if fg_ok else NONE
    chosen = list(candidates(groups)[base].keep_largest)
    report: dict = {"foreground": {"before": _fg_mean(base_means), "after": _fg_mean(fg_means),
                                   "applied": fg_ok}, "classes": {}}
    if len(groups) > 1:
        now = sums.means(base)
        for key, vals in groups.items():
            name = f"{FOREGROUND}+{key}" if base == FOREGROUND else key
            after = sums.means(name)[key]
            ok = after > now[key]
            report["classes"][key] = {"before": now[key], "after": after, "applied": ok}
            if ok:
                chosen.append(list(vals))
    return Postprocessing(keep_largest=chosen), report
