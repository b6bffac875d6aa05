"""Large uint32 work buffers reused from one aggregation to the next.

Why: a masked vector is the size of the model (120 MB at 30M parameters), and every round a
site builds one and the server sums five of them into another. A fresh array of that size is
paid in page faults the first time it is written (measured on the 2-core development VM: about
0.3 s of CPU per 120 MB, more than quantising and masking it), and glibc hands such arrays back
to the kernel on ``free``, so a fresh one is faulted in again every round. Keeping one buffer
per length between rounds makes that a one-off.

The rule that keeps it safe: a buffer is in exactly one place at a time — taken, used, given
back when nothing reads it any more. A caller that cannot be sure (the vector may still be
referenced, e.g. inside a Flower message) simply does not give it back; the next ``take`` then
allocates a fresh one, which is what happened before this pool existed.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["BufferPool"]


class BufferPool:
    """At most ``keep`` idle uint32 buffers (of any lengths), thread-safe."""

    def __init__(self, keep: int = 2) -> None:
        self._idle: list[np.ndarray] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, length: int) -> np.ndarray:
        """A uint32 array of ``length`` elements, contents undefined (a reused one if idle)."""
        with self._lock:
            for i, buf in enumerate(self._idle):
                if buf.shape[0] == length:
                    return self._idle.pop(i)
        return np.empty(length, dtype=np.uint32)

    def give(self, buf: np.ndarray | None) -> None:
        """``buf`` (from :meth:`take`) is no longer read or written by anyone."""
        if buf is None or buf.dtype != np.uint32 or buf.ndim != 1 or buf.base is not None:
            return  # only whole arrays we handed out: a view would keep its base alive anyway
        with self._lock:
            if any(b is buf for b in self._idle):
                return
            self._idle.append(buf)
            del self._idle[:-self._keep]

    def __len__(self) -> int:
        return len(self._idle)
