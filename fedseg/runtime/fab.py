"""The Flower app folder that ``flwr run`` packs into a FAB.

Flower ships an app as a FAB of .py/.toml/.md files (≤10 MB). fedseg's code is installed at the
server and every site (the same pinned version), so the FAB only names the installed
ServerApp/ClientApp and declares the one run-config key. Written fresh per job, byte-for-byte
deterministic, so its hash (and later its signature) is stable for a given fedseg version.
"""

from __future__ import annotations

from pathlib import Path

from fedseg import __version__

PYPROJECT = f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedseg-job"
version = "{__version__}"
description = "fedseg federated segmentation job"
dependencies = []

[tool.flwr.app]
publisher = "fedseg"

[tool.flwr.app.components]
serverapp = "fedseg.server.app:app"
clientapp = "fedseg.client.app:app"

[tool.flwr.app.config]
job-config = ""
'''


def write_app_dir(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pyproject.toml").write_text(PYPROJECT)
    (dest / "README.md").write_text(
        "fedseg job: the ServerApp/ClientApp are the installed fedseg package's.\n"
    )
    return dest
