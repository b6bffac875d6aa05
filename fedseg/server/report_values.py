"""What every part of the run report reads metric records with: the pooled row's name and
:func:`num`. A module of its own so that the report's readers (``report_data``,
``report_cv_data``) share it without importing each other."""

from __future__ import annotations

import math
from typing import Any

POOLED = "pooled"


def num(v: Any) -> float:
    """A metric value as float; None (JSON null) and non-numbers read as NaN (missing)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return math.nan
    return float(v)
