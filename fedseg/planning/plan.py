"""The plan: everything training, inference and the federation need to agree on.

It mirrors nnU-Net v2's ``nnUNetPlans.json`` (same names where a field has a twin there, so a
plan can be compared with nnU-Net's field by field) but is a pydantic model: it is validated
when read, it travels between server and sites, and it is saved with every run and inside every
model bundle. All per-axis lists are in the plan's TRANSPOSED axis order (nnU-Net's
``transpose_forward`` applied to nnU-Net/SimpleITK array order, see ``fedseg.data.dataset``).

Configurations are nnU-Net's: ``3d_fullres`` and ``2d`` always (3D data), and — when nnU-Net's
planner makes them (a fullres patch covers under 25 % of the median image) — ``3d_lowres``
(``next_stage = "3d_cascade_fullres"``) and ``3d_cascade_fullres``. nnU-Net stores the cascade
as ``{"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}``; fedseg stores it
RESOLVED (what nnU-Net's ``PlansManager.get_configuration`` returns: 3d_fullres' fields plus
those two), so every consumer reads one complete configuration. fedseg trains 2d, 3d_fullres
and 3d_lowres; training the cascade's second stage (3d_fullres fed with the 3d_lowres
model's upsampled prediction) is NOT implemented: choosing it is a :class:`FedsegError`.

A configuration's network is nnU-Net's ``PlainConvUNet`` unless its ``architecture`` says
``ResidualEncoderUNet`` (nnU-Net's ResEnc M/L presets, ``fedseg.planning.planners``).

The plan's hash must not move for plans that existed before a field was added (run
checkpoints, caches and bundles are keyed by it): fields added later are left out of the
hashed JSON while they are None or hold nnU-Net's default (``_HASH_NEUTRAL``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedseg.config_io import load_json_model
from fedseg.data.dataset_json import DatasetJson
from fedseg.data.labels import LabelLayout
from fedseg.errors import FedsegError

PLAN_VERSION = 1


class IntensityProperties(BaseModel):
    """Foreground intensity statistics of one channel over the pooled dataset."""

    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


CASCADE = "3d_cascade_fullres"
TRAINABLE = ("2d", "3d_fullres", "3d_lowres")


class ResamplingKwargs(BaseModel):
    """Keyword arguments of nnU-Net's ``resample_data_or_seg_to_shape`` (spline ``order``
    in-plane; ``order_z`` along the one coarse axis when the spacing is anisotropic, > 3x;
    ``force_separate_z`` None: decide by that rule)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # shared as field defaults

    is_seg: bool
    order: int = Field(ge=0, le=5)
    order_z: int = Field(ge=0, le=5)
    force_separate_z: bool | None = None


RESAMPLE_FN = "resample_data_or_seg_to_shape"
# ExperimentPlanner.determine_resampling / determine_segmentation_softmax_export_fn (2.8.1):
# images order 3, segmentations order 1 (on each label's one-hot mask), probabilities order 1,
# order 0 along the coarse axis of anisotropic data
DATA_RESAMPLING = ResamplingKwargs(is_seg=False, order=3, order_z=0)
SEG_RESAMPLING = ResamplingKwargs(is_seg=True, order=1, order_z=0)
PROBABILITIES_RESAMPLING = ResamplingKwargs(is_seg=False, order=1, order_z=0)


