"""nnU-Net v2's training augmentation, applied batched on the device where the batch lives.

Why on the device: nnU-Net runs its augmentation per sample on the CPU and needs ~12 worker
processes to keep one GPU busy; a hospital's GPU box often has far fewer cores. Here the CPU
loader only crops patches and draws the random parameters (cheap, see :func:`sample_params`);
the voxel work (resampling, blur, noise, gamma, ...) is a handful of batched tensor ops on the
GPU, a few milliseconds per batch against tens for the network step.

The pipeline, probabilities and ranges are those of nnU-Net v2's
``nnUNetTrainer.get_training_transforms`` (batchgeneratorsv2), in the same order:

====================  =====  ============================================================
transform             p      parameters
====================  =====  ============================================================
rotation              0.2    every axis U(±30°) (anisotropic "dummy 2D" patch: axis 0 only, ±180°)
scaling               0.2    one factor U(0.7, 1.4) for all axes (in-plane only in dummy 2D)
Gaussian noise        0.1    std U(0, 0.1) (nnU-Net's "variance" is used as the std)
Gaussian blur         0.2    per channel p 0.5, sigma U(0.5, 1) per axis
brightness (mult.)    0.15   per channel factor from BGContrast(0.75, 1.25)
contrast              0.15   per channel factor from BGContrast(0.75, 1.25), range preserved
low resolution        0.25   per channel p 0.5, zoom U(0.5, 1) (same on all non-ignored axes)
gamma, inverted       0.1    per channel gamma from BGContrast(0.7, 1.5), stats retained
gamma                 0.3    per channel gamma from BGContrast(0.7, 1.5), stats retained
mirror                 --    each axis p 0.5
====================  =====  ============================================================

Spatial transform: like nnU-Net, the loader crops a LARGER patch (:func:`initial_patch_size`,
nnU-Net's ``get_patch_size``) around the chosen centre so that rotating/zooming does not pull in
padding, and the transform resamples the centre ``patch_size`` out of it. Only samples that
actually get a rotation or scaling (36 %) are loaded at the larger size; the others are cropped
directly at ``patch_size`` with the same centre, which is what nnU-Net's centre crop yields.
The warp uses MONAI's batched :class:`~monai.networks.layers.AffineTransform` (one
``grid_sample`` for the whole batch, a matrix per sample); the label map is warped as nnU-Net
does it, linearly on one-hot masks then argmax.

Hand-written rather than MONAI's ``Rand*`` transforms because those act on one sample at a time
(a Python loop of MetaTensor ops per sample per transform, 10+ transforms) and draw their own
randomness; here parameters come from the loader's per-batch generator, so a batch is a pure
function of (seed, batch index) and training resumes exactly. MONAI building blocks are used
where they are batched (``AffineTransform``, ``gaussian_1d``).

Finally, as nnU-Net's ``MaskImageTransform``, channels normalised with ``use_mask_for_norm``
are set to 0 where the label is -1 (outside the body).

Deviations from nnU-Net (all small): the larger patch is rounded up to keep (large - patch) even
so the centre crop is exact; the blur kernel is truncated at 4 sigma (MONAI's ``gaussian_1d``)
instead of ~6; labels outside the warped patch are -1 by the argmax over zero one-hot scores
rather than by padding the label map with -1 before interpolating (differs only within half a
voxel of the patch border, where label -1 becomes background anyway).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import AffineTransform
from monai.networks.layers.convutils import gaussian_1d
from pydantic import BaseModel, ConfigDict

ANISO_THRESHOLD = 3.0  # nnU-Net: patch max/patch[0] above this -> "dummy 2D" augmentation


class AugmentConfig(BaseModel):
    """Probabilities and ranges; the defaults are nnU-Net v2's."""

    model_config = ConfigDict(extra="forbid")

    p_rotation: float = 0.2
    rotation_deg: float = 30.0
    rotation_deg_dummy_2d: float = 180.0
    p_scaling: float = 0.2
    scaling: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    p_blur_per_channel: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    p_lowres_per_channel: float = 0.5
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_mirror_per_axis: float = 0.5


