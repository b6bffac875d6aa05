"""nnU-Net v2's ``dataset.json`` as a pydantic model.

Kept apart from the image reader (``dataset.py``) because the server needs the label and channel
declarations but must never import code that touches a site's images.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class DatasetJson(BaseModel):
    """The fields of nnU-Net v2's ``dataset.json`` that fedseg uses (others are kept, ignored)."""

    model_config = ConfigDict(extra="allow")

    channel_names: dict[str, str] = Field(description="channel index (as string) -> modality name")
    labels: dict[str, int | list[int]] = Field(description="label name -> integer value(s)")
    file_ending: str = Field(default=".nii.gz")
    numTraining: int | None = None
    name: str | None = None
    regions_class_order: list[int] | None = Field(
        default=None, description="region-based labels: the label value each region's mask "
        "writes, in order (later regions overwrite earlier ones), as nnU-Net")

    @field_validator("channel_names")
    @classmethod
    def _channels_are_0_to_n(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("must name at least one channel, e.g. {\"0\": \"CT\"}")
        keys = sorted(v, key=lambda k: int(k) if k.isdigit() else -1)
        if keys != [str(i) for i in range(len(v))]:
            raise ValueError(f"keys must be 0..{len(v) - 1} as strings, got {sorted(v)}")
        return v

    @field_validator("labels")
    @classmethod
    def _labels_have_background(cls, v: dict[str, int | list[int]]) -> dict[str, int | list[int]]:
        if "background" not in v or v["background"] != 0:
            raise ValueError('must contain "background": 0')
        if len(v) < 2:
            raise ValueError("must declare at least one foreground label")
        return v

    @model_validator(mode="after")
    def _regions_have_an_order(self) -> DatasetJson:
        regions = [k for k, v in self.labels.items() if isinstance(v, list) and k != "background"]
        if regions and self.regions_class_order is None:
            raise ValueError(
                f"labels {regions} are regions (lists of values), so 'regions_class_order' "
                "is required (the value each region writes, in order), as in nnU-Net"
            )
        n_fg = len([k for k in self.labels if k not in ("background", "ignore")])
        if self.regions_class_order is not None and len(self.regions_class_order) != n_fg:
            raise ValueError(
                f"regions_class_order has {len(self.regions_class_order)} entries but labels "
                f"declare {n_fg} foreground regions; give one value per region"
            )
        if "ignore" in self.labels:
            ign = self.labels["ignore"]
            others = {v for k, val in self.labels.items() if k != "ignore"
                      for v in (val if isinstance(val, list) else [val])}
            if isinstance(ign, list) or ign <= max(others):
                raise ValueError(
                    f"'ignore' = {ign}: must be one integer above every other label value "
                    f"(max {max(others)}), as nnU-Net requires"
                )
        return self

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> list[int]:
        """Sorted integer label values declared (regions expanded), background included."""
        out: set[int] = set()
        for val in self.labels.values():
            out.update(val if isinstance(val, list) else [val])
        return sorted(out)

    @property
    def num_classes(self) -> int:
        """Number of output classes of a network (background included)."""
        return len(self.label_values)