class ConfigurationPlan(BaseModel):
    """One nnU-Net configuration ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")."""

    model_config = ConfigDict(extra="forbid")

    data_identifier: str
    spacing: list[float]
    median_image_size_in_voxels: list[float]
    patch_size: list[int]
    batch_size: int
    # nnU-Net's schemes, chosen by channel name (see fedseg.planning.planner)
    normalization_schemes: list[
        Literal[
            "CTNormalization",
            "ZScoreNormalization",
            "NoNormalization",
            "RescaleTo01Normalization",
            "RGBTo01Normalization",
        ]
    ]
    use_mask_for_norm: list[bool]
    n_stages: int
    features_per_stage: list[int]
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    # the network (nnU-Net's "architecture" entry): PlainConvUNet, n_conv_per_stage convs per
    # encoder stage (MONAI's DynUNet builds it), or ResidualEncoderUNet (the ResEnc presets),
    # n_blocks_per_stage residual blocks per encoder stage (fedseg.models.resenc); both with
    # n_conv_per_stage_decoder convs per decoder stage
    architecture: Literal["PlainConvUNet", "ResidualEncoderUNet"] = "PlainConvUNet"
    n_conv_per_stage: list[int] | None = None
    n_blocks_per_stage: list[int] | None = None
    n_conv_per_stage_decoder: list[int]
    batch_dice: bool
    # nnU-Net's resampling settings (fedseg.training.resample follows them)
    resampling_fn_data: Literal["resample_data_or_seg_to_shape"] = RESAMPLE_FN
    resampling_fn_data_kwargs: ResamplingKwargs = DATA_RESAMPLING
    resampling_fn_seg: Literal["resample_data_or_seg_to_shape"] = RESAMPLE_FN
    resampling_fn_seg_kwargs: ResamplingKwargs = SEG_RESAMPLING
    resampling_fn_probabilities: Literal["resample_data_or_seg_to_shape"] = RESAMPLE_FN
    resampling_fn_probabilities_kwargs: ResamplingKwargs = PROBABILITIES_RESAMPLING
    # the cascade: 3d_lowres -> next_stage 3d_cascade_fullres; 3d_cascade_fullres ->
    # previous_stage 3d_lowres, inherits_from 3d_fullres (nnU-Net's names and meaning)
    next_stage: str | None = None
    previous_stage: str | None = None
    inherits_from: str | None = None

    @model_validator(mode="after")
    def _blocks_fit_the_architecture(self) -> ConfigurationPlan:
        plain = self.architecture == "PlainConvUNet"
        encoder, other = (("n_conv_per_stage", "n_blocks_per_stage") if plain else
                          ("n_blocks_per_stage", "n_conv_per_stage"))
        per_stage = getattr(self, encoder)
        if per_stage is None or len(per_stage) != self.n_stages:
            raise ValueError(f"{self.architecture} needs '{encoder}' with n_stages = "
                             f"{self.n_stages} entries, got {per_stage}")
        if getattr(self, other) is not None:
            raise ValueError(f"'{other}' is not a field of {self.architecture}; leave it out")
        if len(self.n_conv_per_stage_decoder) != self.n_stages - 1:
            raise ValueError(f"'n_conv_per_stage_decoder' needs n_stages - 1 = "
                             f"{self.n_stages - 1} entries, got {self.n_conv_per_stage_decoder}")
        return self


# fields added after plans were first hashed: out of the hash while None or at these values
_HASH_NEUTRAL = {
    name: ConfigurationPlan.model_fields[name].default
    for name in (
        "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_seg",
        "resampling_fn_seg_kwargs", "resampling_fn_probabilities",
        "resampling_fn_probabilities_kwargs", "architecture",
    )
}


def _not_trainable(name: str) -> FedsegError:
    return FedsegError(
        f"configuration '{name}': training nnU-Net's cascade (its second stage takes the "
        "3d_lowres model's prediction as input) is not supported yet; choose one of "
        f"{', '.join(TRAINABLE)}"
    )


def with_configuration(plan: Plan, name: str | None) -> Plan:
    """``plan`` set to train configuration ``name`` (None: unchanged); the choice then travels
    with the plan to every site. Refused where the plan has no such configuration (3d_fullres
    for 2D data, 3d_lowres where nnU-Net made none) and for 3d_cascade_fullres (see the module
    docstring)."""
    if name is None:
        return plan
    plan.trainable_config(name)  # one clear line if missing or not trainable
    return plan.model_copy(update={"configuration": name})


