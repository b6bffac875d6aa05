"""Server side of the federated fingerprint: from the SUM of the sites' vectors to the plan.

The sites each send ``Fingerprint.to_vector()`` — fixed-grid histograms and sums that add — and
the server sees only their sum (secure aggregation makes sure of that). Rebuilding the pooled
fingerprint needs only the channel names (the grids are fixed by modality), so the plan is
exactly the one nnU-Net would make on the pooled data, to the bin width.
"""

from __future__ import annotations

import numpy as np

from fedseg.data.dataset_json import DatasetJson
from fedseg.planning.fingerprint import Fingerprint
from fedseg.planning.plan import Plan
from fedseg.planning.presets import Preset, plan_with_preset


def plan_from_fingerprint_sum(
    total: np.ndarray,
    ds: DatasetJson,
    gpu_memory_gb: float,
    dataset_name: str,
    preset: Preset = "nnunet",
) -> Plan:
    fp = Fingerprint.from_vector(np.asarray(total), Fingerprint.empty(ds.channel_names))
    return plan_with_preset(fp, ds, gpu_memory_gb, dataset_name, preset)
