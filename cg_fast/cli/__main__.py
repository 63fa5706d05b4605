"""``python -m cg_fast.cli``: the same program as ``cg-fast``."""
import sys

from . import main

sys.exit(main())