class Plan(BaseModel):
    """A dataset-wide plan, made once per federation from the pooled fingerprint."""

    model_config = ConfigDict(extra="forbid")

    version: int = PLAN_VERSION
    dataset_name: str
    channel_names: dict[str, str]
    labels: dict[str, int | list[int]]
    regions_class_order: list[int] | None = None
    file_ending: str = ".nii.gz"
    num_training_cases: int
    gpu_memory_gb: float
    transpose_forward: list[int]
    transpose_backward: list[int]
    original_median_spacing_after_transp: list[float]
    original_median_shape_after_transp: list[float]
    foreground_intensity_properties_per_channel: dict[str, IntensityProperties]
    configurations: dict[str, ConfigurationPlan] = Field(
        description='"3d_fullres" (3D data), "2d", and where nnU-Net makes them "3d_lowres" and '
        '"3d_cascade_fullres"'
    )
    configuration: str | None = Field(
        default=None, description="the configuration to train (server.toml 'configuration'); "
        "None: nnU-Net's choice, 3d_fullres for 3D data, 2d for 2D data")

    @field_validator("configuration")
    @classmethod
    def _trainable(cls, v: str | None) -> str | None:
        if v is not None and v not in TRAINABLE:
            raise ValueError(str(_not_trainable(v)) if v == CASCADE else
                             f"'{v}' is not a configuration fedseg trains ({', '.join(TRAINABLE)})")
        return v

    @property
    def layout(self) -> LabelLayout:
        """Network outputs, regions and the ignore label (``fedseg.data.labels``)."""
        return LabelLayout.of(self.labels, self.regions_class_order)

    @property
    def num_outputs(self) -> int:
        """Channels of the network's output (softmax classes, or sigmoid regions)."""
        return self.layout.num_outputs

    @property
    def is_2d_data(self) -> bool:
        """The plan has no 3D configuration: the images are 2D (nnU-Net's rule)."""
        return "3d_fullres" not in self.configurations

    @property
    def default_configuration(self) -> str:
        """What sites train and predict with when nothing else is asked for: the plan's
        ``configuration`` (so the federation's choice travels with the plan), else nnU-Net's."""
        if self.configuration:
            return self.configuration
        return "2d" if self.is_2d_data else "3d_fullres"

    def dataset_json(self) -> DatasetJson:
        """The dataset.json declarations the plan was made for (what a bundle carries)."""
        return DatasetJson(channel_names=self.channel_names, labels=self.labels,
                           file_ending=self.file_ending, name=self.dataset_name,
                           regions_class_order=self.regions_class_order)

    @property
    def num_classes(self) -> int:
        """Distinct label values in the label maps (background and ignore included)."""
        vals: set[int] = set()
        for v in self.labels.values():
            vals.update(v if isinstance(v, list) else [v])
        return len(vals)

    def config(self, name: str | None = None) -> ConfigurationPlan:
        name = name or self.default_configuration
        if name not in self.configurations:
            raise FedsegError(
                f"plan has no configuration '{name}' (has: {', '.join(self.configurations)})"
            )
        return self.configurations[name]

    def trainable_config(self, name: str | None = None) -> ConfigurationPlan:
        """:meth:`config`, refusing what fedseg cannot train (3d_cascade_fullres)."""
        name = name or self.default_configuration
        cfg = self.config(name)
        if name not in TRAINABLE:
            raise _not_trainable(name)
        return cfg

    def canonical_json(self) -> str:
        # exclude_none: a field added with a None default leaves old plans' hashes unchanged;
        # fields added with a non-None default are dropped while they hold it (_HASH_NEUTRAL)
        data = self.model_dump(mode="json", exclude_none=True)
        neutral = {k: (v.model_dump(mode="json", exclude_none=True)
                       if isinstance(v, BaseModel) else v) for k, v in _HASH_NEUTRAL.items()}
        for cfg in data["configurations"].values():
            for key, default in neutral.items():
                if cfg.get(key) == default:
                    del cfg[key]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        """Short content hash; preprocessed-data caches are keyed by it."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")

    def check_dataset(self, plan_path: str | Path, dataset_json: str | Path,
                      channel_names: dict[str, str], labels: dict[str, int | list[int]],
                      file_ending: str | None) -> None:
        """Refuse a dataset this plan was not made for, before any work: a plan with other
        labels would train a network with the wrong number of outputs (found only at predict
        time), other channels would normalise the wrong images."""
        where = f"{plan_path} does not fit {dataset_json}"
        fix = "make a plan for this dataset with 'fedseg plan'"
        if dict(labels) != dict(self.labels):
            raise FedsegError(f"{where}: field 'labels' {labels} differs from the plan's "
                              f"{self.labels}; {fix}")
        # channel names matter where they choose the normalisation (nnU-Net: "CT" or not);
        # "MR" vs "MRI" is the same modality
        ours = {k: v.upper() == "CT" for k, v in self.channel_names.items()}
        theirs = {k: v.upper() == "CT" for k, v in channel_names.items()}
        if ours != theirs:
            raise FedsegError(f"{where}: field 'channel_names' {channel_names} differs from the "
                              f"plan's {self.channel_names}; {fix}")
        if file_ending is not None and self.file_ending and file_ending != self.file_ending:
            raise FedsegError(f"{where}: field 'file_ending' {file_ending!r} differs from the "
                              f"plan's {self.file_ending!r}; {fix}")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return load_json_model(path, cls, "plan file not found; make one with 'fedseg plan'")
