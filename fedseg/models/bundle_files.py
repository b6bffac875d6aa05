"""What a model bundle folder holds, checkable without torch.

Why a module of its own: ``fedseg predict`` must answer a wrong ``--model`` path at once, not
after the ~20 s that importing torch and MONAI can take on a busy machine; :mod:`bundle` (which
reads the weights) needs torch, this does not.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from fedseg import __version__
from fedseg.errors import FedsegError

BUNDLE_FILES = ("plan.json", "dataset.json", "model.pt", "bundle.json")


class BundleInfo(BaseModel):
    """``bundle.json`` of a single-model bundle (here, not in :mod:`bundle`, so that the
    ensemble builder can read it without torch)."""

    config: str | None = None  # None: the plan's default configuration
    fedseg_version: str = __version__
    trained_iterations: int = 0
    note: str = ""


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
