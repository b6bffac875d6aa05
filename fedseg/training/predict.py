"""Prediction: images in, label maps out in the input's own format, through a model bundle
(``fedseg predict``; readers and writers: ``fedseg.data.io``).

Why it reuses :func:`fedseg.training.preprocess.preprocess_case`: the network must see exactly
what training saw, and every step done there (transpose, crop, resample) is undone here in the
reverse order, as nnU-Net v2's ``export_prediction`` does: resample the logits back to the
cropped grid -> argmax -> paste into the uncropped volume (background outside the bbox) ->
transpose back -> write with the input's exact shape, affine and header.

Inference is MONAI's ``sliding_window_inference`` with the plan's patch size, overlap 0.5 and
Gaussian blending (sigma = 1/8 of the patch, nnU-Net's), plus nnU-Net's mirroring test-time
augmentation on every patch (all 2^ndim flips over the spatial axes). As in nnU-Net v2 (not v1)
the flips and the overlapping windows are averaged as LOGITS, and the logits are resampled to
the original grid before the argmax (linear; nearest along the out-of-plane axis of anisotropic
data, as nnU-Net's ``resampling_fn_probabilities``). bf16 autocast on CUDA, fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from fedseg.data.dataset import CaseFiles, DatasetJson, load_case
from fedseg.data.io import SUPPORTED_ENDINGS, ending_of, io_for, io_for_ending, strip_ending
from fedseg.data.labels import LabelLayout
from fedseg.errors import FedsegError
from fedseg.models.bundle import load_bundle
from fedseg.models.network import build_network, load_weights
from fedseg.planning.plan import Plan
from fedseg.training.preprocess import (
    CaseProperties,
    preprocess_case,
    resample_tensor,
    separate_z_axis,
)

ProgressFn = Callable[[int, int], None]
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<chan>\d{4})$")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA GPU if there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise FedsegError(
            f"device '{device}': not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FedsegError(f"device '{device}': no CUDA GPU is visible here; use --device cpu")
    return dev


# --------------------------------------------------------------------------------------------
# inputs


def group_inputs(inputs: str | Path | Sequence[str | Path], ds: DatasetJson) -> list[CaseFiles]:
    """Group image files into cases (``CASE_XXXX<ending>`` = channel XXXX of CASE).

    ``inputs`` is a folder in nnU-Net layout or a list of files. A single-channel model — or a
    format whose one file holds every channel (RGB PNG) — also accepts files without the
    ``_0000`` suffix (the case id is then the file name).
    """
    n_chan = ds.num_channels
    multi = io_for_ending(ds.file_ending).multichannel_files
    kinds = " / ".join(SUPPORTED_ENDINGS)
    if isinstance(inputs, str | Path):
        folder = Path(inputs)
        if not folder.is_dir():
            if folder.is_file():
                return group_inputs([folder], ds)
            raise FedsegError(f"{folder}: no such file or folder; give image files or a folder")
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                       and strip_ending(p.name))
        if not files:
            raise FedsegError(
                f"{folder}: no {kinds} files; give a folder of CASE_0000{ds.file_ending}"
            )
    else:
        files = [Path(p) for p in inputs]
        if not files:
            raise FedsegError("no input files given; pass image files or a folder")
    by_case: dict[str, dict[int, Path]] = {}
    for p in files:
        if not p.is_file():
            raise FedsegError(f"{p}: missing input file")
        stem = strip_ending(p.name)
        if stem is None:
            raise FedsegError(f"{p}: not an image file name ({kinds} expected)")
        m = _CHANNEL_RE.match(stem)
        if m:
            case, chan = m["case"], int(m["chan"])
        elif n_chan == 1 or multi:
            case, chan = stem, 0
        else:
            raise FedsegError(
                f"{p}: the model takes {n_chan} channels; name the files CASE_0000"
                f"{ds.file_ending} .. CASE_{n_chan - 1:04d}{ds.file_ending}"
            )
        chans = by_case.setdefault(case, {})
        if chan in chans:
            raise FedsegError(f"{p}: channel {chan} of case '{case}' given twice ({chans[chan]})")
        chans[chan] = p
    cases = []
    names = ", ".join(f"{k}={v}" for k, v in ds.channel_names.items())
    for case, chans in sorted(by_case.items()):
        extra = sorted(c for c in chans if c >= n_chan)
        if extra:
            raise FedsegError(
                f"{chans[extra[0]]}: channel {extra[0]} but the model takes {n_chan} channel(s) "
                f"({names}); remove the file or use a model trained on these channels"
            )
        missing = [c for c in range(n_chan) if c not in chans]
        if multi and 0 in chans:  # one file may hold several channels: counted when read
            cases.append(CaseFiles(case, tuple(chans[c] for c in sorted(chans)), None))
            continue
        if missing:
            some = next(iter(chans.values()))
            raise FedsegError(
                f"{some.parent / f'{case}_{missing[0]:04d}{ds.file_ending}'}: missing; case "
                f"'{case}' needs {n_chan} channel file(s) ({names})"
            )
        cases.append(CaseFiles(case, tuple(chans[c] for c in range(n_chan)), None))
    return cases


# --------------------------------------------------------------------------------------------
# network


def load_network(plan: Plan, config: str, state: dict, model_dir: Path) -> torch.nn.Module:
    """The bundle's network in eval mode (weights saved with or without deep supervision)."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    err_msg = ""
    for ds_flag in (True, False):
        net = build_network(plan, config, deep_supervision=ds_flag)
        try:
            load_weights(net, state)
        except RuntimeError as err:
            err_msg = str(err).splitlines()[0]
            continue
        return net.eval()
    raise FedsegError(
        f"{model_dir / 'model.pt'}: weights do not fit the network plan.json describes "
        f"({err_msg}); re-export the bundle"
    )


