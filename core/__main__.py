"""``python -m core ...`` from the repository root: see :mod:`core.cli`."""

import sys

from .cli import main

sys.exit(main())
