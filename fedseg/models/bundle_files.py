"""What a model bundle folder holds, checkable without torch.

Why a module of its own: ``fedseg predict`` must answer a wrong ``--model`` path at once, not
after the ~20 s that importing torch and MONAI can take on a busy machine; :mod:`bundle` (which
reads the weights) needs torch, this does not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, Field

from fedseg import __version__
from fedseg.data.labels import label_groups
from fedseg.errors import FedsegError
from fedseg.training.postprocess import Postprocessing

BUNDLE_FILES = ("plan.json", "dataset.json", "model.pt", "bundle.json")


class BundleInfo(BaseModel):
    """``bundle.json`` of a single-model bundle (here, not in :mod:`bundle`, so that the
    ensemble builder can read it without torch)."""

    config: str | None = None  # None: the plan's default configuration
    fedseg_version: str = __version__
    trained_iterations: int = 0
    note: str = ""
    postprocessing: Postprocessing | None = Field(
        default=None, description="largest-component postprocessing decided for this model "
        "and applied by 'fedseg predict' (absent: none decided; fedseg.models."
        "bundle_postprocessing)")


def bundle_kind(model_dir: str | Path) -> str:
    """``"ensemble"`` when ``model_dir/bundle.json`` says so (:mod:`fedseg.models.ensemble`),
    else ``"single"`` (also for a folder that is no bundle at all: the caller's check says why)."""
    p = Path(model_dir) / "bundle.json"
    try:
        raw = json.loads(p.read_text())
    except (OSError, ValueError):
        return "single"
    return "ensemble" if isinstance(raw, dict) and raw.get("kind") == "ensemble" else "single"


def check_bundle_folder(model_dir: str | Path) -> Path:
    """``model_dir`` as a Path if it holds every bundle file, else one clear error line."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FedsegError(f"{d}: no such folder; give a fedseg model bundle folder "
                          "(made by 'fedseg train' or a federated run)")
    if bundle_kind(d) == "ensemble":
        raise FedsegError(
            f"{d}: an ensemble bundle (several models), not a single model; give one of its "
            f"members ({d / 'members'}/NAME) here, or use it with 'fedseg predict'"
        )
    for name in BUNDLE_FILES:
        if not (d / name).is_file():
            raise FedsegError(
                f"{d / name}: missing; {d} is not a fedseg model bundle "
                "(made by 'fedseg train' or a federated run)"
            )
    return d


def check_postprocessing_labels(pp: Postprocessing, labels: Mapping[str, int | list[int]],
                                where: str | Path) -> None:
    """One line naming ``where`` if ``pp`` keeps components of label values that a label map
    of these ``labels`` never holds (a decision made for another model)."""
    known = {v for vals in label_groups(labels).values() for v in vals}
    bad = sorted({v for vals in pp.keep_largest for v in vals} - known)
    if bad or any(not vals for vals in pp.keep_largest):
        raise FedsegError(
            f"{where}: postprocessing label value(s) {bad or '[] (an empty set)'} are not "
            f"foreground labels of this bundle ({sorted(known)})")


def info_json(info: BaseModel) -> str:
    """``bundle.json`` text of a :class:`BundleInfo` or ensemble info: without the
    ``postprocessing`` key while none is decided, so an undecided bundle is written exactly as
    before the field existed (readable by those fedseg versions: the ensemble's schema there
    forbids unknown fields)."""
    skip = {"postprocessing"} if getattr(info, "postprocessing", None) is None else None
    return info.model_dump_json(indent=2, exclude=skip) + "\n"
