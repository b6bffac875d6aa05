"""What a model bundle folder holds, checkable without torch.

Why a module of its own: ``fedseg predict`` must answer a wrong ``--model`` path at once, not
after the ~20 s that importing torch and MONAI can take on a busy machine; :mod:`bundle` (which
reads the weights) needs torch, this does not.
"""

from __future__ import annotations

from pathlib import Path

from fedseg.errors import FedsegError

BUNDLE_FILES = ("plan.json", "dataset.json", "model.pt", "bundle.json")


def check_bundle_folder(model_dir: str | Path) -> Path:
    """``model_dir`` as a Path if it holds every bundle file, else one clear error line."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FedsegError(f"{d}: no such folder; give a fedseg model bundle folder "
                          "(made by 'fedseg train' or a federated run)")
    for name in BUNDLE_FILES:
        if not (d / name).is_file():
            raise FedsegError(
                f"{d / name}: missing; {d} is not a fedseg model bundle "
                "(made by 'fedseg train' or a federated run)"
            )
    return d