class SpatialSetup(BaseModel):
    """Patch-size-dependent choices nnU-Net makes once per training run."""

    patch_size: list[int]
    initial_patch_size: list[int]
    dummy_2d: bool
    rotation_rad: float
    mirror_axes: list[int]


# --------------------------------------------------------------------------------------------
# nnU-Net's larger sampling patch


def _rot_x(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def get_patch_size(
    final_patch_size: Sequence[int], rot: float, scale_range: tuple[float, float]
) -> list[int]:
    """nnU-Net's ``get_patch_size``: the patch to load so the warped one needs no padding.

    Kept bug-for-bug (it rotates only the corner vector, by the maximum angle, clipped to 90°)
    so that the loader reads what nnU-Net's would.
    """
    rot = min(math.pi / 2, abs(rot))
    coords = np.asarray(final_patch_size, dtype=float)
    final = coords.copy()
    if len(coords) == 3:
        for m in (_rot_x(rot), _rot_y(rot), _rot_z(rot)):
            final = np.maximum(np.abs(coords @ m), final)
    else:
        c, s = math.cos(rot), math.sin(rot)
        final = np.maximum(np.abs(coords @ np.array([[c, -s], [s, c]])), final)
    final /= min(scale_range)
    return [int(v) for v in final]


def spatial_setup(patch_size: Sequence[int], cfg: AugmentConfig, augment: bool) -> SpatialSetup:
    """nnU-Net's ``configure_rotation_dummyDA_mirroring_and_inital_patch_size`` for 3D."""
    ps = [int(p) for p in patch_size]
    if len(ps) != 3:
        raise ValueError("fedseg's augmentation is implemented for 3D patches only")
    dummy_2d = max(ps) / ps[0] > ANISO_THRESHOLD
    rot = math.radians(cfg.rotation_deg_dummy_2d if dummy_2d else cfg.rotation_deg)
    if not augment:
        return SpatialSetup(
            patch_size=ps, initial_patch_size=ps, dummy_2d=dummy_2d, rotation_rad=rot,
            mirror_axes=[],
        )
    if dummy_2d:
        init = [ps[0], *get_patch_size(ps[1:], rot, (0.85, 1.25))]
    else:
        init = get_patch_size(ps, rot, (0.85, 1.25))
    # round up so that (initial - patch) is even: the centre crop is then exact
    init = [max(i, p) + (max(i, p) - p) % 2 for i, p in zip(init, ps, strict=True)]
    return SpatialSetup(
        patch_size=ps, initial_patch_size=init, dummy_2d=dummy_2d, rotation_rad=rot,
        mirror_axes=[0, 1, 2],
    )


# --------------------------------------------------------------------------------------------
# parameters, drawn on the CPU by the loader


def _bg_contrast(rng: np.random.Generator, lo: float, hi: float) -> float:
    """batchgeneratorsv2's ``BGContrast``: half the draws below 1, half above."""
    if rng.random() < 0.5 and lo < 1:
        return float(rng.uniform(lo, 1))
    return float(rng.uniform(max(lo, 1), hi))


def sample_spatial(
    rng: np.random.Generator, setup: SpatialSetup, cfg: AugmentConfig
) -> np.ndarray | None:
    """A 3x3 matrix (output offset from centre -> input offset) or None for "no warp"."""
    do_rot = rng.random() < cfg.p_rotation
    do_scale = rng.random() < cfg.p_scaling
    if not (do_rot or do_scale):
        return None
    m = np.eye(3)
    if do_rot:
        r = setup.rotation_rad
        if setup.dummy_2d:  # in-plane only: rotation about axis 0
            m = _rot_x(rng.uniform(-r, r))
        else:
            ax, ay, az = rng.uniform(-r, r, size=3)
            m = _rot_z(az) @ _rot_y(ay) @ _rot_x(ax)  # batchgeneratorsv2's Rz Ry Rx S
    if do_scale:
        s = rng.uniform(*cfg.scaling)
        m = m @ np.diag([1.0 if setup.dummy_2d else s, s, s])
    return m


def sample_params(
    rng: np.random.Generator, n: int, channels: int, setup: SpatialSetup, cfg: AugmentConfig
) -> dict[str, torch.Tensor]:
    """Intensity and mirror parameters for ``n`` samples; identity values where not applied."""
    noise = np.zeros(n, np.float32)
    blur = np.zeros((n, channels, 3), np.float32)
    bright = np.ones((n, channels), np.float32)
    contrast = np.ones((n, channels), np.float32)
    lowres = np.ones((n, channels), np.float32)
    gamma_inv = np.ones((n, channels), np.float32)
    gamma = np.ones((n, channels), np.float32)
    mirror = np.zeros((n, 3), bool)
    for b in range(n):
        if rng.random() < cfg.p_noise:
            noise[b] = rng.uniform(*cfg.noise_std)
        if rng.random() < cfg.p_blur:
            for c in range(channels):
                if rng.random() < cfg.p_blur_per_channel:
                    blur[b, c] = rng.uniform(*cfg.blur_sigma, size=3)
        if rng.random() < cfg.p_brightness:
            bright[b] = [_bg_contrast(rng, *cfg.brightness) for _ in range(channels)]
        if rng.random() < cfg.p_contrast:
            contrast[b] = [_bg_contrast(rng, *cfg.contrast) for _ in range(channels)]
        if rng.random() < cfg.p_lowres:
            for c in range(channels):
                if rng.random() < cfg.p_lowres_per_channel:
                    lowres[b, c] = rng.uniform(*cfg.lowres_zoom)
        if rng.random() < cfg.p_gamma_inverted:
            gamma_inv[b] = [_bg_contrast(rng, *cfg.gamma) for _ in range(channels)]
        if rng.random() < cfg.p_gamma:
            gamma[b] = [_bg_contrast(rng, *cfg.gamma) for _ in range(channels)]
        for ax in setup.mirror_axes:
            mirror[b, ax] = rng.random() < cfg.p_mirror_per_axis
    out = {
        "noise": noise, "blur": blur, "brightness": bright, "contrast": contrast,
        "lowres": lowres, "gamma_inv": gamma_inv, "gamma": gamma, "mirror": mirror,
    }
    return {k: torch.from_numpy(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# application, on the device


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a sync: small CPU tensors are pinned first on CUDA (a blocking
    copy from pageable memory would wait for all queued GPU work every batch)."""
    if device.type != "cuda" or t.is_cuda:
        return t.to(device)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def normalized_theta(
    matrices: np.ndarray | torch.Tensor, src_size: Sequence[int], dst_size: Sequence[int]
) -> torch.Tensor:
    """(B, 4, 4) matrices for ``affine_grid(align_corners=True)`` (x, y, z = W, H, D order)
    from voxel-space ``matrices`` (B, 3, 3, array axis order) that rotate/scale about the
    centres of a ``src_size`` input and a ``dst_size`` output. Computed on the CPU in float64:
    building it on the GPU would mean blocking host->device copies (a sync per batch)."""
    m = np.asarray(matrices, dtype=np.float64).reshape(-1, 3, 3)
    src = np.asarray(src_size, dtype=np.float64)
    dst = np.asarray(dst_size, dtype=np.float64)
    a = np.zeros((len(m), 4, 4))
    a[:, :3, :3] = m
    a[:, :3, 3] = (src - 1) / 2 - m @ ((dst - 1) / 2)  # voxel index out -> voxel index in
    a[:, 3, 3] = 1

    def to_norm(size: np.ndarray) -> np.ndarray:  # voxel index -> [-1, 1] (align_corners)
        t = np.eye(4)
        t[:3, :3] = np.diag(2 / np.maximum(size - 1, 1))
        t[:3, 3] = -1
        return t

    t = to_norm(src) @ a @ np.linalg.inv(to_norm(dst))
    rev = [2, 1, 0, 3]  # array axes (D, H, W) -> grid axes (x=W, y=H, z=D)
    t = t[:, rev][:, :, rev]
    return torch.from_numpy(t.astype(np.float32))


def warp(
    image: torch.Tensor,
    seg: torch.Tensor,
    matrices: torch.Tensor,
    patch_size: Sequence[int],
    num_labels: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/scale a batch of large patches about their centres, output ``patch_size``.

    ``matrices`` (B, 3, 3, on the CPU) map an output voxel's offset from the output centre to
    the input offset from the input centre. ``seg`` values are -1..num_labels-1; out-of-patch
    voxels get -1 (nnU-Net: ``border_cval_seg=-1``).
    """
    theta = normalized_theta(matrices, image.shape[2:], patch_size)
    theta = to_device(theta, image.device)
    # normalized=True: MONAI's layer is then affine_grid + grid_sample, batched, no host syncs
    tf = AffineTransform(
        spatial_size=tuple(patch_size), normalized=True, mode="bilinear", padding_mode="zeros",
        align_corners=True, reverse_indexing=False,
    )
    with warnings.catch_warnings():
        # a 2d configuration's one-slice patches: torch warns that unit-size grids changed
        # meaning in 1.3 — for a slice in and a slice out both meanings sample that slice
        warnings.filterwarnings("ignore", message=".*unit-size grids.*")
        img = tf(image.float(), theta)
        # labels: channel 0 is "-1", so the argmax of an all-zero (outside) voxel is -1
        # float32: the sampling grid is float32 and grid_sample needs matching dtypes
        onehot = torch.stack([seg[:, 0] == v for v in range(-1, num_labels)], 1).float()
        lab = tf(onehot, theta).argmax(1, keepdim=True) - 1
    return img, lab.to(seg.dtype)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur, own sigma per (sample, channel, axis); 0 = untouched.

    ``sigma`` stays on the CPU (it decides which slices to blur: no device sync).
    """
    b, c = x.shape[:2]
    idx = (sigma > 0).any(-1).flatten().nonzero().flatten().tolist()
    if not idx:
        return x
    flat = x.reshape(b * c, *x.shape[2:])
    ii = to_device(torch.tensor(idx), x.device)
    sel = flat.index_select(0, ii)[None]  # (1, K, D, H, W): grouped conv, a group per (b, c)
    sig = sigma.reshape(b * c, 3)[idx]
    for ax in range(3):
        ks = []
        for s in sig[:, ax].tolist():
            ks.append(gaussian_1d(torch.tensor(s), truncated=4.0, normalize=True) if s > 0
                      else torch.ones(1))
        r = max(len(k) for k in ks) // 2
        weight = torch.zeros(len(ks), 2 * r + 1)
        for i, k in enumerate(ks):
            h = len(k) // 2
            weight[i, r - h : r + h + 1] = k
        shape = [len(ks), 1, 1, 1, 1]
        shape[2 + ax] = 2 * r + 1
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - ax)] = pad[2 * (2 - ax) + 1] = r
        mode = "reflect" if sel.shape[2 + ax] > r else "replicate"
        w = to_device(weight.view(shape), sel.device).to(sel.dtype)
        sel = F.conv3d(F.pad(sel, pad, mode=mode), w, groups=len(ks))
    return flat.index_copy(0, ii, sel[0]).view_as(x)


def _lowres(x: torch.Tensor, zoom: torch.Tensor, dummy_2d: bool) -> torch.Tensor:
    """Downsample (nearest) and upsample back (trilinear) the chosen (sample, channel)s."""
    pairs = (zoom < 1).nonzero().tolist()
    if not pairs:
        return x
    x = x.clone()
    shape = list(x.shape[2:])
    for b, c in pairs:
        z = float(zoom[b, c])
        new = [s if (dummy_2d and ax == 0) else max(1, round(s * z)) for ax, s in enumerate(shape)]
        low = F.interpolate(x[b : b + 1, c : c + 1], size=new, mode="nearest-exact")
        x[b, c] = F.interpolate(low, size=shape, mode="trilinear", align_corners=False)[0, 0]
    return x


def _gamma(x: torch.Tensor, gamma: torch.Tensor, invert: bool) -> torch.Tensor:
    """batchgenerators' ``augment_gamma`` with ``retain_stats``, per (sample, channel)."""
    apply = gamma != 1
    g = gamma.view(*gamma.shape, 1, 1, 1)
    a = apply.view_as(g)
    y = -x if invert else x
    dims = tuple(range(2, x.ndim))
    mean = y.mean(dims, keepdim=True)
    std = y.std(dims, correction=0, keepdim=True)
    mn = y.amin(dims, keepdim=True)
    rng = y.amax(dims, keepdim=True) - mn
    z = ((y - mn) / (rng + 1e-7)).clamp_min(0).pow(g) * rng + mn
    z = (z - z.mean(dims, keepdim=True)) / (z.std(dims, correction=0, keepdim=True) + 1e-8)
    z = z * std + mean
    if invert:
        z = -z
    return torch.where(a, z, x)


def _bc(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(*v.shape, *([1] * (x.ndim - v.ndim)))


def apply_intensity_and_mirror(
    image: torch.Tensor,
    seg: torch.Tensor,
    params: dict[str, torch.Tensor],
    dummy_2d: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise, blur, brightness, contrast, low resolution, gamma (inverted, then plain), mirror."""
    dev = image.device
    p = {k: to_device(v, dev) for k, v in params.items()}
    x = image
    # Gaussian noise (one std for all channels of a sample)
    noise_idx = (params["noise"] > 0).nonzero().flatten().tolist()
    if noise_idx:
        x = x.clone()
        for b in noise_idx:  # int indexing: no index tensor to copy, no sync
            n = torch.randn(x.shape[1:], generator=generator, device=dev)
            x[b] += n * float(params["noise"][b])
    x = _blur(x, params["blur"])
    # multiplicative brightness
    x = x * _bc(p["brightness"], x)
    # contrast, range preserved
    if bool((params["contrast"] != 1).any()):
        dims = tuple(range(2, x.ndim))
        mean = x.mean(dims, keepdim=True)
        lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
        y = ((x - mean) * _bc(p["contrast"], x) + mean).clamp(lo, hi)
        x = torch.where(_bc(p["contrast"] != 1, x), y, x)
    x = _lowres(x, params["lowres"], dummy_2d)
    if bool((params["gamma_inv"] != 1).any()):
        x = _gamma(x, p["gamma_inv"], invert=True)
    if bool((params["gamma"] != 1).any()):
        x = _gamma(x, p["gamma"], invert=False)
    # mirroring, per sample
    mirror = params["mirror"]
    if bool(mirror.any()):
        x, seg = x.clone(), seg.clone()
        for b in range(x.shape[0]):
            axes = [1 + a for a in range(3) if mirror[b, a]]  # dims of one (C, D, H, W) sample
            if axes:
                x[b] = x[b].flip(axes)
                seg[b] = seg[b].flip(axes)
    return x, seg


class DeviceAugmenter:
    """Turns a loader batch (see ``fedseg.training.sampling``) into (image, seg) on ``device``."""

    def __init__(
        self,
        setup: SpatialSetup,
        num_labels: int,
        device: torch.device,
        mask_channels: Sequence[int] = (),
    ) -> None:
        self.setup = setup
        self.num_labels = num_labels
        self.device = device
        self.mask_channels = list(mask_channels)  # channels normalised with use_mask_for_norm

    @torch.no_grad()
    def __call__(
        self, batch: dict[str, torch.Tensor], augment: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        image = to_device(batch["image"], dev)
        seg = to_device(batch["seg"], dev)
        if batch["image_big"].shape[0] > 0:
            big_img, big_seg = warp(
                to_device(batch["image_big"], dev),
                to_device(batch["seg_big"], dev),
                batch["matrices"],
                self.setup.patch_size,
                self.num_labels,
            )
            image = torch.cat([image, big_img])
            seg = torch.cat([seg, big_seg])
        if augment and "noise" in batch:
            gen = None
            if "noise_seed" in batch:
                gen = torch.Generator(device=dev)
                gen.manual_seed(int(batch["noise_seed"]))
            params = {k: batch[k] for k in (
                "noise", "blur", "brightness", "contrast", "lowres", "gamma_inv", "gamma", "mirror"
            )}
            image, seg = apply_intensity_and_mirror(
                image, seg, params, self.setup.dummy_2d, gen
            )
        if self.mask_channels:  # nnU-Net's MaskImageTransform: 0 outside the body
            image = image.clone()
            outside = seg < 0
            for c in self.mask_channels:
                image[:, c : c + 1] = image[:, c : c + 1].masked_fill(outside, 0.0)
        return image.contiguous(), seg.contiguous()
