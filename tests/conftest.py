"""Test-session settings that must hold before any test module imports torch.

``OMP_WAIT_POLICY=PASSIVE``: what ``fedseg/__init__`` sets for every fedseg process, also for
this pytest process, whose test modules may import torch before fedseg (libgomp reads the
variable once, when torch loads). On a busy CI box spinning OpenMP threads made CPU training
steps 5-7x slower (BENCHMARKS.md, "CPU threads").
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
