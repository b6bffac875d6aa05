"""A site's dataset fingerprint: fixed-grid histograms and sums that ADD across sites.

Why: nnU-Net's planner needs, over the pooled dataset, every case's spacing and cropped shape
and a sample of foreground intensities. FednnU-Net ships those per-case lists to the server and
averages per-site percentiles — a leak and an approximation. Here a site summarises its cases as
histograms on grids that are FIXED in advance (independent of any data) plus plain sums, so the
fingerprints of several sites add element-wise to the fingerprint of the pooled data, can travel
through secure aggregation (:meth:`Fingerprint.to_vector`), and the planner (``planner.py``)
recovers from the sum the statistics nnU-Net would compute on the pooled data.

No library does this: nnU-Net's ``DatasetFingerprintExtractor`` keeps per-case lists and a
random voxel sample, and generic "mergeable sketch" libraries (t-digest, DDSketch) are neither
exactly additive under secure aggregation nor exact for the medians nnU-Net takes over a few
dozen cases.

What is recorded, per case, mirroring ``DatasetFingerprintExtractor.analyze_case``
(nnunetv2 2.x, ``experiment_planning/dataset_fingerprint/fingerprint_extractor.py``):

* crop to the non-zero region exactly like ``nnunetv2.preprocessing.cropping.crop_to_nonzero``:
  bounding box of (any channel != 0). nnU-Net fills holes in that mask first; the bounding box of
  a hole-filled mask is the bounding box of the mask (a hole is enclosed by the mask), so fedseg
  skips the costly ``binary_fill_holes`` — the cropped shape is identical;
* spacing per axis (log grid, relative bin width 1e-4), cropped shape per axis (1-voxel bins),
  physical extent per axis = cropped shape x spacing (log grid, relative width 1e-4) — the
  planner's median resampled shape is the median over cases of ``round(shape*spacing/target)``,
  a monotone function of the extent, so it follows from the extent histogram alone; and the
  relative size after cropping (linear grid, width 1e-4), whose median decides
  ``use_mask_for_norm``;
* per channel, the foreground (label > 0 inside the crop) intensities. nnU-Net draws the SAME
  number of samples (with replacement) from every case's foreground, so its statistics are those
  of the mixture in which every case has weight 1, not of the pooled voxels. fedseg records that
  mixture exactly: each voxel of case c enters its bin with weight 1/n_c (n_c = the case's
  foreground voxels), plus Σ_c mean_c and Σ_c mean(x²)_c for the mean and std, plus min/max.

Every histogram stores, per bin, the total weight AND the weighted sum of the values in the bin.
A bin's value is then the weighted mean of what fell into it: EXACT whenever the bin holds a
single distinct value (one spacing, one extent, an integer HU value), else within the bin width.
Grids, and the precision that follows:

=====================  ==================================  =====================================
quantity               grid                                worst case (bin holds >1 value)
=====================  ==================================  =====================================
spacing                log, 1e-3..1e4 mm, ratio e^1e-4     1e-4 relative
cropped shape          1 voxel, 0..16384                   exact
extent (shape*spac.)   log, 1e-2..1e5 mm, ratio e^1e-4     1e-4 relative
relative size          linear, width 1e-4 over [0, 1]      1e-4
CT intensity           1 HU bins centred on integers,      exact for integer HU, else <= 1 HU;
                       [-4096, 12287]                      values outside clamp to the end bins
other intensity        signed log, |x| in 1e-6..1e9,       0.1 % relative (|x| < 1e-6: one bin);
                       ratio e^1e-3                        works for any MRI scale
=====================  ==================================  =====================================

Histograms are stored SPARSELY in JSON (occupied bins only) and densely in
:meth:`Fingerprint.to_vector`, whose layout depends only on the channel names (the grids are
fixed), so sites' vectors align element by element.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedseg.config_io import load_json_model
from fedseg.errors import FedsegError

if TYPE_CHECKING:  # the server imports this module; only sites read images (lazy imports below)
    from fedseg.data.dataset import Case

FINGERPRINT_VERSION = 1

# nnU-Net samples int(1e8 // num_cases) foreground voxels per case (DatasetFingerprintExtractor
# .num_foreground_voxels_for_intensitystats); the planner reproduces np.percentile on that many.
NNUNET_FOREGROUND_SAMPLES = 10e7


class Grid(BaseModel):
    """A histogram grid fixed in advance; two histograms add only if their grids are equal.

    ``linear``: ``n`` bins of width ``step`` from ``start`` (values outside clamp to the ends).
    ``log``: bin 0 holds |x| < ``start`` (and, unsigned, everything <= 0); then ``n`` bins with
    edges ``start * exp(k * step)``; ``signed`` mirrors them for negative values.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["linear", "log"]
    start: float
    step: float
    n: int
    signed: bool = False

    @property
    def size(self) -> int:
        if self.kind == "linear":
            return self.n
        return 2 * self.n + 1 if self.signed else self.n + 1

    def index(self, x: np.ndarray) -> np.ndarray:
        """Bin index of every value (float64 in, int64 out)."""
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "linear":
            idx = np.floor((x - self.start) / self.step)
            return np.clip(idx, 0, self.n - 1).astype(np.int64)
        ax = np.abs(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            k = np.floor(np.log(np.maximum(ax, self.start) / self.start) / self.step)
        k = np.clip(np.nan_to_num(k, nan=0.0), 0, self.n - 1).astype(np.int64)
        small = ax < self.start
        if not self.signed:
            return np.where(small | (x <= 0), 0, k + 1)
        return np.where(small, self.n, np.where(x > 0, self.n + 1 + k, self.n - 1 - k))


def _log_grid(lo: float, hi: float, step: float, signed: bool = False) -> Grid:
    return Grid(kind="log", start=lo, step=step, n=math.ceil(math.log(hi / lo) / step), signed=signed)


SPACING_GRID = _log_grid(1e-3, 1e4, 1e-4)
SHAPE_GRID = Grid(kind="linear", start=-0.5, step=1.0, n=16385)
EXTENT_GRID = _log_grid(1e-2, 1e5, 1e-4)
RELSIZE_GRID = Grid(kind="linear", start=-0.5e-4, step=1e-4, n=10001)
CT_GRID = Grid(kind="linear", start=-4096.5, step=1.0, n=16384)
INTENSITY_GRID = _log_grid(1e-6, 1e9, 1e-3, signed=True)


def intensity_grid_for(channel_name: str) -> Grid:
    """CT channels (nnU-Net's rule: name ``ct``, case-insensitive) get 1 HU bins, others log."""
    return CT_GRID if channel_name.casefold() == "ct" else INTENSITY_GRID


class Histogram(BaseModel):
    """Sparse fixed-grid histogram: occupied ``bins``, their ``weights`` and value ``sums``."""

    model_config = ConfigDict(extra="forbid")

    grid: Grid
    bins: list[int] = Field(default_factory=list)
    weights: list[float] = Field(default_factory=list)
    sums: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _aligned(self) -> Histogram:
        if not len(self.bins) == len(self.weights) == len(self.sums):
            raise ValueError("bins, weights and sums must have the same length")
        if any(b < 0 or b >= self.grid.size for b in self.bins):
            raise ValueError(f"bin index outside the grid (size {self.grid.size})")
        return self

    @classmethod
    def from_dense(cls, grid: Grid, weights: np.ndarray, sums: np.ndarray) -> Histogram:
        occ = np.flatnonzero(weights)
        return cls(
            grid=grid,
            bins=occ.tolist(),
            weights=weights[occ].astype(np.float64).tolist(),
            sums=sums[occ].astype(np.float64).tolist(),
        )

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        w = np.zeros(self.grid.size)
        s = np.zeros(self.grid.size)
        w[self.bins] = self.weights
        s[self.bins] = self.sums
        return w, s

    def __add__(self, other: Histogram) -> Histogram:
        if self.grid != other.grid:
            raise FedsegError(
                "fingerprints were made on different histogram grids (different fedseg "
                "versions?); recompute every site's fingerprint with the same fedseg"
            )
        w1, s1 = self.dense()
        w2, s2 = other.dense()
        return Histogram.from_dense(self.grid, w1 + w2, s1 + s2)

    @property
    def total(self) -> float:
        return float(np.sum(self.weights))

    def sorted_values(self) -> tuple[np.ndarray, np.ndarray]:
        """(value of every occupied bin = weighted mean of its content, weight), ascending."""
        order = np.argsort(self.bins)
        w = np.asarray(self.weights)[order]
        s = np.asarray(self.sums)[order]
        return s / w, w


class ChannelIntensities(BaseModel):
    """Foreground intensities of one channel, every case weighted 1 (nnU-Net's sampling)."""

    model_config = ConfigDict(extra="forbid")

    histogram: Histogram  # each voxel of case c has weight 1/n_c
    num_cases_with_foreground: int = 0
    num_voxels: int = 0  # total foreground voxels (informative)
    sum_case_means: float = 0.0  # Σ_c mean_c
    sum_case_mean_squares: float = 0.0  # Σ_c mean(x²)_c
    min: float | None = None
    max: float | None = None

    def __add__(self, other: ChannelIntensities) -> ChannelIntensities:
        mins = [v for v in (self.min, other.min) if v is not None]
        maxs = [v for v in (self.max, other.max) if v is not None]
        return ChannelIntensities(
            histogram=self.histogram + other.histogram,
            num_cases_with_foreground=self.num_cases_with_foreground
            + other.num_cases_with_foreground,
            num_voxels=self.num_voxels + other.num_voxels,
            sum_case_means=self.sum_case_means + other.sum_case_means,
            sum_case_mean_squares=self.sum_case_mean_squares + other.sum_case_mean_squares,
            min=min(mins) if mins else None,
            max=max(maxs) if maxs else None,
        )


def _empty(grid: Grid) -> Histogram:
    return Histogram(grid=grid)


class Fingerprint(BaseModel):
    """Additive dataset fingerprint of one site, or the sum over several sites.

    Axes are in nnU-Net/SimpleITK array order (k, j, i), as ``fedseg.data.dataset`` returns them.
    """

    model_config = ConfigDict(extra="forbid")

    version: int = FINGERPRINT_VERSION
    channel_names: dict[str, str]
    num_cases: int = 0
    spacing: list[Histogram]
    shape_after_crop: list[Histogram]
    extent_after_crop: list[Histogram]
    relative_size_after_crop: Histogram
    intensities: dict[str, ChannelIntensities]

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def empty(cls, channel_names: dict[str, str]) -> Fingerprint:
        return cls(
            channel_names=dict(channel_names),
            spacing=[_empty(SPACING_GRID) for _ in range(3)],
            shape_after_crop=[_empty(SHAPE_GRID) for _ in range(3)],
            extent_after_crop=[_empty(EXTENT_GRID) for _ in range(3)],
            relative_size_after_crop=_empty(RELSIZE_GRID),
            intensities={
                c: ChannelIntensities(histogram=_empty(intensity_grid_for(name)))
                for c, name in channel_names.items()
            },
        )

    # ---- combination --------------------------------------------------------------------

    def _check_compatible(self, other: Fingerprint) -> None:
        if self.version != other.version:
            raise FedsegError(
                f"fingerprint versions differ ({self.version} vs {other.version}); "
                "recompute every site's fingerprint with the same fedseg"
            )
        if self.channel_names != other.channel_names:
            raise FedsegError(
                f"fingerprints have different channel_names ({self.channel_names} vs "
                f"{other.channel_names}); every site's dataset.json must declare the same channels"
            )

    def __add__(self, other: Fingerprint) -> Fingerprint:
        """Fingerprint of the union of both datasets (sums; min/max combine by min/max)."""
        if not isinstance(other, Fingerprint):
            return NotImplemented
        self._check_compatible(other)
        return Fingerprint(
            version=self.version,
            channel_names=dict(self.channel_names),
            num_cases=self.num_cases + other.num_cases,
            spacing=[a + b for a, b in zip(self.spacing, other.spacing, strict=True)],
            shape_after_crop=[
                a + b for a, b in zip(self.shape_after_crop, other.shape_after_crop, strict=True)
            ],
            extent_after_crop=[
                a + b for a, b in zip(self.extent_after_crop, other.extent_after_crop, strict=True)
            ],
            relative_size_after_crop=self.relative_size_after_crop
            + other.relative_size_after_crop,
            intensities={c: self.intensities[c] + other.intensities[c] for c in self.intensities},
        )

    def __radd__(self, other: object) -> Fingerprint:
        if other == 0:  # so that sum([fp1, fp2, ...]) works
            return self
        return NotImplemented  # type: ignore[return-value]

    # ---- secure-aggregation vector ------------------------------------------------------

    def _histograms(self) -> list[Histogram]:
        return [
            *self.spacing,
            *self.shape_after_crop,
            *self.extent_after_crop,
            self.relative_size_after_crop,
            *(self.intensities[c].histogram for c in self._channel_keys()),
        ]

    def _channel_keys(self) -> list[str]:
        return sorted(self.intensities, key=int)

    def to_vector(self) -> np.ndarray:
        """The additive part as one dense float64 vector (layout fixed by the channel names).

        Layout: ``[num_cases]``, then per channel ``[cases_with_fg, voxels, Σmean, Σmean²]``,
        then for every histogram (spacing x3, shape x3, extent x3, relative size, intensity per
        channel) its dense weights followed by its dense sums. The sum of the sites' vectors is
        the vector of the pooled fingerprint.

        min/max are NOT in the vector (a minimum is not a sum). :meth:`from_vector` derives them
        from the lowest/highest occupied intensity bin (that bin's mean value): exact for integer
        CT values and whenever that bin holds a single distinct value, else within one bin width
        (values clamped into an end bin of the CT grid: the mean of the clamped values).
        Count-like entries are integers stored exactly in float64 up to 2**53; a fixed-point
        encoding for a finite ring (secure aggregation) must leave room for Σmean² of the data's
        intensity scale.
        """
        head = [float(self.num_cases)]
        for c in self._channel_keys():
            ch = self.intensities[c]
            head += [
                float(ch.num_cases_with_foreground),
                float(ch.num_voxels),
                ch.sum_case_means,
                ch.sum_case_mean_squares,
            ]
        parts = [np.asarray(head, dtype=np.float64)]
        for h in self._histograms():
            parts.extend(h.dense())
        return np.concatenate(parts)

    @classmethod
    def from_vector(cls, vec: np.ndarray, template: Fingerprint) -> Fingerprint:
        """Inverse of :meth:`to_vector`; ``template`` (any fingerprint with the same channels)
        supplies the layout. Integer fields are rounded (a vector that went through fixed-point
        secure aggregation may carry tiny errors); min/max are derived as described there."""
        vec = np.asarray(vec, dtype=np.float64)
        expected = template.to_vector().size
        if vec.ndim != 1 or vec.size != expected:
            raise FedsegError(
                f"fingerprint vector has {vec.size} entries, expected {expected} for channels "
                f"{template.channel_names}; all sites must run the same fedseg"
            )
        keys = template._channel_keys()
        pos = 0

        def take(n: int) -> np.ndarray:
            nonlocal pos
            out = vec[pos : pos + n]
            pos += n
            return out

        num_cases = int(round(take(1)[0]))
        heads = {c: take(4) for c in keys}
        hists = []
        for h in template._histograms():
            w = take(h.grid.size).copy()
            s = take(h.grid.size)
            if h.grid in (SPACING_GRID, SHAPE_GRID, EXTENT_GRID, RELSIZE_GRID):
                w = np.rint(w)  # case counts
            hists.append(Histogram.from_dense(h.grid, w, s))
        intensities = {}
        for i, c in enumerate(keys):
            hist = hists[10 + i]
            vals, _ = hist.sorted_values() if hist.bins else (np.array([]), None)
            intensities[c] = ChannelIntensities(
                histogram=hist,
                num_cases_with_foreground=int(round(heads[c][0])),
                num_voxels=int(round(heads[c][1])),
                sum_case_means=float(heads[c][2]),
                sum_case_mean_squares=float(heads[c][3]),
                min=float(vals[0]) if vals.size else None,
                max=float(vals[-1]) if vals.size else None,
            )
        return cls(
            version=template.version,
            channel_names=dict(template.channel_names),
            num_cases=num_cases,
            spacing=hists[0:3],
            shape_after_crop=hists[3:6],
            extent_after_crop=hists[6:9],
            relative_size_after_crop=hists[9],
            intensities=intensities,
        )

    # ---- persistence --------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.model_dump(mode="json")) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Fingerprint:
        return load_json_model(path, cls, "fingerprint file not found")


# ---- per-case extraction -----------------------------------------------------------------


def nonzero_bbox(image: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of (any channel != 0), as nnU-Net's ``crop_to_nonzero`` computes it.

    ``image`` is (C, *spatial). An all-zero image keeps its full extent (acvl_utils'
    ``get_bbox_from_mask`` falls back to the whole array). Hole filling is skipped: it cannot
    change a bounding box (see module docstring).
    """
    mask = np.any(image != 0, axis=0)
    out = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        hit = np.flatnonzero(np.any(mask, axis=other))
        out.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, mask.shape[ax]))
    return tuple(out)


class _Accumulator:
    """Dense accumulation for one site (fast), turned into a sparse :class:`Fingerprint`."""

    def __init__(self, channel_names: dict[str, str]) -> None:
        self.channel_names = dict(channel_names)
        self.num_cases = 0

        def dense(grid: Grid) -> list[np.ndarray]:
            return [np.zeros(grid.size), np.zeros(grid.size)]

        self.spacing = [dense(SPACING_GRID) for _ in range(3)]
        self.shape = [dense(SHAPE_GRID) for _ in range(3)]
        self.extent = [dense(EXTENT_GRID) for _ in range(3)]
        self.relsize = dense(RELSIZE_GRID)
        self.grids = {c: intensity_grid_for(n) for c, n in channel_names.items()}
        self.hist = {c: dense(g) for c, g in self.grids.items()}
        self.n_fg = dict.fromkeys(channel_names, 0)
        self.n_vox = dict.fromkeys(channel_names, 0)
        self.s1 = dict.fromkeys(channel_names, 0.0)
        self.s2 = dict.fromkeys(channel_names, 0.0)
        self.mins: dict[str, float | None] = dict.fromkeys(channel_names)
        self.maxs: dict[str, float | None] = dict.fromkeys(channel_names)

    @staticmethod
    def _put(acc: list[np.ndarray], grid: Grid, value: float) -> None:
        i = int(grid.index(np.array([value]))[0])
        acc[0][i] += 1.0
        acc[1][i] += value

    def add_geometry(
        self, spacing: Sequence[float], shape_after: Sequence[int], relative_size: float
    ) -> None:
        """The case-level part: spacing, cropped shape, extent, relative size after crop."""
        self.num_cases += 1
        for ax in range(3):
            sp = float(spacing[ax])
            self._put(self.spacing[ax], SPACING_GRID, sp)
            self._put(self.shape[ax], SHAPE_GRID, float(shape_after[ax]))
            self._put(self.extent[ax], EXTENT_GRID, float(shape_after[ax]) * sp)
        self._put(self.relsize, RELSIZE_GRID, float(relative_size))

    def add_case(
        self, image: np.ndarray, label: np.ndarray, spacing: Sequence[float], case_id: str
    ) -> None:
        """One case: ``image`` (C, k, j, i), ``label`` (k, j, i) or (1, k, j, i)."""
        if label.ndim == image.ndim:
            label = label[0]
        if label.shape != image.shape[1:]:
            raise FedsegError(
                f"case {case_id}: label shape {label.shape[::-1]} differs from the image's "
                f"{image.shape[:0:-1]}; re-export the label on the image grid"
            )
        if not np.all(np.isfinite(image)):
            raise FedsegError(
                f"case {case_id}: image contains NaN or infinite values; fix the file"
            )
        if any(not (math.isfinite(float(s)) and float(s) > 0) for s in spacing):
            raise FedsegError(f"case {case_id}: voxel spacing {tuple(spacing)[::-1]} not positive")
        bbox = nonzero_bbox(image)
        cropped = image[(slice(None), *bbox)]
        fg = label[bbox] > 0
        shape_before = image.shape[1:]
        shape_after = cropped.shape[1:]
        rel = float(np.prod(shape_after) / np.prod(shape_before))
        self.add_geometry(spacing, shape_after, rel)
        if fg.any():
            self.add_foreground({c: cropped[c_idx][fg] for c_idx, c in
                                 enumerate(sorted(self.channel_names, key=int))})

    def add_foreground(self, values: dict[str, np.ndarray]) -> None:
        """The intensity part of one case: its foreground voxel values per channel."""
        for c in sorted(self.channel_names, key=int):
            vals = np.asarray(values[c], dtype=np.float64).ravel()
            n = vals.size
            if n == 0:
                continue
            grid = self.grids[c]
            idx = grid.index(vals)
            self.hist[c][0] += np.bincount(idx, minlength=grid.size) / n
            self.hist[c][1] += np.bincount(idx, weights=vals, minlength=grid.size) / n
            self.n_fg[c] += 1
            self.n_vox[c] += n
            self.s1[c] += float(vals.mean())
            self.s2[c] += float(np.mean(vals * vals))
            lo, hi = float(vals.min()), float(vals.max())
            old_lo, old_hi = self.mins[c], self.maxs[c]
            self.mins[c] = lo if old_lo is None else min(lo, old_lo)
            self.maxs[c] = hi if old_hi is None else max(hi, old_hi)

    def result(self) -> Fingerprint:
        return Fingerprint(
            channel_names=self.channel_names,
            num_cases=self.num_cases,
            spacing=[Histogram.from_dense(SPACING_GRID, *a) for a in self.spacing],
            shape_after_crop=[Histogram.from_dense(SHAPE_GRID, *a) for a in self.shape],
            extent_after_crop=[Histogram.from_dense(EXTENT_GRID, *a) for a in self.extent],
            relative_size_after_crop=Histogram.from_dense(RELSIZE_GRID, *self.relsize),
            intensities={
                c: ChannelIntensities(
                    histogram=Histogram.from_dense(self.grids[c], *self.hist[c]),
                    num_cases_with_foreground=self.n_fg[c],
                    num_voxels=self.n_vox[c],
                    sum_case_means=self.s1[c],
                    sum_case_mean_squares=self.s2[c],
                    min=self.mins[c],
                    max=self.maxs[c],
                )
                for c in self.channel_names
            },
        )


def fingerprint_cases(cases: Iterable[Case], channel_names: dict[str, str]) -> Fingerprint:
    """Fingerprint of cases in memory (nnU-Net axis order, labels required); pass a generator
    to hold one case at a time."""
    acc = _Accumulator(channel_names)
    for case in cases:
        if case.label is None:
            raise FedsegError(f"case {case.case_id}: no label; the fingerprint needs labels")
        acc.add_case(case.image, case.label, case.spacing, case.case_id)
    return acc.result()


def fingerprint_from_summaries(
    channel_names: dict[str, str],
    spacings: Sequence[Sequence[float]],
    shapes_after_crop: Sequence[Sequence[int]],
    relative_sizes: Sequence[float],
    foreground: Sequence[dict[str, np.ndarray]] | None = None,
) -> Fingerprint:
    """A fingerprint from per-case lists instead of images.

    These are the lists of an nnU-Net ``dataset_fingerprint.json`` (``spacings``,
    ``shapes_after_crop``; nnU-Net keeps only the median relative size) and, optionally, each
    case's foreground voxel values per channel (without them: no intensity statistics). Tests
    use it to check the planner against nnU-Net on datasets too large or too many to write.
    """
    acc = _Accumulator(channel_names)
    fg = foreground if foreground is not None else [None] * len(spacings)
    for sp, sh, rel, vals in zip(spacings, shapes_after_crop, relative_sizes, fg, strict=True):
        acc.add_geometry(sp, sh, rel)
        if vals is not None:
            acc.add_foreground(vals)
    return acc.result()


ProgressCallback = Callable[[int, int, str], None]


def compute_fingerprint(
    data_dir: str | Path, progress: ProgressCallback | None = None
) -> Fingerprint:
    """Fingerprint of one site's training cases (``imagesTr``/``labelsTr``).

    Reads one case at a time (memory: one case). ``progress(done, total, case_id)`` is called
    after every case.
    """
    from fedseg.data.dataset import list_cases, load_case, read_dataset_json

    ds = read_dataset_json(data_dir)
    files = list_cases(data_dir, ds, "Tr")
    if not files:
        raise FedsegError(
            f"{Path(data_dir) / 'imagesTr'}: no training cases found; expected files named "
            f"CASE_0000{ds.file_ending}"
        )
    acc = _Accumulator(ds.channel_names)
    for i, f in enumerate(files):
        if f.label is None or not f.label.is_file():
            raise FedsegError(f"{f.label}: missing label file; every training case needs one")
        case = load_case(f, with_label=True)
        assert case.label is not None
        acc.add_case(case.image, case.label, case.spacing, f.case_id)
        if progress is not None:
            progress(i + 1, len(files), f.case_id)
    return acc.result()
