"""``fedseg-server``: the federation server's command line.

The federated job (issue: federation) is not built yet; until it lands this entry point says so
clearly instead of failing obscurely, so that the console script already exists for packaging.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print(
        "fedseg-server: the federated server is not available in this version yet; "
        "use 'fedseg train' for single-site training.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
