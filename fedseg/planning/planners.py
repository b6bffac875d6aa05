"""nnU-Net's planners as data: the default ``ExperimentPlanner`` and the residual-encoder ones.

nnU-Net v2.8.1 (``experiment_planners/residual_unets/residual_encoder_unet_planners.py``) makes
its ResEnc M and L plans with the default planner's rules and four differences, which is all a
:class:`PlannerSpec` holds:

1. the network class (``ResidualEncoderUNet``: a residual encoder of ``n_blocks_per_stage``
   BasicBlockD per stage, (1, 3, 4, 6, 6, ...), and one conv per decoder stage) and so its
   feature-map estimate (:func:`resenc_feature_map_size`, a transcription of
   ``ResidualEncoderUNet.compute_conv_feature_map_size``);
2. the reference values the estimate is compared with (M: 680e6 3D / 135e6 2D per 8 GB;
   L: 2.1e9 / 380e6 per 24 GB) and the GPU target the preset is made for (M 8 GB, L 24 GB);
3. the patch shrinks while ``estimate > reference`` (the default planner's loop tests
   ``estimate / ref_bs * 2 > reference``);
4. ``max_dataset_covered = 1`` (the default caps the batch at 5 % of the dataset's voxels).

Data identifiers are nnU-Net's too: a ResEnc plan's 2d and 3d_fullres data is the default
plan's (``nnUNetPlans_3d_fullres``), its 3d_lowres is ``nnUNetResEncUNetMPlans_3d_lowres``.

Why a transcription and not ``dynamic_network_architectures`` itself for the estimate: nnU-Net
instantiates the full network for every candidate patch size (a 3D ResEnc L has ~100 M
parameters), which costs seconds per plan on a server that otherwise plans in milliseconds
and would pull torch into the server's planning; ``tests/test_resenc.py`` checks the
transcription against the package's own ``compute_conv_feature_map_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

NetworkClass = Literal["PlainConvUNet", "ResidualEncoderUNet"]


@dataclass(frozen=True)
class PlannerSpec:
    """What distinguishes one nnU-Net planner from another (see the module docstring)."""

    name: str  # nnU-Net's planner class
    plans_identifier: str  # nnU-Net's default plans_name
    network_class_name: NetworkClass
    reference_val_3d: float
    reference_val_2d: float
    reference_val_corresp_gb: float
    blocks_per_stage_encoder: tuple[int, ...]
    blocks_per_stage_decoder: tuple[int, ...]
    max_dataset_covered: float
    batch_size_corrected_loop: bool  # default planner: shrink while estimate / ref_bs * 2 > ref
    gpu_memory_gb: float | None  # the fixed target the preset is made for; None: the sites'

    def data_identifier(self, configuration_name: str) -> str:
        """``generate_data_identifier``: ResEnc shares the default plan's 2d / 3d_fullres data."""
        if self.network_class_name == "ResidualEncoderUNet" and configuration_name not in (
            "2d", "3d_fullres"
        ):
            return f"{self.plans_identifier}_{configuration_name}"
        return f"nnUNetPlans_{configuration_name}"

    def feature_map_size(self, patch_size: Any, strides: list[list[int]], features: list[int],
                         num_classes: int) -> int:
        """``static_estimate_VRAM_usage``: the network's conv feature map size at this patch."""
        n = len(strides)
        enc = list(self.blocks_per_stage_encoder[:n])
        dec = list(self.blocks_per_stage_decoder[:n - 1])
        if self.network_class_name == "ResidualEncoderUNet":
            return resenc_feature_map_size(patch_size, strides, features, enc, dec, num_classes)
        return plain_feature_map_size(patch_size, strides, features, enc, dec, num_classes)

    def architecture_fields(self, n_stages: int) -> dict[str, Any]:
        """The plan's architecture fields (``fedseg.planning.plan.ConfigurationPlan``)."""
        enc = [int(b) for b in self.blocks_per_stage_encoder[:n_stages]]
        dec = [int(b) for b in self.blocks_per_stage_decoder[:n_stages - 1]]
        if self.network_class_name == "ResidualEncoderUNet":
            return {"architecture": "ResidualEncoderUNet", "n_blocks_per_stage": enc,
                    "n_conv_per_stage": None, "n_conv_per_stage_decoder": dec}
        return {"n_conv_per_stage": enc, "n_conv_per_stage_decoder": dec}


