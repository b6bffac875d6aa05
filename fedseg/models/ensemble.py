"""An ensemble bundle: several model bundles that ``fedseg predict`` averages, as nnU-Net
predicts with its cross-validation folds and ensembles configurations.

Layout::

    ENSEMBLE_DIR/bundle.json            {"kind": "ensemble", "members": [...], ...}
    ENSEMBLE_DIR/members/NAME/          one ordinary bundle per member (plan.json,
                                        dataset.json, model.pt, bundle.json)

Members may have different plans and configurations (``2d`` beside ``3d_fullres``, folds of
one plan, models of different federations): each preprocesses with its own plan and the
probabilities are averaged in the original image space (``fedseg.training.ensemble_predict``).
Every member has a weight (default 1: a plain mean); an ensemble given as one of the inputs
weighs as ONE model, its members sharing that weight. So ``fedseg predict -m ENS_2D -m ENS_3D``
(or an ensemble built from those two) is nnU-Net's mean of the two configurations, each
itself the mean of its folds (``nnUNetv2_ensemble`` of two prediction folders), whatever the
number of folds in each.

What members must share is what makes their probabilities comparable voxel by voxel: the
labels (and so the output channels), the regions and ``regions_class_order``, the input
channels and the file ending. That is checked when the ensemble is built AND when it is read, with one
error line naming the member that differs.

Torch-free on purpose: the server (which never imports torch at module level) builds the
ensemble of a federated cross-validation from the fold bundles it wrote, with
:func:`build_ensemble`; ``fedseg predict`` checks a wrong ``--model`` before importing torch.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedseg import __version__
from fedseg.config_io import load_json_model
from fedseg.data.dataset_json import DatasetJson
from fedseg.errors import FedsegError
from fedseg.models.bundle_files import (
    BUNDLE_FILES,
    BundleInfo,
    bundle_kind,
    check_bundle_folder,
    check_postprocessing_labels,
    info_json,
)
from fedseg.planning.plan import Plan
from fedseg.training.postprocess import Postprocessing

MEMBERS_DIR = "members"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class EnsembleMember(BaseModel):
    """One member as ``bundle.json`` records it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="its folder: ENSEMBLE_DIR/members/NAME")
    config: str = Field(description="the plan configuration it predicts with")
    plan_hash: str = Field(description="its plan.json's hash when the ensemble was built")
    source: str = Field(default="", description="the bundle it was copied from")
    weight: float = Field(default=1.0, gt=0, description="its share of the average (relative "
                          "to the other members'; see the module docstring)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"'{v}': a member name is one folder name (letters, digits, _ . -)")
        return v


class EnsembleInfo(BaseModel):
    """``bundle.json`` of an ensemble bundle."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["ensemble"] = "ensemble"
    members: list[EnsembleMember] = Field(min_length=1)
    fedseg_version: str = __version__
    note: str = ""
    postprocessing: Postprocessing | None = Field(
        default=None, description="largest-component postprocessing decided for the "
        "ensemble's averaged prediction (its members' own decisions never apply to it; "
        "fedseg.models.bundle_postprocessing)")

    @field_validator("members")
    @classmethod
    def _unique(cls, v: list[EnsembleMember]) -> list[EnsembleMember]:
        names = [m.name for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"member name(s) {dup} given more than once")
        return v


@dataclass(frozen=True)
class Member:
    """A member bundle, its declarations read (no weights: those need torch)."""

    name: str  # for log lines: "ENSEMBLE/members/NAME" or the bundle folder
    folder: Path
    plan: Plan
    dataset: DatasetJson
    config: str
    weight: float = 1.0  # its share of the average, relative to the other members'


def read_member(folder: str | Path, name: str | None = None, weight: float = 1.0) -> Member:
    """One single bundle's plan, dataset.json and configuration; one line if any is wrong."""
    d = check_bundle_folder(folder)
    plan = Plan.load(d / "plan.json")
    ds = load_json_model(d / "dataset.json", DatasetJson, "missing")
    info = load_json_model(d / "bundle.json", BundleInfo, "missing")
    config = info.config or plan.default_configuration
    if config not in plan.configurations:
        raise FedsegError(f"{d / 'bundle.json'}: field 'config' '{config}' is not a "
                          f"configuration of its plan.json ({', '.join(plan.configurations)})")
    if dict(ds.labels) != dict(plan.labels) or len(ds.channel_names) != len(plan.channel_names):
        raise FedsegError(f"{d}: dataset.json and plan.json declare different labels or "
                          "channels; the bundle is inconsistent, re-export it")
    return Member(name or str(d), d, plan, ds, config, weight)


def _declarations(m: Member) -> dict[str, object]:
    """What members must share. Labels as an ordered list: for regions the order of the
    foreground entries IS the order of the network's sigmoid outputs."""
    return {
        "labels": list(m.dataset.labels.items()) if m.dataset.regions_class_order
        else sorted(m.dataset.labels.items()),
        "regions_class_order": m.dataset.regions_class_order,
        "channel_names": dict(m.dataset.channel_names),
        "file_ending": m.dataset.file_ending,
    }


def _show(field: str, value: object) -> object:
    return dict(value) if field == "labels" else value  # type: ignore[call-overload]


def check_compatible(members: Sequence[Member]) -> None:
    """All members predict the same outputs from the same inputs, else one line naming the
    first member that differs from the first one, the field and both values."""
    if not members:
        raise FedsegError("an ensemble needs at least one member bundle")
    ref = _declarations(members[0])
    for m in members[1:]:
        ours = _declarations(m)
        for field, want in ref.items():
            if ours[field] != want:
                raise FedsegError(
                    f"{m.name}: dataset.json field '{field}' {_show(field, ours[field])!r} "
                    f"differs from {members[0].name}'s {_show(field, want)!r}; an ensemble's "
                    "members must share labels, regions order, channels and file ending"
                )


def read_ensemble(folder: str | Path) -> tuple[EnsembleInfo, list[Member]]:
    """An ensemble bundle's manifest and members (checked: present, unchanged plans,
    compatible), the members' weights scaled to sum to 1 (the ensemble weighs as one model
    beside others)."""
    d = Path(folder)
    info = load_json_model(d / "bundle.json", EnsembleInfo, "missing")
    total = sum(rec.weight for rec in info.members)
    members = []
    for rec in info.members:
        m = read_member(d / MEMBERS_DIR / rec.name, name=str(d / MEMBERS_DIR / rec.name),
                        weight=rec.weight / total)
        if m.plan.hash() != rec.plan_hash or m.config != rec.config:
            raise FedsegError(
                f"{m.folder}: its plan/configuration ({m.plan.hash()}, {m.config}) is not the "
                f"one {d / 'bundle.json'} records ({rec.plan_hash}, {rec.config}); the member "
                "was changed after the ensemble was built, re-build it with 'fedseg ensemble'"
            )
        members.append(m)
    check_compatible(members)
    return info, members


def resolve_models(folders: Sequence[str | Path]) -> list[Member]:
    """The members behind ``fedseg predict -m A [-m B ...]``: a single bundle is one member,
    an ensemble bundle all of its members, sharing one model's weight; all of them checked
    compatible. Torch-free, so a wrong path is answered before torch loads."""
    members: list[Member] = []
    for f in folders:
        if bundle_kind(f) == "ensemble":
            members.extend(read_ensemble(f)[1])
        else:
            members.append(read_member(f))
    check_compatible(members)
    return members


def build_ensemble(
    bundles: Sequence[str | Path] | Mapping[str, str | Path],
    out_dir: str | Path,
    note: str = "",
    postprocessing: Postprocessing | None = None,
) -> Path:
    """Write an ensemble bundle of ``bundles`` to ``out_dir``; returns ``out_dir``.

    ``bundles``: bundle folders (members named ``member_0``, ``member_1``, ... in order) or a
    mapping member name -> folder (e.g. ``{"fold_0": ..., "fold_1": ...}`` from a federated
    cross-validation). An ensemble among them contributes each of its members (named
    ``NAME_MEMBER``), together weighing as one bundle: ``fedseg ensemble ENS_2D ENS_3D``
    averages the two configurations' fold means, as nnU-Net does. Only the four bundle files
    are copied (no training checkpoint). The members are checked compatible BEFORE anything
    is written, and the ensemble appears at ``out_dir`` only when complete (built beside it,
    then renamed). ``out_dir`` must not exist or be empty.

    ``postprocessing``: the decision for the ensemble, if already made (else later, with
    :func:`fedseg.models.bundle_postprocessing.write_postprocessing`). The members' and any
    inner ensemble's decisions are not carried over: they were measured on other predictions
    (each member keeps its own in its ``bundle.json``, which ``fedseg predict`` ignores there).
    """
    named = (list(bundles.items()) if isinstance(bundles, Mapping)
             else [(f"member_{i}", b) for i, b in enumerate(bundles)])
    flat: list[tuple[str, Member]] = []
    for name, folder in named:
        if bundle_kind(folder) == "ensemble":
            _, inner = read_ensemble(folder)
            flat.extend((f"{name}_{m.folder.name}", m) for m in inner)  # weights sum to 1
        else:
            flat.append((name, read_member(folder)))
    check_compatible([m for _, m in flat])
    if postprocessing is not None:
        check_postprocessing_labels(postprocessing, flat[0][1].dataset.labels, out_dir)
    info = EnsembleInfo(
        members=[EnsembleMember(name=n, config=m.config, plan_hash=m.plan.hash(),
                                source=str(m.folder), weight=m.weight) for n, m in flat],
        note=note, postprocessing=postprocessing,
    )  # names validated before any copy

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedsegError(f"{out}: exists and is not an empty folder; choose a new --out")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for n, m in flat:
            dst = tmp / MEMBERS_DIR / n
            dst.mkdir(parents=True)
            for f in BUNDLE_FILES:
                shutil.copy2(m.folder / f, dst / f)
        (tmp / "bundle.json").write_text(info_json(info))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FedsegError(f"{out}: cannot write the ensemble bundle ({err})") from None
    return out
