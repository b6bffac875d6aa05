"""Plan presets: nnU-Net's plan (default or ResEnc M/L planner) as is, or shrunk for CPUs.

``nnunet``: nnU-Net's default ``ExperimentPlanner`` (PlainConvUNet) for the sites' GPU budget.
``resenc_m`` / ``resenc_l``: nnU-Net's ``nnUNetPlannerResEncM`` / ``nnUNetPlannerResEncL``
(``ResidualEncoderUNet``, ``fedseg.planning.planners``) for the GPU target nnU-Net made each
for — 8 GB and 24 GB — whatever the sites report: the presets are those targets, as in
nnU-Net, where choosing M or L IS choosing the GPU (a site with less memory than the preset's
target should use a smaller preset). ``tiny`` / ``resenc_tiny``: the nnunet / resenc_m plan
shrunk as below, for CPU demos and tests (``resenc_tiny`` keeps the residual encoder and its
blocks per stage, 1-3-4-6-..., so CPU tests run the real ResEnc network).

nnU-Net's 3d_fullres plan (32→320 features, patch near the median shape) is what a GPU site
should train; on a CPU it takes seconds per iteration. The "tiny" preset keeps the plan's
topology (spacing, normalisation, pooling per axis) but caps the features and the patch edge so
that the whole pipeline — and the federation tests — run in seconds on two cores. The preset is
recorded in ``data_identifier``, so it changes the plan's hash and never shares a cache with
the real plan.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from fedseg.data.dataset_json import DatasetJson
from fedseg.planning.fingerprint import Fingerprint
from fedseg.planning.plan import Plan
from fedseg.planning.planner import make_plan
from fedseg.planning.planners import DEFAULT, RESENC_L, RESENC_M, PlannerSpec

Preset = Literal["nnunet", "tiny", "resenc_m", "resenc_l", "resenc_tiny"]
PRESETS: tuple[str, ...] = get_args(Preset)
_SPECS: dict[str, PlannerSpec] = {"nnunet": DEFAULT, "tiny": DEFAULT, "resenc_m": RESENC_M,
                                  "resenc_l": RESENC_L, "resenc_tiny": RESENC_M}
_SHRUNK = ("tiny", "resenc_tiny")


def planner_spec(preset: Preset) -> PlannerSpec:
    """The nnU-Net planner behind ``preset``."""
    return _SPECS[preset]


def planning_gpu_memory(preset: Preset, gpu_memory_gb: float) -> float:
    """The GPU target the plan is made for: the preset's own (ResEnc: nnU-Net's 8 / 24 GB) or,
    for the default planner, ``gpu_memory_gb`` (the smallest site GPU, or the override)."""
    return planner_spec(preset).gpu_memory_gb or gpu_memory_gb


def plan_with_preset(fp: Fingerprint, ds: DatasetJson, gpu_memory_gb: float,
                     dataset_name: str, preset: Preset = "nnunet") -> Plan:
    """The plan of ``preset``'s planner for the (summed) fingerprint, shrunk where the preset
    says; what both the server and ``fedseg plan`` make."""
    spec = planner_spec(preset)
    plan = make_plan(fp, ds, gpu_memory_gb=planning_gpu_memory(preset, gpu_memory_gb),
                     dataset_name=dataset_name, spec=spec)
    return apply_preset(plan, preset)


MAX_PATCH_2D = 256
"""The tiny preset's patch edge for 2d configurations: a 2D patch of 256^2 costs about what a
32^3 one does, and 32 pixels would be too little context for a natural image (the optic disc of
a 512^2 fundus crop is ~100 pixels across)."""


def apply_preset(
    plan: Plan, preset: Preset, max_features: int = 32, max_patch: int = 32, base: int = 4
) -> Plan:
    """``plan`` shrunk for CPUs where ``preset`` is a tiny one, else unchanged."""
    if preset not in _SHRUNK:
        return plan
    out = plan.model_copy(deep=True)
    for name, cfg in out.configurations.items():
        strides = np.array(cfg.strides)
        total = strides.prod(axis=0)  # overall downsampling per axis
        edge = MAX_PATCH_2D if len(cfg.patch_size) == 2 else max_patch
        patch = []
        for ax, p in enumerate(cfg.patch_size):
            t = int(total[ax])
            cap = max(t, (edge // t) * t)
            patch.append(int(min(p, cap)))
        cfg.patch_size = patch
        cfg.features_per_stage = [min(base * 2**i, max_features) for i in range(cfg.n_stages)]
        cfg.batch_size = 2
        cfg.data_identifier = f"{cfg.data_identifier}_tiny"
        out.configurations[name] = cfg
    return out
