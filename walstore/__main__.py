"""`python -m walstore`: the same command as the `walstore` console script."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
