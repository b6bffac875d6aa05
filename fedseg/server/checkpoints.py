"""The job's checkpoint ``last``, written in the background while the next round runs.

Why a thread: the next round's messages go out while the file (the model plus the server
optimiser's moments, fsync'ed) is written. The write is atomic (``RunDir.save_checkpoint``), so
a crash meanwhile leaves the previous round's checkpoint (resume repeats one round). The job
replaces its weights dict with every step, never mutates it, so the thread writes a consistent
snapshot.
"""

from __future__ import annotations

import threading
from typing import Any

from fedseg.errors import FedsegError
from fedseg.server.rundir import RunDir, snapshot_name


class Checkpointer:
    def __init__(self, run: RunDir) -> None:
        self.run = run
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None

    def write(self, state: dict[str, Any], snapshot: bool = False) -> None:
        """Start writing ``state`` as ``last`` (after the previous write finished); with
        ``snapshot`` it is also kept as the round's snapshot."""
        self.wait()

        def write() -> None:
            try:
                self.run.save_checkpoint("last", state)
                if snapshot:  # kept for learning curves: bench/quality.py, bundle_from_checkpoint
                    self.run.copy_checkpoint("last", snapshot_name(int(state["round"])))
            except Exception as err:  # reported by wait(), in the job's thread
                self._error = err

        self._thread = threading.Thread(target=write, name="checkpoint")
        self._thread.start()

    def wait(self) -> None:
        """Until the last checkpoint is on disk; a failed write stops the job here."""
        t, self._thread = self._thread, None
        if t is not None:
            t.join()
        err, self._error = self._error, None
        if err is not None:
            raise FedsegError(f"could not write {self.run.checkpoint_path('last')}: {err}")
