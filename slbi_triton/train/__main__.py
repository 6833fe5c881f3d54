"""``python -m slbi_triton.train``: the ``slbi-train`` command."""

import sys

from .cli import main

sys.exit(main())
