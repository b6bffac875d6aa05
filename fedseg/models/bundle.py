"""A model bundle: the self-contained folder ``fedseg predict`` needs.

``MODEL_DIR/plan.json`` (the plan), ``MODEL_DIR/dataset.json`` (labels, channels, file ending),
``MODEL_DIR/model.pt`` (the network's state_dict only: safe to load with ``weights_only=True``)
and ``MODEL_DIR/bundle.json`` (which configuration, fedseg version, provenance). Weights live in
a separate file from the training checkpoint so that a bundle can be shipped without optimiser
state or site data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fedseg.data.dataset_json import DatasetJson
from fedseg.errors import FedsegError
from fedseg.models.bundle_files import BundleInfo, check_bundle_folder, info_json
from fedseg.planning.plan import Plan

__all__ = ["BundleInfo", "bundle_from_checkpoint", "load_bundle", "save_bundle"]


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_bundle(
    model_dir: str | Path,
    plan: Plan,
    dataset_json: DatasetJson,
    state_dict: dict[str, torch.Tensor],
    info: BundleInfo,
) -> Path:
    """Write (atomically, file by file) a bundle; returns its folder."""
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    plan.save(d / "plan.json")
    (d / "dataset.json").write_text(
        json.dumps(dataset_json.model_dump(mode="json", exclude_none=True), indent=2) + "\n"
    )
    cpu = {k: v.detach().cpu() for k, v in state_dict.items()}
    _atomic_write_bytes(d / "model.pt", lambda p: torch.save(cpu, p))
    (d / "bundle.json").write_text(info_json(info))
    return d


def load_bundle(
    model_dir: str | Path,
) -> tuple[Plan, DatasetJson, dict[str, Any], BundleInfo]:
    """Read a bundle; one clear error line if anything is missing."""
    d = check_bundle_folder(model_dir)
    plan = Plan.load(d / "plan.json")
    ds = DatasetJson.model_validate_json((d / "dataset.json").read_text())
    info = BundleInfo.model_validate_json((d / "bundle.json").read_text())
    state = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
    return plan, ds, state, info


def bundle_from_checkpoint(run_dir: str | Path, which: str, model_dir: str | Path) -> Path:
    """A bundle of a federated run's checkpoint ``which`` (``last``, ``best``, ``round_0005``):
    the run's ``plan.json`` and the checkpoint's global weights (the server keeps checkpoints
    as torch-free ``.npz``; ``fedseg predict`` wants a bundle)."""
    from fedseg.server.rundir import RunDir

    run = RunDir(run_dir)
    ck = run.load_checkpoint(which)
    if ck is None:
        raise FedsegError(f"{run.checkpoint_path(which)}: missing; no such checkpoint in {run_dir}")
    plan = Plan.load(run.plan_path)
    ds = plan.dataset_json()
    state = {k: torch.from_numpy(v) for k, v in ck["weights"].items()}
    return save_bundle(model_dir, plan, ds, state, BundleInfo(
        trained_iterations=0, note=f"checkpoint {which} of {run_dir} (round {ck['round']})"))
