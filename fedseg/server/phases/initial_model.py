"""The untrained network's weights for the plan, the job's global model before round 1.

Why a subprocess (``python -m fedseg.models.init``): so the ServerApp never imports torch/MONAI,
~300 MB less server memory for the whole run. Same seed -> same weights.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from fedseg.errors import FedsegError
from fedseg.planning.plan import Plan
from fedseg.server.aggregate import State


def initial_weights(plan: Plan, seed: int) -> State:
    with tempfile.TemporaryDirectory(prefix="fedseg-init-") as tmp:
        plan_path, out = Path(tmp) / "plan.json", Path(tmp) / "weights.npz"
        plan.save(plan_path)
        res = subprocess.run(
            [sys.executable, "-m", "fedseg.models.init", str(plan_path), str(out),
             "--seed", str(seed)],
            capture_output=True, text=True, timeout=1800,
        )
        if res.returncode != 0:
            raise FedsegError("could not build the initial network: "
                              + (res.stderr.strip().splitlines() or ["?"])[-1])
        with np.load(out, allow_pickle=False) as z:
            return {k: z[k].astype(np.float32) for k in z.files}
