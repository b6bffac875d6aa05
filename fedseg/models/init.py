"""``python -m fedseg.models.init PLAN OUT.npz [--seed S]``: the untrained network's weights.

The server runs this in a subprocess once per job, so its own long-running process never
imports torch or MONAI (see ``fedseg.server.phases.initial_model``). Same seed -> same weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedseg.models.init", description=__doc__.splitlines()[0])
    ap.add_argument("plan", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    from fedseg.models.network import build_network, weights_of
    from fedseg.planning.plan import Plan

    torch.manual_seed(args.seed)
    net = build_network(Plan.load(args.plan))
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in weights_of(net).items()}
    tmp = args.out.with_name(args.out.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **state)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
