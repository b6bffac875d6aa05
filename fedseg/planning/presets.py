"""Plan presets: nnU-Net's plan as is, or a shrunken one for CPU demos and tests.

nnU-Net's 3d_fullres plan (32→320 features, patch near the median shape) is what a GPU site
should train; on a CPU it takes seconds per iteration. The "tiny" preset keeps the plan's
topology (spacing, normalisation, pooling per axis) but caps the features and the patch edge so
that the whole pipeline — and the federation tests — run in seconds on two cores. The preset is
recorded in ``data_identifier``, so it changes the plan's hash and never shares a cache with
the real plan.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fedseg.planning.plan import Plan

Preset = Literal["nnunet", "tiny"]


MAX_PATCH_2D = 256
"""The tiny preset's patch edge for 2d configurations: a 2D patch of 256^2 costs about what a
32^3 one does, and 32 pixels would be too little context for a natural image (the optic disc of
a 512^2 fundus crop is ~100 pixels across)."""


def apply_preset(
    plan: Plan, preset: Preset, max_features: int = 32, max_patch: int = 32, base: int = 4
) -> Plan:
    if preset == "nnunet":
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
