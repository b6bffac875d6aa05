"""``fedseg plan DIR [DIR ...] --out plan.json``: plan from several sites' folders on one machine.

Why: a consortium (or a tester) that can see all site folders should get exactly the plan the
federation would make: the per-site fingerprints are computed separately and ADDED, as the
secure aggregation does, never by pooling the cases.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedseg.data.dataset import read_dataset_json
from fedseg.errors import FedsegError
from fedseg.planning.fingerprint import Fingerprint, compute_fingerprint
from fedseg.planning.plan import Plan
from fedseg.planning.presets import Preset, plan_with_preset, planner_spec

SiteProgress = Callable[[str, int, int, str], None]


def plan_main(
    data_dirs: list[Path],
    out: Path,
    gpu_memory_gb: float | None = None,
    progress: SiteProgress | None = None,
    dataset_name: str = "fedseg",
    preset: Preset = "nnunet",
) -> Plan:
    """Fingerprint every site, sum, plan (nnU-Net v2 rules), save to ``out``; return the plan.

    All sites must declare the same ``channel_names`` and ``labels`` in dataset.json, else a
    :class:`FedsegError` names the first site that differs from the first one.
    ``progress(site_dir, done, total, case_id)`` is called after every case.
    ``gpu_memory_gb``: the GPU target (default 8 GB); the ResEnc presets have their own
    (nnU-Net's M 8 GB, L 24 GB: ``fedseg.planning.presets``), so giving another is refused.
    """
    if not data_dirs:
        raise FedsegError("no site folder given; pass one or more dataset folders")
    fixed = planner_spec(preset).gpu_memory_gb
    if gpu_memory_gb is not None and fixed is not None and gpu_memory_gb != fixed:
        raise FedsegError(
            f"--gpu-memory-gb {gpu_memory_gb:g}: preset {preset} is nnU-Net's plan for a "
            f"{fixed:g} GB GPU; leave --gpu-memory-gb out, or choose another --preset")
    gpu_memory_gb = 8.0 if gpu_memory_gb is None else gpu_memory_gb
    if gpu_memory_gb <= 0:
        raise FedsegError(f"--gpu-memory-gb {gpu_memory_gb}: must be positive (GiB)")
    dirs = [Path(d) for d in data_dirs]
    dss = [read_dataset_json(d) for d in dirs]
    ref = dss[0]
    for d, ds in zip(dirs[1:], dss[1:], strict=True):
        if ds.channel_names != ref.channel_names:
            raise FedsegError(
                f"{d / 'dataset.json'}: channel_names {ds.channel_names} differ from "
                f"{dirs[0] / 'dataset.json'} ({ref.channel_names}); all sites must declare the "
                "same channels in the same order"
            )
        if ds.labels != ref.labels:
            raise FedsegError(
                f"{d / 'dataset.json'}: labels {ds.labels} differ from "
                f"{dirs[0] / 'dataset.json'} ({ref.labels}); all sites must declare the same labels"
            )
    total: Fingerprint | None = None
    for d in dirs:
        cb = None
        if progress is not None:
            site_dir = str(d)

            def cb(done: int, n: int, case_id: str, _s: str = site_dir) -> None:
                progress(_s, done, n, case_id)

        fp = compute_fingerprint(d, cb)
        total = fp if total is None else total + fp
    assert total is not None
    plan = plan_with_preset(total, ref, gpu_memory_gb, dataset_name, preset)
    plan.save(out)
    return plan
