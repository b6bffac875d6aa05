"""The site's fixed split of its training cases into training and validation ids.

Why a module of its own: enrolment, training and evaluation (``client/app.py``) and the secure
fingerprint's case count (``client/secure.py``) must all see the same split, and neither of
those modules may import the other.
"""

from __future__ import annotations

from pathlib import Path


def train_val_ids(data_dir: Path, fold: int = 0, folds: int = 1) -> tuple[list[str], list[str]]:
    """(training ids, validation ids) of the nnU-Net raw dataset in ``data_dir``: the fixed
    1-in-5 hold-out of a one-model job (``folds`` 1), or fold ``fold`` of a ``folds``-fold
    cross-validation (``fedseg/data/splits.py``)."""
    # imported here: the data layer is not needed to import the ClientApp (its start-up time)
    from fedseg.data.dataset import list_cases, read_dataset_json
    from fedseg.data.splits import fold_split

    ds = read_dataset_json(data_dir)
    ids = [c.case_id for c in list_cases(data_dir, ds, "Tr")]
    return fold_split(ids, fold, folds)
