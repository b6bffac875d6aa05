"""Patch sampling the nnU-Net way, and a loader that keeps the device fed.

What a batch is (nnU-Net v2's ``nnUNetDataLoader``): ``batch_size`` cases drawn uniformly WITH
replacement; the last ``batch_size - round(batch_size * (1 - oversample))`` samples of the batch
are centred on a random stored voxel of a random class present in the case (1/3 oversampling:
one sample of two at batch size 2, as in nnU-Net); the others are placed uniformly, allowing the
patch to hang over the border by the augmentation margin. Patches are read from memory-mapped
``.npy`` files (only the patch is touched) and padded where they leave the case: image with 0,
labels with -1 (nnU-Net's values).

Determinism: batch ``i`` is a pure function of ``(seed, i)`` — a numpy generator seeded with
``[seed, i]`` picks cases, boxes and every augmentation parameter. A trainer that resumes at
iteration ``i`` therefore sees exactly the batches an uninterrupted run would have, whatever
the number of workers and without saving any worker RNG state.

Keeping the GPU fed: batches are made in ``DataLoader`` worker processes (or, with 0 workers,
one background thread), pinned, and copied to the GPU on a side CUDA stream one batch ahead
(:class:`DevicePrefetcher`), so the copy overlaps the previous step. The voxel-heavy
augmentation then runs on the GPU (``fedseg.training.augment``); the CPU side only crops.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from fedseg.errors import FedsegError
from fedseg.training.augment import AugmentConfig, SpatialSetup, sample_params, sample_spatial
from fedseg.training.preprocess import PreprocessedDataset, case_paths

DEVICE_KEYS = ("image", "seg", "image_big", "seg_big")  # the big tensors; params stay on CPU
_LOCATION_CACHE_SIZE = 64


def num_foreground_samples(batch_size: int, oversample_foreground: float) -> int:
    """How many samples of a batch are forced onto foreground (nnU-Net's rule, incl. round)."""
    return batch_size - round(batch_size * (1 - oversample_foreground))


def get_bbox(
    shape: Sequence[int],
    patch: Sequence[int],
    need_to_pad: Sequence[int],
    rng: np.random.Generator,
    locations: dict[str, np.ndarray] | None,
) -> list[int]:
    """Lower corner of a ``patch`` box in a case of ``shape`` (nnU-Net's ``get_bbox``).

    ``locations`` given (a foreground sample): centre on a random voxel of a random class that
    has voxels; else (or if no class has any) a uniform box. Boxes may extend past the case.
    """
    nd = len(shape)
    need = [int(n) for n in need_to_pad]
    for d in range(nd):
        if need[d] + shape[d] < patch[d]:
            need[d] = patch[d] - shape[d]
    lbs = [(-need[d]) // 2 for d in range(nd)]
    ubs = [shape[d] + need[d] // 2 + need[d] % 2 - patch[d] for d in range(nd)]
    if locations is not None:
        eligible = [k for k, v in locations.items() if len(v) > 0]
        if eligible:
            vox = locations[eligible[rng.integers(len(eligible))]]
            v = vox[rng.integers(len(vox))]
            return [max(lbs[d], int(v[d]) - patch[d] // 2) for d in range(nd)]
    return [int(rng.integers(lbs[d], ubs[d] + 1)) for d in range(nd)]


def crop_padded(
    arr: np.ndarray,
    lower: Sequence[int],
    size: Sequence[int],
    fill: float,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``arr[:, lower:lower+size]`` (spatial axes), ``fill`` where the box leaves ``arr``.

    Written into ``out`` when given (any dtype: the copy converts), so a batch is assembled in
    place without an extra stacking copy.
    """
    if out is None:
        out = np.empty((arr.shape[0], *size), dtype=arr.dtype)
    src, dst = [slice(None)], [slice(None)]
    inside = True
    for lo, sz, n in zip(lower, size, arr.shape[1:], strict=True):
        a, b = max(lo, 0), min(lo + sz, n)
        if b <= a:
            out.fill(fill)
            return out
        inside = inside and a == lo and b == lo + sz
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    if not inside:
        out.fill(fill)
    out[tuple(dst)] = arr[tuple(src)]
    return out


class PatchSampler:
    """Makes batch ``i`` of a preprocessed folder (picklable: DataLoader workers hold a copy)."""

    def __init__(
        self,
        folder: str | Path,
        setup: SpatialSetup,
        batch_size: int,
        oversample_foreground: float = 0.33,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        case_ids: Sequence[str] | None = None,
    ) -> None:
        self.dataset = PreprocessedDataset(folder)
        if len(self.dataset) == 0:
            raise FedsegError(
                f"{self.dataset.folder}: no preprocessed cases; preprocess the site's data first"
            )
        if batch_size < 1:
            raise FedsegError(f"batch size must be at least 1, got {batch_size}")
        if case_ids is None:
            self.case_ids = list(self.dataset.case_ids)
        else:  # a training split
            self.case_ids = sorted(case_ids)
            missing = [c for c in self.case_ids if c not in self.dataset]
            if missing or not self.case_ids:
                raise FedsegError(
                    f"{self.dataset.folder}: training case(s) not preprocessed: "
                    f"{', '.join(missing[:5]) or '(none given)'}; preprocess the site's data again"
                )
        self.num_channels = int(self._open(self.case_ids[0])[0].shape[0])
        self.setup = setup
        self.batch_size = batch_size
        self.n_fg = num_foreground_samples(batch_size, oversample_foreground)
        self.augment = augment
        self.seed = int(seed)
        self._locations: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()

    def _open(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        # straight to the arrays: PreprocessedDataset.load would also parse the properties JSON
        data_p, seg_p, _ = case_paths(self.dataset.folder, case_id)
        return np.load(data_p, mmap_mode="r"), np.load(seg_p, mmap_mode="r")

    def _class_locations(self, case_id: str) -> dict[str, np.ndarray]:
        hit = self._locations.get(case_id)
        if hit is None:
            hit = self.dataset.class_locations(case_id)
            self._locations[case_id] = hit
            if len(self._locations) > _LOCATION_CACHE_SIZE:
                self._locations.popitem(last=False)
        else:
            self._locations.move_to_end(case_id)
        return hit

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index``: patches split into plain ("image", "seg") and to-be-warped
        ("image_big", "seg_big", "matrices"), plus augmentation parameters in that order."""
        rng = np.random.default_rng([self.seed, int(index)])
        ps, big = self.setup.patch_size, self.setup.initial_patch_size
        offset = [(b - p) // 2 for b, p in zip(big, ps, strict=True)]
        need = [b - p for b, p in zip(big, ps, strict=True)]
        small: list[tuple[str, list[int]]] = []
        large: list[tuple[str, list[int]]] = []
        mats = []
        for j in range(self.batch_size):
            cid = self.case_ids[int(rng.integers(len(self.case_ids)))]
            shape = self._open(cid)[0].shape[1:]
            force_fg = j >= self.batch_size - self.n_fg
            locs = self._class_locations(cid) if force_fg else None
            lower = get_bbox(shape, big, need, rng, locs)
            m = sample_spatial(rng, self.setup, self.augment) if self.augment else None
            if m is None:  # no warp: nnU-Net's centre crop of the large box, read directly
                small.append((cid, [lo + o for lo, o in zip(lower, offset, strict=True)]))
            else:
                large.append((cid, lower))
                mats.append(m)
        c = self.num_channels

        def fill(items: list[tuple[str, list[int]]], size: list[int]):
            img = torch.empty((len(items), c, *size), dtype=torch.float32)
            seg = torch.empty((len(items), 1, *size), dtype=torch.int16)
            for k, (cid, lower) in enumerate(items):
                data, lab = self._open(cid)
                crop_padded(data, lower, size, 0.0, out=img[k].numpy())
                crop_padded(lab, lower, size, -1, out=seg[k].numpy())
            return img, seg

        image, seg = fill(small, ps)
        image_big, seg_big = fill(large, big)
        out = {
            "image": image,
            "seg": seg,
            "image_big": image_big,
            "seg_big": seg_big,
            "matrices": torch.from_numpy(np.asarray(mats, dtype=np.float32).reshape(-1, 3, 3)),
        }
        if self.augment is not None:
            out.update(sample_params(rng, self.batch_size, c, self.setup, self.augment))
            out["noise_seed"] = torch.tensor(int(rng.integers(2**62)))
        return out


class _BatchDataset(torch.utils.data.Dataset):
    def __init__(self, sampler: PatchSampler, start: int, count: int) -> None:
        self.sampler, self.start, self.count = sampler, start, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.sampler.batch(self.start + i)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _pin(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.pin_memory() for k, v in batch.items()}


def _threaded(make: Iterator[dict[str, torch.Tensor]], depth: int) -> Iterator[dict[str, torch.Tensor]]:
    """Run ``make`` in one background thread, ``depth`` batches ahead (numpy copies drop the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def run() -> None:
        try:
            for item in make:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as err:  # re-raised in the consumer
            q.put(err)

    t = threading.Thread(target=run, name="fedseg-loader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


def batch_iterator(
    sampler: PatchSampler,
    start: int,
    count: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch: int = 4,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches ``start .. start+count-1`` in order, made in the background."""
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(
            _BatchDataset(sampler, start, count),
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=max(1, prefetch // num_workers + 1),
            worker_init_fn=_worker_init,
            persistent_workers=False,
        )
        yield from loader
        return
    gen = (sampler.batch(start + i) for i in range(count))
    if pin_memory:
        gen = (_pin(b) for b in gen)
    yield from _threaded(gen, depth=prefetch)


class DevicePrefetcher:
    """Copies the big tensors of the next batch to ``device`` on a side CUDA stream.

    On a CPU device it just passes batches through. Parameters (small tensors that steer
    control flow in the augmenter) stay on the CPU so that reading them never syncs the GPU.
    """

    def __init__(self, batches: Iterator[dict[str, torch.Tensor]], device: torch.device) -> None:
        self.it = iter(batches)
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        self._next = self._load()

    def _load(self) -> dict[str, torch.Tensor] | None:
        try:
            batch = next(self.it)
        except StopIteration:
            return None
        if not self.cuda:
            return batch
        with torch.cuda.stream(self.stream):
            for k in DEVICE_KEYS:
                batch[k] = batch[k].to(self.device, non_blocking=True)
        return batch

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self._next
        if batch is None:
            raise StopIteration
        if self.cuda:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_stream(self.stream)
            for k in DEVICE_KEYS:
                batch[k].record_stream(cur)
        self._next = self._load()
        return batch
