"""Built-in synthetic multi-site demo data (``fedseg demo-data``).

Why: a hospital engineer (and our tests) must be able to try the whole federated pipeline
without any real patient data, and the demo must exercise what makes federated nnU-Net hard:
sites whose scanners differ. So each site gets its own voxel spacing (one anisotropic), field
of view, intensity scale/offset and noise level, and every volume has a "body" that is smaller
than the field of view with exact zeros outside it (nnU-Net's crop-to-nonzero then matters).

The anatomy is drawn in millimetres, not voxels, so a site's spacing changes the sampling but
not the anatomy. Class 1 "organ" is a smoothly deformed ellipsoid, class 2 "lesion" a smaller
blob inside or at the edge of it, with different intensities, partial-volume blur, a smooth
multiplicative bias field and noise: a tiny U-Net learns it in a few hundred iterations, a
plain intensity threshold does not solve it.

Volumes are kept small (field of view 44-56 mm, 20-64 voxels per axis) so CPU training works.
Everything is deterministic: case ``n`` of site ``s`` is drawn from
``numpy.random.default_rng([seed, s, n])``. Files follow nnU-Net v2's raw layout; ``labelsTs``
is fedseg's extension so ``fedseg evaluate`` can score the held-out cases.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from fedseg.errors import FedsegError

ENDING = ".nii.gz"
LABELS = {"background": 0, "organ": 1, "lesion": 2}


@dataclass(frozen=True)
class SiteStyle:
    """How one simulated scanner differs from the others."""

    spacing: tuple[float, float, float]  # (si, sj, sk) in mm, nibabel order
    fov: tuple[float, float, float]  # field of view in mm, nibabel order
    scale: float  # intensity units per unit of tissue contrast
    offset: float  # added to every voxel inside the body
    noise: float  # noise sigma, relative to the contrast scale
    origin: tuple[float, float, float]  # world position of voxel (0, 0, 0) in mm


# The first sites are hand-picked to look like three different scanners; later sites vary more.
_STYLES = [
    SiteStyle((1.0, 1.0, 1.0), (48.0, 48.0, 48.0), 1000.0, 0.0, 0.07, (-24.0, -24.0, -24.0)),
    SiteStyle((0.8, 0.8, 2.0), (48.0, 48.0, 52.0), 400.0, 50.0, 0.10, (-20.0, -25.0, -30.0)),
    SiteStyle((1.2, 1.2, 1.2), (54.0, 54.0, 54.0), 2500.0, -200.0, 0.08, (10.0, -30.0, 5.0)),
    SiteStyle((0.75, 0.75, 1.5), (45.0, 45.0, 48.0), 150.0, 20.0, 0.12, (0.0, 0.0, 0.0)),
    SiteStyle((1.5, 1.5, 1.5), (54.0, 54.0, 54.0), 1.0, 0.0, 0.06, (-27.0, -27.0, -27.0)),
]


MAX_DEMO_SITES = 26 + 26 * 26  # siteA .. siteZ, then siteAA .. siteZZ


def site_name(index: int) -> str:
    """``0 -> "siteA"``, ``1 -> "siteB"``, ..., ``25 -> "siteZ"``, ``26 -> "siteAA"``, ...
    (two letters after Z: the benchmarks simulate 30 sites)."""
    if not 0 <= index < MAX_DEMO_SITES:
        raise ValueError(f"site index {index}: must be between 0 and {MAX_DEMO_SITES - 1}")
    letters = string.ascii_uppercase
    if index < 26:
        return "site" + letters[index]
    first, second = divmod(index - 26, 26)
    return "site" + letters[first] + letters[second]


def site_style(index: int, seed: int = 0) -> SiteStyle:
    """The scanner style of site ``index`` (hand-picked for the first five, drawn after)."""
    if index < len(_STYLES):
        return _STYLES[index]
    rng = np.random.default_rng([seed, index, 10**6])
    inplane = float(rng.choice([0.7, 0.8, 0.9, 1.0, 1.1]))
    through = float(rng.choice([inplane, 1.5, 2.0]))
    fov = tuple(float(f) for f in rng.uniform(44.0, 56.0, 3))
    return SiteStyle(
        spacing=(inplane, inplane, through),
        fov=fov,  # type: ignore[arg-type]
        scale=float(10 ** rng.uniform(0, 3.5)),
        offset=float(rng.uniform(-100, 100)),
        noise=float(rng.uniform(0.05, 0.12)),
        origin=tuple(float(o) for o in rng.uniform(-30, 30, 3)),  # type: ignore[arg-type]
    )


def _smooth_field(
    rng: np.random.Generator, coords: tuple[np.ndarray, ...], wavelength: float, terms: int = 6
) -> np.ndarray:
    """A smooth random field (roughly unit amplitude) in physical coordinates (mm).

    A sum of random plane waves: vectorised, cheap, and independent of the voxel spacing.
    """
    out = np.zeros(np.broadcast_shapes(*(c.shape for c in coords)), dtype=np.float32)
    for _ in range(terms):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        freq = 2 * np.pi / (wavelength * rng.uniform(0.7, 1.4))
        phase = rng.uniform(0, 2 * np.pi)
        arg = sum(freq * d * c for d, c in zip(direction, coords, strict=True)) + phase
        out += np.cos(arg).astype(np.float32)
    return out * np.float32(np.sqrt(2.0 / terms))


def _blob(
    rng: np.random.Generator,
    coords: tuple[np.ndarray, ...],
    center: np.ndarray,
    radii: np.ndarray,
    deform: float,
    wavelength: float,
) -> np.ndarray:
    """Mask of a randomly rotated ellipsoid whose surface is smoothly deformed."""
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rel = [c - m for c, m in zip(coords, center, strict=True)]
    dist = np.zeros(np.broadcast_shapes(*(c.shape for c in coords)), dtype=np.float32)
    for axis in range(3):
        proj = sum(rot[axis, d] * rel[d] for d in range(3))
        dist += (proj / radii[axis]) ** 2
    dist = np.sqrt(dist)
    return dist + deform * _smooth_field(rng, coords, wavelength) < 1.0


def make_case(
    style: SiteStyle, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic case: (float32 image, uint8 label, affine), arrays in nibabel order."""
    spacing = np.asarray(style.spacing)
    shape = np.round(np.asarray(style.fov) / spacing).astype(int)
    shape = np.maximum(shape + rng.integers(-2, 3, 3), 8)  # cases of a site differ a little
    half = shape * spacing / 2
    coords = tuple(
        ((np.arange(n) + 0.5) * s - h).reshape([-1 if a == i else 1 for a in range(3)])
        for i, (n, s, h) in enumerate(zip(shape, spacing, half, strict=True))
    )

    body_r = half * rng.uniform(0.72, 0.88, 3)
    body = _blob(rng, coords, rng.normal(0, 1.5, 3), body_r, 0.06, 30.0)
    inner = body_r - 6.0  # keep the organ well inside the body
    for _attempt in range(20):
        organ_c = rng.uniform(-0.35, 0.35, 3) * inner
        organ_r = rng.uniform(7.0, 12.0, 3)
        organ = _blob(rng, coords, organ_c, organ_r, 0.25, 16.0) & body
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        lesion_c = organ_c + direction * rng.uniform(0.2, 0.85) * organ_r.min()
        lesion = _blob(rng, coords, lesion_c, rng.uniform(3.0, 5.5, 3), 0.15, 8.0) & body
        if (organ & ~lesion).sum() >= 30 and lesion.sum() >= 8:
            break
    label = np.zeros(tuple(shape), dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2

    # tissue contrast: tissue 0.5, organ 0.85, lesion 0.3, each with its own texture
    texture = _smooth_field(rng, coords, 10.0)
    img = np.where(body, 0.5 + 0.05 * texture, 0.0).astype(np.float32)
    img[label == 1] = (0.85 + 0.04 * texture)[label == 1]
    img[label == 2] = (0.3 + 0.04 * texture)[label == 2]
    img = ndimage.gaussian_filter(img, sigma=0.8 / spacing)  # partial-volume blur, in mm
    bias = np.exp(0.15 * _smooth_field(rng, coords, 60.0, terms=3))
    img = img * bias + rng.normal(0, style.noise, img.shape).astype(np.float32)
    img = (img * style.scale + style.offset).astype(np.float32)
    img[~body] = 0.0  # exact zeros outside the body: crop-to-nonzero finds it
    img[body & (img == 0.0)] = np.float32(1e-3 * style.scale)

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = style.origin
    return img, label, affine


def _write(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def make_demo_data(
    out: str | Path, sites: int = 3, cases: int = 10, test_cases: int = 4, seed: int = 0
) -> list[Path]:
    """Write one nnU-Net v2 raw dataset per site to ``OUT/siteA``, ``OUT/siteB``, ...

    Training cases go to ``imagesTr``/``labelsTr``, ``test_cases`` held-out ones (numbered after
    the training cases) to ``imagesTs``/``labelsTs``. Returns the site folders. Files of an
    earlier demo in the same folders are replaced, so a rerun never mixes two generations.
    """
    if not 1 <= sites <= MAX_DEMO_SITES:
        raise FedsegError(f"sites={sites}: must be between 1 and {MAX_DEMO_SITES}; "
                          f"pass --sites 1..{MAX_DEMO_SITES}")
    if cases < 1 or test_cases < 0:
        raise FedsegError(
            f"cases={cases}, test_cases={test_cases}: need at least 1 training case and "
            "0 or more test cases; pass positive counts"
        )
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise FedsegError(f"{root}: exists and is not a directory; choose another output folder")
    dirs = []
    for s in range(sites):
        name = site_name(s)
        style = site_style(s, seed)
        site_dir = root / name
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (site_dir / sub).mkdir(parents=True, exist_ok=True)
            for old in (site_dir / sub).glob(f"{name}_*{ENDING}"):
                old.unlink()
        for n in range(cases + test_cases):
            split = "Tr" if n < cases else "Ts"
            img, label, affine = make_case(style, np.random.default_rng([seed, s, n]))
            cid = f"{name}_{n:03d}"
            _write(img, affine, site_dir / f"images{split}" / f"{cid}_0000{ENDING}")
            _write(label, affine, site_dir / f"labels{split}" / f"{cid}{ENDING}")
        meta = {
            "name": f"fedseg-demo-{name}",
            "description": (
                f"fedseg synthetic demo, {name}: spacing {list(style.spacing)} mm (i, j, k), "
                f"seed {seed}"
            ),
            "channel_names": {"0": "MRI"},
            "labels": dict(LABELS),
            "numTraining": cases,
            "numTest": test_cases,
            "file_ending": ENDING,
        }
        (site_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        dirs.append(site_dir)
    return dirs
