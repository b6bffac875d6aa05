"""fedseg: federated nnU-Net-style 3D segmentation on Flower."""

import os as _os

__version__ = "0.1.0"

# OpenMP threads that SLEEP while they wait, unless the user chose otherwise. Set here, before
# anything of fedseg imports torch (libgomp reads it once, at load), and inherited by every
# process fedseg starts. Why: by default libgomp's threads spin at each barrier; on a machine
# whose cores are busy with other work (a shared hospital server, CI) a spinning thread holds a
# core its sibling needs, and a CPU training step of the tiny 2D network measured 1.7-2.4 s
# instead of 0.31-0.36 s with PASSIVE, at load ~4 on 2 cores (BENCHMARKS.md, "CPU threads").
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
