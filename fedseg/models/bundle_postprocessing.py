"""A bundle's postprocessing decision: read it, write it into an existing bundle, and say which
decision ``fedseg predict -m ...`` applies.

Where it lives: the optional field ``postprocessing`` of the bundle's ``bundle.json`` (a single
model's :class:`~fedseg.models.bundle_files.BundleInfo` or an ensemble's
:class:`~fedseg.models.ensemble.EnsembleInfo`). Absent means "never decided" (old bundles read
as before); ``{"keep_largest": []}`` means "decided: nothing to remove". A field rather than a
file of its own because ``bundle.json`` already travels with every bundle copy (the members of
an ensemble keep their own decision in their folder), and one atomic rename updates it.

Which decision applies (nnU-Net decides postprocessing for the predictor it was measured on):

* ``-m BUNDLE`` (one model): that bundle's decision;
* ``-m ENSEMBLE`` (one ensemble bundle): the ensemble's decision; its members' own decisions
  were measured on each member alone and never apply;
* ``-m A -m B ...`` (an ensemble put together on the command line): no decision — nobody has
  measured one for that combination. Build it with ``fedseg ensemble`` and decide with
  ``fedseg postprocess`` to have one.

Torch-free (the server writes the federated decision into the job's bundle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from fedseg.data.dataset_json import DatasetJson
from fedseg.errors import FedsegError, first_error
from fedseg.models.bundle_files import (
    BundleInfo,
    bundle_kind,
    check_bundle_folder,
    check_postprocessing_labels,
)
from fedseg.training.postprocess import Postprocessing

FIELD = "postprocessing"


def _bundle_json(model_dir: str | Path) -> Path:
    d = Path(model_dir)
    if bundle_kind(d) == "single":
        check_bundle_folder(d)  # one line if it is no bundle at all
    return d / "bundle.json"


def read_postprocessing(model_dir: str | Path) -> Postprocessing | None:
    """The decision recorded in a single or ensemble bundle, or None if none was made."""
    path = _bundle_json(model_dir)
    if bundle_kind(model_dir) == "ensemble":
        from fedseg.config_io import load_json_model
        from fedseg.models.ensemble import EnsembleInfo

        return load_json_model(path, EnsembleInfo, "missing").postprocessing
    try:
        return BundleInfo.model_validate_json(path.read_text()).postprocessing
    except ValidationError as err:
        field, msg = first_error(err)
        raise FedsegError(f"{path}: field '{field}': {msg}; re-export the bundle") from None


def _labels(model_dir: Path) -> dict[str, int | list[int]]:
    """The bundle's labels (an ensemble's members share them)."""
    if bundle_kind(model_dir) == "ensemble":
        from fedseg.models.ensemble import read_ensemble

        return dict(read_ensemble(model_dir)[1][0].dataset.labels)
    return dict(DatasetJson.model_validate_json((model_dir / "dataset.json").read_text()).labels)


def write_postprocessing(model_dir: str | Path, pp: Postprocessing | None) -> Path:
    """Record ``pp`` (None: remove the decision) in the bundle's ``bundle.json``, atomically
    (written beside it, then renamed), keeping every other field as it was; returns the file.
    Label values the bundle does not predict are refused with one line."""
    d = Path(model_dir)
    path = _bundle_json(d)
    raw = json.loads(path.read_text())
    if pp is None:
        raw.pop(FIELD, None)
    else:
        check_postprocessing_labels(pp, _labels(d), path)
        raw[FIELD] = pp.model_dump()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(raw, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def decision_for(models: Sequence[str | Path]) -> tuple[Postprocessing | None, str]:
    """The decision ``fedseg predict -m MODELS`` applies (see the module docstring) and one
    line saying what is done with it, for the log."""
    if len(models) == 1:
        pp = read_postprocessing(models[0])
        if pp is None:
            return None, "postprocessing: none decided for this bundle"
        return pp, f"postprocessing: {describe(pp)} (the bundle's decision)"
    decided = [str(m) for m in models if read_postprocessing(m) is not None]
    if decided:
        return None, ("postprocessing: not applied; the decisions of "
                      f"{', '.join(decided)} were made for each bundle alone, not for this "
                      "combination ('fedseg ensemble' + 'fedseg postprocess' decide one)")
    return None, "postprocessing: none decided for these bundles"


def describe(pp: Postprocessing) -> str:
    if not pp.keep_largest:
        return "nothing removed"
    return "keep the largest component of " + ", then ".join(
        "labels " + "+".join(str(v) for v in vals) for vals in pp.keep_largest)
