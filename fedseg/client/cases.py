"""The site's fixed split of its training cases into training and validation ids.

Why a module of its own: enrolment, training and evaluation (``client/app.py``) and the secure
fingerprint's case count (``client/secure.py``) must all see the same split, and neither of
those modules may import the other.
"""

from __future__ import annotations

from pathlib import Path


def train_val_ids(data_dir: Path) -> tuple[list[str], list[str]]:
    """(training ids, validation ids) of the nnU-Net raw dataset in ``data_dir``."""
    # imported here: the data layer is not needed to import the ClientApp (its start-up time)
    from fedseg.data.dataset import list_cases, read_dataset_json
    from fedseg.data.splits import split_cases

    ds = read_dataset_json(data_dir)
    ids = [c.case_id for c in list_cases(data_dir, ds, "Tr")]
    return split_cases(ids)
