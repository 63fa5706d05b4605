"""``python -m cg_fast``: the same program as the ``cg-fast`` command (cg_fast.cli)."""
import sys

from .cli import main

sys.exit(main())