def _mirror_axes_sets(ndim: int) -> list[tuple[int, ...]]:
    axes = range(2, 2 + ndim)  # tensor dims of the spatial axes (B, C, ...)
    return [c for k in range(1, ndim + 1) for c in itertools.combinations(axes, k)]


def forward_batch(device: torch.device, patch_voxels: int, first_features: int) -> int:
    """Patches (windows x mirrorings) per network call.

    On a CPU it depends on the network's size: a small network leaves the convolution kernels
    mostly waiting on per-call overhead, a large one runs out of cache when batched. Measured on
    2 cores: the tiny hippocampus network (32^3 patch, 4 features at full resolution) 18.2 ms per
    patch one at a time vs 5.2 eight at a time; the nnunet preset's (40x56x40, 32 features)
    198 ms one at a time vs 231 eight at a time. So: as many as keep the first stage's output of
    one call near 2^20 values (8 for the former, 1 for the latter). On a GPU a larger batch
    keeps it busy (16; not yet measured here)."""
    if device.type == "cuda":
        return 16
    return max(1, min(8, 2**20 // max(1, patch_voxels * first_features)))


def _first_features(net: torch.nn.Module) -> int:
    for m in net.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            return int(m.out_channels)
    return 1


def make_predictor(
    net: torch.nn.Module, device: torch.device, mirror_tta: bool, ndim: int,
    max_batch: int | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Patches -> logits (fp32), averaged over all mirrorings when ``mirror_tta``.

    Up to ``max_batch`` (default :func:`forward_batch`) mirrored patches go through the network
    as one batch: the same arithmetic either way (each patch is still predicted on its own:
    instance norm and convolutions do not mix batch entries; a test checks the equality)."""
    first = _first_features(net)
    flips: list[tuple[int, ...]] = [(), *(_mirror_axes_sets(ndim) if mirror_tta else [])]

    def autocast():
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def flip(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        return torch.flip(t, dims) if dims else t

    def predict(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        out: torch.Tensor | None = None
        batch = max_batch or forward_batch(device, math.prod(x.shape[2:]), first)
        per_call = max(1, batch // n)  # mirrorings per network call
        with autocast():
            for i in range(0, len(flips), per_call):
                group = flips[i:i + per_call]
                y = net(torch.cat([flip(x, d) for d in group])).float()
                for j, d in enumerate(group):
                    part = flip(y[j * n:(j + 1) * n], d)
                    out = part if out is None else out + part
        assert out is not None
        return out / len(flips)

    return predict


def predict_logits(
    data: np.ndarray,
    net: torch.nn.Module,
    patch_size: list[int],
    device: torch.device,
    mirror_tta: bool = True,
    sw_batch_size: int = 1,
    max_batch: int | None = None,
) -> torch.Tensor:
    """Sliding-window logits (K, *spatial) on ``device`` for a preprocessed case (C, *spatial).

    A 2d configuration (2-element patch) runs slice by slice along the first axis.
    ``max_batch``: patches per network call (default :func:`forward_batch`).
    """
    from monai.inferers import sliding_window_inference

    ndim = len(patch_size)
    arr = np.ascontiguousarray(data, dtype=np.float32)
    if not arr.flags.writeable:  # a memory-mapped cache file: torch wants writable memory
        arr = arr.copy()
    x = torch.from_numpy(arr).to(device)
    x = x[None] if ndim == 3 else x.permute(1, 0, 2, 3)  # (B, C, ...)
    out = sliding_window_inference(
        x,
        roi_size=list(patch_size),
        sw_batch_size=sw_batch_size,
        predictor=make_predictor(net, device, mirror_tta, ndim, max_batch),
        overlap=0.5,
        mode="gaussian",
        sigma_scale=0.125,
        padding_mode="constant",
        cval=0.0,
        sw_device=device,
        device=device,
    )
    return out[0] if ndim == 3 else out.permute(1, 0, 2, 3)


# --------------------------------------------------------------------------------------------
# back to the original grid


def segment(logits: torch.Tensor, layout: LabelLayout) -> np.ndarray:
    """Logits (K, ...) -> label map on the same grid: the argmax's label value, or for regions
    every region whose sigmoid is above 0.5 (logit > 0) painted in ``regions_class_order``."""
    if layout.has_regions:
        return layout.paint((logits > 0).cpu().numpy())
    lut = np.asarray(layout.softmax_values, dtype=np.int16)
    return lut[logits.argmax(0).cpu().numpy()]


def logits_to_segmentation(
    logits: torch.Tensor, props: CaseProperties, plan: Plan,
    label_values: Sequence[int] | None = None,
) -> np.ndarray:
    """Logits on the preprocessed grid -> label map in nnU-Net order on the original grid.

    Per output channel, so memory stays at a few volumes whatever the number of classes.
    ``label_values``: softmax channel -> label value (default: the plan's).
    """
    shape = props.shape_after_cropping_and_before_resampling
    sep = separate_z_axis(props.target_spacing, props.spacing_transposed)
    layout = plan.layout
    if layout.has_regions:
        masks = np.stack([
            (resample_tensor(logits[k : k + 1].float(), shape, sep)[0] > 0).cpu().numpy()
            for k in range(logits.shape[0])
        ])
        seg_crop = layout.paint(masks)
    else:
        best = None
        arg = None
        for k in range(logits.shape[0]):
            r = resample_tensor(logits[k : k + 1].float(), shape, sep)[0]
            if best is None:
                best, arg = r, torch.zeros(r.shape, dtype=torch.int64, device=r.device)
            else:
                win = r > best
                arg[win] = k
                best = torch.where(win, r, best)
        assert arg is not None
        values = layout.softmax_values if label_values is None else label_values
        lut = np.asarray(values, dtype=np.int64)
        seg_crop = lut[arg.cpu().numpy()]
    return to_original_grid(seg_crop, props, plan)


def to_original_grid(cropped: np.ndarray, props: CaseProperties, plan: Plan,
                     fill: float | np.ndarray = 0) -> np.ndarray:
    """An array on the cropped grid (optionally with leading channel axes) pasted into the
    uncropped volume and transposed back to nnU-Net array order: the last step of a label map
    (:func:`logits_to_segmentation`) and of probabilities (ensembles) alike. ``fill``: what lies
    outside the crop (a scalar, or per channel broadcastable like ``(K, 1, 1, 1)``)."""
    lead = cropped.ndim - len(props.shape_before_cropping)
    full = np.empty((*cropped.shape[:lead], *props.shape_before_cropping), dtype=cropped.dtype)
    full[...] = fill
    full[(Ellipsis, *(slice(lo, hi) for lo, hi in props.bbox_used_for_cropping))] = cropped
    full = full.transpose([*range(lead), *(i + lead for i in plan.transpose_backward)])
    assert list(full.shape[lead:]) == props.original_shape, (full.shape, props.original_shape)
    return np.ascontiguousarray(full)


def write_like(seg_nnunet_order: np.ndarray, reference: Path, out_path: Path) -> Path:
    """Write a label map in ``reference``'s format with its shape and geometry (integer
    dtype); the format's writer is chosen by the reference's ending (``fedseg.data.io``)."""
    return io_for(reference).write_seg(seg_nnunet_order, reference, out_path)


# --------------------------------------------------------------------------------------------
# the entry point


def load_bundle_checked(model_dir: Path):
    """:func:`load_bundle`, with corrupt files turned into one clear line."""
    try:
        return load_bundle(model_dir)
    except FedsegError:
        raise
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise FedsegError(
            f"{model_dir}: invalid bundle file (field '{field}': {first['msg']}); re-export it"
        ) from None
    except Exception as err:  # torch.load: pickle / zip / EOF errors of a corrupt file
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FedsegError(
            f"{model_dir / 'model.pt'}: unreadable weights ({msg[:120]}); re-export the bundle"
        ) from None


def predict_files(
    model_dir: str | Path,
    inputs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    device: str | torch.device = "auto",
    mirror_tta: bool = True,
    progress: ProgressFn | None = None,
    sw_batch_size: int = 1,
    postprocess: bool = True,
) -> list[Path]:
    """Segment every case of ``inputs`` with the bundle in ``model_dir``; returns written files.

    Output: ``OUT_DIR/CASE<ending>`` per case in the input's format, integer labels (uint8
    when they fit), with the input's shape and geometry (NIfTI: affine and header; SimpleITK
    formats: spacing, origin, direction; PNG: the image's size). ``progress(done, total)`` is
    called after each case. ``postprocess``: apply the bundle's postprocessing decision (if
    it has one) to each label map on the original grid, as nnU-Net does after export.
    """
    model_dir = Path(model_dir)
    plan, ds, state, info = load_bundle_checked(model_dir)  # a missing folder: one line too
    pp = info.postprocessing if postprocess else None
    config = info.config or plan.default_configuration
    cfg = plan.config(config)
    if len(ds.channel_names) != len(plan.channel_names):
        raise FedsegError(
            f"{model_dir}: dataset.json has {len(ds.channel_names)} channel(s), plan.json "
            f"{len(plan.channel_names)}; the bundle is inconsistent, re-export it"
        )
    if dict(ds.labels) != dict(plan.labels):
        raise FedsegError(
            f"{model_dir}: dataset.json declares labels {ds.labels}, plan.json "
            f"{plan.labels}; the bundle is inconsistent, re-export it"
        )
    cases = group_inputs(inputs, ds)
    dev = resolve_device(device)
    net = load_network(plan, config, state, model_dir).to(dev)
    out_dir = Path(out_dir)
    written = []
    with torch.inference_mode():
        for i, files in enumerate(cases):
            case = load_case(files, with_label=False, num_channels=len(plan.channel_names))
            pc = preprocess_case(case, plan, config)
            del case
            logits = predict_logits(pc.data, net, cfg.patch_size, dev, mirror_tta, sw_batch_size)
            seg = logits_to_segmentation(logits, pc.properties, plan)
            del logits, pc
            if pp is not None:
                seg = pp.apply(seg)
            ref = files.images[0]
            ending = ending_of(ref.name) or plan.file_ending
            written.append(write_like(seg, ref, out_dir / f"{files.case_id}{ending}"))
            if progress is not None:
                progress(i + 1, len(cases))
    return written