def _stage_sizes(patch_size: Any, strides: list[list[int]]) -> list[list[int]]:
    sizes, size = [], [int(i) for i in patch_size]
    for st in strides:
        size = [i // j for i, j in zip(size, st, strict=True)]
        sizes.append(size)
    return sizes


def plain_feature_map_size(patch_size: Any, strides: list[list[int]], features: list[int],
                           n_conv: list[int], n_conv_decoder: list[int], num_classes: int) -> int:
    """``PlainConvUNet.compute_conv_feature_map_size`` (no deep supervision): encoder stage s
    n_conv x F_s x prod(size_s); decoder stage j (n_conv_dec + 1 transposed conv) x F_j x
    prod(size_j); the segmentation output num_classes x prod(size_0)."""
    sizes = _stage_sizes(patch_size, strides)
    out = sum(n_conv[s] * f * math.prod(sizes[s]) for s, f in enumerate(features))
    for j in range(len(features) - 1):
        out += (n_conv_decoder[len(features) - 2 - j] + 1) * features[j] * math.prod(sizes[j])
    return out + num_classes * math.prod(sizes[0])


def resenc_feature_map_size(patch_size: Any, strides: list[list[int]], features: list[int],
                            n_blocks: list[int], n_conv_decoder: list[int],
                            num_classes: int) -> int:
    """``ResidualEncoderUNet.compute_conv_feature_map_size`` (dynamic_network_architectures,
    no deep supervision): the stem conv (F_0 at full size); per encoder stage s two convs per
    BasicBlockD at size_s, plus the first block's 1x1 projection where the stage changes the
    channels or the size; the decoder as in :func:`plain_feature_map_size`."""
    size_in = [int(i) for i in patch_size]
    out = features[0] * math.prod(size_in)  # stem: one conv, stride 1
    channels_in = features[0]
    for s, f in enumerate(features):
        size = [i // j for i, j in zip(size_in, strides[s], strict=True)]
        vox = math.prod(size)
        out += 2 * f * vox  # first block's conv1 + conv2
        if channels_in != f or size != size_in:
            out += f * vox  # its skip projection
        out += (n_blocks[s] - 1) * 2 * f * vox
        size_in, channels_in = size, f
    sizes = _stage_sizes(patch_size, strides)
    for j in range(len(features) - 1):
        out += (n_conv_decoder[len(features) - 2 - j] + 1) * features[j] * math.prod(sizes[j])
    return out + num_classes * math.prod(sizes[0])


# ExperimentPlanner.__init__ (nnunetv2 2.8.1)
DEFAULT = PlannerSpec(
    name="ExperimentPlanner", plans_identifier="nnUNetPlans", network_class_name="PlainConvUNet",
    reference_val_3d=560000000, reference_val_2d=85000000, reference_val_corresp_gb=8,
    blocks_per_stage_encoder=(2,) * 14, blocks_per_stage_decoder=(2,) * 13,
    max_dataset_covered=0.05, batch_size_corrected_loop=True, gpu_memory_gb=None,
)
_RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
# nnUNetPlannerResEncM / nnUNetPlannerResEncL (their gpu_memory_target_in_gb defaults)
RESENC_M = PlannerSpec(
    name="nnUNetPlannerResEncM", plans_identifier="nnUNetResEncUNetMPlans",
    network_class_name="ResidualEncoderUNet", reference_val_3d=680000000,
    reference_val_2d=135000000, reference_val_corresp_gb=8,
    blocks_per_stage_encoder=_RESENC_BLOCKS, blocks_per_stage_decoder=(1,) * 12,
    max_dataset_covered=1, batch_size_corrected_loop=False, gpu_memory_gb=8,
)
RESENC_L = PlannerSpec(
    name="nnUNetPlannerResEncL", plans_identifier="nnUNetResEncUNetLPlans",
    network_class_name="ResidualEncoderUNet", reference_val_3d=2100000000,
    reference_val_2d=380000000, reference_val_corresp_gb=24,
    blocks_per_stage_encoder=_RESENC_BLOCKS, blocks_per_stage_decoder=(1,) * 12,
    max_dataset_covered=1, batch_size_corrected_loop=False, gpu_memory_gb=24,
)
